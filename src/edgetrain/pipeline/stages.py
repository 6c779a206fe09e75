"""Cached pipeline stages: each stage runs once per distinct input and is skipped when its output
is present and valid.

A stage's output folder ``<root>/<name>/`` holds ``stage.json`` = {fingerprint, inputs, summary,
files, seconds, cpu_seconds} (wall and CPU time of the stage's run). The fingerprint is a hash
of everything that determines the stage's result (its own config section and the fingerprints of the
stages it reads from), and ``inputs`` lists those values, so a reuse compares them and a rerun says
in one line what changed. Changing one stage's settings re-runs
that stage and everything downstream, and nothing upstream.

Nothing finished is deleted before its replacement is complete: a stage runs in
``<root>/.<name>.partial/`` (its ``.fingerprint`` marker says for which inputs), writes
``stage.json`` last, and only then replaces ``<root>/<name>/`` (two renames; an interruption between
them is repaired on the next run). A stage interrupted halfway resumes from its own checkpoint in the
partial folder when its inputs are unchanged; with other inputs the partial folder is discarded.

``<root>/status.json`` records what each stage of the latest run did (reused, done, failed,
interrupted, and why), from which :func:`write_status_report` writes a report for a run that stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetrain import atomic

STAGE_FILE = "stage.json"
MARKER_FILE = ".fingerprint"
STATUS_FILE = "status.json"


class StageError(RuntimeError):
    """A stage could not run or write its output; the message says what to do."""


class StageKey(str):
    """A stage fingerprint (16 hex digits) that remembers the values it was computed from."""

    parts: tuple[Any, ...]

    def __new__(cls, digest: str, parts: tuple[Any, ...]) -> StageKey:
        key = super().__new__(cls, digest)
        key.parts = parts
        return key

    def inputs(self) -> dict[str, Any]:
        """The parts as one flat mapping: config keys by name, upstream fingerprints as '<stage> result'."""
        flat: dict[str, Any] = {}
        for index, part in enumerate(self.parts[1:], start=1):
            items = part.items() if isinstance(part, dict) else [(_part_label(part, index), part)]
            for label, value in items:
                flat[label if label not in flat else f"{label} (part {index})"] = _jsonable(value)
        return flat


def _part_label(part: Any, index: int) -> str:
    if isinstance(part, StageKey) and part.parts:
        return f"{part.parts[0]} result"
    return f"input {index}"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def fingerprint(*parts: Any) -> StageKey:
    """sha256 of the JSON of ``parts`` (by convention: the stage name, config sections, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return StageKey(hashlib.sha256(blob).hexdigest()[:16], parts)


def describe_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """``'lr: 0.003 -> 0.01; quantize result changed'``: what differs between two recorded inputs."""
    if old is None:
        return "recorded by an older edgetrain without its inputs"
    changes = []
    for label in sorted(set(old) | set(new)):
        before, after = old.get(label, "(unset)"), new.get(label, "(unset)")
        if before != after:
            changes.append(f"{label} changed" if label.endswith(" result") else f"{label}: {before!r} -> {after!r}")
    return "; ".join(changes) or "same settings, another edgetrain version"


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
    seconds: float = 0.0  # wall time of this run of the stage (0 when reused)
    cpu_seconds: float = 0.0  # CPU time (user + system, all threads) of this run of the stage


def _read_meta(directory: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((directory / STAGE_FILE).read_text())
        return meta if isinstance(meta, dict) and isinstance(meta.get("fingerprint"), str) else None
    except (OSError, ValueError):
        return None


def _complete(directory: Path, meta: dict[str, Any] | None, key: str) -> bool:
    """The folder holds a finished result for ``key``: stage.json matches and every listed file exists."""
    if meta is None or meta["fingerprint"] != key:
        return False
    files = meta.get("files")
    return isinstance(files, list) and all((directory / str(f)).is_file() for f in files)


def _promote(partial: Path, final: Path) -> None:
    """Replace ``final`` by the finished ``partial`` folder: rename old aside, rename new in, drop old."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)


def _repair(final: Path) -> None:
    """Finish or undo a promotion that was interrupted between its two renames."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)


def run_stage(
    root: Path,
    name: str,
    key: str,
    body: Callable[[Path], dict[str, Any]],
    log: Callable[[str], None] = print,
) -> StageResult:
    """Run ``body(directory) -> summary`` unless ``root/name`` already holds a valid result for ``key``.

    ``body`` writes into a partial folder that replaces ``root/name`` only once it has finished."""
    final, partial = root / name, root / f".{name}.partial"
    inputs = key.inputs() if isinstance(key, StageKey) else {}
    try:
        _repair(final)
        meta = _read_meta(final)
        if _complete(final, meta, key):
            log(f"[{name}] up to date, skipped ({final})")
            record_status(root, name, "reused", "")
            return StageResult(name, key, meta["summary"], final, skipped=True)
        partial_meta = _read_meta(partial)
        if _complete(partial, partial_meta, key):  # finished, but its promotion was interrupted
            _promote(partial, final)
            record_status(root, name, "done", "")
            return StageResult(name, key, partial_meta["summary"], final, skipped=False)
        if meta is not None:
            why = (
                "a result file is missing"
                if meta["fingerprint"] == key
                else f"inputs changed: {describe_changes(meta.get('inputs'), inputs)}"
            )
            log(f"[{name}] {why}; re-running (the previous results stay until the new ones are complete)")
        if _marker(partial) not in (None, key):
            log(f"[{name}] discarding an interrupted run made with other inputs")
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        (partial / MARKER_FILE).write_text(key)
        (partial / STAGE_FILE).unlink(missing_ok=True)
    except OSError as err:
        raise StageError(f"cannot create the output folder {partial}: {err.strerror or err}; choose --out") from err
    log(f"[{name}] running -> {final}")
    record_status(root, name, "running", "")
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        summary = body(partial)
    except KeyboardInterrupt:
        record_status(root, name, "interrupted", "stopped by Ctrl-C; run the same command again to resume")
        raise
    except Exception as err:
        record_status(root, name, "failed", f"{type(err).__name__}: {err}")
        raise
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    files = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file() and p.name != STAGE_FILE)
    timing = {"seconds": seconds, "cpu_seconds": cpu_seconds}
    write_json_atomic(
        partial / STAGE_FILE, {"fingerprint": key, "inputs": inputs, "summary": summary, "files": files, **timing}
    )
    try:
        _promote(partial, final)
    except OSError as err:
        raise StageError(f"cannot move the finished {name} results into {final}: {err.strerror or err}") from err
    record_status(root, name, "done", f"{seconds:.0f} s")
    log(f"[{name}] done in {seconds:.0f} s ({cpu_seconds:.0f} CPU-s)")
    return StageResult(name, key, summary, final, skipped=False, seconds=seconds, cpu_seconds=cpu_seconds)


def _marker(directory: Path) -> str | None:
    try:
        return (directory / MARKER_FILE).read_text().strip()
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# run status: what each stage of the latest run did, and the report of a run that stopped


def reset_status(root: Path) -> None:
    """Start a new run's status record (call before the first stage)."""
    (root / STATUS_FILE).unlink(missing_ok=True)


def read_status(root: Path) -> dict[str, dict[str, str]]:
    try:
        status = json.loads((root / STATUS_FILE).read_text())
        return status if isinstance(status, dict) else {}
    except (OSError, ValueError):
        return {}


def record_status(root: Path, name: str, state: str, detail: str) -> None:
    status = read_status(root)
    status[name] = {"state": state, "detail": detail}
    try:
        atomic.write_json_atomic(root / STATUS_FILE, status, indent=2)
    except OSError:
        pass  # the status record is a convenience; the stage results themselves are what count


def write_status_report(root: Path, stage_names: Sequence[str], error: BaseException) -> tuple[Path, Path]:
    """``<root>/report/report.{md,html}`` for a run that stopped: per stage, done or not and why,
    and the headline numbers of every finished stage (from its ``stage.json``)."""
    from edgetrain.report import Report

    status = read_status(root)
    report = Report(f"edgetrain run in {root}: stopped before the end")
    reason = "interrupted (Ctrl-C)" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
    report.paragraph(f"The run stopped: {reason}. Run the same command again to resume: finished stages are reused.")
    rows = []
    for name in stage_names:
        entry = status.get(name, {"state": "not run", "detail": "an earlier stage did not finish"})
        rows.append([name, entry["state"], entry["detail"]])
    report.heading("Stages")
    report.table(["stage", "state", "detail"], rows)
    for name in stage_names:
        meta = _read_meta(root / name)
        if status.get(name, {}).get("state") in ("done", "reused") and meta is not None:
            numbers = [[k, v] for k, v in meta.get("summary", {}).items() if isinstance(v, int | float | str)]
            report.heading(f"{name}: results")
            report.table(["quantity", "value"], numbers)
    return report.write(root / "report")
