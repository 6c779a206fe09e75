"""On-device adaptation: the online (batch-1) trainer, its update rules and the quantized network.

docs/device.md, docs/adaptation.md. :class:`DeviceNet` is an exported integer program as the adapting
device (``from_program`` / ``to_program``, bit-exact); ``quantize_for_adaptation`` turns the LRT paper's
float net into its fixed-point :class:`QNet` (the paper's formats); :class:`OnlineTrainer` streams a scenario
through it with one of the rules of :mod:`edgetrain.adapt.rules`, weights held in ``NVMArray``s.
"""

from edgetrain.adapt.checkpoint import CheckpointError
from edgetrain.adapt.device import DeviceNet
from edgetrain.adapt.qnet import PAPER_FORMATS, Grid, LayerFormats, QNet, quantize_for_adaptation
from edgetrain.adapt.rules import (
    RULE_OPTIONS,
    RULES,
    SGD,
    BiasOnly,
    InferenceOnly,
    LowRank,
    LowRankOptions,
    MinibatchSGD,
    SGDStochastic,
    UpdateRule,
    make_rule,
    parse_rule_options,
)
from edgetrain.adapt.trainer import OnlineTrainer

__all__ = [
    "PAPER_FORMATS",
    "RULE_OPTIONS",
    "RULES",
    "SGD",
    "BiasOnly",
    "CheckpointError",
    "DeviceNet",
    "Grid",
    "InferenceOnly",
    "LayerFormats",
    "LowRank",
    "LowRankOptions",
    "MinibatchSGD",
    "OnlineTrainer",
    "QNet",
    "SGDStochastic",
    "UpdateRule",
    "make_rule",
    "parse_rule_options",
    "quantize_for_adaptation",
]
