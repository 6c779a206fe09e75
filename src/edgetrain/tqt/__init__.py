"""Trained Quantization Thresholds (Jain, Gural, Wu, Dick, MLSys 2020): quantizer, calibration, retraining."""

from edgetrain.tqt.calibration import CALIBRATION_METHODS, calibrate
from edgetrain.tqt.quantizer import TQTQuantizer, tqt_quantize
from edgetrain.tqt.retrain import RetrainConfig, ThresholdHistory, retrain, split_parameters

__all__ = [
    "CALIBRATION_METHODS",
    "RetrainConfig",
    "TQTQuantizer",
    "ThresholdHistory",
    "calibrate",
    "retrain",
    "split_parameters",
    "tqt_quantize",
]
