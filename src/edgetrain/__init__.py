"""edgetrain: networks for fixed-point edge hardware with weights in non-volatile memory.

The life of a network, one module per step:

1. Quantize with Trained Quantization Thresholds (power-of-2, per-tensor scales, trained log2
   thresholds; Jain et al., MLSys 2020): ``quantize(model, example, calib_data, QuantConfig(...))``
   rewrites any supported CNN with torch.fx (``edgetrain.graph``); ``edgetrain.tqt`` holds the
   quantizer (``tqt_quantize``, ``TQTQuantizer``), ``calibrate`` and the ``retrain`` recipe (on labels,
   or without them: ``RetrainConfig(distill="logits" | "features")`` with ``teacher=float_model``).
2. Deploy: ``to_integer(qmodel)`` is the bit-exact integer program (safetensors + JSON manifest,
   NumPy executor), ``to_onnx`` a QDQ graph for onnxruntime (``edgetrain.export``).
3. Adapt on the device with Low-Rank Training (Gural et al.): ``StreamingKroneckerSum`` keeps the
   gradient sum as rank r (``edgetrain.lowrank``); ``DeviceNet.from_program(program)`` makes the
   exported integer program the device (``to_program()`` exports it again, bit-exact), and
   ``OnlineTrainer`` with the rules of
   ``edgetrain.adapt.rules`` learns from a stream (``edgetrain.adapt.scenarios``) on weights held in a
   simulated NVM (``NVMArray``: write counts, energy, endurance, drift; ``edgetrain.nvm``).
4. The whole pipeline with a report: ``edgetrain demo`` / ``edgetrain run CONFIG``
   (``edgetrain.pipeline``).

Data: ``load_dataset`` (``edgetrain.data``); models: ``create_model`` (``edgetrain.models``).
"""

from edgetrain.kernel_cache import use_source_keyed_cache

use_source_keyed_cache()  # before any kernel below is compiled (edgetrain.kernel_cache)

from edgetrain.adapt import DeviceNet, OnlineTrainer, make_rule, quantize_for_adaptation  # noqa: E402
from edgetrain.adapt.scenarios import make_scenario  # noqa: E402
from edgetrain.data import load_dataset  # noqa: E402
from edgetrain.export import IntegerProgram, to_integer, to_onnx  # noqa: E402
from edgetrain.fixedpoint import FixedPointFormat, Rounding  # noqa: E402
from edgetrain.graph import QuantConfig, QuantizedModel, quantize  # noqa: E402
from edgetrain.lowrank import MaxNorm, StreamingKroneckerSum  # noqa: E402
from edgetrain.models import create_model  # noqa: E402
from edgetrain.nvm import DriftSpec, EnergyModel, NVMArray  # noqa: E402
from edgetrain.tqt import RetrainConfig, TQTQuantizer, calibrate, retrain, tqt_quantize  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "DeviceNet",
    "DriftSpec",
    "EnergyModel",
    "FixedPointFormat",
    "IntegerProgram",
    "MaxNorm",
    "NVMArray",
    "OnlineTrainer",
    "QuantConfig",
    "QuantizedModel",
    "RetrainConfig",
    "Rounding",
    "StreamingKroneckerSum",
    "TQTQuantizer",
    "calibrate",
    "create_model",
    "load_dataset",
    "make_rule",
    "make_scenario",
    "quantize",
    "quantize_for_adaptation",
    "retrain",
    "to_integer",
    "to_onnx",
    "tqt_quantize",
]
