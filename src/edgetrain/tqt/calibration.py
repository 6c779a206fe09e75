"""Threshold initialisation (calibration) for TQT quantizers (docs/fixed-point.md).

Each method maps a sample of a tensor to ``log2_t`` (the log2 of the clipping threshold):

- ``max``: t = max|x| (Graffitist: weights in static mode)
- ``3sd``: t = |mean(x)| + 3 std(x) (Graffitist: weights in retrain mode)
- ``kl_j``: the symmetric-KL (J-divergence) histogram search of Settle et al. 2018, Alg. 1
  (Graffitist: every other quantizer)
- ``percentile``: t = the given percentile of |x| (default 99.99)
- ``mse``: the power-of-2 threshold minimising the mean squared quantization error
- ``auto``: every candidate above on the same data, scored by the quantization error it gives there
  (power-of-2 grids: s = 2^ceil(log2 t) / 2^m), the smallest error wins; ties go to the earlier
  candidate in ``CANDIDATE_METHODS`` (kl_j first, Graffitist's default). :func:`choose_threshold` also
  returns which candidate won and its SQNR = 10 log10(sum x^2 / sum (q(x) - x)^2) dB. A heuristic that
  collapses on a tensor (kl_j clipping the few large activations a layer depends on) loses to one
  that does not. Since ``mse`` searches the power-of-2 grid exhaustively (within 8 octaves below
  max), the winner's error is the least any power-of-2 threshold reaches there; the label says which
  heuristics reach it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from edgetrain.fixedpoint import FixedPointFormat, Rounding, round_tensor

CANDIDATE_METHODS = ("kl_j", "max", "3sd", "percentile", "mse")  # auto's candidates, in tie-break order
CALIBRATION_METHODS = ("max", "3sd", "kl_j", "percentile", "mse", "auto")
MAX_KL_BINS = 2048
ZERO_TENSOR_LOG2_T = 0.0  # an all-zero tensor quantizes exactly under any threshold


def _as_array(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    array = np.asarray(x, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError("cannot calibrate on an empty tensor: feed at least one calibration sample")
    bad = ~np.isfinite(array)
    if bad.any():
        raise ValueError(
            f"calibration data holds {int(bad.sum())} NaN/inf values out of {array.size}: "
            "check the input data and the float model (a diverged model produces NaN activations)"
        )
    return array


def _log2(threshold: float) -> float:
    return math.log2(threshold) if threshold > 0 else ZERO_TENSOR_LOG2_T


def calibrate_max(x: np.ndarray) -> float:
    """log2 max|x|."""
    return _log2(float(np.max(np.abs(x))))


def calibrate_3sd(x: np.ndarray) -> float:
    """log2(|mean| + 3 std)."""
    return _log2(float(abs(x.mean()) + 3.0 * x.std()))


def calibrate_percentile(x: np.ndarray, percentile: float = 99.99) -> float:
    """log2 of the ``percentile``-th percentile of |x|."""
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    return _log2(float(np.percentile(np.abs(x), percentile)))


def calibrate_kl_j(x: np.ndarray, fmt: FixedPointFormat) -> float:
    """Symmetric-KL (J-divergence) threshold search (Settle et al. 2018, Alg. 1; as in Graffitist).

    Histogram |x| on [0, max|x|] with ``ceil(sqrt(N))`` bins (numpy's 'sqrt' rule, capped at
    ``MAX_KL_BINS`` so that large tensors calibrate in well under a second); L = 2^(b - signed)
    levels. For each candidate i = L+1 .. n_bins kept bins, the histogram clipped at bin i (tail
    mass folded into the last kept bin) is quantized to L levels and back (each level's mass spread
    evenly over its non-empty bins), giving Q. P is the original histogram on those bins, so the
    folded tail costs as much as the rounding. J = sum (P - Q) log2(P / Q) over the bins where Q is
    non-empty; an empty bin of P counts as half a sample, so clipping into empty bins is not free.
    (Comparing Q with the *clipped* histogram, as TensorRT's KL does, scores i ~ L as lossless
    whatever it clips: it picks 0.2 as the threshold of Fashion-MNIST pixels.)
    Exact zeros are left out of the histogram: they quantize exactly under every threshold, and
    their spike (half of a post-ReLU tensor) would only blur the comparison. The threshold is the
    clip edge ``i * width`` of the minimum-J candidate; ``max`` when there are fewer than L + 2 bins.
    """
    magnitude = np.abs(x)
    magnitude = magnitude[magnitude > 0]  # exact zeros are exact under any threshold (ReLU, padding, background)
    if magnitude.size == 0:
        return ZERO_TENSOR_LOG2_T
    top = float(magnitude.max())
    levels = fmt.levels_per_sign
    n_bins = min(math.ceil(math.sqrt(magnitude.size)), MAX_KL_BINS)
    if n_bins < levels + 2:
        return _log2(top)
    hist, edges = np.histogram(magnitude, bins=n_bins, range=(0.0, top))
    hist = hist.astype(np.float64) / magnitude.size
    floor = 0.5 / magnitude.size
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = mass of bins >= i
    best_i, best_score = n_bins, math.inf
    for i in range(levels + 1, n_bins + 1):
        reference = hist[:i].copy()
        reference[-1] += tail[i]
        starts = (np.arange(levels) * i) // levels
        sizes = np.diff(np.append(starts, i))
        occupied = reference > 0
        level_mass = np.add.reduceat(reference, starts)
        level_count = np.add.reduceat(occupied.astype(np.float64), starts)
        spread = np.divide(level_mass, level_count, out=np.zeros(levels), where=level_count > 0)
        quantized = np.repeat(spread, sizes) * occupied
        # an empty original bin that receives folded tail mass costs as if it held half a sample
        p, q = np.maximum(hist[:i][occupied], floor), quantized[occupied]
        score = float(np.sum((p - q) * np.log2(p / q)))
        if score < best_score:
            best_i, best_score = i, score
    return _log2(best_i * (edges[1] - edges[0]))


class GridErrors:
    """mean (q(x) - x)^2 of one sample on the grid s = 2^k, computed once per exponent k (``auto`` scores
    several candidates that often share a grid; ``mse`` searches the grids)."""

    def __init__(self, values: torch.Tensor, fmt: FixedPointFormat, rounding: Rounding | str) -> None:
        self.values, self.fmt, self.rounding = values, fmt, Rounding.parse(rounding)
        self.by_exponent: dict[int, float] = {}

    def __call__(self, exponent: int) -> float:
        if exponent not in self.by_exponent:
            scale = math.ldexp(1.0, exponent)
            scaled = self.values / scale  # one temporary; every later pass is in place
            codes = scaled.round_() if self.rounding is Rounding.HALF_EVEN else round_tensor(scaled, self.rounding)
            error = codes.clamp_(self.fmt.qmin, self.fmt.qmax).mul_(scale).sub_(self.values)
            self.by_exponent[exponent] = float(torch.mean(error.square_()))
        return self.by_exponent[exponent]


def calibrate_mse(
    x: np.ndarray,
    fmt: FixedPointFormat,
    rounding: Rounding | str = Rounding.HALF_EVEN,
    errors: GridErrors | None = None,
) -> float:
    """The integer log2 t (power-of-2 threshold) minimising mean (q(x) - x)^2.

    Candidates: ceil(log2 max|x|) and the 8 powers of two below it (more clipping, finer steps).
    """
    top = float(np.max(np.abs(x)))
    if top == 0.0:
        return ZERO_TENSOR_LOG2_T
    errors = errors or GridErrors(torch.from_numpy(x), fmt, rounding)
    ceiling = math.ceil(math.log2(top))
    candidates = range(ceiling, ceiling - 9, -1)
    return float(min(candidates, key=lambda k: (errors(k - fmt.mantissa_bits), -k)))  # ties: the larger t


def quantization_error(
    x: torch.Tensor, log2_t: float, fmt: FixedPointFormat, rounding: Rounding | str = Rounding.HALF_EVEN
) -> float:
    """mean (q(x) - x)^2 on the grid s = 2^(ceil(log2_t) - m) of ``fmt`` (the quantizer's forward)."""
    return GridErrors(x, fmt, rounding)(fmt.exponent(log2_t))


def sqnr_db(signal_power: float, error: float) -> float:
    """10 log10(signal power / error power); inf for an exact quantization."""
    if error == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal_power, 1e-300) / error)


