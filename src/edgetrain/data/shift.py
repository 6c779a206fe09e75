"""Distribution-shift augmentations of the LRT paper's shift scenario (the authors' code).

Four kinds, combined per 10k-sample block in ``PAPER_SHIFT_BLOCKS``:

- CD, class clustering: the order of a block is permuted so that each class comes in clusters
  (spread 1.0, eps 0.3): class c gets a random slot k_c in 0..K-1, each sample the sort key
  (k_c + 0.5 + spread x (U(0, 1) - 0.5)) / K (spread 1: a class fills its slot; > 1: neighbours
  overlap), except a fraction eps whose key is U(0, 1) (they stay scattered over the block).
- ST, scale/rotation/shift: a random affine map about the image centre, per sample: scale exp(N(0, 0.1^2))
  per axis, rotation N(0, 10 deg), translation N(0, 2 px) per axis; bilinear, zero outside.
- BG, background: x' = clip(contrast x + offset + plane, 0, 1), contrast U(0.3, 1.0), offset U(0, 0.7),
  plane a planar gradient in a random direction whose largest deviation is U(0, dev_max = 0.5).
- WN, white noise: x' = clip(x + N(0, sigma^2), 0, 1), sigma log-uniform in [0.03, 0.3] per sample.

The reference gives only these parameters (its generator notebook is not transcribed), so the exact
formulas above are ours. Image transforms work on float arrays in [0, 1] of shape ``(H, W)``, ``(N, H, W)``
or ``(N, C, H, W)`` (one draw per image, shared by its channels) and are seeded through the ``rng``
argument; all draws are vectorised over the batch.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import map_coordinates

SHIFT_KINDS = ("CD", "ST", "BG", "WN")
# The paper's ten 10k-sample blocks (CD, ST, BG, WN): 1:CD 2:ST 3:BG 4:WN 5:ST+WN 6:ST+BG 7:BG+WN
# 8:ST+BG+WN 9:all four 10:none.
PAPER_SHIFT_BLOCKS: tuple[tuple[str, ...], ...] = (
    ("CD",),
    ("ST",),
    ("BG",),
    ("WN",),
    ("ST", "WN"),
    ("ST", "BG"),
    ("BG", "WN"),
    ("ST", "BG", "WN"),
    ("CD", "ST", "BG", "WN"),
    (),
)


def class_clustered_order(
    labels: np.ndarray, rng: np.random.Generator, spread: float = 1.0, eps: float = 0.3
) -> np.ndarray:
    """A permutation of ``range(len(labels))`` that clusters the classes in time (CD; see module doc)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a vector, got shape {labels.shape}")
    if spread < 0 or not 0 <= eps <= 1:
        raise ValueError(f"need spread >= 0 and eps in [0, 1], got spread={spread}, eps={eps}")
    classes, index = np.unique(labels, return_inverse=True)
    k = len(classes)
    slots = rng.permutation(k)[index]
    keys = (slots + 0.5 + spread * (rng.random(labels.size) - 0.5)) / max(k, 1)
    scattered = rng.random(labels.size) < eps
    keys[scattered] = rng.random(int(scattered.sum()))
    return np.argsort(keys, kind="stable")


