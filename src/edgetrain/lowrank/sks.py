"""Streaming optimal Kronecker-sum accumulator (SKS/OK), LRT v1 §4.4-4.6, App. A and H."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from edgetrain.lowrank import _kernels

ArrayLike = np.ndarray | torch.Tensor

_SIGN_BLOCK = 4096
_STATE_ARRAYS = ("ql", "qr", "cx", "qstep", "pend_dz", "pend_a", "stats", "signs")
_DTYPE = np.float32


def kronecker_sum_aux_bits(n_out: int, n_in: int, rank: int, factor_bits: int | None = 16, chunk: int = 1) -> int:
    """Auxiliary memory of a rank-r Kronecker-sum accumulator in bits (LRT v1 section 3: about r(n+m)b).

    r (n_out + n_in) factor_bits for the bases (32 when unquantized: float32) + 32 r for c_x
    + 2 x 32 for the two per-matrix scales (quantized only) + (chunk - 1)(n_out + n_in) x 8 for the
    pending terms, counted as 8-bit samples like minibatch SGD's stored samples (docs/lowrank.md).
    The one formula the update rules, the trainer and ``bench/bench_sks.py`` report.
    """
    nm = n_out + n_in
    total = rank * nm * (factor_bits or 32) + 32 * rank
    if factor_bits is not None:
        total += 2 * 32
    return total + (chunk - 1) * nm * 8


def _as_array(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=_DTYPE)


class StreamingKroneckerSum:
    """Rank-r running estimate L R^T of the gradient sum sum_i dz_i a_i^T (a sum, not a mean).

    State (LRT v1 App. A, Algorithm 1): orthonormal bases Q_L (n_out x r), Q_R (n_in x r) and
    weights c_x (r); L = Q_L diag(sqrt c_x), R = Q_R diag(sqrt c_x). Each step folds ``chunk`` terms:
    Gram-Schmidt against the kept basis, kappa gate, SVD of the small q x q core (q = r + chunk),
    rank reduction to r, rotation of the bases, optional re-quantization of the bases to
    ``factor_bits`` with one max-abs scale per matrix. Cost O((n_out + n_in + q) q^2) per step.

    Args:
        n_out: length of dz (rows of the weight matrix).
        n_in: length of a (columns; k_h k_w c_in for an im2col'ed conv).
        rank: r, the number of kept directions.
        unbiased: True: minimum-variance unbiased OK estimator (Benzing et al. 2019; LRT v1
            §4.4.2), E[L R^T] = exact sum (exactly so with the gate off). False: keep the top r
            singular triplets (biased, zero variance).
        kappa_th: the gate fires on a term when c_x[0] > kappa_th * ||a_res|| * ||dz_res|| (LRT v1
            App. H; residuals after Gram-Schmidt, both nonzero); None or inf disables it. c_x[0]
            grows with the number of terms folded, so on long streams the gate fires more often.
        gate: what a fired gate does: "skip" drops the whole term (the paper and its code);
            "project" still folds the term's component inside the kept span and drops only its
            residual (no new direction, so no conditioning issue; less bias on long streams).
        factor_bits: re-quantize Q_L, Q_R to this many signed bits after every step (LRT v1
            App. C uses 16); None keeps float32.
        chunk: terms folded per step. chunk = 1 is the paper's per-sample algorithm; chunk = c
            buffers up to c - 1 pending terms ((c - 1)(n_out + n_in) values) and folds c at once.
        seed: seed of the numpy Generator that draws the random signs (unbiased mode).
    """

    def __init__(
        self,
        n_out: int,
        n_in: int,
        rank: int = 4,
        unbiased: bool = True,
        kappa_th: float | None = 100.0,
        gate: str = "skip",
        factor_bits: int | None = 16,
        chunk: int = 1,
        seed: int | None = None,
    ) -> None:
        if n_out < 1 or n_in < 1:
            raise ValueError(f"n_out and n_in must be >= 1, got n_out={n_out}, n_in={n_in}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if factor_bits is not None and not 2 <= factor_bits <= 24:
            raise ValueError(f"factor_bits must be None or in [2, 24], got {factor_bits}")
        if gate not in ("skip", "project"):
            raise ValueError(f"gate must be 'skip' or 'project', got {gate!r}")
        if kappa_th is not None and not kappa_th > 0:
            raise ValueError(f"kappa_th must be > 0 or None, got {kappa_th}")
        self.n_out = int(n_out)
        self.n_in = int(n_in)
        self.rank = int(rank)
        self.unbiased = bool(unbiased)
        self.kappa_th = math.inf if kappa_th is None else float(kappa_th)
        self.gate = gate
        self.factor_bits = factor_bits
        self.chunk = int(chunk)
        self._levels = 0.0 if factor_bits is None else float(2 ** (factor_bits - 1) - 1)
        self._rng = np.random.default_rng(seed)
        self._signs = np.empty(0)
        self.reset()

    def reset(self) -> None:
        """Forget the accumulated sum (the random-sign stream continues)."""
        rows = 2 * self.rank + self.chunk  # kept basis, new directions, rotation scratch
        self._ql = np.zeros((rows, self.n_out), _DTYPE)
        self._qr = np.zeros((rows, self.n_in), _DTYPE)
        self._cx = np.zeros(self.rank)
        self._qstep = np.zeros(2)
        self._pend_dz = np.zeros((self.chunk, self.n_out), _DTYPE)
        self._pend_a = np.zeros((self.chunk, self.n_in), _DTYPE)
        self._stats = np.zeros(4, dtype=np.int64)  # folded, skipped, sign position, pending

    @property
    def count(self) -> int:
        """Number of terms folded into the estimate (zero terms included; gated terms only with
        gate="project")."""
        return int(self._stats[0])

    @property
    def skipped(self) -> int:
        """Number of terms the kappa gate fired on (dropped, or reduced to their in-span part)."""
        return int(self._stats[1])

    @property
    def pending(self) -> int:
        """Terms buffered for the next chunk (chunk > 1); folded by the next full chunk or factors()."""
        return int(self._stats[3])

    def add(self, dz: ArrayLike, a: ArrayLike) -> None:
        """Add dz ⊗ a (two vectors) or sum_t dz[t] ⊗ a[t] (two 2-D arrays, rows folded in order).

        Accepts NumPy arrays or torch tensors of any float dtype. Raises ValueError on a shape
        mismatch or on NaN/inf input (the state is then unchanged).
        """
        dz2, a2 = self._check(_as_array(dz), _as_array(a))
        self._stream(dz2, a2, flush=False)

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(L, R), n_out x r and n_in x r float64, with L R^T the estimate of the sum (pending folded)."""
        self._stream(self._pend_dz[:0], self._pend_a[:0], flush=True)
        w = np.sqrt(self._cx)
        return self._ql[: self.rank].T * w, self._qr[: self.rank].T * w  # float64 (w is float64)

    def estimate(self) -> np.ndarray:
        """The n_out x n_in estimate L R^T of sum_i dz_i a_i^T."""
        left, right = self.factors()
        return left @ right.T

    def state_dict(self) -> dict[str, Any]:
        """Copies of the whole state (bases, weights, pending terms, counters, random-sign stream),
        enough to resume bit-exactly with :meth:`load_state_dict` on an accumulator built with the
        same arguments."""
        state: dict[str, Any] = {name: getattr(self, f"_{name}").copy() for name in _STATE_ARRAYS}
        state["rng"] = self._rng.bit_generator.state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (ValueError if it was taken with other sizes)."""
        for name in _STATE_ARRAYS:
            current = getattr(self, f"_{name}")
            value = np.asarray(state[name], dtype=current.dtype)
            if name != "signs" and value.shape != current.shape:
                raise ValueError(f"state {name!r}: expected shape {current.shape}, got {value.shape}")
            setattr(self, f"_{name}", value.copy())
        self._rng.bit_generator.state = state["rng"]

    def aux_memory_bits(self) -> int:
        """Bits of state kept between samples: :func:`kronecker_sum_aux_bits` of this accumulator."""
        return kronecker_sum_aux_bits(self.n_out, self.n_in, self.rank, self.factor_bits, self.chunk)

    def _check(self, dz: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dz2 = dz[None] if dz.ndim == 1 else dz
        a2 = a[None] if a.ndim == 1 else a
        if (
            dz.ndim != a.ndim
            or dz2.ndim != 2
            or dz2.shape[1] != self.n_out
            or a2.shape[1] != self.n_in
            or dz2.shape[0] != a2.shape[0]
        ):
            want = (
                f"({self.n_out},) and ({self.n_in},)"
                if dz.ndim == 1
                else f"(T, {self.n_out}) and (T, {self.n_in}), both 1-D or both 2-D"
            )
            raise ValueError(f"expected dz, a of shapes {want}, got dz.shape={dz.shape}, a.shape={a.shape}")
        return dz2, a2

    def _stream(self, dz: np.ndarray, a: np.ndarray, flush: bool) -> None:
        if self.unbiased:
            stats = self._stats
            need = ((int(stats[3]) + dz.shape[0]) // self.chunk + 1) * (self.rank + self.chunk)
            pos = int(stats[2])
            if self._signs.shape[0] - pos < need:
                fresh = self._rng.random(max(need, _SIGN_BLOCK)) < 0.5
                self._signs = np.concatenate([self._signs[pos:], np.where(fresh, -1.0, 1.0)])
                self._stats[2] = 0
        bad = _kernels.stream(
            self._ql,
            self._qr,
            self._cx,
            self._qstep,
            self._pend_dz,
            self._pend_a,
            dz,
            a,
            self.unbiased,
            self.kappa_th,
            self.gate == "project",
            self._levels,
            flush,
            self._signs,
            self._stats,
        )
        if bad >= 0:
            name = "dz" if bad % 2 == 0 else "a"
            raise ValueError(f"{name} holds NaN or inf (row {bad // 2}); nothing was added")
