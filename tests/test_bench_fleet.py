"""bench/bench_fleet.py --reuse pairs a rerun with an earlier run only when both ran the same device
program: the recorded model digests must agree before the run (edgetrain.fleet.engine.model_sha256),
and federated low-rank's held-out scores after round 0 (before any broadcast) after it."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_fleet  # noqa: E402

from edgetrain.export.program import IntegerProgram  # noqa: E402
from edgetrain.fleet.engine import model_sha256  # noqa: E402


def figures(round0: list[float], later: float) -> dict:
    return {"devices": [{"test_accuracy_per_round": [[0, a], [1, later]]} for a in round0]}


def test_reuse_needs_the_same_program() -> None:
    earlier = figures([0.70, 0.685], 0.80)
    assert bench_fleet.same_programs(figures([0.70, 0.685], 0.90), earlier)  # later rounds may differ
    assert not bench_fleet.same_programs(figures([0.705, 0.685], 0.80), earlier)  # another program


def test_model_digest_names_the_network(tmp_path) -> None:
    model = tmp_path / "net.safetensors"
    model.write_bytes(b"weights")
    assert model_sha256(model) == hashlib.sha256(b"weights").hexdigest()
    weights = {"w": np.arange(4, dtype=np.int8)}
    program = IntegerProgram(quantizers={}, ops=[], tensors=weights, input="x", output="x", input_shape=[1, 2])
    digest = model_sha256(program.save(tmp_path / "a"))
    assert digest == json.loads((tmp_path / "a" / "manifest.json").read_text())["manifest_sha256"]
    program.tensors["w"] = np.arange(4, dtype=np.int8)[::-1].copy()  # another weight: another digest
    assert model_sha256(program.save(tmp_path / "b")) != digest


def test_reuse_refuses_another_program_up_front(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(bench_fleet, "RESULTS", tmp_path)
    (tmp_path / "earlier.json").write_text(json.dumps({"model_sha256": "a" * 64}))
    bench_fleet.check_reused_program("earlier", "a" * 64)
    with pytest.raises(SystemExit, match="ran another program"):
        bench_fleet.check_reused_program("earlier", "b" * 64)
    (tmp_path / "older.json").write_text(json.dumps({}))  # recorded before the digest: checked after the run
    bench_fleet.check_reused_program("older", "b" * 64)
