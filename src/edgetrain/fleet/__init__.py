"""A fleet of devices adapting together: federated low-rank adaptation on Flower (docs/fleet.md).

N simulated devices, each with its own NVM, drift realisation and non-IID stream, adapt online; every
round each sends its pending low-rank factors (or, for the FedAvg baselines, its weight delta) to a
Flower ServerApp, which merges them (:func:`merge_lowrank`: the best rank-r approximation of the mean
of the devices' rank-r products) and broadcasts one update every device writes as an NVM update event.
:func:`run_fleet` runs the strategies side by side on Flower's simulation or deployment engine;
:func:`write_report` plots the result.
"""

from edgetrain.fleet.config import FAULT_KINDS, STRATEGIES, Fault, FleetConfig
from edgetrain.fleet.engine import run_fleet
from edgetrain.fleet.merge import check_update, mean_delta, merge_lowrank
from edgetrain.fleet.report import write_report

__all__ = [
    "FAULT_KINDS",
    "STRATEGIES",
    "Fault",
    "FleetConfig",
    "check_update",
    "mean_delta",
    "merge_lowrank",
    "run_fleet",
    "write_report",
]
