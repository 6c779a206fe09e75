"""Write accounting (issue 11): the code-change and pulse write models on hand-built update sequences,
SR-SGD's stochastic rounding (unbiased, seeded), SGD's per-pixel pulses, and report file names
confined to the output folder."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from edgetrain.adapt.qnet import PAPER_FORMATS
from edgetrain.adapt.rules import SGD, SGDStochastic, grid_codes, pixel_activity, round_to_grid
from edgetrain.fixedpoint import FixedPointFormat
from edgetrain.nvm import NVMArray
from edgetrain.report.adaptation import render

INT8 = FixedPointFormat(8, signed=True)
LSB = PAPER_FORMATS.weight.lsb  # 2^-7


class FakeLayer:
    """The layer protocol the rules use, with hand-set im2col terms (``a``: P x m, ``dz``: P x n) or,
    for a grouped layer, a hand-set dense gradient."""

    def __init__(self, name: str, n: int, m: int, is_conv: bool = False, groups: int = 1) -> None:
        self.name, self.shape2d, self.is_conv, self.groups = name, (n, m), is_conv, groups
        self.formats = PAPER_FORMATS
        self.bias = nn.Parameter(torch.zeros(n))  # no gradient: the bias step is skipped
        self.a = torch.zeros(1, m)
        self.dz = torch.zeros(1, n)
        self.grad: torch.Tensor | None = None
        self.loaded = np.zeros((n, m), dtype=np.int64)

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.groups != 1:
            raise RuntimeError("columns() is only defined for groups == 1")
        return self.a, self.dz

    def nonzero_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, dz = self.columns()
        keep = (dz != 0).any(1)
        return a[keep].float(), dz[keep].float()

    def weight_grad(self) -> torch.Tensor:
        return self.grad if self.grad is not None else self.dz.T @ self.a

    def set_codes(self, codes: np.ndarray) -> None:
        self.loaded = np.array(codes)


def bind(rule, *layers: FakeLayer, seed: int = 0) -> dict[str, NVMArray]:
    arrays = {layer.name: NVMArray(np.zeros(layer.shape2d, dtype=np.int64), INT8) for layer in layers}
    rule.bind(SimpleNamespace(weight_layers=list(layers), bn_layers=[]), arrays, seed)
    return arrays


def test_code_change_and_pulse_counts_on_a_hand_built_sequence() -> None:
    arr = NVMArray(np.array([0, 0, 126]), INT8)
    assert arr.apply_update([0, 0, 0], pulses=[1, 0, 2]) == 0  # updates that round to zero: pulses only
    np.testing.assert_array_equal(arr.write_counts, [0, 0, 0])
    np.testing.assert_array_equal(arr.pulse_counts, [1, 0, 2])
    assert arr.apply_update([1, 0, -1]) == 2  # codes -1, 0, 127
    assert arr.apply_update([-1, 0, -5]) == 1  # cell 0 back to 0 (its second write); cell 2 saturates at 127
    np.testing.assert_array_equal(arr.codes, [0, 0, 127])
    np.testing.assert_array_equal(arr.write_counts, [2, 0, 1])  # a cell changed twice counts twice
    np.testing.assert_array_equal(arr.pulse_counts, [3, 0, 4])  # the saturated update still pulsed
    assert (arr.max_writes, arr.total_writes) == (2, 3)
    assert (arr.pulse_max_writes, arr.pulse_total_writes) == (4, 7)
    np.testing.assert_array_equal(arr.counts("pulse"), arr.pulse_counts)
    with pytest.raises(ValueError, match="write model"):
        arr.counts("activity")
    with pytest.raises(ValueError, match="non-negative"):
        arr.apply_update([0, 0, 0], pulses=[-1, 0, 0])


def test_sgd_conv_pulses_are_per_pixel_activity_and_sub_lsb_updates_write_nothing() -> None:
    layer = FakeLayer("conv", 2, 3, is_conv=True)
    rule = SGD(lr=0.01)
    arrays = bind(rule, layer)
    # 4 pixels, each non-zero per-pixel product lr dz_i a_j = 0.1 LSB: the sum (<= 0.4 LSB) rounds to 0
    d = 0.1 * LSB / (0.01 * 0.5)
    layer.a = torch.tensor([[0.5, 0.0, 0.5], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.5, 0.5]])
    layer.dz = torch.tensor([[d, 0.0], [d, d], [0.0, d], [d, 0.0]])
    x = 0.01 * (layer.dz.T @ layer.a).double().numpy() / LSB
    assert np.abs(x).max() < 0.5
    rule.update(0)
    array = arrays["conv"]
    expected = ((layer.dz != 0).T.long() @ (layer.a != 0).long()).numpy()
    np.testing.assert_array_equal(array.pulse_counts, expected)
    np.testing.assert_array_equal(pixel_activity(layer.a, layer.dz), expected)
    assert array.total_writes == 0 and array.update_events == 1
    # a large update changes codes: one code-change write per changed cell, pulses per active pixel again
    layer.dz = layer.dz * 100
    rule.update(1)
    step = np.rint(0.01 * (layer.dz.T @ layer.a).double().numpy() / LSB)
    np.testing.assert_array_equal(array.write_counts, (step != 0).astype(int))
    np.testing.assert_array_equal(array.pulse_counts, 2 * expected)
    np.testing.assert_array_equal(layer.loaded, array.codes)


def test_stochastic_rounding_is_unbiased_and_seeded() -> None:
    x = np.array([[0.25, -0.6, 1.75], [2.0, -3.5, 0.05]])
    draws = np.stack([round_to_grid(x, np.random.default_rng(seed)) for seed in range(4000)])
    assert set(np.unique(draws - np.floor(x))) <= {0, 1}  # floor(x) or floor(x) + 1
    frac = x - np.floor(x)
    np.testing.assert_allclose(draws.mean(0), x, atol=float(5 * np.sqrt(frac * (1 - frac) / 4000).max()) + 1e-12)
    np.testing.assert_array_equal(round_to_grid(x), np.rint(x))  # without an rng: round to nearest


def test_grid_codes_scales_then_rounds_like_numpy() -> None:
    """grid_codes(v, s, lsb) is round(s * v / lsb) in float64, half-even or with the same uniform draws."""
    values = np.random.default_rng(3).standard_normal((7, 5)).astype(np.float32) * 40
    values[0, :3] = [1.5, 2.5, -0.5]  # half-way cases: half-even
    x = 0.5 * values.astype(np.float64) / 0.25
    np.testing.assert_array_equal(grid_codes(values, 0.5, 0.25), np.rint(x))
    low = np.floor(x)
    expected = low + (np.random.default_rng(9).random(x.shape) < x - low)
    np.testing.assert_array_equal(grid_codes(values, 0.5, 0.25, np.random.default_rng(9)), expected)


def test_pixel_activity_counts_pixels_where_both_are_nonzero() -> None:
    a = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0], [4.0, 5.0, 0.0]])
    dz = torch.tensor([[0.5, 0.0], [0.0, 0.0], [1.0, -2.0]])  # pixel 1 has no gradient
    expected = np.array([[2, 1, 1], [1, 1, 0]])  # cell (i, j): pixels p with dz[p, i] != 0 and a[p, j] != 0
    np.testing.assert_array_equal(pixel_activity(a, dz), expected)


def sr_sgd_step(seed: int, layer: FakeLayer) -> np.ndarray:
    rule = SGDStochastic(lr=0.01)
    arrays = bind(rule, layer, seed=seed)
    rule.update(0)
    return -arrays[layer.name].codes  # codes start at 0: W <- 0 - dW_q


def test_sr_sgd_update_is_unbiased_over_seeds_and_reproducible() -> None:
    layer = FakeLayer("fc", 2, 3)
    layer.a = torch.tensor([[1.0, 0.5, -0.25]])
    layer.dz = torch.tensor([[0.3, -0.07]]) * LSB / 0.01  # x = lr dz a^T / lsb = [[0.3, 0.15, ...]]
    x = 0.01 * (layer.dz.T @ layer.a).double().numpy() / LSB
    assert np.all(np.abs(x) < 0.5)  # round to nearest would never move these weights
    steps = np.stack([sr_sgd_step(seed, layer) for seed in range(600)])
    frac = x - np.floor(x)
    np.testing.assert_allclose(steps.mean(0), x, atol=float(5 * np.sqrt(frac * (1 - frac) / 600).max()))
    np.testing.assert_array_equal(sr_sgd_step(3, layer), sr_sgd_step(3, layer))
    assert any(not np.array_equal(sr_sgd_step(3, layer), sr_sgd_step(s, layer)) for s in range(4, 10))


def test_report_file_names_stay_in_the_output_folder(tmp_path: Path) -> None:
    log = {
        "config": {"stream": {"name": "../../escaped/x"}, "rule": {"rule": "sgd"}},
        "history": {"step": [1, 2], "online_accuracy": [0.5, 0.6], "max_writes": [0, 1]},
        "final": {
            "samples": 2,
            "online_accuracy": 0.6,
            "test_accuracy": None,
            "max_writes": 1,
            "total_writes": 3,
            "pulse_max_writes": 5,
            "write_density": 0.1,
            "energy_pj": {"read": 2e6, "write": 1e3, "total": 2.001e6},
            "aux_memory_bits": {"fc": 0},
        },
    }
    logs = tmp_path / "runs" / "a"
    logs.mkdir(parents=True)
    (logs / "log.json").write_text(json.dumps(log))
    out = tmp_path / "runs" / "report"
    files = render(tmp_path / "runs", out)
    assert all(path.resolve().parent == out.resolve() for path in files)
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()
    table = (out / "report.md").read_text()
    assert "max pulses/cell (LRT paper's metric)" in table and "| 2.0 | 0.001 |" in table  # read, write energy apart


def test_pipeline_report_defines_shift_blocks_and_keeps_threshold_lines_apart() -> None:
    from edgetrain.pipeline.report import _describe_scenario, _threshold_figure

    blocks = [{"start": 0, "kinds": ["CD"]}, {"start": 10, "kinds": ["ST", "WN"]}, {"start": 20, "kinds": []}]
    text = _describe_scenario({"name": "shift", "dataset": "mnist", "samples": 30, "blocks": blocks})
    assert "CD = class clustering" in text and "ST = random scale" in text and "WN = white noise" in text
    history = {"steps": [0, 1], "values": {f"net.q{i}.log2_t": [i, i + 0.5] for i in range(14)}}
    fig = _threshold_figure(history)
    ax = fig.axes[0]
    styles = {(tuple(line.get_color()), line.get_linestyle()) for line in ax.get_lines()}
    assert len(styles) == 14  # no two lines look alike
    assert len(ax.get_legend().get_texts()) == 14  # and every one is named
