"""Crash safety: ``edgetrain run`` killed with SIGKILL inside each stage resumes to identical artifacts.

The kill is placed deterministically: the child process wraps ``edgetrain.atomic.atomic_path`` so
that right after the first file written into ``.<stage>.partial/`` (a checkpoint, or the first
half of the integer program) it sends itself SIGKILL, mid-stage, with no chance to clean up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edgetrain.pipeline.stages import fingerprint, read_status, reset_status, run_stage, write_status_report

KILLER = """
import os, signal, sys
from contextlib import contextmanager
import edgetrain.atomic as atomic

target, config = sys.argv[1], sys.argv[2]
original = atomic.atomic_path

@contextmanager
def killing(path):
    with original(path) as tmp:
        yield tmp
    if f".{target}.partial" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)

atomic.atomic_path = killing
from edgetrain.cli import main
sys.exit(main(["run", config]))
"""

CONFIG = """
[data]
dataset = "digits"
[pretrain]
epochs = 1
[quantize]
calibration_samples = 64
retrain_epochs = 1
retrain_samples = 256
[adapt]
rules = []
[output]
dir = "{out}"
"""
ARTIFACTS = (
    "pretrain/model.pt",
    "quantize/qmodel.pt",
    "export/integer/manifest.json",
    "export/integer/weights.safetensors",
    "export/model.onnx",
)
STAGES = ("pretrain", "quantize", "export")


def _edgetrain_run(config: Path, kill_in: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-c", KILLER, kill_in or "no-stage", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def _config(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(CONFIG.format(out=tmp_path / name))
    return path


@pytest.mark.slow
def test_killed_run_resumes_each_stage_to_identical_artifacts(tmp_path: Path) -> None:
    reference = _edgetrain_run(_config(tmp_path, "whole"))
    assert reference.returncode == 0, reference.stderr[-2000:]

    config, out = _config(tmp_path, "killed"), tmp_path / "killed"
    for index, stage in enumerate(STAGES):
        killed = _edgetrain_run(config, kill_in=stage)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert (out / f".{stage}.partial").is_dir() and not (out / stage).exists()
        for done in STAGES[: max(index - 1, 0)]:  # stages finished in an earlier run are reused
            assert f"[{done}] up to date, skipped" in killed.stdout
        for resumed in STAGES[max(index - 1, 0) : index + 1]:  # the one killed last time resumes, then this one
            assert f"[{resumed}] running" in killed.stdout

    finished = _edgetrain_run(config)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "[pretrain] up to date, skipped" in finished.stdout and "[quantize] up to date, skipped" in finished.stdout
    assert "[export] running" in finished.stdout  # the killed stage resumes from its partial folder
    assert not any(out.glob(".*.partial"))
    for artifact in ARTIFACTS:
        assert (out / artifact).read_bytes() == (tmp_path / "whole" / artifact).read_bytes(), artifact


# -- stage reuse and replacement (in process) -------------------------------------------------------


def _writer(text: str, calls: list[str]) -> Callable[[Path], dict]:
    def body(directory: Path) -> dict:
        calls.append(text)
        (directory / "out.txt").write_text(text)
        return {"text": text}

    return body


def test_changed_inputs_are_named_and_old_results_survive_a_failed_rerun(tmp_path: Path) -> None:
    calls: list[str] = []
    logs: list[str] = []
    run_stage(tmp_path, "adapt", fingerprint("adapt", "up1", {"lr": 0.003, "rules": ["sgd"]}), _writer("one", calls))

    def broken(directory: Path) -> dict:
        (directory / "half.txt").write_text("half")
        raise RuntimeError("rule 2 failed")

    changed = fingerprint("adapt", "up1", {"lr": 0.01, "rules": ["sgd"]})
    with pytest.raises(RuntimeError):
        run_stage(tmp_path, "adapt", changed, broken, logs.append)
    assert any("inputs changed: lr: 0.003 -> 0.01; re-running" in line for line in logs)
    assert (tmp_path / "adapt" / "out.txt").read_text() == "one"  # nothing deleted before the new result exists
    assert read_status(tmp_path)["adapt"] == {"state": "failed", "detail": "RuntimeError: rule 2 failed"}
    result = run_stage(tmp_path, "adapt", changed, _writer("two", calls), logs.append)
    assert result.summary == {"text": "two"} and (tmp_path / "adapt" / "out.txt").read_text() == "two"
    assert not (tmp_path / ".adapt.partial").exists() and not (tmp_path / ".adapt.old").exists()


def test_an_upstream_change_is_named(tmp_path: Path) -> None:
    upstream_a, upstream_b = fingerprint("quantize", {"weight_bits": 8}), fingerprint("quantize", {"weight_bits": 4})
    logs: list[str] = []
    run_stage(tmp_path, "export", fingerprint("export", upstream_a, {"onnx": True}), _writer("a", []))
    run_stage(tmp_path, "export", fingerprint("export", upstream_b, {"onnx": True}), _writer("b", []), logs.append)
    assert any("inputs changed: quantize result changed" in line for line in logs)


def test_a_promotion_interrupted_between_its_renames_is_repaired(tmp_path: Path) -> None:
    key = fingerprint("stage", {"x": 1})
    run_stage(tmp_path, "stage", key, _writer("old", []))
    os.replace(tmp_path / "stage", tmp_path / ".stage.old")  # killed after the first rename
    calls: list[str] = []
    result = run_stage(tmp_path, "stage", key, _writer("again", calls))
    assert result.skipped and calls == [] and (tmp_path / "stage" / "out.txt").read_text() == "old"

    new_key = fingerprint("stage", {"x": 2})
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, "stage", new_key, _interrupt_after_finishing(tmp_path))
    calls = []
    result = run_stage(tmp_path, "stage", new_key, _writer("unused", calls))
    assert calls == [] and (tmp_path / "stage" / "out.txt").read_text() == "new"


def _interrupt_after_finishing(root: Path) -> Callable[[Path], dict]:
    """A body whose stage finishes, then is 'killed' before its promotion (stage.json written by hand)."""

    def body(directory: Path) -> dict:
        (directory / "out.txt").write_text("new")
        meta = {"fingerprint": fingerprint("stage", {"x": 2}), "inputs": {}, "summary": {}, "files": ["out.txt"]}
        (directory / "stage.json").write_text(json.dumps(meta))
        raise KeyboardInterrupt

    return body


def test_status_report_says_what_finished_and_what_did_not(tmp_path: Path) -> None:
    reset_status(tmp_path)
    run_stage(tmp_path, "pretrain", fingerprint("pretrain", {}), lambda d: {"test_accuracy": 0.91})

    def failing(directory: Path) -> dict:
        raise ValueError("bits=17 is out of range")

    with pytest.raises(ValueError) as caught:
        run_stage(tmp_path, "quantize", fingerprint("quantize", {}), failing)
    markdown, html = write_status_report(tmp_path, ["pretrain", "quantize", "export"], caught.value)
    text = markdown.read_text()
    assert "| pretrain | done |" in text and "| test_accuracy | 0.91 |" in text
    assert "| quantize | failed | ValueError: bits=17 is out of range |" in text
    assert "| export | not run | an earlier stage did not finish |" in text
    assert "stopped before the end" in html.read_text()
