"""edgetrain: networks for fixed-point edge hardware with weights in non-volatile memory.

1. Quantize with Trained Quantization Thresholds (power-of-2, per-tensor scales): ``edgetrain.tqt``.
2. Export a bit-exact integer program: ``edgetrain.export``.
3. Keep learning on the device with Low-Rank Training: ``edgetrain.lowrank``, ``edgetrain.adapt``,
   on a simulated NVM weight memory: ``edgetrain.nvm``.

Data loaders live in ``edgetrain.data``, model definitions in ``edgetrain.models``.
"""

from edgetrain.data import load_dataset
from edgetrain.fixedpoint import FixedPointFormat, Rounding
from edgetrain.models import create_model
from edgetrain.tqt import TQTQuantizer, calibrate, tqt_quantize

__version__ = "0.1.0"

__all__ = [
    "FixedPointFormat",
    "Rounding",
    "TQTQuantizer",
    "calibrate",
    "create_model",
    "load_dataset",
    "tqt_quantize",
]
