"""Atomic file writes: every file edgetrain writes goes through :func:`atomic_write`.

The content goes to ``<name>.tmp`` beside the target, is flushed, and is moved into place with
``os.replace`` (atomic on POSIX): a run killed mid-write leaves the previous file intact, never a
half-written one. A failed write removes its temporary file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path``; returns ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def json_safe(value: Any) -> Any:
    """Non-finite floats become ``None`` (JSON has no inf/NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_bytes_atomic(path: str | os.PathLike[str], blob: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(blob))


def write_json_atomic(path: str | os.PathLike[str], payload: Any, indent: int = 1) -> Path:
    """JSON (non-finite floats as null; other objects by ``str``) written atomically."""
    return write_text_atomic(path, json.dumps(json_safe(payload), indent=indent, default=str))


def torch_save_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` of tensors and plain containers (read back with ``weights_only=True``)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
