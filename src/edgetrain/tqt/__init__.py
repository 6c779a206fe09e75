"""Trained Quantization Thresholds (Jain, Gural, Wu, Dick, MLSys 2020): quantizer, calibration, retraining."""

from edgetrain.tqt.calibration import CALIBRATION_METHODS, calibrate
from edgetrain.tqt.quantizer import TQTQuantizer, tqt_quantize

__all__ = ["CALIBRATION_METHODS", "TQTQuantizer", "calibrate", "tqt_quantize"]
