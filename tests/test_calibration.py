"""Threshold calibration methods (DESIGN.md section 3)."""

import math

import numpy as np
import pytest
import torch

from edgetrain.fixedpoint import FixedPointFormat
from edgetrain.tqt import CALIBRATION_METHODS, CANDIDATE_METHODS, calibrate, choose_threshold
from edgetrain.tqt.calibration import quantization_error


def test_max_is_exact() -> None:
    x = torch.tensor([0.1, -3.0, 2.0])
    assert calibrate(x, "max") == math.log2(3.0)


def test_3sd_formula() -> None:
    x = np.random.default_rng(0).normal(0.5, 2.0, 10000)
    assert calibrate(x, "3sd") == pytest.approx(math.log2(abs(x.mean()) + 3 * x.std()), rel=1e-12)


def test_percentile() -> None:
    x = np.arange(1, 10001, dtype=float)
    assert calibrate(x, "percentile", percentile=50.0) == pytest.approx(math.log2(np.percentile(x, 50.0)))


def test_kl_j_on_gaussian_clips_a_small_tail() -> None:
    x = np.random.default_rng(1).normal(0, 1, 200_000)
    t = 2 ** calibrate(x, "kl_j", bits=8, signed=True)
    top = np.abs(x).max()
    assert t < top  # it clips ...
    clipped = np.mean(np.abs(x) > t)
    assert 0 < clipped < 0.01  # ... only a small tail
    assert t > 2.5  # and keeps the bulk of the distribution


def test_kl_j_clips_more_at_low_bit_width() -> None:
    x = np.random.default_rng(2).laplace(0, 1, 100_000)
    assert calibrate(x, "kl_j", bits=4) < calibrate(x, "kl_j", bits=8)


def test_kl_j_stable_under_sample_order() -> None:
    x = np.random.default_rng(3).normal(0, 1, 50_000)
    perm = np.random.default_rng(4).permutation(x)
    assert calibrate(x, "kl_j") == calibrate(perm, "kl_j")


def test_kl_j_falls_back_to_max_on_few_samples() -> None:
    x = np.linspace(-1, 4, 100)  # 10 bins < 2^7 + 2
    assert calibrate(x, "kl_j") == math.log2(4.0)


def test_mse_picks_the_power_of_two_with_least_error() -> None:
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(0, 0.1, 100_000), [10.0]])  # one outlier
    fmt = FixedPointFormat(4, True)
    k = calibrate(x, "mse", bits=4)
    assert k == int(k)

    def mse(kk: float) -> float:
        s = fmt.scale(kk)
        return float(np.mean((np.clip(np.round(x / s), fmt.qmin, fmt.qmax) * s - x) ** 2))

    assert mse(k) <= min(mse(k + 1), mse(k - 1))
    assert k < math.log2(10.0)  # clips the outlier


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_all_zero_tensor(method: str) -> None:
    assert calibrate(torch.zeros(100), method) == 0.0


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_bad_input(method: str) -> None:
    with pytest.raises(ValueError, match="NaN/inf"):
        calibrate(torch.tensor([1.0, float("nan")]), method)
    with pytest.raises(ValueError, match="NaN/inf"):
        calibrate(np.array([1.0, np.inf]), method)
    with pytest.raises(ValueError, match="empty"):
        calibrate(torch.zeros(0), method)
    with pytest.raises(ValueError, match="out of range"):
        calibrate(torch.ones(3), method, bits=1)
    with pytest.raises(ValueError, match="out of range"):
        calibrate(torch.ones(3), method, bits=17)


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="kl_j"):
        calibrate(torch.ones(3), "entropy")


def test_kl_j_ignores_a_spike_of_exact_zeros() -> None:
    # Like images with a black background or a post-ReLU tensor: half exact zeros, the rest uniform.
    rng = np.random.default_rng(6)
    x = np.concatenate([np.zeros(200_000), rng.integers(1, 256, 200_000) / 255.0])
    assert 2 ** calibrate(x, "kl_j", bits=8, signed=True) > 0.9


