"""What the config names, built: the float model (a zoo name, or the user's own nn.Module from an import
path), the data source (dataset, root, preprocessing), the quantizer settings and the retraining recipe.

Shared by ``edgetrain run`` and ``edgetrain train | quantize``, so a model and data spec means the same
thing everywhere.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from edgetrain.data import Dataset, DataSource, Preprocess
from edgetrain.fixedpoint import Rounding
from edgetrain.graph import QuantConfig
from edgetrain.models import MODELS, create_model
from edgetrain.pipeline.config import DataSection, ModelSection, QuantizeSection
from edgetrain.tqt.retrain import RetrainConfig


def _import_file(path: Path) -> object:
    """Import ``path`` (a .py file) as a module named after it; its folder goes on ``sys.path`` first so
    that it can import its neighbours."""
    name = f"edgetrain_user_{path.stem}"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # fx and pickle look classes up by module name
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable of ``"package.module:callable"`` or ``"path/to/file.py:callable"``.

    A relative file path is taken from the working directory; a module name is looked up on
    ``sys.path`` with the working directory first (no PYTHONPATH needed for ``mynets.py`` beside you).
    """
    target, _, attribute = spec.rpartition(":")
    if not target or not attribute:
        raise ValueError(
            f"model import {spec!r} must look like 'package.module:callable' or 'path/to/file.py:callable'"
        )
    try:
        if target.endswith(".py") or os.sep in target or "/" in target:
            path = Path(target).expanduser().resolve()
            if not path.is_file():
                raise ImportError(f"no file {path} (relative paths start at the working directory {Path.cwd()})")
            module = _import_file(path)
        else:
            cwd = str(Path.cwd())
            if cwd not in sys.path:
                sys.path.insert(0, cwd)
            module = importlib.import_module(target)
        factory = getattr(module, attribute)
    except (ImportError, AttributeError, SyntaxError) as err:
        raise ValueError(f"cannot import the model {spec!r}: {err}") from err
    if not callable(factory):
        raise ValueError(f"model import {spec!r} names a {type(factory).__name__}, not a callable")
    return factory


def model_from_spec(spec: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A zoo model name, or an import spec (see :func:`resolve_factory`) called with those of
    ``num_classes`` / ``in_channels`` / ``image_size`` it accepts."""
    if ":" not in spec:
        if spec not in MODELS:
            raise ValueError(
                f"unknown zoo model {spec!r}; choose one of: {', '.join(sorted(MODELS))}, "
                "or give your own as 'path/to/file.py:build' / 'package.module:build'"
            )
        return create_model(spec, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    factory = resolve_factory(spec)
    offered = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    accepted = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    model = factory(**{k: v for k, v in offered.items() if takes_any or k in accepted})
    if not isinstance(model, nn.Module):
        raise ValueError(f"model import {spec!r} returned {type(model).__name__}, not a torch nn.Module")
    return model


def build_model(section: ModelSection, data: Dataset) -> nn.Module:
    """``[model] import`` (see :func:`resolve_factory`), else the zoo model ``name``, sized for ``data``."""
    channels, height, width = data.input_shape
    if not section.import_path and height != width:
        raise ValueError(f"zoo models expect square images, the data has {height}x{width}; set [data] image_size")
    return model_from_spec(section.import_path or section.name, data.num_classes, channels, height)


def data_source(section: DataSection) -> DataSource:
    """The ``[data]`` section as a :class:`DataSource` (the same tensors for every stage)."""
    preprocess = Preprocess(
        image_size=section.image_size,
        resize=section.resize,
        color=section.color,
        mean=tuple(section.mean),
        std=tuple(section.std),
    )
    return DataSource(section.dataset, section.root or None, preprocess, section.seed)


def quant_settings(section: QuantizeSection) -> QuantConfig:
    """The ``[quantize]`` section as the graph quantizer's :class:`QuantConfig`."""
    return QuantConfig(
        weight_bits=section.weight_bits,
        act_bits=section.act_bits,
        first_last_weight_bits=section.first_last_weight_bits,
        depthwise_weight_bits=section.depthwise_weight_bits or None,
        layer_weight_bits=dict(section.layer_weight_bits),
        weight_calibration=section.weight_calibration or None,
        activation_calibration=section.calibration,
        rounding=Rounding.parse(section.rounding),
        allow_float=section.allow_float,
    )


def retrain_settings(section: QuantizeSection) -> RetrainConfig:
    """The ``[quantize]`` section's retraining keys as the TQT recipe's :class:`RetrainConfig`."""
    return RetrainConfig(
        epochs=section.retrain_epochs,
        batch_size=section.batch_size,
        weight_lr=section.weight_lr,
        threshold_lr=section.threshold_lr,
        bn_statistics=section.bn_statistics,
        distill=section.distill,
    )
