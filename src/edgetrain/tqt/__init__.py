"""Trained Quantization Thresholds (Jain, Gural, Wu, Dick, MLSys 2020): quantizer, calibration, retraining."""

from edgetrain.tqt.calibration import (
    CALIBRATION_METHODS,
    CANDIDATE_METHODS,
    ThresholdChoice,
    calibrate,
    choose_threshold,
)
from edgetrain.tqt.quantizer import TQTQuantizer, tqt_quantize
from edgetrain.tqt.retrain import RetrainConfig, ThresholdHistory, retrain, set_bn_statistics, split_parameters

__all__ = [
    "CALIBRATION_METHODS",
    "CANDIDATE_METHODS",
    "RetrainConfig",
    "TQTQuantizer",
    "ThresholdChoice",
    "ThresholdHistory",
    "calibrate",
    "choose_threshold",
    "retrain",
    "set_bn_statistics",
    "split_parameters",
    "tqt_quantize",
]
