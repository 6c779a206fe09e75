"""Where numba keeps edgetrain's compiled kernels: a folder keyed by the package's whole source.

Numba caches a ``@njit(cache=True)`` kernel beside its source file and reuses it while that file's
time stamp and size are unchanged; it does not notice when a kernel's callee in another module
changes (edgetrain's kernels call shared helpers across modules, e.g. ``adapt.qnet.round_code``). After
a ``git pull`` or an edit that touches only the callee's module, the old machine code would run:
silently wrong numbers. So, unless the user chose a folder (``NUMBA_CACHE_DIR`` or
``numba.config.CACHE_DIR``), the kernels go to ``$XDG_CACHE_HOME/edgetrain/numba/<digest>`` (default
``~/.cache``), where the digest covers every ``.py`` file of the package: any change starts a fresh
cache (a few MB per source version; older folders can be deleted at any time). An unwritable folder
falls back to numba's own locations.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba

PACKAGE = Path(__file__).resolve().parent


def source_digest(folder: Path = PACKAGE) -> str:
    """SHA-256 (first 16 hex digits) of every ``.py`` file under ``folder``: relative path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def kernel_cache_dir(folder: Path = PACKAGE) -> Path:
    """The cache folder for the source under ``folder`` (module docstring)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgetrain" / "numba" / source_digest(folder)


def use_source_keyed_cache() -> None:
    """Point numba's cache at :func:`kernel_cache_dir` unless the user set one; call before any
    edgetrain kernel is decorated (``edgetrain/__init__`` does, first)."""
    if os.environ.get("NUMBA_CACHE_DIR") or numba.config.CACHE_DIR:
        return
    numba.config.CACHE_DIR = str(kernel_cache_dir())
