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


def _grid_array(grid: FastGrid) -> np.ndarray:
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
        buffers = [torch.empty_like(y) for _ in range(7)]
        product, prod_q, maxed, grad_max, grad_prod, grad_pin, grad_y = (b.reshape(-1) for b in buffers)
        _leaky_backward(
            y.reshape(-1).numpy(),
            grad_out.reshape(-1).numpy(),
            ctx.alpha,
            *ctx.grids,
            np.float32(0.5),
            *(b.numpy() for b in (product, prod_q, maxed, grad_max, grad_prod, grad_pin, grad_y)),
        )
        grad_prod_t = grad_out_t = None
        if ctx.needs_input_grad[1]:  # q16's threshold: ln2 (sum g q - sum g_x x), as _FastTQTQuantizeFunction
            grad_prod_t = (torch.dot(grad_prod, prod_q) - torch.dot(grad_pin, product)).mul(LN2).reshape(())
        if ctx.needs_input_grad[2]:
            grad_out_t = (torch.dot(grad_out.reshape(-1), out.reshape(-1)) - torch.dot(grad_max, maxed)).mul(LN2)
            grad_out_t = grad_out_t.reshape(())
        return buffers[6], grad_prod_t, grad_out_t, None, None, None


@njit(cache=True)
def _epilogue_forward(acc, bias, quantize_acc, acc_grid, out_grid, out):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """out = q_out(q_acc(acc) + b_c) over acc as (N, C, L) (channel c's bias b_c; ``out_grid``'s low is 0
    for a fused ReLU; without ``quantize_acc``, q_acc is proven the identity and left out)."""
    a_low, a_high, a_magic = acc_grid[0], acc_grid[1], acc_grid[2]
    o_low, o_high, o_magic = out_grid[0], out_grid[1], out_grid[2]
    for n in range(acc.shape[0]):
        for c in range(acc.shape[1]):
            b = bias[c]
            for j in range(acc.shape[2]):
                a = acc[n, c, j]
                y = (_quantize(a, a_low, a_high, a_magic) if quantize_acc else a) + b
                out[n, c, j] = _quantize(y, o_low, o_high, o_magic)


@njit(cache=True)
def _epilogue_backward(acc, bias, grad_out, quantize_acc, acc_grid, out_grid, zero, acc_q, summed, grad_sum, grad_acc):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202, E501, PLR0913
    """Recompute q_acc(acc) and y = q_acc(acc) + b; dL/dy = q_out's hardtanh_backward of dL/dout, dL/dacc =
    q_acc's hardtanh_backward of dL/dy (the add passes the gradient through)."""
    a_low, a_high, a_magic, a_glow, a_ghigh = acc_grid[0], acc_grid[1], acc_grid[2], acc_grid[3], acc_grid[4]
    o_glow, o_ghigh = out_grid[3], out_grid[4]
    for n in range(acc.shape[0]):
        for c in range(acc.shape[1]):
            b = bias[c]
            for j in range(acc.shape[2]):
                a = acc[n, c, j]
                qa = _quantize(a, a_low, a_high, a_magic) if quantize_acc else a
                y = qa + b
                gy = zero if (y <= o_glow) | (y >= o_ghigh) else grad_out[n, c, j]
                acc_q[n, c, j] = qa
                summed[n, c, j] = y
                grad_sum[n, c, j] = gy
                grad_acc[n, c, j] = zero if quantize_acc and ((a <= a_glow) | (a >= a_ghigh)) else gy


class FusedEpilogue(torch.autograd.Function):
    """The conv / linear epilogue ``q_out(act(q_acc(acc) + q_bias(b')))`` (act: none or a ReLU fused into
    q_out; ``acc_log2_t`` None: q_acc proven the identity and left out) in one pass forward and one
    backward, the same float32 operations as the unfused ``acc_q``, add and ``out_q``; the threshold
    gradients use the same ``torch.dot`` reductions and the bias gradient the same ``sum_to_size``
    reduction autograd applies to a broadcast add, on the same tensors, so values and gradients are
    identical bit for bit."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        acc: torch.Tensor,
        bias_view: torch.Tensor,
        acc_log2_t: torch.Tensor | None,
        out_log2_t: torch.Tensor,
        acc_grid: FastGrid,
        out_grid: FastGrid,
    ) -> torch.Tensor:
        out = torch.empty_like(acc)
        grids = (_grid_array(acc_grid), _grid_array(out_grid))
        bias = bias_view.detach().reshape(-1).contiguous()
        quantize_acc = acc_log2_t is not None
        _epilogue_forward(_as_ncl(acc.detach()), bias.numpy(), quantize_acc, *grids, _as_ncl(out))
        ctx.save_for_backward(acc, bias, out)
        ctx.grids, ctx.bias_shape, ctx.quantize_acc = grids, bias_view.shape, quantize_acc
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        acc, bias, out = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        acc_q, summed, grad_sum, grad_acc = (torch.empty_like(acc) for _ in range(4))
        _epilogue_backward(
            _as_ncl(acc),
            bias.numpy(),
            _as_ncl(grad_out),
            ctx.quantize_acc,
            *ctx.grids,
            np.float32(0.0),
            *(_as_ncl(t) for t in (acc_q, summed, grad_sum, grad_acc)),
        )
        grad_acc_t = grad_out_t = None
        if ctx.needs_input_grad[2]:  # q_acc's threshold: its output's gradient is dL/dy
            grad_acc_t = torch.dot(grad_sum.reshape(-1), acc_q.reshape(-1)) - torch.dot(
                grad_acc.reshape(-1), acc.reshape(-1)
            )
            grad_acc_t = grad_acc_t.mul(LN2).reshape(())
        if ctx.needs_input_grad[3]:
            grad_out_t = torch.dot(grad_out.reshape(-1), out.reshape(-1)) - torch.dot(
                grad_sum.reshape(-1), summed.reshape(-1)
            )
            grad_out_t = grad_out_t.mul(LN2).reshape(())
        grad_bias = grad_sum.sum_to_size(ctx.bias_shape) if ctx.needs_input_grad[1] else None
        return grad_acc, grad_bias, grad_acc_t, grad_out_t, None, None


def _as_ncl(t: torch.Tensor) -> np.ndarray:
    """A contiguous (N, C, ...) tensor as an (N, C, L) NumPy view."""
    return t.reshape(t.shape[0], t.shape[1], -1).numpy()