@dataclass(frozen=True)
class ThresholdChoice:
    """The outcome of ``auto`` calibration for one quantizer."""

    log2_t: float
    method: str  # the winning candidate
    sqnr_db: float  # of the winner on the calibration data
    errors: dict[str, float]  # mean squared quantization error per candidate


def choose_threshold(
    x: torch.Tensor | np.ndarray,
    bits: int = 8,
    signed: bool = True,
    *,
    candidates: tuple[str, ...] = CANDIDATE_METHODS,
    percentile: float = 99.99,
    rounding: Rounding | str = Rounding.HALF_EVEN,
) -> ThresholdChoice:
    """Calibrate with every method of ``candidates`` and keep the one with the least quantization
    error on ``x`` (module docstring, ``auto``)."""
    unknown = sorted(set(candidates) - set(CANDIDATE_METHODS))
    if unknown or not candidates:
        raise ValueError(f"candidates must be a non-empty subset of {CANDIDATE_METHODS}, got unknown {unknown}")
    fmt = FixedPointFormat(bits, signed)
    data = _as_array(x)
    grid_errors = GridErrors(torch.from_numpy(data), fmt, rounding)
    thresholds = {m: _calibrate(data, m, fmt, percentile, rounding, grid_errors) for m in candidates}
    errors = {m: grid_errors(fmt.exponent(t)) for m, t in thresholds.items()}
    best = min(candidates, key=lambda m: (errors[m], candidates.index(m)))
    return ThresholdChoice(thresholds[best], best, sqnr_db(float(np.mean(data * data)), errors[best]), errors)


