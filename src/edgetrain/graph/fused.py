"""Fused training kernels: one element-wise pass where autograd would run many (QAT speed only).

:class:`FusedLeakyReLU` is the training forward and backward of the quantized LeakyReLU
(docs/quantization.md; TQT paper appendix A)::

    p = q16(alpha_q y),   m = max(y, p),   out = q8(m)

with the TQT gradients of both quantizers (tqt/quantizer.py), the maximum's gradient split in half on
ties (graph/modules.TieSplitMaximum) and the product's gradient ``dL/dy += alpha_q dL/d(alpha_q y)``.
Every element is computed with the same float32 operations, in the same order, as the unfused modules
(``clamp``, the magic-number rounding ``(v + c) - c``, ``sign``, ``hardtanh_backward``), and the threshold
gradients use the same ``torch.dot`` reductions on the same tensors, so values and gradients are
identical bit for bit (tests/test_graph_fused.py checks this against the unfused modules).
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch
from numba import njit

from edgetrain.tqt.quantizer import LN2, FastGrid


@njit(cache=True)
def _quantize(v, low, high, magic):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """torch.clamp(v, low, high) (NaN stays NaN), then rounded half-even onto the grid; branch-free selects
    so that the loops vectorize."""
    v = low if v < low else v
    v = high if v > high else v
    return (v + magic) - magic


@njit(cache=True)
def _leaky_forward(y, alpha, prod_grid, out_grid, out):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """out = q8(max(y, q16(alpha y))) per element; ``*_grid`` = (low, high, magic, grad_low, grad_high).
    The maximum keeps y on ties and where y is NaN (then p, computed from y, is NaN too)."""
    p_low, p_high, p_magic = prod_grid[0], prod_grid[1], prod_grid[2]
    o_low, o_high, o_magic = out_grid[0], out_grid[1], out_grid[2]
    for i in range(y.size):
        v = y[i]
        p = _quantize(v * alpha, p_low, p_high, p_magic)
        out[i] = _quantize(p if p > v else v, o_low, o_high, o_magic)


@njit(cache=True)
def _leaky_backward(
    y, grad_out, alpha, prod_grid, out_grid, half, product, prod_q, maxed, grad_max, grad_prod, grad_pin, grad_y
):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202, E501, PLR0913
    """Recompute the forward's intermediates and apply the chain rule of the unfused modules per element:
    q8's hardtanh_backward, the tie-split maximum ((sign(y - p) + 1) / 2), q16's hardtanh_backward, alpha."""
    p_low, p_high, p_magic, p_glow, p_ghigh = prod_grid[0], prod_grid[1], prod_grid[2], prod_grid[3], prod_grid[4]
    o_glow, o_ghigh = out_grid[3], out_grid[4]
    one = half + half
    zero = half - half
    for i in range(y.size):
        v = y[i]
        ya = v * alpha
        p = _quantize(ya, p_low, p_high, p_magic)
        m = p if p > v else v
        g = grad_out[i]
        gm = zero if (m <= o_glow) | (m >= o_ghigh) else g  # hardtanh_backward of q8
        d = v - p
        share = one if d > zero else (zero if d < zero else half)  # (sign(d) + 1) / 2
        share = d if d != d else share  # NaN, as sign(NaN)
        ga = share * gm
        gb = gm - ga
        gp = zero if (ya <= p_glow) | (ya >= p_ghigh) else gb  # hardtanh_backward of q16
        product[i] = ya
        prod_q[i] = p
        maxed[i] = m
        grad_max[i] = gm
        grad_prod[i] = gb
        grad_pin[i] = gp
        grad_y[i] = ga + gp * alpha


_WORKSPACE = threading.local()
ROW_ALIGN = 16  # float32 elements in 64 bytes, the alignment of torch's CPU allocator


def scratch(count: int, numel: int) -> torch.Tensor:
    """A (count, numel) float32 scratch tensor for intermediates that live inside one backward call only:
    one buffer per thread, grown as needed and reused by every later call (a fresh multi-megabyte tensor
    per call costs a page fault per 4 KiB page on first touch, more than the kernel's pass over it). Each row
    starts 64-byte aligned like a fresh tensor, so that BLAS reductions over it sum in the same order."""
    stride = -(-numel // ROW_ALIGN) * ROW_ALIGN  # rows 64-byte aligned, as torch's own allocations
    buffer = getattr(_WORKSPACE, "buffer", None)
    if buffer is None or buffer.numel() < count * stride:
        buffer = _WORKSPACE.buffer = torch.empty(count * stride)
    return buffer[: count * stride].view(count, stride)[:, :numel]


def release_scratch() -> None:
    """Free this thread's scratch buffer (it holds 6 x the largest fused activation after a QAT step)."""
    _WORKSPACE.buffer = None


@functools.lru_cache(maxsize=1024)
def _grid_array(grid: FastGrid) -> np.ndarray:
    """The grid's five constants as a float32 array for the kernels (cached per grid; read-only)."""
    return np.array([grid.low, grid.high, grid.magic, grid.grad_low, grid.grad_high], dtype=np.float32)


class FusedLeakyReLU(torch.autograd.Function):
    """``q_out(max(y, q_prod(alpha_q y)))`` in one pass forward and one backward (module docstring);
    ``alpha_q`` is a frozen float32 scalar, ``y`` contiguous float32, both quantizers on the fast path."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        y: torch.Tensor,
        prod_log2_t: torch.Tensor,
        out_log2_t: torch.Tensor,
        alpha_q: float,
        prod_grid: FastGrid,
        out_grid: FastGrid,
    ) -> torch.Tensor:
        out = torch.empty_like(y)
        alpha = np.float32(alpha_q)
        grids = (_grid_array(prod_grid), _grid_array(out_grid))
        _leaky_forward(y.detach().reshape(-1).numpy(), alpha, *grids, out.reshape(-1).numpy())
        ctx.save_for_backward(y, out)
        ctx.alpha, ctx.grids = alpha, grids
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        y, out = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_y = torch.empty_like(y)  # returned; the six others are consumed by the dot products below
        product, prod_q, maxed, grad_max, grad_prod, grad_pin = scratch(6, y.numel())
        _leaky_backward(
            y.reshape(-1).numpy(),
            grad_out.reshape(-1).numpy(),
            ctx.alpha,
            *ctx.grids,
            np.float32(0.5),
            *(b.numpy() for b in (product, prod_q, maxed, grad_max, grad_prod, grad_pin, grad_y.reshape(-1))),
        )
        grad_prod_t = grad_out_t = None
        if ctx.needs_input_grad[1]:  # q16's threshold: ln2 (sum g q - sum g_x x), as _FastTQTQuantizeFunction
            grad_prod_t = (torch.dot(grad_prod, prod_q) - torch.dot(grad_pin, product)).mul(LN2).reshape(())
        if ctx.needs_input_grad[2]:
            grad_out_t = (torch.dot(grad_out.reshape(-1), out.reshape(-1)) - torch.dot(grad_max, maxed)).mul(LN2)
            grad_out_t = grad_out_t.reshape(())
        return grad_y, grad_prod_t, grad_out_t, None, None, None
