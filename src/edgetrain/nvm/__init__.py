"""Simulated NVM weight memory: codes, write counters, energy, endurance, drift, stuck-at faults."""

from edgetrain.nvm.array import STUCK_MODELS, WRITE_MODELS, EnergyModel, NVMArray
from edgetrain.nvm.drift import DRIFT_KINDS, FLIP_DRAWS, DriftSpec

__all__ = ["DRIFT_KINDS", "FLIP_DRAWS", "STUCK_MODELS", "WRITE_MODELS", "DriftSpec", "EnergyModel", "NVMArray"]