def test_kl_j_penalises_clipping_a_heavy_tail() -> None:
    # A Gaussian bulk with 2% of the mass far out: clipping that mass must cost more than coarse steps.
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(0, 1, 98_000), rng.uniform(8, 10, 2_000)])
    assert 2 ** calibrate(x, "kl_j", bits=8) > 8


def test_auto_keeps_the_candidate_with_the_least_quantization_error() -> None:
    rng = np.random.default_rng(8)
    cases = {
        "heavy outliers": np.concatenate([rng.normal(0, 1, 50_000), rng.uniform(20, 30, 25)]),
        "laplace": rng.laplace(0, 1, 50_000),
        "bimodal": np.concatenate([rng.normal(0, 0.02, 40_000), rng.normal(3, 0.3, 10_000)]),
    }
    for x in cases.values():
        choice = choose_threshold(x, bits=8, signed=True)
        values = torch.from_numpy(x)
        fmt = FixedPointFormat(8, True)
        # every candidate's error is its own power-of-2 quantization error on x
        for method in CANDIDATE_METHODS:
            expected = quantization_error(values, calibrate(x, method, 8, True), fmt)
            assert choice.errors[method] == expected
        assert choice.errors[choice.method] == min(choice.errors.values())
        assert calibrate(x, "auto", 8, True) == choice.log2_t
        # no power-of-2 threshold in the 9 octaves below max|x| does better
        top = math.ceil(math.log2(np.abs(x).max()))
        assert min(quantization_error(values, k, fmt) for k in range(top - 8, top + 1)) >= choice.errors[choice.method]
        signal = float(np.mean(x * x))
        assert choice.sqnr_db == pytest.approx(10 * math.log10(signal / choice.errors[choice.method]))
    # 3sd clips the outliers and loses; on the bimodal data max wastes the grid and loses
    assert (
        choose_threshold(cases["heavy outliers"]).errors["3sd"]
        > 10 * choose_threshold(cases["heavy outliers"]).errors["max"]
    )
    assert choose_threshold(cases["bimodal"]).method != "max"


def test_auto_ties_go_to_the_first_candidate() -> None:
    x = np.linspace(-1, 1, 10_001)  # every heuristic lands in the same octave
    choice = choose_threshold(x, candidates=("max", "kl_j"))
    assert choice.errors["max"] == choice.errors["kl_j"] and choice.method == "max"
    with pytest.raises(ValueError, match="subset"):
        choose_threshold(x, candidates=("auto",))


def test_auto_is_the_one_default_of_the_api_the_config_and_the_cli() -> None:
    from edgetrain.cli import build_parser
    from edgetrain.graph import QuantConfig
    from edgetrain.pipeline.config import QuantizeSection

    cli = build_parser().parse_args(["quantize", "--float", "f.pt", "--out", "q"])
    assert QuantConfig().activation_calibration == QuantizeSection().calibration == cli.calibration == "auto"


def test_calibration_names_auto_s_pick_per_quantizer() -> None:
    """Each activation quantizer records ``auto:<winner>``, the winner's threshold is the one in use, and
    the quantizer table shows it; weights name their own method; a threshold set by hand names none."""
    from torch import nn

    from edgetrain.graph import QuantConfig, quantize

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    images = torch.rand(64, 1, 6, 6) * 2
    qmodel = quantize(net, images[:1], images, QuantConfig(), mode="static")
    rows = {info.name: info for info in qmodel.quantizers()}
    assert rows["input_quant.out_q"].calibration == "auto:" + choose_threshold(images, 8, True).method
    assert math.isclose(rows["input_quant.out_q"].log2_t, choose_threshold(images, 8, True).log2_t, rel_tol=1e-6)
    picks = {info.calibration for info in rows.values() if info.role in ("activation", "accumulator", "bias")}
    assert picks and all(p.split(":")[0] == "auto" and p.split(":")[1] in CANDIDATE_METHODS for p in picks)
    assert {info.calibration for info in rows.values() if info.role == "weight"} == {"max"}
    table = qmodel.quantizer_table()
    assert "calibration" in table.splitlines()[0] and rows["input_quant.out_q"].calibration in table
    qmodel.net.input_quant.out_q.set_log2_t(0.0)
    assert qmodel.net.input_quant.out_q.calibration is None