def _flatten(images: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """(N, C, H, W) float64 view of (H, W), (N, H, W) or (N, C, H, W) images, and the original shape."""
    images = np.asarray(images)
    if not 2 <= images.ndim <= 4:
        raise ValueError(f"images must be (H, W), (N, H, W) or (N, C, H, W), got shape {images.shape}")
    if images.ndim == 4:
        return images.astype(np.float64), images.shape
    return images.reshape(-1, 1, *images.shape[-2:]).astype(np.float64), images.shape


def scale_rotate_shift(
    images: np.ndarray,
    rng: np.random.Generator,
    scale_sd: float = 0.1,
    rotation_sd_deg: float = 10.0,
    shift_sd_px: float = 2.0,
) -> np.ndarray:
    """ST: x'(p) = x(A^-1 (p - c - t) + c), A = R(theta) diag(s_y, s_x); s = exp(N(0, scale_sd^2)) per
    axis, theta ~ N(0, rotation_sd_deg), t ~ N(0, shift_sd_px^2) per axis; bilinear, zero outside."""
    flat, shape = _flatten(images)
    n, _, h, w = flat.shape
    scale = np.exp(rng.normal(0.0, scale_sd, size=(n, 2)))
    theta = np.deg2rad(rng.normal(0.0, rotation_sd_deg, size=n))
    shift = rng.normal(0.0, shift_sd_px, size=(n, 2))
    cos, sin = np.cos(theta), np.sin(theta)
    # inverse map A^-1 = diag(1/s) R(-theta), acting on (y, x) offsets from the centre
    inv = np.empty((n, 2, 2))
    inv[:, 0, 0], inv[:, 0, 1] = cos / scale[:, 0], sin / scale[:, 0]
    inv[:, 1, 0], inv[:, 1, 1] = -sin / scale[:, 1], cos / scale[:, 1]
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out_offsets = np.stack([yy, xx]).reshape(2, -1)[None] - (centre + shift)[:, :, None]  # n x 2 x HW
    src = np.einsum("nij,njp->nip", inv, out_offsets) + centre[None, :, None]
    coords = np.stack([np.broadcast_to(np.arange(n)[:, None], (n, h * w)), src[:, 0], src[:, 1]]).reshape(3, n, h, w)
    out = np.stack(
        [map_coordinates(flat[:, c], coords, order=1, mode="constant", cval=0.0) for c in range(flat.shape[1])], 1
    )
    return np.clip(out, 0.0, 1.0).astype(np.float32).reshape(shape)


def background(
    images: np.ndarray,
    rng: np.random.Generator,
    contrast: tuple[float, float] = (0.3, 1.0),
    offset: tuple[float, float] = (0.0, 0.7),
    dev_max: float = 0.5,
) -> np.ndarray:
    """BG: x' = clip(c x + b + g, 0, 1), c ~ U(contrast), b ~ U(offset), g a plane in a random direction
    whose largest |value| on the image is ~ U(0, dev_max)."""
    flat, shape = _flatten(images)
    n, _, h, w = flat.shape
    c = rng.uniform(*contrast, size=(n, 1, 1, 1))
    b = rng.uniform(*offset, size=(n, 1, 1, 1))
    phi = rng.uniform(0.0, 2 * math.pi, size=(n, 1, 1, 1))
    dev = rng.uniform(0.0, dev_max, size=(n, 1, 1, 1))
    yy, xx = np.meshgrid(np.linspace(-1.0, 1.0, h), np.linspace(-1.0, 1.0, w), indexing="ij")
    direction = xx * np.cos(phi) + yy * np.sin(phi)
    extreme = np.abs(np.cos(phi)) + np.abs(np.sin(phi))  # max of |direction| over the image corners
    plane = dev * direction / extreme
    return np.clip(c * flat + b + plane, 0.0, 1.0).astype(np.float32).reshape(shape)


def white_noise(
    images: np.ndarray, rng: np.random.Generator, sigma_range: tuple[float, float] = (0.03, 0.3)
) -> np.ndarray:
    """WN: x' = clip(x + N(0, sigma^2), 0, 1), sigma log-uniform in ``sigma_range`` per image."""
    flat, shape = _flatten(images)
    lo, hi = sigma_range
    if not 0 < lo <= hi:
        raise ValueError(f"sigma_range must satisfy 0 < low <= high, got {sigma_range}")
    sigma = np.exp(rng.uniform(math.log(lo), math.log(hi), size=(flat.shape[0], 1, 1, 1)))
    return np.clip(flat + sigma * rng.normal(size=flat.shape), 0.0, 1.0).astype(np.float32).reshape(shape)


def apply_shift(images: np.ndarray, kinds: tuple[str, ...] | list[str], rng: np.random.Generator) -> np.ndarray:
    """Apply the image transforms among ``kinds`` in the order ST, BG, WN (CD only reorders a block,
    see :func:`class_clustered_order`, and is ignored here)."""
    unknown = [k for k in kinds if k not in SHIFT_KINDS]
    if unknown:
        raise ValueError(f"unknown shift kind(s) {unknown}; choose from: {', '.join(SHIFT_KINDS)}")
    out = np.asarray(images, dtype=np.float32)
    if "ST" in kinds:
        out = scale_rotate_shift(out, rng)
    if "BG" in kinds:
        out = background(out, rng)
    if "WN" in kinds:
        out = white_noise(out, rng)
    return out
