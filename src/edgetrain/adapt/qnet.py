"""The quantized network that adapts on the device: a list of fixed-point stages.

LRT v1 section 5 and appendix C; docs/adaptation.md. Every tensor lives on a
power-of-2 grid (:class:`Grid`, the TQT quantizer with a fixed ``log2_t``). A weight layer computes

    z = q_acc( q_acc(wmult * q_w(W) (*) a) + q_b(b) ),   a' = q_act(ReLU(z))   (ReLU optional)

with ``W`` the stored NVM value in [-1, 1), ``wmult = 2^floor(log2 sqrt(3 nlvar / fan_in))`` the
power of 2 nearest He initialisation (nlvar = 2 before a ReLU, 1 for the logits). Backward is STE
through every quantizer; in online mode the gradients are quantized (8-bit, [-1, 1)) after each
ReLU derivative, at each layer input and out of the loss. Formats come from a mapping
``layer name -> LayerFormats`` (default: the paper's), so calibrated TQT formats plug in the same way.

Batch norm is the paper's streaming batch norm (App. E): per-batch channel mean ``mu_i`` and mean
square ``sq_i``, EMAs ``mu_s = eta mu_s + (1-eta) mu_i``, ``sq_s = eta sq_s + (1-eta) sq_i`` (eta =
1 - 1/B), bias-corrected by ``1 - eta^step``; ``var = sq - mu^2`` clipped to [1e-8, 1e8]; no gradient
through the statistics. With batch 1 this is the on-device rule; with larger batches it pretrains.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit
from torch import nn

from edgetrain.fixedpoint import FixedPointFormat, Rounding
from edgetrain.models import LRTNet


@dataclass(frozen=True)
class Grid:
    """A fixed-point grid: ``bits``-wide codes times 2^k with threshold 2^log2_t (TQT, fixed t)."""

    bits: int
    signed: bool
    log2_t: int

    @cached_property
    def fmt(self) -> FixedPointFormat:
        return FixedPointFormat(self.bits, self.signed)

    @cached_property
    def lsb(self) -> float:
        """2^k with k = log2_t - (b-1) signed, log2_t - b unsigned."""
        return math.ldexp(1.0, self.fmt.exponent(self.log2_t))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """clip(round(x / lsb), n, p) * lsb, straight-through (gradient masked outside the range).

        The TQT quantizer (``edgetrain.tqt``) with its threshold fixed, so without the threshold
        gradient: a lean path because the online loop calls it ~40 times per sample.
        """
        if x.requires_grad:
            return _STEQuantize.apply(x, self)
        return grid_round(x, self.lsb, self.fmt.qmin, self.fmt.qmax)

    @torch.no_grad()
    def descend_(self, param: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        """``param <- q(param - q(lr grad))`` in place (the 16-bit bias / BN step, LRT v1 section 4.5):
        one numba pass in the parameter's own dtype for a contiguous float32/float64 CPU parameter,
        the same operations as ``param.copy_(self.quantize(param - self.quantize(lr * grad)))``."""
        values = param.detach()
        if values.dtype not in _NUMPY_FLOAT or grad.dtype != values.dtype or not values.is_contiguous():
            values.copy_(self.quantize(values - self.quantize(lr * grad)))
            return
        kind = _NUMPY_FLOAT[values.dtype]
        _descend(
            values.numpy().reshape(-1),
            grad.detach().contiguous().numpy().reshape(-1),
            *(kind(v) for v in (lr, self.lsb, 1.0 / self.lsb, self.fmt.qmin, self.fmt.qmax)),
        )

    def codes(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Integer codes clip(round(x / lsb), n, p) as int64 (no gradient)."""
        values = np.rint(np.asarray(x, dtype=np.float64) / self.lsb)
        return np.clip(values, self.fmt.qmin, self.fmt.qmax).astype(np.int64)

    def __str__(self) -> str:
        return f"{self.fmt}[2^{self.log2_t}]"


@njit(cache=True)
def _grid_round(x, lsb, lo, hi, out):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """out = clip(round(x / lsb), lo, hi) lsb (NaN stays NaN), computed in float64: with lsb a power
    of 2, x / lsb = x (1 / lsb) and every step is exact, so a float32 result equals float32 torch ops."""
    inverse = 1.0 / lsb
    for k in range(x.shape[0]):
        v = np.float64(x[k])
        out[k] = v if np.isnan(v) else min(max(np.rint(v * inverse), lo), hi) * lsb


@njit(cache=True)
def _on_grid(v, lsb, inverse, lo, hi):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    return v if np.isnan(v) else min(max(np.rint(v * inverse), lo), hi) * lsb


@njit(cache=True)
def _descend(param, grad, lr, lsb, inverse, lo, hi):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """param <- q(param - q(lr grad)) element-wise in the arrays' dtype (every argument of that dtype,
    as torch computes a float32 tensor times a Python float in float32)."""
    for k in range(param.shape[0]):
        step = _on_grid(lr * grad[k], lsb, inverse, lo, hi)
        param[k] = _on_grid(param[k] - step, lsb, inverse, lo, hi)


_NUMPY_FLOAT = {torch.float32: np.float32, torch.float64: np.float64}
_TORCH_FLOAT = {np.float32: torch.float32, np.float64: torch.float64}


