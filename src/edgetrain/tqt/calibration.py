"""Threshold initialisation (calibration) for TQT quantizers (DESIGN.md section 3).

Each method maps a sample of a tensor to ``log2_t`` (the log2 of the clipping threshold):

- ``max``: t = max|x| (Graffitist: weights in static mode)
- ``3sd``: t = |mean(x)| + 3 std(x) (Graffitist: weights in retrain mode)
- ``kl_j``: the symmetric-KL (J-divergence) histogram search of Settle et al. 2018, Alg. 1
  (Graffitist: every other quantizer)
- ``percentile``: t = the given percentile of |x| (default 99.99)
- ``mse``: the power-of-2 threshold minimising the mean squared quantization error
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from edgetrain.fixedpoint import FixedPointFormat, Rounding, round_tensor

CALIBRATION_METHODS = ("max", "3sd", "kl_j", "percentile", "mse")
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
    levels. For each candidate index i >= L+1: clip the cdf at bin i (all tail mass lands in bin i),
    resample the clipped cdf to L points and back (the quantized cdf), and score
    J = sum (P - Q) log2(P / Q) over the entries where both are non-zero. Threshold = (i + 0.5) * width.
    Falls back to ``max`` when there are fewer than L + 2 bins.
    """
    magnitude = np.abs(x)
    top = float(magnitude.max())
    if top == 0.0:
        return ZERO_TENSOR_LOG2_T
    levels = fmt.levels_per_sign
    n_bins = min(math.ceil(math.sqrt(magnitude.size)), MAX_KL_BINS)
    hist, edges = np.histogram(magnitude, bins=n_bins, range=(0.0, top))
    if n_bins < levels + 2:
        return _log2(top)
    width = edges[1] - edges[0]
    cdf = np.cumsum(hist, dtype=np.float64) / magnitude.size
    best_i, best_score = n_bins - 1, math.inf
    for i in range(levels + 1, n_bins):
        reference = cdf[: i + 1].copy()
        reference[-1] = 1.0  # the clipped tail lands in the last kept bin
        grid = np.arange(i + 1, dtype=np.float64)
        coarse = np.linspace(0.0, i, levels)
        quantized = np.interp(grid, coarse, np.interp(coarse, grid, reference))
        both = (reference > 0) & (quantized > 0)
        diff = reference[both] - quantized[both]
        score = float(np.sum(diff * np.log2(reference[both] / quantized[both])))
        if score < best_score:
            best_i, best_score = i, score
    return _log2((best_i + 0.5) * width)


def calibrate_mse(x: np.ndarray, fmt: FixedPointFormat, rounding: Rounding | str = Rounding.HALF_EVEN) -> float:
    """The integer log2 t (power-of-2 threshold) minimising mean (q(x) - x)^2.

    Candidates: ceil(log2 max|x|) and the 8 powers of two below it (more clipping, finer steps).
    """
    top = float(np.max(np.abs(x)))
    if top == 0.0:
        return ZERO_TENSOR_LOG2_T
    values = torch.from_numpy(x)
    best_k, best_err = None, math.inf
    ceiling = math.ceil(math.log2(top))
    for k in range(ceiling, ceiling - 9, -1):
        scale = math.ldexp(1.0, k - fmt.mantissa_bits)
        q = round_tensor(values / scale, rounding).clamp_(fmt.qmin, fmt.qmax) * scale
        err = float(torch.mean((q - values) ** 2))
        if err < best_err:
            best_k, best_err = k, err
    return float(best_k)


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

    ``method`` is one of ``max``, ``3sd``, ``kl_j``, ``percentile``, ``mse``. Raises ``ValueError``
    on empty data, NaN/inf values, an unknown method or an unsupported bit-width.
    """
    fmt = FixedPointFormat(bits, signed)
    data = _as_array(x)
    methods: dict[str, Callable[[], float]] = {
        "max": lambda: calibrate_max(data),
        "3sd": lambda: calibrate_3sd(data),
        "kl_j": lambda: calibrate_kl_j(data, fmt),
        "percentile": lambda: calibrate_percentile(data, percentile),
        "mse": lambda: calibrate_mse(data, fmt, rounding),
    }
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; choose one of: {', '.join(CALIBRATION_METHODS)}")
    return methods[method]()
