"""bench/bench_fleet.py --reuse pairs a rerun with an earlier run only when both ran the same device
program: federated low-rank's held-out scores after round 0 (before any broadcast) must agree."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_fleet  # noqa: E402


def figures(round0: list[float], later: float) -> dict:
    return {"devices": [{"test_accuracy_per_round": [[0, a], [1, later]]} for a in round0]}


def test_reuse_needs_the_same_program() -> None:
    earlier = figures([0.70, 0.685], 0.80)
    assert bench_fleet.same_programs(figures([0.70, 0.685], 0.90), earlier)  # later rounds may differ
    assert not bench_fleet.same_programs(figures([0.705, 0.685], 0.80), earlier)  # another program
