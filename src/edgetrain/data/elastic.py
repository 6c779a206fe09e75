"""Elastic deformation (Simard et al. 2003), used by the LRT paper to turn digits into long streams.

A displacement field of uniform noise in [-1, 1] per pixel and axis is smoothed with a Gaussian of
width ``sigma`` (as the LRT reference does it, on an H x W x 1 array) and scaled by ``alpha``; the
image is resampled at the displaced coordinates with
bilinear interpolation. The LRT reference draws (sigma, alpha) uniformly from ``ELASTIC_PAIRS``
(the authors' code); (1, 0) is the identity.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

ELASTIC_PAIRS: tuple[tuple[float, float], ...] = (
    (1, 0),
    (2, 25),
    (2, 50),
    (3, 100),
    (3, 150),
    (4, 200),
    (4, 300),
    (5, 300),
    (5, 500),
    (6, 600),
    (7, 1200),
)


def elastic_deform(image: np.ndarray, sigma: float, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Deform one H x W (or C x H x W: one field for every channel) image:
    x' = x + alpha * G_sigma * U(-1, 1) per axis, bilinear resampling."""
    if image.ndim not in (2, 3):
        raise ValueError(f"elastic_deform expects one H x W or C x H x W image, got shape {image.shape}")
    if alpha == 0:
        return image.copy()
    h, w = image.shape[-2:]
    # The reference smooths an H x W x 1 field: the filter also runs along the size-1 channel axis
    # with zero padding, which scales the field by the kernel's centre weight (~1/(sqrt(2 pi) sigma)).
    # Keeping that axis keeps the paper's displacement magnitudes (alpha is calibrated for it).
    dy = gaussian_filter(rng.uniform(-1, 1, (h, w, 1)), sigma, mode="constant")[..., 0] * alpha
    dx = gaussian_filter(rng.uniform(-1, 1, (h, w, 1)), sigma, mode="constant")[..., 0] * alpha
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([yy + dy, xx + dx])
    if image.ndim == 3:
        return np.stack([map_coordinates(c, coords, order=1, mode="constant", cval=0.0) for c in image]).astype(
            image.dtype
        )
    return map_coordinates(image, coords, order=1, mode="constant", cval=0.0).astype(image.dtype)


def elastic_stream(
    images: torch.Tensor, labels: torch.Tensor, count: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` samples drawn with replacement from ``images`` (N x C x H x W, values in [0, 1]), each
    elastically deformed with a (sigma, alpha) pair drawn uniformly from ``ELASTIC_PAIRS``. Seeded."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, images.shape[0], size=count)
    pairs = rng.integers(0, len(ELASTIC_PAIRS), size=count)
    source = images.numpy()
    out = np.empty((count, *source.shape[1:]), dtype=np.float32)
    for j, (i, p) in enumerate(zip(picks, pairs, strict=True)):
        sigma, alpha = ELASTIC_PAIRS[p]
        out[j] = elastic_deform(source[i], sigma, alpha, rng)
    return torch.from_numpy(out).clamp_(0.0, 1.0), labels[torch.from_numpy(picks)]