def grid_round(x: torch.Tensor, lsb: float, lo: int, hi: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.round(x / lsb).clamp_(lo, hi).mul_(lsb)`` (then ``.to(dtype)``, exact) in one numba pass
    for CPU float tensors: the online loop quantizes ~20 small tensors per sample."""
    if x.dtype not in (torch.float32, torch.float64) or x.device.type != "cpu":
        return torch.round(x / lsb).clamp_(lo, hi).mul_(lsb).to(dtype or x.dtype)
    flat = x.detach().contiguous().numpy().reshape(-1)
    out = torch.empty(x.shape, dtype=dtype or x.dtype)
    _grid_round(flat, lsb, float(lo), float(hi), out.numpy().reshape(-1))
    return out


class _STEQuantize(torch.autograd.Function):
    """Fixed-grid quantizer with the straight-through gradient dq/dx = 1 inside [n, p], else 0."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, grid: Grid) -> torch.Tensor:  # type: ignore[override]
        codes = torch.round(x / grid.lsb)
        ctx.save_for_backward((codes >= grid.fmt.qmin) & (codes <= grid.fmt.qmax))
        return codes.clamp_(grid.fmt.qmin, grid.fmt.qmax).mul_(grid.lsb)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None


class _GradQuantize(torch.autograd.Function):
    """Identity forward; backward rounds the incoming gradient onto ``grid`` (LRT v1 appendix C)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, grid: Grid) -> torch.Tensor:  # type: ignore[override]
        ctx.grid = grid
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grid: Grid = ctx.grid
        codes = torch.round(grad / grid.lsb).clamp_(grid.fmt.qmin, grid.fmt.qmax)
        return codes.mul_(grid.lsb), None


# The paper's fixed formats (LRT v1 appendix C).
PAPER_WEIGHT = Grid(8, True, 0)  # [-1, 1), LSB 2^-7
PAPER_WIDE = Grid(16, True, 3)  # biases, accumulators, BN parameters: [-8, 8), LSB 2^-12
PAPER_ACT = Grid(8, False, 1)  # ReLU outputs: [0, 2), LSB 2^-7
PAPER_BN_OUT = Grid(8, True, 1)  # BN outputs: [-2, 2)
PAPER_GRAD = Grid(8, True, 0)  # gradients: [-1, 1)
PAPER_INPUT = Grid(8, False, 0)  # pixels: [0, 1), LSB 2^-8


@dataclass(frozen=True)
class LayerFormats:
    """Fixed-point formats of one layer. ``wmult_log2=None``: the He-nearest power of 2."""

    weight: Grid = PAPER_WEIGHT
    bias: Grid = PAPER_WIDE
    acc: Grid = PAPER_WIDE
    act: Grid = PAPER_ACT
    grad: Grid = PAPER_GRAD
    bn_out: Grid = PAPER_BN_OUT
    bn_mean: Grid = PAPER_WIDE
    bn_msq: Grid = Grid(16, True, 6)  # [-64, 64): the square of the [-8, 8) range
    wmult_log2: int | None = None


PAPER_FORMATS = LayerFormats()


def he_wmult_log2(fan_in: int, before_relu: bool) -> int:
    """log2 of wmult = 2^floor(log2 sqrt(3 nlvar / fan_in)), nlvar = 2 before a ReLU else 1 (App. C)."""
    nlvar = 2 if before_relu else 1
    return math.floor(math.log2(math.sqrt(3 * nlvar / fan_in)))


class GradQuantMixin(nn.Module):
    """Stages that quantize gradients do so only in online mode (``quantize_grads``)."""

    quantize_grads: bool = False

    def gq(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        return _GradQuantize.apply(x, grid) if self.quantize_grads and x.requires_grad else x

    def quantize_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """A gradient on the layer's gradient grid in online mode (LRT v1 App. C); as is offline."""
        if not self.quantize_grads:
            return grad
        grid: Grid = self.formats.grad  # type: ignore[attr-defined]
        return torch.round(grad / grid.lsb).clamp_(grid.fmt.qmin, grid.fmt.qmax).mul_(grid.lsb)


class QWeight(GradQuantMixin):
    """A conv or linear layer with NVM-stored weights ``W`` (stored units, [-1, 1)) and a ReLU option.

    ``weight`` holds ``codes * lsb`` of the stored array, shaped like torch's weight; the matrix view
    is ``n_out x n_in`` with ``n_in = c_in kh kw`` in ``unfold`` order (im2col, LRT App. B).
    Always ungrouped (``groups = 1``; the device network also has grouped / depthwise layers).
    """

    groups = 1

    def __init__(
        self,
        name: str,
        weight: torch.Tensor,
        bias: torch.Tensor,
        formats: LayerFormats,
        relu: bool,
        wmult_log2: int,
        stride: int = 1,
        padding: int = 0,
    ) -> None:
        super().__init__()
        self.name = name
        self.formats = formats
        self.relu = relu
        self.wmult = math.ldexp(1.0, wmult_log2)
        self.stride = stride
        self.padding = padding
        self.is_conv = weight.ndim == 4
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.bias = nn.Parameter(bias.detach().clone().float())
        self.record = False  # keep the input and dz of each online pass (the update rules read them)
        self.cache_input: torch.Tensor | None = None
        self.cache_dz: torch.Tensor | None = None
        self.out_pixels = 1  # output pixels of the last pass (im2col rows; 1 for linear)
        self._frozen_wq: torch.Tensor | None = None  # wmult * q_w(W) while W is not trained by autograd
        acc = QuantStage(formats.acc.lsb, formats.acc.fmt.qmin, formats.acc.fmt.qmax)
        act = QuantStage(formats.act.lsb, formats.act.fmt.qmin, formats.act.fmt.qmax, relu=True)
        self.chain = QuantChain([acc, acc, act] if relu else [acc, acc])

    @property
    def shape2d(self) -> tuple[int, int]:
        """(n_out, n_in) of the weight matrix."""
        return int(self.weight.shape[0]), int(self.weight[0].numel())

    @property
    def kernel_size(self) -> tuple[int, int]:
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not self.weight.requires_grad:  # online: stored weights, one node
            self.cache_dz = None
            if self.record:
                self.cache_input = x.detach()
            return _QWeightStep.apply(x, self.bias, self)
        f = self.formats
        z = self.product(self.gq(x, f.grad), self.effective_weight())
        z = f.acc.quantize(f.acc.quantize(z) + self._bias_view(f.bias.quantize(self.bias)))
        if not self.relu:
            return z
        return f.act.quantize(torch.relu(self.gq(z, f.grad)))

    def product(self, x: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
        """wq (*) x: the convolution or the matrix product of the flattened input (no bias)."""
        if self.is_conv:
            z = F.conv2d(x, wq, stride=self.stride, padding=self.padding)
            self.out_pixels = int(z.shape[-2] * z.shape[-1])
            return z
        return F.linear(x.flatten(1), wq)

    def effective_weight(self) -> torch.Tensor:
        """wmult * q_w(W); cached while W needs no gradient (online it changes only via set_codes)."""
        if self.weight.requires_grad:
            return self.formats.weight.quantize(self.weight) * self.wmult
        if self._frozen_wq is None:
            self._frozen_wq = self.formats.weight.quantize(self.weight.detach()) * self.wmult
        return self._frozen_wq

    def _bias_view(self, b: torch.Tensor) -> torch.Tensor:
        return b.view(1, -1, 1, 1) if self.is_conv else b

    def _recorded(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache_input is None or self.cache_dz is None:
            raise RuntimeError(f"layer {self.name}: no online forward/backward pass has been recorded")
        return self.cache_input, self.cache_dz

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The last sample's im2col terms (LRT App. B): ``a`` (pixels x n_in) and ``dz`` (pixels x n_out)
        with dz = wmult * dL/dz, the gradient with respect to the stored weight's product."""
        x, grad = self._recorded()
        if not self.is_conv:
            return x.flatten(1), grad
        a = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)
        return a[0].T, grad[0].flatten(1).T

    def nonzero_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of :meth:`columns` whose ``dz`` is non-zero, float32, cut only at those pixels."""
        x, dz = self._recorded()
        pair = (self.stride, self.stride), (self.padding, self.padding)
        kernel = self.kernel_size if self.is_conv else (1, 1)
        return nonzero_im2col(x, dz, kernel, *pair, (1, 1), self.is_conv)

    def weight_grad(self) -> torch.Tensor:
        """Sum over pixels of dz a^T (n_out x n_in) from the recorded pass."""
        a, dz = self.columns()
        return dz.T @ a

    def set_codes(self, codes: np.ndarray, cells: np.ndarray | None = None) -> None:
        """Load the stored codes (n_out x n_in) into the float weight (codes * lsb); with ``cells``
        (flat indices of the only cells that changed since the last load) only those."""
        with torch.no_grad():
            if cells is None:
                values = torch.from_numpy(codes.astype(np.float32) * self.formats.weight.lsb)
                self.weight.copy_(values.view_as(self.weight))
            else:
                changed = codes.reshape(-1)[cells].astype(np.float32) * self.formats.weight.lsb
                self.weight.view(-1)[torch.from_numpy(cells)] = torch.from_numpy(changed)
        self._frozen_wq = None
        self._input_grad_cache = None

    def codes(self) -> np.ndarray:
        """Current stored codes as an (n_out x n_in) int64 matrix."""
        return self.formats.weight.codes(self.weight.detach().reshape(self.shape2d).numpy())


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    """(v, v) for an int, else the first two entries (a conv's stride, padding, dilation, kernel)."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def input_gradient(
    shape: torch.Size, weight: torch.Tensor, dz: torch.Tensor, layer: Any, units: tuple[float, float] | None = None
) -> torch.Tensor:
    """dL/dx = W^T dL/dz of a conv (``torch.nn.grad.conv2d_input`` with the layer's stride, padding,
    dilation, groups) or a linear layer (QNet and DeviceNet layers), float32.

    ``units`` = (u_dz, u_w): when dz and W are integer multiples of them, a sample whose dz has few
    non-zero entries is computed entry by entry (:func:`_scattered_input_gradient`) whenever the float32
    sums are provably exact: every dx entry sums terms of magnitude <= max|dz| |W[:, c]|_1, so
    max|dz / u_dz| max_c |W[:, c] / u_w|_1 <= 2^24 makes the result the same in any order, the dense
    kernel's included."""
    if units is not None and dz.shape[0] == 1 and (layer.is_conv or weight.numel() >= SCATTER_MIN_LINEAR):
        dx = _scattered_input_gradient(shape, weight, dz, layer, units)
        if dx is not None:
            return dx
    if not layer.is_conv:
        return (dz @ weight).view(shape)
    dilation, groups = getattr(layer, "dilation", 1), getattr(layer, "groups", 1)
    return torch.nn.grad.conv2d_input(shape, weight, dz, layer.stride, layer.padding, dilation, groups)


SCATTER_GRADIENT_SHARE = 4  # W^T dz entry by entry when at most 1/4 of dz's entries are non-zero
SCATTER_MIN_LINEAR = 2**16  # smaller linear layers: the dense product costs less than the call


def _laid_weights(layer: Any, weight: torch.Tensor) -> np.ndarray:
    """W laid out for the scatter (n_out x kh x kw x c_in/groups; a linear layer's n_out x 1 x 1 x n_in),
    float32; a conv's copy is cached on the layer until ``weight`` is another tensor or the layer's codes
    change (``set_codes`` drops the cache)."""
    values = weight.detach()
    if not layer.is_conv:
        return values.contiguous().numpy().reshape(values.shape[0], 1, 1, -1)
    cache = getattr(layer, "_input_grad_cache", None)
    if cache is None or cache[0] is not weight:
        cache = (weight, np.ascontiguousarray(values.permute(0, 2, 3, 1).numpy()))
        layer._input_grad_cache = cache
    return cache[1]


def _scattered_input_gradient(
    shape: torch.Size, weight: torch.Tensor, dz: torch.Tensor, layer: Any, units: tuple[float, float]
) -> torch.Tensor | None:
    """:func:`input_gradient` as a scatter of dz's non-zero entries (``dx[c, window] += dz[o, pixel]
    W[o, c, window]``), any groups; None where it would not pay (more than 1/SCATTER_GRADIENT_SHARE of
    the entries non-zero) or could be inexact. Exact under the bound of :func:`input_gradient`
    (dz on its grid, ``max|dz / u_dz| max_c |W[:, c] / u_w|_1 <= 2^24``), so it equals the dense kernel
    bit for bit: every partial sum of every dx entry is an integer multiple of u_dz u_w below 2^24 of
    them, exact in float32 in any order. The column sum is first bounded from the weight format alone
    (``n_out kh kw 2^(bits-1)``) and computed only when that bound is not enough."""
    if dz.dtype != torch.float32 or weight.dtype != torch.float32 or math.log2(units[0] * units[1]) < -100:
        return None
    grad = dz[0].detach().contiguous().numpy()
    laid = _laid_weights(layer, weight)
    if layer.is_conv:
        flat = grad.reshape(grad.shape[0], -1)
        kernel = (laid.shape[1], laid.shape[2])
        stride, padding = pair(layer.stride), pair(layer.padding)
        dilation = pair(getattr(layer, "dilation", 1))
        out = np.empty((shape[2], shape[3], shape[1]), np.float32)  # H x W x C: the scatter runs along C
        out_width = grad.shape[2]
    else:
        flat = grad.reshape(-1, 1)  # n_out x 1 "pixel"
        kernel, stride, padding, dilation = (1, 1), (1, 1), (0, 0), (1, 1)
        out = np.empty((1, 1, laid.shape[3]), np.float32)
        out_width = 1
    formats = getattr(layer, "formats", None)
    column_bound = math.inf
    if formats is not None:
        column_bound = float(laid.shape[0] * laid.shape[1] * laid.shape[2]) * 2.0 ** (formats.weight.bits - 1)
    args = (flat, laid, out, out_width, kernel, stride, padding, dilation, int(getattr(layer, "groups", 1)))
    inverse = np.float32(1.0 / units[0])
    status = _scatter_gradient(*args, inverse, column_bound, float(FLOAT32_EXACT), SCATTER_GRADIENT_SHARE)
    if status == SCATTER_OVER_BOUND:  # the format's bound is not enough: the weights' own column sums
        values = weight.detach()
        column_l1 = float(values.abs().sum([d for d in range(values.dim()) if d != 1]).max()) / units[1]
        status = _scatter_gradient(*args, inverse, column_l1, float(FLOAT32_EXACT), SCATTER_GRADIENT_SHARE)
    if status != SCATTER_DONE:
        return None
    if not layer.is_conv:
        return torch.from_numpy(out.reshape(-1)).view(shape)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))).view(shape)


