"""Gradient max-norm (LRT v1 App. D)."""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


class MaxNorm:
    """Stateful max-norm: x / max(x_max, x_mv / (1 - beta^k)) with x_max = max|x| + eps.

    LRT v1 App. D: state k = 0, x_mv = eps; per call k += 1, x_mv = beta x_mv + (1 - beta) x_max.
    The bias-corrected EMA keeps an occasional small x from being blown up to unit max.
    Works on NumPy arrays and torch tensors (returns the same type); one instance per tensor stream.
    """

    def __init__(self, beta: float = 0.999, eps: float = 1e-4) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.beta = float(beta)
        self.eps = float(eps)
        self.reset()

    def reset(self) -> None:
        """Restart the EMA (k = 0, x_mv = eps)."""
        self.step = 0
        self.x_mv = self.eps

    def __call__(self, x: ArrayLike) -> ArrayLike:
        size = x.numel() if isinstance(x, torch.Tensor) else np.size(x)
        x_max = (float(abs(x).max()) if size else 0.0) + self.eps
        self.step += 1
        self.x_mv = self.beta * self.x_mv + (1.0 - self.beta) * x_max
        x_mv_hat = self.x_mv / (1.0 - self.beta**self.step)
        return x / max(x_max, x_mv_hat)
