"""bench/bench_refresh_bound.py: the write bounds it sizes the oracle for, the cells the oracle picks
within the budget line, and, with no budget, every weight held at its pretrained code after every drift
event."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_refresh_bound  # noqa: E402
from bench_refresh_bound import OracleRefreshTrainer, refresh_cells  # noqa: E402

from edgetrain.adapt.pretrain import build_qnet  # noqa: E402
from edgetrain.adapt.scenarios import make_scenario  # noqa: E402


def test_refresh_picks_the_farthest_cells_below_the_line() -> None:
    target = np.zeros(6, dtype=np.int64)
    codes = np.array([5, -9, 0, 2, -3, 7])
    counts = np.array([0, 0, 0, 0, 0, 4])
    assert sorted(refresh_cells(codes, target, counts, 0.5, None)) == [0, 1, 5]  # ceil(0.5 x 6) = 3 farthest
    assert sorted(refresh_cells(codes, target, counts, 0.5, 4)) == [0, 1, 4]  # cell 5 has used its 4 writes
    assert sorted(refresh_cells(codes, target, counts, 1.0, None)) == [0, 1, 3, 4, 5]  # never an undrifted cell
    assert refresh_cells(codes, target, counts, 0.5, 0).size == 0  # line 0: nothing may be written yet


def test_unbounded_refresh_holds_the_pretrained_codes() -> None:
    torch.manual_seed(0)
    net = build_qnet({"arch": "lrt-cnn", "width": 4, "hidden": 16})
    stream = make_scenario("analog-drift", "mnist", 40, seed=0, drift={"kind": "analog", "sigma0": 100.0})
    trainer = OracleRefreshTrainer(net, stream, 1.0, None, 40, seed=0, test_samples=10)
    drifted = 0
    original = trainer._drift
    for step in range(40):
        original(step)
        for layer in net.weight_layers:
            array = trainer.arrays[layer.name]
            np.testing.assert_array_equal(array.codes, trainer.pretrained_codes[layer.name])
            np.testing.assert_array_equal(layer.codes(), trainer.pretrained_codes[layer.name])
            drifted += array.drifted_cells.size if step % 10 == 0 else 0
    assert drifted > 0 and trainer.total_writes == drifted  # every drifted cell re-written once per event


def test_bounds_are_a_tenth_of_the_max_and_a_third_of_the_total(tmp_path, monkeypatch) -> None:
    run = {"max_writes": 8730, "total_writes": 274659907, "samples": 100_000}
    table = {"results": {"analog-drift": {"sgd-sr": {"per_seed": {"0": run}}}}}
    (tmp_path / "writes-paper.json").write_text(json.dumps(table))
    monkeypatch.setattr(bench_refresh_bound, "RESULTS", tmp_path)
    assert bench_refresh_bound.bounds("analog-drift") == {"max_writes": 873.0, "total_writes": 274659907 / 3}