SCATTER_DONE, SCATTER_DECLINED, SCATTER_OVER_BOUND = 0, 1, 2
FLOAT32_EXACT = 2**24  # every integer of magnitude <= 2^24 is a float32


@njit(cache=True)
def _scatter_gradient(
    grad, weight, out, out_width, kernel, stride, padding, dilation, groups, inverse, column_l1, bound, share
):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202, PLR0913
    """out (H x W x C_in, zero-filled here) = sum over the non-zero grad[o, p] (n_out x P, P = pixels
    of ``out_width`` per row) of grad[o, p] weight[o, ky, kx, :] at the window's input pixels (zero
    padding outside), input channels of o's group; returns 0, or, writing nothing, 1 when more than
    1/share of the entries are non-zero or an entry is not an integer multiple of 1 / ``inverse``, 2
    when max|grad| ``inverse`` ``column_l1`` exceeds ``bound``."""
    n_out, pixels = grad.shape
    largest = 0.0
    count = 0
    for o in range(n_out):
        for p in range(pixels):
            v = grad[o, p]
            if v != 0:
                code = v * inverse
                if code != np.rint(code):
                    return 1
                largest = max(largest, abs(code))
                count += 1
    if share * count > n_out * pixels:
        return 1
    if largest * column_l1 > bound:
        return 2
    out[:] = 0.0
    h, w, channels = out.shape
    per_group = channels // groups
    out_per_group = n_out // groups
    kh, kw = kernel
    for o in range(n_out):
        base = (o // out_per_group) * per_group
        for p in range(pixels):
            v = grad[o, p]
            if v == 0:
                continue
            oy, ox = p // out_width, p % out_width
            for ky in range(kh):
                iy = oy * stride[0] - padding[0] + ky * dilation[0]
                if iy < 0 or iy >= h:
                    continue
                for kx in range(kw):
                    ix = ox * stride[1] - padding[1] + kx * dilation[1]
                    if ix < 0 or ix >= w:
                        continue
                    row = weight[o, ky, kx]
                    target = out[iy, ix, base : base + per_group]  # a view: the loop vectorizes
                    for c in range(per_group):
                        target[c] += v * row[c]
    return 0


@njit(cache=True)
def _kept_rows(flat):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """(pixels, rows): the columns of ``flat`` (n_out x P) holding a non-zero, and those columns as
    float32 rows (kept x n_out)."""
    keep = np.zeros(flat.shape[1], np.bool_)
    for o in range(flat.shape[0]):
        for p in range(flat.shape[1]):
            if flat[o, p] != 0:
                keep[p] = True
    pixels = np.flatnonzero(keep)
    rows = np.empty((pixels.shape[0], flat.shape[0]), np.float32)
    for r in range(pixels.shape[0]):
        for o in range(flat.shape[0]):
            rows[r, o] = flat[o, pixels[r]]
    return pixels, rows


@njit(cache=True)
def _window_walk(image, rows, pixels, out_width, kernel, stride, padding, dilation):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202, PLR0913
    """im2col at the kept output ``pixels`` (flat indices, ``out_width`` per row) of ``image``
    (C x H x W, zero padding): ``rows[r, col] = image[ch, iy, ix]``, columns in ``F.unfold`` order
    (channel, kernel row, kernel column); entries outside the image are left as they are."""
    channels, h, w = image.shape
    kh, kw = kernel
    for r in range(pixels.shape[0]):
        oy, ox = pixels[r] // out_width, pixels[r] % out_width
        for ch in range(channels):
            for ky in range(kh):
                iy = oy * stride[0] - padding[0] + ky * dilation[0]
                if iy < 0 or iy >= h:
                    continue
                for kx in range(kw):
                    ix = ox * stride[1] - padding[1] + kx * dilation[1]
                    if 0 <= ix < w:
                        rows[r, (ch * kh + ky) * kw + kx] = image[ch, iy, ix]


def nonzero_im2col(
    x: torch.Tensor,
    dz: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    is_conv: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, dz) float32 rows of the im2col terms (LRT App. B) of one sample whose ``dz`` is non-zero.

    ``x`` is the layer input (1 x C x H x W, or 1 x n_in for a linear layer), ``dz`` its output
    gradient (1 x n_out x Ho x Wo, or 1 x n_out). Conv patches are cut only at the kept pixels, in
    one pass (same column order as ``F.unfold``), so a sample whose gradient is mostly zero costs
    little; values are codes times powers of 2, exact in float32.
    """
    if not is_conv:
        if not dz.any():  # the common case after 8-bit gradient quantization: no terms at all
            return x.new_zeros(0, x[0].numel(), dtype=torch.float32), dz.new_zeros(0, dz.shape[1], dtype=torch.float32)
        keep = (dz != 0).any(1).nonzero()[:, 0]
        return x.flatten(1)[keep].float(), dz[keep].float()
    image = np.ascontiguousarray(x[0].detach().numpy())
    grad = np.ascontiguousarray(dz[0].detach().numpy())
    pixels, rows = _kept_rows(grad.reshape(grad.shape[0], -1))
    a = np.zeros((pixels.shape[0], image.shape[0] * kernel[0] * kernel[1]), np.float32)
    _window_walk(image, a, pixels, grad.shape[2], kernel, stride, padding, dilation)
    return torch.from_numpy(a), torch.from_numpy(rows)


ROUNDING_CODES = {Rounding.HALF_EVEN.value: 0, Rounding.HALF_AWAY.value: 1, Rounding.FLOOR.value: 2}


@dataclass(frozen=True)
class QuantStage:
    """One quantizer of a weight layer's output chain: step 2^k, code range [lo, hi], rounding, and
    whether its straight-through mask also requires a positive input (a ReLU folded into it)."""

    step: float
    lo: int
    hi: int
    rounding: str = Rounding.HALF_EVEN.value
    relu: bool = False


@njit(cache=True)
def round_code(x, mode, half):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201
    """``round_tensor``'s modes on one value (``ROUNDING_CODES``: 0 half-even, 1 half away from zero,
    2 floor); ``half`` = 0.5 in x's dtype. torch.sign(-0) is +0 (NumPy's is -0): so is the sign here."""
    if mode == 0:
        return np.rint(x)
    if mode == 1:
        sign = np.sign(x) if x != 0 else np.abs(x)
        return sign * np.floor(np.abs(x) + half)
    return np.floor(x)


@njit(cache=True)
def _requantize_chain(z, bias, steps, inverses, limits, modes, relu, half, out, masks):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """out = q_S(...q_1(q_0(z) + b)...) element-wise in z's dtype, masks[s] = code s did not clip
    (and, where relu[s], its input was > 0); z, out: N x C x P; bias: C. ``v * 2^-k`` is ``v / 2^k``
    exactly (a power of 2), so each stage is the torch ops' arithmetic, one row at a time."""
    buf = np.empty(z.shape[2], z.dtype)
    for i in range(z.shape[0]):
        for ch in range(z.shape[1]):
            buf[:] = z[i, ch]
            for s in range(steps.shape[0]):
                step, inv, lo, hi = steps[s], inverses[s], limits[s, 0], limits[s, 1]
                mode, positive, mask = modes[s], relu[s], masks[s, i, ch]
                for k in range(buf.shape[0]):
                    v = buf[k]
                    code = round_code(v * inv, mode, half)
                    mask[k] = (code >= lo) & (code <= hi) & ((not positive) | (v > 0))
                    buf[k] = min(max(code, lo), hi) * step
                if s == 0:
                    buf += bias[ch]
            out[i, ch] = buf


