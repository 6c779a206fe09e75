"""Atomic, pickle-free checkpoints of nested state (safetensors + a JSON header).

A nested dict is flattened to ``a/b/c`` keys: array and tensor leaves become safetensors tensors,
every other leaf (numbers, strings, lists, RNG states) goes, as JSON, into the file's metadata.
Files are written to a temporary name and moved into place with ``os.replace``, so a killed run
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from edgetrain.atomic import atomic_write

SEP = "/"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match the run."""


def _flatten(tree: dict[str, Any], prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    for key, value in tree.items():
        if SEP in key:
            raise ValueError(f"checkpoint keys may not contain {SEP!r}: {key!r}")
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            _flatten(value, path + SEP, tensors, meta)
        elif isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous()
        elif isinstance(value, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(value))
        else:
            meta[path] = value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def _insert(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(SEP)
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def save_state(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``state`` atomically to ``path`` (safetensors)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    _flatten(state, "", tensors, meta)
    header = {"edgetrain_state": json.dumps(meta, default=_json_default)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a :func:`save_state` file back into a nested dict of NumPy arrays and JSON values."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"checkpoint {source} does not exist")
    try:
        with safe_open(str(source), framework="pt") as f:
            header = (f.metadata() or {}).get("edgetrain_state")
        tensors = load_file(str(source))
        if header is None:
            raise CheckpointError(f"{source} is not an edgetrain adaptation checkpoint (no state header)")
        meta = json.loads(header)
    except (SafetensorError, OSError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {source} is corrupt or unreadable: {err}") from err
    tree: dict[str, Any] = {}
    for key, value in meta.items():
        _insert(tree, key, value)
    for key, tensor in tensors.items():
        _insert(tree, key, tensor.numpy())
    return tree