def _calibrate(
    data: np.ndarray,
    method: str,
    fmt: FixedPointFormat,
    percentile: float,
    rounding: Rounding | str,
    grid_errors: GridErrors | None = None,
) -> float:
    methods: dict[str, Callable[[], float]] = {
        "max": lambda: calibrate_max(data),
        "3sd": lambda: calibrate_3sd(data),
        "kl_j": lambda: calibrate_kl_j(data, fmt),
        "percentile": lambda: calibrate_percentile(data, percentile),
        "mse": lambda: calibrate_mse(data, fmt, rounding, grid_errors),
        "auto": lambda: choose_threshold(data, fmt.bits, fmt.signed, percentile=percentile, rounding=rounding).log2_t,
    }
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; choose one of: {', '.join(CALIBRATION_METHODS)}")
    return methods[method]()


def calibrate(
    x: torch.Tensor | np.ndarray,
    method: str = "kl_j",
    bits: int = 8,
    signed: bool = True,
    *,
    percentile: float = 99.99,
    rounding: Rounding | str = Rounding.HALF_EVEN,
) -> float:
    """Initial ``log2_t`` for a quantizer of ``bits`` (``signed``) from sample data ``x``.

    ``method`` is one of ``max``, ``3sd``, ``kl_j``, ``percentile``, ``mse``, ``auto``. Raises
    ``ValueError`` on empty data, NaN/inf values, an unknown method or an unsupported bit-width.
    """
    fmt = FixedPointFormat(bits, signed)
    return _calibrate(_as_array(x), method, fmt, percentile, rounding)
