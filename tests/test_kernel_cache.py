"""Numba's kernel cache is keyed by the package's whole source (edgetrain.kernel_cache): a change in any
module, a callee's included, starts a fresh cache instead of reusing stale machine code."""

from __future__ import annotations

from pathlib import Path

import numba
import pytest

from edgetrain import kernel_cache
from edgetrain.adapt.device import _load_codes


def test_the_digest_follows_every_source_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "notes.txt").write_text("not source")
    first = kernel_cache.source_digest(tmp_path)
    assert kernel_cache.source_digest(tmp_path) == first
    (tmp_path / "notes.txt").write_text("changed, still not source")
    assert kernel_cache.source_digest(tmp_path) == first
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")  # a callee's module changes: a new cache
    changed = kernel_cache.source_digest(tmp_path)
    assert changed != first
    (tmp_path / "sub" / "b.py").rename(tmp_path / "sub" / "c.py")  # same bytes, another module
    assert kernel_cache.source_digest(tmp_path) != changed


def test_the_package_kernels_are_cached_under_the_source_digest(monkeypatch, tmp_path: Path) -> None:
    if not numba.config.CACHE_DIR.startswith(str(kernel_cache.kernel_cache_dir().parent)):
        pytest.skip("NUMBA_CACHE_DIR is set in this environment: the user's folder is used")
    assert Path(_load_codes._cache._cache_path).is_relative_to(numba.config.CACHE_DIR)  # set at import
    assert Path(numba.config.CACHE_DIR).name == kernel_cache.source_digest()  # the source as imported
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    kernel_cache.use_source_keyed_cache()
    assert numba.config.CACHE_DIR == ""  # a user's folder wins (numba reads it at its own import)
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernel_cache.use_source_keyed_cache()
    assert numba.config.CACHE_DIR == str(tmp_path / "edgetrain" / "numba" / kernel_cache.source_digest())
