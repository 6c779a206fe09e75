"""The server's side of a fleet round: check the devices' updates, merge them, scale the broadcast.

docs/fleet.md. Federated low-rank: device k sends, per layer, factors (L_k, R_k) of its pending
gradient sum G_k ~ L_k R_k^T (r(n + m) numbers instead of n m). The server forms the mean
G = (1/K) sum_k L_k R_k^T of the K accepted devices and re-compresses it to rank r with the
streaming Kronecker sum of the LRT paper (v1 section 4, App. A) in its biased (top-r) mode with the
kappa gate and factor quantization off, folding all K r columns in one step: one SVD of the
(r + K r) core, so the result is the best rank-r approximation of G (Eckart-Young), exact when
K r <= r or the columns span at most r directions. The merged factors are optionally max-normed
(LRT v1 App. D, one stateful norm per factor and layer). FedAvg baselines: the mean of the devices'
weight deltas (in weight codes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edgetrain.lowrank import MaxNorm, StreamingKroneckerSum

Factors = tuple[np.ndarray, np.ndarray]


def merge_lowrank(updates: Sequence[Factors], rank: int) -> Factors:
    """Factors (L, R) of rank min(``rank``, K r, n, m) of (1/K) sum_k L_k R_k^T: the best rank-r
    approximation (SVD truncation) of the mean, computed by one fold of a
    :class:`StreamingKroneckerSum`; the exact mean when ``rank`` >= K r (or >= min(n, m))."""
    if not updates:
        raise ValueError("merge_lowrank needs at least one device update")
    n, m = updates[0][0].shape[0], updates[0][1].shape[0]
    terms = sum(left.shape[1] for left, _ in updates)
    rank = max(min(rank, terms, n, m), 1)
    acc = StreamingKroneckerSum(n, m, rank=rank, unbiased=False, kappa_th=None, factor_bits=None, chunk=max(terms, 1))
    scale = 1.0 / len(updates)
    for left, right in updates:
        acc.add((left * scale).T, right.T)
    return acc.factors()


def encode_factors(name: str, factors: Factors, bits: int) -> dict[str, np.ndarray]:
    """Factors as sent: ``bits = 32``: float32; ``16``: L / s_L and R / s_R in float16 with the
    max-abs scales (s_L, s_R) in float32 under ``name.scale`` (the accumulator keeps 16-bit bases)."""
    left, right = factors
    if bits == 32:
        return {f"{name}.L": left.astype(np.float32), f"{name}.R": right.astype(np.float32)}
    scales = np.array([np.abs(left).max(initial=0.0), np.abs(right).max(initial=0.0)], dtype=np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float64)
    return {
        f"{name}.L": (left / safe[0]).astype(np.float16),
        f"{name}.R": (right / safe[1]).astype(np.float16),
        f"{name}.scale": scales,
    }


def decode_factors(name: str, arrays: Mapping[str, np.ndarray]) -> Factors:
    """The float64 factors of :func:`encode_factors`."""
    left, right = arrays[f"{name}.L"].astype(np.float64), arrays[f"{name}.R"].astype(np.float64)
    if f"{name}.scale" in arrays:
        scale = arrays[f"{name}.scale"].astype(np.float64)
        left, right = left * scale[0], right * scale[1]
    return left, right


def mean_delta(deltas: Sequence[np.ndarray]) -> np.ndarray:
    """FedAvg of weight deltas: (1/K) sum_k D_k (float64, in weight codes)."""
    if not deltas:
        raise ValueError("mean_delta needs at least one device update")
    return np.mean(np.stack([np.asarray(d, dtype=np.float64) for d in deltas]), axis=0)


def check_update(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why an update must be rejected (missing or extra array, wrong shape, NaN or inf), or None."""
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        return f"arrays missing {missing} / unexpected {extra}"
    for key, shape in expected.items():
        value = arrays[key]
        if tuple(value.shape) != tuple(shape):
            return f"{key} has shape {tuple(value.shape)}, expected {tuple(shape)}"
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad = int(np.count_nonzero(~np.isfinite(value)))
            return f"{key} holds {bad} NaN/inf value(s)"
    return None


class FactorNorms:
    """Server-side max-norm of the merged factors, one :class:`MaxNorm` per layer and side."""

    def __init__(self) -> None:
        self.norms: dict[str, tuple[MaxNorm, MaxNorm]] = {}

    def __call__(self, layer: str, factors: Factors) -> Factors:
        left_norm, right_norm = self.norms.setdefault(layer, (MaxNorm(), MaxNorm()))
        return left_norm(factors[0]), right_norm(factors[1])
