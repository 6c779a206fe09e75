"""Typed rule options (validation, config mapping, CLI flags) and the LowRank knobs of issue 11 on
small hand-made cases: stochastic rounding, write threshold, rank-r error feedback, the endurance
governor, and the dense accumulator of grouped / depthwise layers."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_writes import LSB, FakeLayer, bind

from edgetrain.adapt.qnet import PAPER_FORMATS
from edgetrain.adapt.rules import (
    SGD,
    LowRank,
    LowRankOptions,
    SGDOptions,
    make_rule,
    parse_rule_options,
)
from edgetrain.cli import CLIError, build_parser
from edgetrain.cli.adapt import rule_options
from edgetrain.nvm import NVMArray


def test_options_are_validated_with_one_line_errors() -> None:
    assert parse_rule_options("lowrank", {"rank": 8, "lr": 1}) == LowRankOptions(rank=8, lr=1.0)
    for mapping, fragment in (
        ({"rnk": 4}, "rule 'lowrank' has no option 'rnk'"),
        ({"rank": 0}, "lowrank option rank=0 must be >= 1"),
        ({"rank": 2.5}, "lowrank option rank=2.5 must be int"),
        ({"max_norm": "yes"}, "max_norm='yes' must be bool"),
        ({"rho_min": 1.5}, "rho_min=1.5 must be <= 1"),
        ({"lr": -1}, "lr=-1 must be > 0"),
        ({"lr": math.nan}, "must be a finite number"),
        ({"rounding": "up"}, "choose one of: nearest, stochastic"),
        ({"endurance": 1e6}, "endurance and lifetime_samples go together"),
    ):
        with pytest.raises(ValueError, match=re.escape(fragment)) as err:
            parse_rule_options("lowrank", mapping)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="rule 'sgd-sr' has no option 'rank'"):
        parse_rule_options("sgd-sr", {"rank": 4})
    with pytest.raises(ValueError, match="sgd-sr option lr=0"):
        parse_rule_options("sgd-sr", {"lr": 0})
    with pytest.raises(ValueError, match="unknown update rule 'adam'"):
        make_rule("adam")


def test_make_rule_takes_an_options_object_a_mapping_or_keywords() -> None:
    a = make_rule("lowrank", LowRankOptions(rank=2))
    b = make_rule("lowrank", {"rank": 2})
    c = make_rule("lowrank", rank=2)
    assert a.config() == b.config() == c.config() and a.config()["rank"] == 2
    assert make_rule("sgd-sr").config() == {"rule": "sgd-sr", "lr": 0.01, "train_biases": True}
    with pytest.raises(TypeError, match="takes LowRankOptions"):
        LowRank(SGDOptions())


def cli_options(*flags: str):
    args = build_parser().parse_args(["adapt", "--model", "m.safetensors", "--out", "o", *flags])
    return rule_options(args)


def test_cli_flags_are_generated_from_the_options() -> None:
    assert cli_options("--rule", "lowrank") == LowRankOptions()
    options = cli_options(
        "--rule", "lowrank", "--rank", "2", "--no-max-norm", "--biased", "--write-threshold", "1.5", "--error-feedback"
    )
    assert options == LowRankOptions(rank=2, max_norm=False, unbiased=False, write_threshold=1.5, error_feedback=True)
    assert cli_options("--rule", "minibatch-sgd", "--batch", "5").batch == 5
    with pytest.raises(CLIError, match="--rank do\\(es\\) not apply to --rule sgd"):
        cli_options("--rule", "sgd", "--rank", "3")
    with pytest.raises(CLIError, match="lowrank option rank=0 must be >= 1"):
        cli_options("--rule", "lowrank", "--rank", "0")


def lowrank(layer: FakeLayer, seed: int = 0, **options) -> tuple[LowRank, dict]:
    rule = LowRank(**{"max_norm": False, "rho_min": 0.0, "batch_fc": 1, **options})
    return rule, bind(rule, layer, seed=seed)


def test_stochastic_rounding_and_write_threshold_formulas() -> None:
    layer = FakeLayer("fc", 2, 5)
    rule, _ = lowrank(layer, rounding="stochastic")
    x = np.full((200, 50), 0.3)
    draws = rule.step_codes(layer, x, samples=1)
    assert set(np.unique(draws)) == {0, 1} and draws.mean() == pytest.approx(0.3, abs=0.02)
    rule, _ = lowrank(layer, write_threshold=1.0)
    x = np.array([[0.4, 0.6, -1.4, 2.5, -0.9], [1.0, -1.0, 0.99, 3.6, 0.0]])
    np.testing.assert_array_equal(rule.step_codes(layer, x, samples=1), [[0, 0, -1, 2, 0], [1, -1, 0, 4, 0]])


def test_error_feedback_keeps_the_projected_remainder_within_rank_r() -> None:
    rng = np.random.default_rng(0)
    layer = FakeLayer("fc", 6, 8)
    lr, rank = 0.02, 2
    rule, arrays = lowrank(
        layer, rank=rank, batch_fc=3, unbiased=False, kappa_th=1e8, lr=lr, write_threshold=1.0, error_feedback=True
    )
    terms = [(rng.normal(size=6) * 0.3, rng.normal(size=8) * 0.5) for _ in range(3)]
    total = sum(np.outer(dz, a) for dz, a in terms)
    for step, (dz, a) in enumerate(terms):
        layer.dz, layer.a = torch.tensor(dz[None], dtype=torch.float32), torch.tensor(a[None], dtype=torch.float32)
        rule.update(step)
    # the biased accumulator holds the top-2 truncation T of the 3-term sum; x = lr sqrt(3) T / lsb
    u, s, vt = np.linalg.svd(total)
    top = (u[:, :rank] * s[:rank]) @ vt[:rank]
    lr_eff = lr * math.sqrt(3)
    x = lr_eff * top / LSB
    step_codes = np.where(np.abs(x) >= 1.0, np.rint(x), 0)
    np.testing.assert_array_equal(-arrays["fc"].codes, step_codes)  # written: codes start at 0
    remainder = (x - step_codes) * LSB / lr_eff
    basis = u[:, :rank]
    expected = basis @ basis.T @ remainder  # rank <= r: the remainder inside the update's column space
    fed_back = rule.layers["fc"].acc.estimate()
    assert np.linalg.matrix_rank(fed_back, tol=1e-6 * np.abs(fed_back).max()) <= rank
    np.testing.assert_allclose(fed_back, expected, atol=2e-3 * np.abs(expected).max())
    assert np.abs(expected).max() > 0.1 * np.abs(remainder).max()  # something real was fed back
    # without error feedback the accumulator restarts empty
    plain, _ = lowrank(layer, rank=rank, batch_fc=3, unbiased=False, kappa_th=1e8, lr=lr, write_threshold=1.0)
    for step, (dz, a) in enumerate(terms):
        layer.dz, layer.a = torch.tensor(dz[None], dtype=torch.float32), torch.tensor(a[None], dtype=torch.float32)
        plain.update(step)
    assert not plain.layers["fc"].acc.estimate().any()


def test_adaptive_period_waits_until_the_update_rms_reaches_the_gate() -> None:
    rng = np.random.default_rng(3)
    left, right = rng.normal(size=(5, 2)), rng.normal(size=(7, 2))
    assert LowRank.rms(left, right) == pytest.approx(np.sqrt(np.mean((left @ right.T) ** 2)))
    layer = FakeLayer("fc", 3, 4)
    dz, a = np.array([0.2, -0.1, 0.05]), np.array([0.3, 0.1, -0.2, 0.4])
    lr, gate = 0.001, 1.0
    rule, arrays = lowrank(layer, rank=1, unbiased=False, kappa_th=1e8, lr=lr, min_update_rms=gate)
    layer.dz, layer.a = torch.tensor(dz[None], dtype=torch.float32), torch.tensor(a[None], dtype=torch.float32)
    rms_per_sample = np.sqrt(np.mean(np.outer(dz, a) ** 2))  # the same term every sample: G_t = t dz a^T
    # x_t = lr sqrt(t) G_t / lsb, rms(x_t) = lr t^1.5 rms(dz a^T) / lsb: the first t with rms >= gate
    first = math.ceil((gate * LSB / (lr * rms_per_sample)) ** (2 / 3))
    for step in range(first):
        assert arrays["fc"].update_events == 0
        rule.update(step)
    assert arrays["fc"].update_events == 1 and rule.layers["fc"].mult == 0.0
    x = lr * math.sqrt(first) * first * np.outer(dz, a) / LSB
    np.testing.assert_array_equal(-arrays["fc"].codes, np.rint(x))


def test_endurance_governor_never_exceeds_the_budget() -> None:
    layer = FakeLayer("fc", 4, 4)
    endurance, lifetime, samples = 3.0, 30.0, 30
    rule, arrays = lowrank(layer, rank=1, lr=0.05, endurance=endurance, lifetime_samples=lifetime)
    free, free_arrays = lowrank(FakeLayer("fc", 4, 4), rank=1, lr=0.05)
    for step in range(samples):
        sign = 1.0 if step % 2 == 0 else -1.0  # alternating updates of 6.4 LSB: every event changes every cell
        for r, layer_ in ((rule, layer), (free, free.net.weight_layers[0])):
            layer_.dz, layer_.a = torch.full((1, 4), sign), torch.ones(1, 4)
            r.update(step)
        budget = math.floor(endurance * (step + 1) / lifetime)
        assert arrays["fc"].write_counts.max() <= budget == rule.allowed_writes(step + 1)
    assert 1 <= arrays["fc"].max_writes <= endurance  # it writes, inside the budget (blocked sums keep accumulating)
    assert free_arrays["fc"].max_writes == samples
    aux = rule.aux_memory_bits()["fc"]
    assert aux == free.aux_memory_bits()["fc"] + 16 * math.ceil(math.log2(endurance + 1))  # per-cell counters


def governed_writes(burst: int | None, idle: int = 20, active: int = 20) -> list[int]:
    """Cumulative writes of a 1 x 2 layer under the governor E = 5, T = 20 (a write per 4 samples):
    ``idle`` samples with a zero update, then ``active`` samples that each want to change every cell
    (x = +-5 LSB, alternating); the rule's own step codes are written each sample."""
    layer = FakeLayer("fc", 1, 2)
    rule, arrays = lowrank(layer, endurance=5.0, lifetime_samples=20.0, governor_burst=burst)
    counts = []
    for sample in range(1, idle + active + 1):
        x = np.zeros((1, 2)) if sample <= idle else np.full((1, 2), 5.0 if sample % 2 else -5.0)
        rule.write(layer, rule.step_codes(layer, x, samples=sample))
        assert arrays["fc"].write_counts.max() <= math.floor(5.0 * sample / 20.0)  # never past the budget
        counts.append(int(arrays["fc"].write_counts[0, 0]))
    return counts


