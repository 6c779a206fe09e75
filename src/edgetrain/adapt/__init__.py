"""On-device adaptation: the online (batch-1) trainer, its update rules and the quantized network.

docs/adaptation.md. ``quantize_for_adaptation`` turns a float model into a fixed-point
:class:`QNet` (the LRT paper's formats by default); :class:`OnlineTrainer` streams a scenario
through it with one of the rules of :mod:`edgetrain.adapt.rules`, weights held in ``NVMArray``s.
"""

from edgetrain.adapt.checkpoint import CheckpointError
from edgetrain.adapt.device import DeviceNet
from edgetrain.adapt.qnet import PAPER_FORMATS, Grid, LayerFormats, QNet, quantize_for_adaptation
from edgetrain.adapt.rules import (
    RULES,
    SGD,
    BiasOnly,
    InferenceOnly,
    LowRank,
    MinibatchSGD,
    UpdateRule,
    make_rule,
)
from edgetrain.adapt.trainer import OnlineTrainer

__all__ = [
    "PAPER_FORMATS",
    "RULES",
    "SGD",
    "BiasOnly",
    "CheckpointError",
    "DeviceNet",
    "Grid",
    "InferenceOnly",
    "LayerFormats",
    "LowRank",
    "MinibatchSGD",
    "OnlineTrainer",
    "QNet",
    "UpdateRule",
    "make_rule",
    "quantize_for_adaptation",
]