class QuantChain:
    """A weight layer's quantizer chain ``q_S(...q_1(q_0(z) + b)...)`` as one fused pass: the same
    operations in z's dtype as the torch ops ``clip(round(v / 2^k), lo, hi) 2^k`` (bit-identical),
    returning every stage's straight-through mask (code inside [lo, hi]; input > 0 for a folded
    ReLU). ``z``: N x C (x H x W); ``bias``: C, added after the first stage."""

    def __init__(self, stages: Sequence[QuantStage]) -> None:
        self.stages = tuple(stages)
        self._params: dict[type, tuple[np.ndarray, ...]] = {}

    def params(self, dtype: type) -> tuple[np.ndarray, ...]:
        """(steps, 1 / steps, limits, rounding modes, relu flags, 0.5) in ``dtype``, built once per dtype."""
        if dtype not in self._params:
            self._params[dtype] = (
                np.array([q.step for q in self.stages], dtype=dtype),
                np.array([1.0 / q.step for q in self.stages], dtype=dtype),
                np.array([(q.lo, q.hi) for q in self.stages], dtype=dtype),
                np.array([ROUNDING_CODES[q.rounding] for q in self.stages], dtype=np.int64),
                np.array([q.relu for q in self.stages]),
                np.array(0.5, dtype=dtype),
            )
        return self._params[dtype]

    def __call__(
        self, z: torch.Tensor, bias: torch.Tensor, out_dtype: type | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(output in ``out_dtype`` (default: z's), masks of every stage, each shaped like z)."""
        flat = z.detach().contiguous().numpy()
        dtype = flat.dtype.type
        flat = flat.reshape(z.shape[0], z.shape[1], -1)
        steps, inverses, limits, modes, relu, half = self.params(dtype)
        out = torch.empty(z.shape, dtype=_TORCH_FLOAT[out_dtype or dtype])  # torch-owned: no from_numpy per call
        masks = torch.empty((len(self.stages), *z.shape), dtype=torch.bool)
        b = np.ascontiguousarray(bias.detach().numpy(), dtype=dtype)
        _requantize_chain(
            flat,
            b,
            steps,
            inverses,
            limits,
            modes,
            relu,
            half[()],
            out.numpy().reshape(flat.shape),
            masks.numpy().reshape(len(self.stages), *flat.shape),
        )
        return out, tuple(masks.unbind(0))


@njit(cache=True)
def _layer_gradient(grad, pre, mid, post, use_pre, use_mid, quantize, lsb, lo, hi, wmult, bias_g, g, dz):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202, PLR0913
    """One pass of :func:`layer_gradient` over flat arrays; returns whether any g is non-zero. Every
    step is exact (masks, powers of 2, rounding to integers), as in the torch ops it replaces."""
    inverse = 1.0 / lsb
    nonzero = False
    for k in range(grad.shape[0]):
        v = grad[k]
        if use_pre:
            v = v * (1.0 if pre[k] else 0.0)
        if quantize:
            v = min(max(np.rint(v * inverse), lo), hi) * lsb
        if use_mid:
            v = v * (1.0 if mid[k] else 0.0)
        bias_g[k] = v
        v = v * (1.0 if post[k] else 0.0)
        g[k] = v
        dz[k] = v * wmult
        nonzero |= v != 0
    return nonzero


def layer_gradient(
    grad: torch.Tensor,
    grid: Grid | None,
    post: torch.Tensor,
    pre: torch.Tensor | None = None,
    mid: torch.Tensor | None = None,
    wmult: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """A weight layer's straight-through backward through its quantizer chain in one pass:
    ``g_b = m_mid q_g(m_pre grad)`` (``q_g`` onto ``grid`` when given, LRT v1 App. C), ``g = m_post g_b``
    (dL/dz), ``dz = wmult g`` (the update rules' gradient in stored units); returns (g_b, g, dz, any g
    non-zero). g_b is what the bias gradient sums."""
    values = np.ascontiguousarray(grad.detach().numpy()).reshape(-1)
    flat = [m.detach().numpy().reshape(-1) if m is not None else None for m in (pre, mid, post)]
    tensors = torch.empty((3, *grad.shape), dtype=_TORCH_FLOAT[values.dtype.type])  # bias_g, g, dz
    out = tensors.numpy().reshape(3, -1)
    fmt = grid.fmt if grid is not None else None
    nonzero = _layer_gradient(
        values,
        flat[0] if flat[0] is not None else flat[2],
        flat[1] if flat[1] is not None else flat[2],
        flat[2],
        pre is not None,
        mid is not None,
        grid is not None,
        grid.lsb if grid is not None else 1.0,
        float(fmt.qmin) if fmt is not None else 0.0,
        float(fmt.qmax) if fmt is not None else 0.0,
        float(wmult),
        *out,
    )
    bias_g, g, dz = tensors.unbind(0)
    return bias_g, g, dz, bool(nonzero)


def _ste(x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """(q(x), mask): the fixed-grid quantizer and its straight-through mask (inside [n, p])."""
    codes = torch.round(x / grid.lsb)
    return codes.clamp(grid.fmt.qmin, grid.fmt.qmax).mul_(grid.lsb), (codes >= grid.fmt.qmin) & (codes <= grid.fmt.qmax)


class _QWeightStep(torch.autograd.Function):
    """An online :class:`QWeight` (stored weights, no weight gradient) as one autograd node with its
    backward written out; the same arithmetic as the module's quantizer chain:

    forward ``out = q_act(ReLU(q_acc(q_acc(wq x) + q_b(b))))``; backward: g m_act (ReLU > 0), onto the
    gradient grid, m_acc2 -> dL/db (m_b, summed over pixels) and m_acc1 -> dL/dz (recorded as
    ``dz = wmult dL/dz``), dL/dx = wq^T dL/dz onto the gradient grid (online mode).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, bias: torch.Tensor, layer: QWeight
    ) -> torch.Tensor:
        bq, bias_mask = _ste(bias.detach(), layer.formats.bias)
        out, (acc1, acc2, *act) = layer.chain(layer.product(x, layer.effective_weight()), bq)
        ctx.layer, ctx.shape = layer, x.shape
        ctx.save_for_backward(acc1, acc2, bias_mask, *act)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        layer: QWeight = ctx.layer
        acc1, acc2, bias_mask, *act = ctx.saved_tensors
        grid = layer.formats.grad if act and layer.quantize_grads else None
        bias_g, grad, dz, nonzero = layer_gradient(grad, grid, acc1, act[0] if act else None, acc2, layer.wmult)
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = (bias_g.sum((0, 2, 3)) if layer.is_conv else bias_g.sum(0)) * bias_mask
        if layer.record:
            layer.cache_dz = dz
        if not ctx.needs_input_grad[0]:
            return None, grad_bias, None
        if not nonzero:  # all-zero after gradient quantization: no kernel, nothing to quantize
            return grad.new_zeros(ctx.shape), grad_bias, None
        units = (layer.formats.grad.lsb, layer.formats.weight.lsb * layer.wmult)  # grad and wq: codes times these
        dx = input_gradient(ctx.shape, layer.effective_weight(), grad, layer, units)
        return layer.quantize_grad(dx), grad_bias, None


class ActQuant(GradQuantMixin):
    """A ReLU that is not fused into a weight layer (after max-pool): q_act(ReLU(x)), gradient quantized."""

    def __init__(self, formats: LayerFormats) -> None:
        super().__init__()
        self.formats = formats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.formats.act.quantize(torch.relu(self.gq(x, self.formats.grad)))


class StreamingBN(GradQuantMixin):
    """Streaming batch norm (LRT v1 App. E), channel-wise on N x C x H x W inputs.

    In train mode each forward updates the quantized EMAs of the batch's channel mean and mean
    square (eta = 1 - 1/B) and normalises with their bias-corrected values; in eval mode it only
    normalises. y = q_out(q(gamma) (x - mu) / sigma + q(beta)); dx = q_g(dy q(gamma) / sigma).
    """

    def __init__(self, name: str, channels: int, formats: LayerFormats, batch: int = 10) -> None:
        super().__init__()
        self.name = name
        self.formats = formats
        self.eta = 1.0 - 1.0 / batch
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.register_buffer("mean_ema", torch.zeros(channels))
        self.register_buffer("msq_ema", torch.zeros(channels))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.enabled = True

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bias-corrected (mu, sigma): mu = m / (1 - eta^t), var = clip(sq / (1 - eta^t) - mu^2)."""
        correction = 1.0 - self.eta ** max(int(self.step), 1)
        mu = self.mean_ema / correction
        var = (self.msq_ema / correction - mu * mu).clamp(1e-8, 1e8)
        return mu, torch.sqrt(var + 1e-8)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """One EMA step with the channel mean and mean square of ``x`` (over N, H, W), 16-bit stored."""
        f = self.formats
        mean = x.mean(dim=(0, 2, 3))
        msq = (x * x).mean(dim=(0, 2, 3))
        self.mean_ema.copy_(f.bn_mean.quantize(self.eta * self.mean_ema + (1 - self.eta) * mean))
        self.msq_ema.copy_(f.bn_msq.quantize(self.eta * self.msq_ema + (1 - self.eta) * msq))
        self.step += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        f = self.formats
        if self.training:
            self.observe(x.detach())
        mu, sigma = self.statistics()
        x = self.gq(x, f.grad)
        gamma = f.bias.quantize(self.gamma).view(1, -1, 1, 1)
        beta = f.bias.quantize(self.beta).view(1, -1, 1, 1)
        return f.bn_out.quantize(gamma * (x - mu.view(1, -1, 1, 1)) / sigma.view(1, -1, 1, 1) + beta)

    @torch.no_grad()
    def load_float(self, bn: nn.BatchNorm2d, warm_steps: int = 10_000) -> None:
        """Start from a float BN: EMAs = running mean and mean square, ``step`` large (no correction)."""
        self.gamma.copy_(bn.weight)
        self.beta.copy_(bn.bias)
        self.mean_ema.copy_(bn.running_mean)
        self.msq_ema.copy_(bn.running_var + bn.running_mean**2)
        self.step.fill_(warm_steps)


class QNet(nn.Module):
    """A sequence of quantized stages with the input quantized to ``input_grid``."""

    def __init__(self, stages: Sequence[nn.Module], input_grid: Grid = PAPER_INPUT) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.input_grid = input_grid

    @property
    def weight_layers(self) -> list[QWeight]:
        return [s for s in self.stages if isinstance(s, QWeight)]

    @property
    def bn_layers(self) -> list[StreamingBN]:
        return [s for s in self.stages if isinstance(s, StreamingBN)]

    def set_online(self, online: bool) -> None:
        """Online (batch 1) mode quantizes gradients; offline pretraining does not."""
        for stage in self.stages:
            if isinstance(stage, GradQuantMixin):
                stage.quantize_grads = online

    def set_streaming_bn(self, enabled: bool) -> None:
        """``False`` turns the BN stages into identities (the "no streaming batch norm" ablation)."""
        for bn in self.bn_layers:
            bn.enabled = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_grid.quantize(x)
        for stage in self.stages:
            x = stage(x)
        return x


@dataclass
class _Builder:
    formats: Mapping[str, LayerFormats]
    bn_batch: int
    stages: list[nn.Module] = field(default_factory=list)

    def fmt(self, name: str) -> LayerFormats:
        return self.formats.get(name, PAPER_FORMATS)

    def add_weight(self, name: str, module: nn.Conv2d | nn.Linear, relu: bool, last: bool) -> None:
        f = self.fmt(name)
        fan_in = int(module.weight[0].numel())
        wmult_log2 = f.wmult_log2 if f.wmult_log2 is not None else he_wmult_log2(fan_in, not last)
        stored = torch.from_numpy(f.weight.codes(module.weight.detach().numpy() / math.ldexp(1.0, wmult_log2)))
        bias = module.bias.detach() if module.bias is not None else torch.zeros(module.weight.shape[0])
        stride = padding = 0
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.dilation != (1, 1) or len(set(module.stride + module.padding)) > 2:
                raise ValueError(f"layer {name}: only plain square convolutions (groups=1, no dilation) adapt")
            stride, padding = module.stride[0], module.padding[0]
        self.stages.append(
            QWeight(name, stored.float() * f.weight.lsb, bias, f, relu, wmult_log2, max(stride, 1), padding)
        )

    def add_bn(self, name: str, bn: nn.BatchNorm2d) -> None:
        stage = StreamingBN(name, bn.num_features, self.fmt(name), self.bn_batch)
        stage.load_float(bn)
        self.stages.append(stage)


def quantize_for_adaptation(
    model: nn.Module,
    formats: Mapping[str, LayerFormats] | None = None,
    input_grid: Grid = PAPER_INPUT,
    bn_batch: int = 10,
) -> QNet:
    """Convert a float ``LRTNet`` or ``nn.Sequential`` (Conv2d, Linear, ReLU, MaxPool2d, BatchNorm2d,
    Flatten, Dropout) into a :class:`QNet`: weights divided by their wmult and rounded onto the
    weight grid (saturating), a ReLU right after a weight layer fused into it, BN made streaming."""
    if isinstance(model, LRTNet):
        named = [
            ("conv1", model.conv1),
            ("", nn.ReLU()),
            ("conv2", model.conv2),
            ("", model.pool),
            ("", nn.ReLU()),
            ("bn2", model.bn2),
            ("conv3", model.conv3),
            ("", nn.ReLU()),
            ("conv4", model.conv4),
            ("", model.pool),
            ("", nn.ReLU()),
            ("bn4", model.bn4),
            ("", nn.Flatten()),
            ("fc1", model.fc1),
            ("", nn.ReLU()),
            ("fc2", model.fc2),
        ]
    elif isinstance(model, nn.Sequential):
        named = list(model.named_children())
    else:
        raise TypeError(f"quantize_for_adaptation takes an LRTNet or nn.Sequential, got {type(model).__name__}")
    builder = _Builder(formats or {}, bn_batch)
    weight_names = [n for n, m in named if isinstance(m, nn.Conv2d | nn.Linear)]
    i = 0
    while i < len(named):
        name, module = named[i]
        follows_relu = i + 1 < len(named) and isinstance(named[i + 1][1], nn.ReLU)
        if isinstance(module, nn.Conv2d | nn.Linear):
            builder.add_weight(name, module, follows_relu, name == weight_names[-1])
            i += 2 if follows_relu else 1
            continue
        if isinstance(module, nn.ReLU):
            builder.stages.append(ActQuant(builder.fmt(name)))
        elif isinstance(module, nn.MaxPool2d):
            builder.stages.append(nn.MaxPool2d(module.kernel_size, module.stride))
        elif isinstance(module, nn.BatchNorm2d):
            builder.add_bn(name, module)
        elif isinstance(module, nn.Flatten):
            builder.stages.append(nn.Flatten())
        elif not isinstance(module, nn.Dropout | nn.Identity):
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) is not supported for adaptation; supported: "
                "Conv2d, Linear, ReLU, MaxPool2d, BatchNorm2d, Flatten, Dropout"
            )
        i += 1
    return QNet(builder.stages, input_grid)