def test_token_governor_caps_saved_up_writes_in_few_bits() -> None:
    lifetime, tokens = governed_writes(None), governed_writes(2)
    # lifetime counter: the 5 writes saved while idle are spent at once, then one per 4 samples (budget floor(s/4))
    assert lifetime[20:] == [min(s - 20, s // 4) for s in range(21, 41)]
    # burst 2: only 2 saved-up writes, then a token each time the budget grows (samples 24, 28, ...)
    assert tokens[20:] == [min(s - 20, 2) + (s - 20) // 4 for s in range(21, 41)]
    assert governed_writes(5) == lifetime == governed_writes(50)  # C >= E: the lifetime governor exactly
    layer = FakeLayer("fc", 3, 4)
    rule, _ = lowrank(layer, rank=1, endurance=1e6, lifetime_samples=1e8, governor_burst=4)
    free, _ = lowrank(FakeLayer("fc", 3, 4), rank=1)
    assert rule.aux_memory_bits()["fc"] == free.aux_memory_bits()["fc"] + 12 * 3  # ceil(log2(5)) = 3 bits per cell
    with pytest.raises(ValueError, match="governor_burst needs the governor"):
        LowRankOptions(governor_burst=4)


def test_token_governor_pays_for_writes_it_did_not_make_and_resumes() -> None:
    layer = FakeLayer("fc", 1, 2)
    rule, arrays = lowrank(layer, endurance=1.0, lifetime_samples=1.0, governor_burst=2)
    x = np.full((1, 2), 3.0)
    np.testing.assert_array_equal(rule.step_codes(layer, x, samples=2), [[3, 3]])  # 2 tokens each
    assert arrays["fc"].apply_update(np.array([[1, 0]])) == 1  # a write the rule did not gate (a fleet step)
    assert arrays["fc"].apply_update(np.array([[1, 0]])) == 1
    # cell 0 paid both its tokens; the budget does not grow at the same sample: cell 1 alone may write
    np.testing.assert_array_equal(rule.step_codes(layer, x, samples=2), [[0, 3]])
    resumed = make_rule("lowrank", rule.options)
    restored = {"fc": NVMArray.from_state_dict(arrays["fc"].state_dict())}  # a resume restores the NVM too
    resumed.bind(SimpleNamespace(weight_layers=[FakeLayer("fc", 1, 2)], bn_layers=[]), restored, 0)
    resumed.load_state_dict(rule.state_dict())
    for governor in (rule, resumed):  # one sample later each cell gains one token, cell 1 keeps its cap of 2
        np.testing.assert_array_equal(governor.layers["fc"].tokens.tokens, [[0, 2]])
        np.testing.assert_array_equal(governor.step_codes(layer, x, samples=3), [[3, 3]])
        np.testing.assert_array_equal(governor.layers["fc"].tokens.tokens, [[1, 2]])
    # a full cell that writes and then gains: it pays first (2 -> 1), then refills to its cap (-> 2)
    governor, governed = lowrank(FakeLayer("fc", 1, 1), endurance=1.0, lifetime_samples=1.0, governor_burst=2)
    cell = governor.net.weight_layers[0]
    governor.write(cell, governor.step_codes(cell, np.full((1, 1), 3.0), samples=2))
    assert governed["fc"].write_counts[0, 0] == 1
    governor.step_codes(cell, np.zeros((1, 1)), samples=3)
    np.testing.assert_array_equal(governor.layers["fc"].tokens.tokens, [[2]])


def test_sparse_events_write_the_largest_cells_inside_the_budget() -> None:
    layer = FakeLayer("fc", 2, 5)
    x = np.array([[0.4, 0.6, -2.6, 2.5, -0.9], [1.2, -3.0, 0.7, 0.2, 0.0]])  # 6 cells round to non-zero
    rule, arrays = lowrank(layer, write_fraction=0.3)  # ceil(0.3 * 10) = 3 cells: |x| = 3.0, 2.6, 2.5
    np.testing.assert_array_equal(rule.step_codes(layer, x, samples=1), [[0, 0, -3, 2, 0], [0, -3, 0, 0, 0]])
    rule, arrays = lowrank(layer, write_fraction=0.3, endurance=1.0, lifetime_samples=1.0)
    used = np.zeros((2, 5), dtype=np.int64)
    used[1, 1] = 1
    assert arrays["fc"].apply_update(used) == 1
    # the largest cell used its budget of 1 write: the next largest takes its place
    np.testing.assert_array_equal(rule.step_codes(layer, x, samples=1), [[0, 0, -3, 2, 0], [1, 0, 0, 0, 0]])
    rule, _ = lowrank(layer, write_fraction=0.9)  # 9 slots, 6 candidates: nothing is dropped, zeros stay zero
    np.testing.assert_array_equal(rule.step_codes(layer, x, samples=1), np.rint(x))
    conv = FakeLayer("conv", 2, 5, is_conv=True)
    rule, _ = lowrank(conv, write_fraction=0.3, write_fraction_fc=0.1)  # a conv layer keeps write_fraction
    np.testing.assert_array_equal(rule.step_codes(conv, x, samples=1), [[0, 0, -3, 2, 0], [0, -3, 0, 0, 0]])
    rule, _ = lowrank(layer, write_fraction=0.3, write_fraction_fc=0.1)  # an FC layer: ceil(0.1 * 10) = 1 cell
    np.testing.assert_array_equal(rule.step_codes(layer, x, samples=1), [[0, 0, 0, 0, 0], [0, -3, 0, 0, 0]])
    with pytest.raises(ValueError, match="write_fraction=0.01 must exceed rho_min=0.01"):
        LowRankOptions(write_fraction=0.01)
    with pytest.raises(ValueError, match="write_fraction_fc=0.005 must exceed rho_min=0.01"):
        LowRankOptions(write_fraction_fc=0.005)


def test_bias_lr_sets_the_bias_step_and_leaves_the_weight_step() -> None:
    steps = {}
    for bias_lr in (None, 0.2):
        layer = FakeLayer("fc", 2, 3)
        rule, arrays = lowrank(layer, rank=1, unbiased=False, kappa_th=1e8, lr=0.05, bias_lr=bias_lr)
        layer.dz, layer.a = torch.tensor([[0.5, -0.25]]), torch.tensor([[0.4, 0.2, -0.4]])
        layer.bias.grad = torch.tensor([0.5, -0.25])
        rule.update(0)
        steps[bias_lr] = (layer.bias.detach().clone(), arrays["fc"].codes.copy())
    grid = PAPER_FORMATS.bias
    for bias_lr, lr_p in ((None, 0.05), (0.2, 0.2)):  # p <- q(p - q(lr_p g)), p = 0
        expected = grid.quantize(-grid.quantize(lr_p * torch.tensor([0.5, -0.25])))
        torch.testing.assert_close(steps[bias_lr][0], expected)
    np.testing.assert_array_equal(steps[None][1], steps[0.2][1])  # the weight step uses lr alone
    assert steps[None][1].any()


def test_grouped_layers_use_a_dense_accumulator_and_weight_grad() -> None:
    layer = FakeLayer("dw", 3, 9, is_conv=True, groups=3)
    grad = torch.tensor(np.random.default_rng(1).normal(size=(3, 9)), dtype=torch.float32)
    layer.grad = grad
    rule, arrays = lowrank(layer, batch_conv=2, lr=0.05)
    assert rule.layers["dw"].acc is None
    assert rule.aux_memory_bits() == {"dw": 3 * 9 * 16}
    rule.update(0)
    assert arrays["dw"].update_events == 0
    rule.update(1)
    expected = np.rint(0.05 * math.sqrt(2) * 2 * grad.double().numpy() / LSB)
    np.testing.assert_array_equal(-arrays["dw"].codes, np.clip(expected, -127, 128))
    assert not rule.layers["dw"].dense.any()  # reset after the write
    sgd = SGD(lr=0.05)
    sgd_arrays = bind(sgd, layer)
    sgd.update(0)  # columns() would raise: SGD takes weight_grad() for a grouped layer
    np.testing.assert_array_equal(-sgd_arrays["dw"].codes, np.rint(0.05 * grad.double().numpy() / LSB))


def test_lowrank_state_round_trips_through_the_accumulator_state_dict() -> None:
    layer = FakeLayer("fc", 4, 5)
    rule, _ = lowrank(layer, batch_fc=10, rounding="stochastic")
    layer.dz, layer.a = torch.ones(1, 4), torch.arange(5.0)[None]
    rule.update(0)
    state = rule.state_dict()
    assert set(state["layers"]["fc"]["acc"]) >= {"ql", "qr", "cx", "rng"}
    twin, _ = lowrank(FakeLayer("fc", 4, 5), batch_fc=10, rounding="stochastic", seed=5)
    twin.load_state_dict(state)
    np.testing.assert_array_equal(twin.layers["fc"].acc.estimate(), rule.layers["fc"].acc.estimate())
    assert twin.rng.random() == rule.rng.random()
