"""bench/bench_writes.py at paper scale: a run interrupted after a checkpoint resumes from it and ends
exactly where an uninterrupted run ends (same accuracy, same writes), and a stopped run's partial log
is summarised with the sample count it reached."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_writes  # noqa: E402

from edgetrain.adapt.pretrain import load_model  # noqa: E402

POINT = "lowrank-gov-f7-lr0.02-blr0.01"


def run(model_file: str, samples: int) -> dict:
    net, _ = load_model(model_file)
    return bench_writes.run_point(net, "digital-drift", POINT, 0, samples, 10, scale="paper")["final"]


def test_paper_scale_run_resumes_from_its_checkpoint(
    tmp_path: Path, monkeypatch, tiny_lrt_model_file, interrupt_adaptation_at, one_thread
) -> None:
    monkeypatch.setattr(bench_writes, "PAPER_CHECKPOINT", 20)
    monkeypatch.setattr(bench_writes, "RUNS", tmp_path / "straight")
    straight = run(tiny_lrt_model_file, 50)
    monkeypatch.setattr(bench_writes, "RUNS", tmp_path / "resumed")
    interrupt_adaptation_at(30)  # after the checkpoint at 20
    with pytest.raises(KeyboardInterrupt):
        run(tiny_lrt_model_file, 50)
    partial = bench_writes.collect(50, "paper")["digital-drift"][POINT]
    assert partial["samples"] == 20 and partial["seeds"] == 1  # the partial log, at the length it reached
    interrupt_adaptation_at(None)
    resumed = run(tiny_lrt_model_file, 50)
    for key in ("samples", "online_accuracy", "max_writes", "total_writes"):
        assert resumed[key] == straight[key], key


def row(rule: str, steps: list[int], accuracy: list[float], max_writes: list[int], total: list[int]) -> dict:
    history = {"step": steps, "online_accuracy": accuracy, "max_writes": max_writes, "total_writes": total}
    return {"rule": rule, "samples": steps[-1], "history": history}


def test_paper_verdict_compares_both_runs_at_the_shorter_runs_length() -> None:
    base = row("sgd-sr", [5000, 10000], [0.70, 0.60], [300, 700], [30000, 90000])
    longer = row("lowrank", [5000, 10000, 15000], [0.75, 0.74, 0.10], [30, 60, 90], [9000, 20000, 40000])
    text = bench_writes.paper_verdict({"analog-drift": {"sgd-sr": base, "p": longer}})
    # at 10000 samples: 0.74 vs 0.60, 60 vs 700 max (11.7x), 20000 vs 90000 total (4.5x); not 100k
    assert "after 10000 samples" in text and "0.740 vs 0.600" in text
    assert "11.7x fewer" in text and "4.5x fewer" in text and "PARTIAL (10000 of 100000" in text
    done = {"sgd-sr": row("sgd-sr", [100_000], [0.70], [700], [90000])}
    done["p"] = row("lowrank", [100_000], [0.73], [60], [20000])
    text = bench_writes.paper_verdict({"analog-drift": done})
    assert "target MET" in text  # 0.73 >= 0.70 and >= 0.722, 11.7x and 4.5x fewer writes
    done["p"] = row("lowrank", [100_000], [0.71], [60], [20000])
    assert "target NOT met" in bench_writes.paper_verdict({"analog-drift": done})  # below the paper's 0.722
