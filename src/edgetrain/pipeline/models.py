"""Build the pipeline's float model: a zoo name, or the user's own nn.Module from an import path."""

from __future__ import annotations

import importlib
import inspect

from torch import nn

from edgetrain.data import Dataset
from edgetrain.models import MODELS, create_model
from edgetrain.pipeline.config import ModelSection


def build_model(section: ModelSection, data: Dataset) -> nn.Module:
    """``import_path = "package.module:callable"`` (called with ``num_classes``/``in_channels``/
    ``image_size`` when it accepts them), else the zoo model ``name`` sized for ``data``."""
    channels, height, width = data.input_shape
    if section.import_path:
        module_name, _, attribute = section.import_path.partition(":")
        if not attribute:
            raise ValueError(f"[model] import = {section.import_path!r} must look like 'package.module:callable'")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"[model] cannot import {section.import_path!r}: {err}") from err
        offered = {"num_classes": data.num_classes, "in_channels": channels, "image_size": height}
        accepted = inspect.signature(factory).parameters
        model = factory(**{k: v for k, v in offered.items() if k in accepted})
        if not isinstance(model, nn.Module):
            raise ValueError(f"[model] {section.import_path!r} returned {type(model).__name__}, not a torch nn.Module")
        return model
    if section.name not in MODELS:
        raise ValueError(f"[model] unknown zoo model {section.name!r}; choose one of: {', '.join(sorted(MODELS))}")
    if height != width:
        raise ValueError(f"zoo models expect square images, the data has {height}x{width}")
    return create_model(section.name, num_classes=data.num_classes, in_channels=channels, image_size=height)
