"""torch.fx graph quantizer: fold BN, apply the rules of docs/quantization.md, share scales, calibrate."""

from edgetrain.graph.quantize import (
    SUPPORTED_OPS,
    QuantConfig,
    QuantizedModel,
    QuantizerInfo,
    UnsupportedOpError,
    build_quantized_model,
    calibrate_model,
    quantize,
    register_elementwise,
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
    "register_elementwise",
]
