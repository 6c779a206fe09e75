"""One model-file contract for every model edgetrain writes with ``torch.save``.

A model file is a dict of tensors and plain values, written atomically and read back with
``weights_only=True`` (never unpickled)::

    {"format": "edgetrain-model", "kind": "float" | "quantized", "meta": {"model": ARCH, ...},
     "state_dict": {...}, ...kind-specific fields}

``meta["model"]`` names the architecture, so nothing that reads an edgetrain file needs to be told
it; asking for another architecture is a one-line error naming both. (Integer programs have their
own manifest, :mod:`edgetrain.export.program`; adaptation checkpoints are safetensors,
:mod:`edgetrain.adapt.checkpoint`.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgetrain.atomic import torch_save_atomic
from edgetrain.training import load_checkpoint

MODEL_FORMAT = "edgetrain-model"
KINDS = ("float", "quantized")
WRITERS = {"float": "edgetrain train", "quantized": "edgetrain quantize"}


class ModelFileError(ValueError):
    """A model file of the wrong kind or architecture, or not an edgetrain model file."""


def save_model_file(
    path: str | os.PathLike[str], kind: str, meta: dict[str, Any], state_dict: dict[str, Any], **extra: Any
) -> Path:
    """Write a model file (atomically); ``meta["model"]`` must name the architecture."""
    if kind not in KINDS:
        raise ValueError(f"model file kind must be one of {KINDS}, got {kind!r}")
    if not meta.get("model"):
        raise ValueError("a model file's meta must name its architecture (meta['model'])")
    payload = {"format": MODEL_FORMAT, "kind": kind, "meta": dict(meta), "state_dict": state_dict, **extra}
    return torch_save_atomic(payload, path)


def read_model_file(path: str | os.PathLike[str], kind: str, arch: str | None = None) -> dict[str, Any]:
    """Read a model file of ``kind``; ``arch`` (optional) must match the recorded architecture."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or state.get("kind") not in KINDS or "meta" not in state:
        raise ModelFileError(f"{path} is not an edgetrain model file (written by `edgetrain train` or `quantize`)")
    if state["kind"] != kind:
        raise ModelFileError(f"{path} is a {state['kind']} model file; this needs a {kind} one ({WRITERS[kind]})")
    recorded = state["meta"].get("model")
    if arch is not None and recorded != arch:
        raise ModelFileError(f"{path} holds a {recorded}, not a {arch}; drop --arch (the file records it)")
    return state
