"""Cached pipeline stages: each stage runs once per distinct input and is skipped when its output
is present and valid.

A stage's output folder holds ``stage.json`` = {fingerprint, summary, files}. The fingerprint is a
hash of the stage's own config section and the fingerprints of the stages it reads from, so
changing one stage's settings re-runs that stage and everything downstream, and nothing upstream.
``stage.json`` is written last (atomically): a stage interrupted halfway has none and runs again,
resuming from its own checkpoint where it keeps one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetrain import atomic

STAGE_FILE = "stage.json"


class StageError(RuntimeError):
    """A stage could not run or write its output; the message says what to do."""


def fingerprint(*parts: Any) -> str:
    """sha256 of the JSON of ``parts`` (config sections, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace`` (never a half-written file)."""
    try:
        atomic.write_json_atomic(path, payload, indent=2)
    except OSError as err:
        raise StageError(
            f"cannot write {path}: {err.strerror or err}. Free disk space or choose a writable output folder "
            "(--out); the stages already finished are kept and will be reused"
        ) from err


@dataclass
class StageResult:
    name: str
    fingerprint: str
    summary: dict[str, Any]
    directory: Path
    skipped: bool


def run_stage(
    root: Path,
    name: str,
    key: str,
    body: Callable[[Path], dict[str, Any]],
    log: Callable[[str], None] = print,
) -> StageResult:
    """Run ``body(directory) -> summary`` unless ``root/name`` already holds a valid result for ``key``."""
    directory = root / name
    meta_path = directory / STAGE_FILE
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            valid = meta["fingerprint"] == key and all((directory / f).exists() for f in meta["files"])
        except (OSError, ValueError, KeyError, TypeError):
            valid = False
        if valid:
            log(f"[{name}] up to date, skipped ({directory})")
            return StageResult(name, key, meta["summary"], directory, skipped=True)
    previous_key = _previous_key(directory)
    if previous_key is not None and previous_key != key:
        shutil.rmtree(directory)  # inputs changed: stale outputs and checkpoints go
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ".fingerprint").write_text(key)
    except OSError as err:
        raise StageError(f"cannot create the output folder {directory}: {err.strerror or err}; choose --out") from err
    meta_path.unlink(missing_ok=True)
    log(f"[{name}] running -> {directory}")
    summary = body(directory)
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != STAGE_FILE)
    write_json_atomic(meta_path, {"fingerprint": key, "summary": summary, "files": files})
    return StageResult(name, key, summary, directory, skipped=False)


def _previous_key(directory: Path) -> str | None:
    marker = directory / ".fingerprint"
    try:
        return marker.read_text().strip() if marker.exists() else None
    except OSError:
        return None
