"""Simulated NVM weight memory: codes, write counters, energy, endurance, drift, stuck-at faults."""

from edgetrain.nvm.array import EnergyModel, NVMArray
from edgetrain.nvm.drift import DRIFT_KINDS, DriftSpec

__all__ = ["DRIFT_KINDS", "DriftSpec", "EnergyModel", "NVMArray"]
