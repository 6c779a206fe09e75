"""Fixed-point formats and integer shift requantization (DESIGN.md section 3)."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from edgetrain.fixedpoint import (
    FixedPointFormat,
    Rounding,
    quantize_to_codes,
    requantize,
    round_tensor,
    shift_round,
)


def exact_round(value: Fraction, mode: Rounding) -> int:
    """Reference rounding on exact rationals."""
    floor = value.numerator // value.denominator
    frac = value - floor
    if mode is Rounding.FLOOR:
        return floor
    if frac > Fraction(1, 2):
        return floor + 1
    if frac < Fraction(1, 2):
        return floor
    if mode is Rounding.HALF_EVEN:
        return floor + (floor % 2)
    return floor + 1 if value > 0 else floor  # half away from zero


@pytest.mark.parametrize(
    ("bits", "signed", "qmin", "qmax"),
    [(8, True, -128, 127), (8, False, 0, 255), (4, True, -8, 7), (16, True, -32768, 32767), (2, False, 0, 3)],
)
def test_format_ranges(bits: int, signed: bool, qmin: int, qmax: int) -> None:
    fmt = FixedPointFormat(bits, signed)
    assert (fmt.qmin, fmt.qmax) == (qmin, qmax)


def test_scale_is_threshold_over_levels() -> None:
    # s = 2^ceil(log2 t) / 2^(b-1) signed, / 2^b unsigned
    assert FixedPointFormat(8, True).scale(0.3) == 2.0 / 128
    assert FixedPointFormat(8, False).scale(0.3) == 2.0 / 256
    assert FixedPointFormat(8, True).scale(1.0) == 2.0 / 128  # ceil(1.0) = 1
    assert FixedPointFormat(8, True).scale(1.0001) == 4.0 / 128
    assert FixedPointFormat(16, True).exponent(3.0) == 3 - 15


@pytest.mark.parametrize("bits", [0, 1, 17, 32])
def test_bits_out_of_range(bits: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        FixedPointFormat(bits, True)


def test_unknown_rounding() -> None:
    with pytest.raises(ValueError, match="half_even"):
        Rounding.parse("stochastic")


@pytest.mark.parametrize("mode", list(Rounding))
def test_round_tensor_ties(mode: Rounding) -> None:
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, -0.51])
    expected = [exact_round(Fraction(float(v)), mode) for v in x]
    assert round_tensor(x, mode).tolist() == expected


@given(
    values=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=50),
    shift=st.integers(-8, 30),
    mode=st.sampled_from(list(Rounding)),
)
def test_shift_round_matches_exact_rational_rounding(values: list[int], shift: int, mode: Rounding) -> None:
    got = shift_round(np.array(values, dtype=np.int64), shift, mode)
    expected = [exact_round(Fraction(v, 2**shift) if shift >= 0 else Fraction(v * 2**-shift), mode) for v in values]
    assert got.tolist() == expected


def test_shift_round_rejects_floats() -> None:
    with pytest.raises(TypeError, match="integer"):
        shift_round(np.array([1.5]), 1)


def test_requantize_saturates() -> None:
    fmt = FixedPointFormat(8, True)
    # from exponent -10 to -6: divide by 16 and round half to even, then clip to int8
    codes = np.array([40, 24, 8, -8, 100000, -100000])
    assert requantize(codes, -10, -6, fmt).tolist() == [2, 2, 0, 0, 127, -128]


@given(st.lists(st.floats(-100, 100), min_size=1, max_size=30), st.integers(-10, 2))
def test_quantize_to_codes_matches_torch_fake_quant(xs: list[float], exponent: int) -> None:
    fmt = FixedPointFormat(8, True)
    codes = quantize_to_codes(np.array(xs), exponent, fmt)
    ref = torch.round(torch.tensor(xs, dtype=torch.float64) / 2.0**exponent).clamp(-128, 127)
    assert codes.tolist() == ref.long().tolist()
