"""torch.fx graph quantizer: fold BN, apply the DESIGN.md section 4 rules, share scales, calibrate."""

from edgetrain.graph.quantize import (
    SUPPORTED_OPS,
    QuantConfig,
    QuantizedModel,
    QuantizerInfo,
    UnsupportedOpError,
    build_quantized_model,
    calibrate_model,
    quantize,
)

__all__ = [
    "SUPPORTED_OPS",
    "QuantConfig",
    "QuantizedModel",
    "QuantizerInfo",
    "UnsupportedOpError",
    "build_quantized_model",
    "calibrate_model",
    "quantize",
]
