"""Fixed-point formats, power-of-2 scales and integer shift requantization.

A tensor on the target is ``int_b * 2^k`` with one exponent ``k`` per tensor (TQT, Jain et al. 2020,
section 3; docs/fixed-point.md). Signed b-bit integers span ``[-2^(b-1), 2^(b-1)-1]``, unsigned
``[0, 2^b-1]`` (full range, not narrow). A quantizer holds ``log2_t`` and its scale is

    s = 2^ceil(log2_t) / 2^(b-1)   (signed)        s = 2^ceil(log2_t) / 2^b   (unsigned)

so its exponent is ``k = ceil(log2_t) - (b-1)`` or ``ceil(log2_t) - b``. Requantizing an integer from
exponent ``k_in`` to ``k_out`` is a shift by ``k_out - k_in`` with round-to-nearest (TQT appendix A,
eq. 16); the helpers here do it on NumPy int64 arrays with no floating point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch

MIN_BITS = 2
MAX_BITS = 16
RELU6_CEILING = 6.0  # ReLU6 clips at 6 before its output quantizer


class Rounding(StrEnum):
    """Rounding of ``x / s`` onto the integer grid."""

    HALF_EVEN = "half_even"  # round half to even (tf.round, torch.round); the default
    HALF_AWAY = "half_away"  # round half away from zero (C's round, some DSP targets)
    FLOOR = "floor"  # towards -inf: the average-pool output (Graffitist)

    @classmethod
    def parse(cls, value: Rounding | str) -> Rounding:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown rounding mode {value!r}; choose one of: {choices}") from None


@dataclass(frozen=True)
class FixedPointFormat:
    """An integer format: ``bits`` wide, two's complement when ``signed``."""

    bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise TypeError(f"bits must be an int, got {type(self.bits).__name__}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits={self.bits} is out of range: quantizers support {MIN_BITS} to {MAX_BITS} bits")

    @property
    def qmin(self) -> int:
        """n: the smallest integer code."""
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """p: the largest integer code."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels_per_sign(self) -> int:
        """2^(b-1) for signed, 2^b for unsigned: the divisor between threshold and scale."""
        return 2 ** (self.bits - 1) if self.signed else 2**self.bits

    @property
    def mantissa_bits(self) -> int:
        """log2 of :attr:`levels_per_sign`."""
        return self.bits - 1 if self.signed else self.bits

    def exponent(self, log2_t: float) -> int:
        """k = ceil(log2_t) - mantissa_bits, so that the scale is s = 2^k."""
        return int(math.ceil(log2_t)) - self.mantissa_bits

    def scale(self, log2_t: float) -> float:
        """s = 2^ceil(log2_t) / 2^(b-1) (signed) or / 2^b (unsigned)."""
        return math.ldexp(1.0, self.exponent(log2_t))

    def __str__(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"


def round_tensor(x: torch.Tensor, rounding: Rounding | str = Rounding.HALF_EVEN) -> torch.Tensor:
    """Round a float tensor to integers (kept as floats) with the given mode."""
    mode = Rounding.parse(rounding)
    if mode is Rounding.HALF_EVEN:
        return torch.round(x)
    if mode is Rounding.HALF_AWAY:
        return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)
    return torch.floor(x)


def shift_round(values: np.ndarray, shift: int, rounding: Rounding | str = Rounding.HALF_EVEN) -> np.ndarray:
    """Exact ``round(values * 2^-shift)`` on integers, by shifting.

    ``shift > 0`` divides (right shift, rounded with ``rounding``); ``shift <= 0`` multiplies
    exactly (left shift). Works on any integer array; the result is int64.
    """
    v = np.asarray(values)
    if not np.issubdtype(v.dtype, np.integer):
        raise TypeError(f"shift_round needs an integer array, got dtype {v.dtype}")
    v = v.astype(np.int64, copy=False)
    if shift <= 0:
        return np.left_shift(v, -shift)
    mode = Rounding.parse(rounding)
    floor = np.right_shift(v, shift)  # arithmetic shift: floor division by 2^shift
    if mode is Rounding.FLOOR:
        return floor
    remainder = v - np.left_shift(floor, shift)  # in [0, 2^shift)
    half = 1 << (shift - 1)
    if mode is Rounding.HALF_EVEN:
        up = (remainder > half) | ((remainder == half) & (floor % 2 == 1))
    else:  # half away from zero: ties go up for positive values, down for negative ones
        up = (remainder > half) | ((remainder == half) & (v >= 0))
    return floor + up.astype(np.int64)


def clip_to_format(values: np.ndarray, fmt: FixedPointFormat) -> np.ndarray:
    """Saturate integer codes to ``[qmin, qmax]`` of ``fmt``."""
    return np.clip(values, fmt.qmin, fmt.qmax)


def requantize(
    values: np.ndarray,
    exponent_in: int,
    exponent_out: int,
    fmt: FixedPointFormat,
    rounding: Rounding | str = Rounding.HALF_EVEN,
) -> np.ndarray:
    """Move integer codes from scale 2^exponent_in to 2^exponent_out and saturate to ``fmt``.

    ``x_out = clip(round(x_in * 2^(exponent_in - exponent_out)), n, p)``: a shift by
    ``exponent_out - exponent_in`` (TQT appendix A, eq. 16).
    """
    return clip_to_format(shift_round(values, exponent_out - exponent_in, rounding), fmt)


class NaNInputError(ValueError):
    """NaN reached a quantizer: it has no integer code (inf and huge values saturate instead)."""


def reject_nan(has_nan: bool, where: str) -> None:
    """Raise :class:`NaNInputError` when ``has_nan``: the one NaN rule of the program, fake-quant and eval."""
    if has_nan:
        raise NaNInputError(
            f"{where} contains NaN, which has no integer code (+-inf and huge values saturate to the "
            "largest/smallest code); replace or drop the NaN samples first"
        )


def quantize_to_codes(
    x: np.ndarray, exponent: int, fmt: FixedPointFormat, rounding: Rounding | str = Rounding.HALF_EVEN
) -> np.ndarray:
    """Float array to integer codes: ``clip(round(x / 2^exponent), n, p)`` as int64.

    Saturating: +-inf and values beyond the int64 range clip to ``p`` / ``n`` in floating point
    before the cast, as the fake-quant model and ONNX ``QuantizeLinear`` do. NaN raises
    :class:`NaNInputError`.
    """
    values = np.asarray(x, dtype=np.float64)
    reject_nan(bool(np.isnan(values).any()), "the input")
    rounded = round_tensor(torch.as_tensor(np.ldexp(values, -exponent)), rounding).numpy()
    return np.clip(rounded, fmt.qmin, fmt.qmax).astype(np.int64)
