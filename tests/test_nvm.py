"""NVM weight memory: write counting, energy, drift statistics, stuck cells, lifetime, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgetrain.fixedpoint import FixedPointFormat
from edgetrain.nvm import DriftSpec, EnergyModel, NVMArray

INT8 = FixedPointFormat(8, signed=True)
UINT4 = FixedPointFormat(4, signed=False)


def test_write_counting_is_exact_on_a_hand_made_sequence() -> None:
    arr = NVMArray(np.array([[0, 1], [2, 3]]), INT8)
    assert arr.write([[0, 1], [2, 3]]) == 0  # nothing changes: an update event without writes
    assert arr.write([[5, 1], [2, -3]]) == 2
    assert arr.write([[5, 1], [7, -3]]) == 1
    assert arr.write([[6, 1], [7, -3]]) == 1
    np.testing.assert_array_equal(arr.write_counts, [[2, 0], [1, 1]])
    np.testing.assert_array_equal(arr.codes, [[6, 1], [7, -3]])
    np.testing.assert_array_equal(arr.levels, [[6.0, 1.0], [7.0, -3.0]])
    assert arr.codes.dtype == np.int64 and arr.write_counts.dtype == np.int64
    assert (arr.max_writes, arr.total_writes, arr.update_events, arr.num_cells) == (2, 4, 4, 4)
    assert arr.write_density(samples=10) == pytest.approx(4 / 4 / 10)


def test_codes_view_is_read_only() -> None:
    arr = NVMArray(np.zeros(3, dtype=np.int64), INT8)
    with pytest.raises(ValueError):
        arr.codes[0] = 1
    with pytest.raises(ValueError):
        arr.write_counts[0] = 1


def test_energy_arithmetic() -> None:
    energy_model = EnergyModel(write_pj_per_bit=2.0, read_pj_per_bit=0.5)
    arr = NVMArray(np.zeros((4, 5), dtype=np.int64), INT8, energy=energy_model)
    arr.write(np.eye(4, 5, dtype=np.int64))  # 4 cells written
    arr.read()
    arr.read()
    energy = arr.energy_pj
    assert energy["write"] == pytest.approx(4 * 8 * 2.0)
    assert energy["read"] == pytest.approx(2 * 20 * 8 * 0.5)
    assert energy["total"] == pytest.approx(energy["read"] + energy["write"])
    default = NVMArray(np.zeros(10, dtype=np.int64), UINT4)
    default.write(np.arange(10))  # cell 0 keeps 0: 9 writes of 4 bits
    default.read()
    assert default.energy_pj["write"] == pytest.approx(9 * 4 * 10.9)
    assert default.energy_pj["read"] == pytest.approx(10 * 4 * 1.76)


def test_read_returns_a_copy() -> None:
    arr = NVMArray(np.array([1, 2]), INT8)
    codes = arr.read()
    codes[0] = 100
    np.testing.assert_array_equal(arr.codes, [1, 2])


def test_lifetime_formula() -> None:
    arr = NVMArray(np.zeros(3, dtype=np.int64), INT8, endurance=1000)
    assert arr.projected_lifetime_samples(50) == math.inf
    for k in range(1, 6):
        arr.write([k, 0, k % 2])
    assert arr.max_writes == 5
    # 5 writes in 100 samples on the worst cell -> 1000 writes after 1000 * 100 / 5 samples
    assert arr.projected_lifetime_samples(100) == pytest.approx(20_000)


def test_stuck_cells_ignore_writes_and_are_not_counted() -> None:
    initial = np.arange(-50, 50).reshape(10, 10)
    arr = NVMArray(initial, INT8, stuck_fraction=0.3, seed=4)
    stuck = arr.stuck_mask.copy()
    stuck_codes = arr.codes[stuck].copy()
    assert stuck.sum() == 30
    again = NVMArray(initial, INT8, stuck_fraction=0.3, seed=4)  # seeded: same cells, same codes
    np.testing.assert_array_equal(again.stuck_mask, stuck)
    np.testing.assert_array_equal(again.codes, arr.codes)
    # stuck at codes drawn from the whole int8 range, not at the trained values (-50..49)
    assert np.mean(stuck_codes != initial[stuck]) > 0.9 and np.abs(stuck_codes).max() > 50
    np.testing.assert_array_equal(arr.codes[~stuck], initial[~stuck])
    target = initial + 1
    target[stuck] = stuck_codes + np.where(stuck_codes < 127, 1, -1)  # tries to change every stuck cell
    written = arr.write(target)
    assert written == 70
    np.testing.assert_array_equal(arr.codes[stuck], stuck_codes)
    np.testing.assert_array_equal(arr.codes[~stuck], initial[~stuck] + 1)
    assert arr.write_counts[stuck].sum() == 0 and arr.total_writes == 70
    assert arr.pulse_counts[stuck].sum() == 30  # the pulse model still pulses a stuck cell
    assert arr.energy_pj["write"] == pytest.approx(70 * 8 * 10.9)
    arr.apply_analog_drift(5.0, np.random.default_rng(0))
    arr.apply_digital_drift(0.5, np.random.default_rng(0))
    np.testing.assert_array_equal(arr.codes[stuck], stuck_codes)


def test_stuck_models_draw_from_the_code_range() -> None:
    zeros = np.zeros(20_000, dtype=np.int64)
    uniform = NVMArray(zeros, INT8, stuck_fraction=0.5, seed=1)
    codes = uniform.codes[uniform.stuck_mask]
    assert codes.min() == -128 and codes.max() == 127
    assert codes.mean() == pytest.approx(-0.5, abs=3 * 74 / math.sqrt(codes.size))  # uniform: sd ~ 256/sqrt(12)
    bounds = NVMArray(zeros, INT8, stuck_fraction=0.5, seed=1, stuck_model="bounds")
    assert set(np.unique(bounds.codes[bounds.stuck_mask])) == {-128, 127}
    assert np.mean(bounds.codes[bounds.stuck_mask] == 127) == pytest.approx(0.5, abs=0.03)
    with pytest.raises(ValueError, match="stuck_model"):
        NVMArray(zeros, INT8, stuck_model="trained")


def test_binomial2_flip_draw_doubles_the_flip_rate() -> None:
    spec = DriftSpec("digital", period=1, p0=5e4, horizon=1e6, flip_draw="binomial2")  # p = 0.05
    assert spec.flip_probability == pytest.approx(1 - 0.95**2)
    assert DriftSpec("digital", period=1, p0=5e4, horizon=1e6).flip_probability == pytest.approx(0.05)
    arr = NVMArray(np.zeros(20_000, dtype=np.int64), INT8)
    spec.apply(arr, step=0, rng=np.random.default_rng(2))
    flipped = ((np.bitwise_and(arr.codes, 0xFF)[:, None] >> np.arange(8)) & 1).sum()
    n, q = 160_000, 1 - 0.95**2
    assert abs(flipped - n * q) < 4 * math.sqrt(n * q * (1 - q))
    assert spec.as_dict()["flip_draw"] == "binomial2"
    with pytest.raises(ValueError, match="flip_draw"):
        DriftSpec("digital", flip_draw="poisson")


def test_analog_drift_statistics_and_clipping() -> None:
    rng = np.random.default_rng(123)
    arr = NVMArray(np.zeros(200_000, dtype=np.int64), FixedPointFormat(12), seed=0)
    sigma = 3.0
    changed = arr.apply_analog_drift(sigma, rng)
    inc = arr.levels.copy()
    assert abs(inc.mean()) < 5 * sigma / math.sqrt(inc.size)
    assert inc.var() == pytest.approx(sigma**2, rel=0.02)
    np.testing.assert_array_equal(arr.codes, np.rint(inc))
    assert changed == np.count_nonzero(np.rint(inc))
    assert arr.total_writes == 0 and arr.update_events == 0  # drift is not a write
    # clipping: a large drift saturates at qmin/qmax, in levels and codes
    edge = NVMArray(np.full(10_000, 127), INT8)
    edge.apply_analog_drift(50.0, rng)
    assert edge.levels.max() == 127 and edge.levels.min() >= -128
    assert np.mean(edge.codes == 127) == pytest.approx(0.5, abs=0.03)  # half the increments are positive


def test_a_write_resets_the_drifted_level() -> None:
    arr = NVMArray(np.zeros(1000, dtype=np.int64), INT8)
    arr.apply_analog_drift(0.2, np.random.default_rng(1))  # most codes stay 0, levels move
    target = arr.codes.copy()
    target[:10] = 5
    arr.write(target)
    np.testing.assert_array_equal(arr.levels[:10], 5.0)
    assert np.any(arr.levels[10:] != 0.0)  # unwritten cells keep their drifted level


def test_digital_flip_rate_matches_p() -> None:
    rng = np.random.default_rng(7)
    cells, bits, p = 50_000, 8, 0.01
    arr = NVMArray(np.zeros(cells, dtype=np.int64), INT8)
    arr.apply_digital_drift(p, rng)
    words = np.bitwise_and(arr.codes, 0xFF)  # two's complement bit pattern
    bit_matrix = (words[:, None] >> np.arange(bits)) & 1
    n = cells * bits
    assert abs(bit_matrix.sum() - n * p) < 4 * math.sqrt(n * p * (1 - p))
    per_bit = bit_matrix.mean(axis=0)  # every bit position flips at the same rate
    assert np.all(np.abs(per_bit - p) < 5 * math.sqrt(p * (1 - p) / cells))
    assert arr.total_writes == 0


def test_digital_drift_flips_twos_complement_bits() -> None:
    arr = NVMArray(np.array([0, -1, 127, -128, 5]), INT8)
    arr.apply_digital_drift(1.0, np.random.default_rng(0))  # p = 1: every bit flips -> ~x = -x - 1
    np.testing.assert_array_equal(arr.codes, [-1, 0, -128, 127, -6])
    unsigned = NVMArray(np.array([0, 15, 6]), UINT4)
    unsigned.apply_digital_drift(1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(unsigned.codes, [15, 0, 9])
    unchanged = NVMArray(np.array([3, 4]), INT8)
    assert unchanged.apply_digital_drift(0.0, np.random.default_rng(0)) == 0


def test_drift_spec_schedule_and_units() -> None:
    analog = DriftSpec("analog", period=10)
    assert analog.sigma == pytest.approx(10 / math.sqrt(1e5))
    assert DriftSpec("digital", period=10).p == pytest.approx(1e-4)
    arr = NVMArray(np.zeros(100_000, dtype=np.int64), FixedPointFormat(12))
    assert analog.sigma_codes(arr) == pytest.approx(analog.sigma * 2048)
    # an explicit range [-1, 1) with an LSB of 2^-7 is the paper's int8 weight: sigma x 128 codes
    assert DriftSpec("analog", weight_range=1.0).sigma_codes(arr, lsb=2**-7) == pytest.approx(analog.sigma * 128)
    rng = np.random.default_rng(0)
    assert analog.apply(arr, step=7, rng=rng) == 0 and np.all(arr.levels == 0)
    analog.apply(arr, step=20, rng=rng)
    assert arr.levels.std() == pytest.approx(analog.sigma * 2048, rel=0.02)
    digital = DriftSpec("digital", period=1, p0=1e5, horizon=1e6)  # p = 0.1
    byte = NVMArray(np.zeros(20_000, dtype=np.int64), INT8)
    digital.apply(byte, step=3, rng=rng)
    flipped = ((np.bitwise_and(byte.codes, 0xFF)[:, None] >> np.arange(8)) & 1).sum()
    assert abs(flipped - 16_000) < 4 * math.sqrt(160_000 * 0.1 * 0.9)
    assert analog.as_dict()["sigma"] == pytest.approx(analog.sigma)


def test_state_dict_round_trip() -> None:
    rng = np.random.default_rng(3)
    codes = rng.integers(-128, 128, size=(6, 7))
    arr = NVMArray(codes, INT8, EnergyModel(3.0, 1.0), endurance=500, stuck_fraction=0.2, seed=9, stuck_model="bounds")
    arr.write(np.clip(arr.codes + 1, -128, 127))
    arr.apply_analog_drift(0.7, rng)
    arr.read()
    state = arr.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    # as a checkpoint gives it back: torch tensors, scalars as shape (1,) (safetensors)
    back = NVMArray.from_state_dict(
        {k: torch.as_tensor(v).reshape(-1) if v.ndim == 0 else torch.as_tensor(v) for k, v in state.items()}
    )
    for key, value in back.state_dict().items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)
    assert (back.max_writes, back.total_writes, back.energy_pj) == (arr.max_writes, arr.total_writes, arr.energy_pj)
    assert (back.pulse_max_writes, back.stuck_model) == (arr.pulse_max_writes, arr.stuck_model)
    # both continue identically
    new = np.clip(arr.codes - 2, -128, 127)
    assert back.write(new) == arr.write(new)
    np.testing.assert_array_equal(back.write_counts, arr.write_counts)
    with pytest.raises(KeyError, match="missing"):
        NVMArray.from_state_dict({"codes": np.zeros(2)})


def test_bad_arguments_give_clear_errors() -> None:
    with pytest.raises(ValueError, match="outside the int8 range"):
        NVMArray(np.array([0, 200]), INT8)
    with pytest.raises(ValueError, match="non-integer"):
        NVMArray(np.array([0.5]), INT8)
    with pytest.raises(TypeError, match="FixedPointFormat"):
        NVMArray(np.array([0]), 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stuck_fraction"):
        NVMArray(np.array([0]), INT8, stuck_fraction=1.5)
    arr = NVMArray(np.zeros((2, 2), dtype=np.int64), INT8)
    with pytest.raises(ValueError, match="shape"):
        arr.write(np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="range"):
        arr.write(np.full((2, 2), -129))
    with pytest.raises(ValueError, match="samples"):
        arr.write_density(0)
    with pytest.raises(ValueError, match="probability"):
        arr.apply_digital_drift(1.5, np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        arr.apply_analog_drift(1.0, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="drift kind"):
        DriftSpec("thermal")
    with pytest.raises(ValueError, match="LSB"):
        DriftSpec("analog", weight_range=1.0).sigma_codes(arr)
    with pytest.raises(ValueError, match="EnergyModel"):
        EnergyModel(write_pj_per_bit=-1.0)
