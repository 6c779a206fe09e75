"""Model zoo (float definitions); ``create_model(name)`` builds one, ``MODELS`` lists them."""

from edgetrain.models import (
    basic,  # noqa: F401  (registers mnistnet, lrt-cnn)
    modern,  # noqa: F401  (registers mobilenetv3-tiny, unet-tiny)
    tiny,  # noqa: F401  (registers the graph-rule zoo nets)
)
from edgetrain.models.basic import LRTNet
from edgetrain.models.registry import MODELS, create_model, register_model

__all__ = ["MODELS", "LRTNet", "create_model", "register_model"]
