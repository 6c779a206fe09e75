"""Fake-quantized layers inserted by the graph pass (docs/quantization.md; TQT paper section 3).

Each module holds its :class:`~edgetrain.tqt.TQTQuantizer` children and names their roles in
``quantizer_roles()``. In eval mode the multiply-accumulates run in float64, so that every sum of
integer products is exact (Graffitist's bit-accurate mode) and the integer program of
``edgetrain.export`` reproduces the outputs bit for bit; in training mode they run in float32 (speed).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgetrain.fixedpoint import RELU6_CEILING
from edgetrain.graph.fused import FusedLeakyReLU
from edgetrain.tqt import TQTQuantizer
from edgetrain.tqt.quantizer import (
    LN2,
    ThresholdTangent,
    fast_grid,
    has_fast_path,
    quantized_unchanged,
    threshold_tangent,
)

ACTIVATIONS = ("none", "relu", "relu6")
BN_STATISTICS = ("float", "quantized")  # QCompute.set_bn_statistics
EXACT_FLOAT32_SUM = 1 << 24  # float32 adds integers of magnitude below 2^24 exactly
TANGENT_ATTRIBUTE = "edgetrain_threshold_tangent"  # set by QActivation on a quantized input, read by QCompute


def apply_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    """ReLU, ReLU6 (clip at 0 and 6 before the output quantizer) or nothing."""
    if activation == "relu":
        return torch.relu(x)
    if activation == "relu6":
        return F.hardtanh(x, 0.0, RELU6_CEILING)  # = clamp(x, 0, 6), with a single fused backward kernel
    return x


def quantize_activation(quantizer: TQTQuantizer, x: torch.Tensor, activation: str) -> torch.Tensor:
    """``quantizer(act(x))``; in training a ReLU is fused into the quantizer's single pass (same values and
    gradients, TQTQuantizer.forward's ``relu``), and so is a ReLU6 whose ceiling 6 lies where the quantizer
    clips anyway (6 >= (p + 1/2) s: there q(relu6(x)) = q(relu(x)), values and gradients); in eval the
    quantizer sees ``act(x)`` (calibration and analysis hooks)."""
    if quantizer.training and (
        activation == "relu"
        or (activation == "relu6" and (quantizer.format.qmax + 0.5) * quantizer.scale <= RELU6_CEILING)
    ):
        return quantizer(x, relu=True)
    return quantizer(apply_activation(x, activation))


def channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over an ``ndim`` tensor whose channels are dim 1."""
    return t.reshape(1, -1, *([1] * (ndim - 2)))


def channel_sums(t: torch.Tensor) -> torch.Tensor:
    """sum over every dim but 1 (channels), as (C,): the spatial dims first, then the batch (contiguous,
    several times faster on CPU than one reduction over dims (0, 2, 3))."""
    return t.reshape(t.shape[0], t.shape[1], -1).sum(2).sum(0)


class BatchMoments(torch.autograd.Function):
    """Batch norm's batch statistics of ``y`` per channel (dim 1), over the n = numel / C values each::

        mean = sum y / n,   var = sum (y - mean)^2 / n      (two passes, un-Bessel-corrected)
        dL/dy = dL/dmean / n + dL/dvar * 2 (y - mean) / n   (one fused pass)

    the same formulas as ``y.mean(dims)`` / ``y.var(dims, unbiased=False)`` under autograd, equal to them
    up to float rounding (another summation order, so not bit for bit), whose CPU variance kernel is
    several times slower than these sums.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        count = y.numel() // y.shape[1]
        mean = channel_sums(y).div_(count)
        var = channel_sums((y - channel_view(mean, y.dim())).square_()).div_(count)
        ctx.save_for_backward(y, mean)
        ctx.count = count
        return mean, var

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_mean: torch.Tensor | None, grad_var: torch.Tensor | None
    ) -> torch.Tensor:
        y, mean = ctx.saved_tensors
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
        slope = grad_var * (2.0 / ctx.count)
        offset = grad_mean / ctx.count - slope * mean
        return torch.addcmul(channel_view(offset, y.dim()), y, channel_view(slope, y.dim()))


class QuantModule(nn.Module):
    """Base of the fake-quantized layers: ``quantizer_roles()`` maps child name -> role."""

    roles: dict[str, str] = {}
    bit_exact = True  # eval-mode sums in float64; calibration turns it off for speed

    def quantizer_roles(self) -> dict[str, str]:
        return dict(self.roles)

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        """float64 in eval mode (exact integer sums), unchanged in training mode."""
        return x.double() if self.bit_exact and not self.training else x


class QActivation(QuantModule):
    """``q(act(x))``: the input quantizer, a rescale quantizer on a bare branch, or a ReLU/ReLU6 that
    has no producer to merge into (its own uint8 quantizer)."""

    def __init__(self, quantizer: TQTQuantizer, activation: str = "none", role: str = "activation") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.out_q = quantizer
        self.activation = activation
        self.role = role

    def quantizer_roles(self) -> dict[str, str]:
        return {"out_q": self.role}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``q(act(x))``. In training, on an ``x`` that needs no gradient (the data at the input quantizer), the
        output also carries the quantizer's :class:`~edgetrain.tqt.quantizer.ThresholdTangent`, so that a
        convolution reading it can take the threshold gradient without its input gradient
        (:class:`AdjointInputConv`)."""
        y = quantize_activation(self.out_q, x, self.activation)
        if self.training and self.activation == "none" and not x.requires_grad:
            tangent = threshold_tangent(self.out_q, x, y)
            if tangent is not None:
                setattr(y, TANGENT_ATTRIBUTE, tangent)
        return y


class AdjointInputConv(torch.autograd.Function):
    """``conv(x, w)`` on a quantized input x = q(data) whose only trained dependence is q's threshold, with
    the threshold gradient from the adjoint identity <conv^T(G, w), r> = <G, conv(r, w)>::

        dL/dw       = the convolution's weight gradient (as F.conv2d)
        dL/dlog2_t  = ln2 <G, conv(r, w)>,   r = q - x dq/dx  (the quantizer's ThresholdTangent)

    instead of ln2 <conv^T(G, w), r>: the input gradient conv^T(G, w) is never formed (for a first layer with
    one input channel, oneDNN's backward-data costs ~5x its forward). Same values; gradients equal the
    quantizer-then-conv autograd chain up to float summation order.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        w: torch.Tensor,
        log2_t: torch.Tensor,
        r: torch.Tensor,
        conv_args: dict[str, Any],
    ) -> torch.Tensor:
        ctx.save_for_backward(x, w, r)
        ctx.conv_args = conv_args
        return F.conv2d(x, w, None, **conv_args)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[None, torch.Tensor | None, torch.Tensor | None, None, None]:
        x, w, r = ctx.saved_tensors
        args = ctx.conv_args
        grad_w = grad_log2_t = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                grad_out,
                x,
                w,
                None,
                args["stride"],
                args["padding"],
                args["dilation"],
                False,
                [0, 0],
                args["groups"],
                [False, True, False],
            )[1]
        if ctx.needs_input_grad[2]:
            tangent_out = F.conv2d(r, w, None, **args)
            grad_log2_t = torch.dot(grad_out.reshape(-1), tangent_out.reshape(-1)).mul(LN2).reshape(())
        return None, grad_w, grad_log2_t, None, None


class QCompute(QuantModule):
    """Conv2d / depthwise Conv2d / Linear / per-channel scale with folded batch norm (docs/quantization.md)::

        y = q_out( act( q_acc( c * sum q_w(w') q(x) ) + q_bias(b') ) )

    with w' = w gamma / sqrt(var_mv + eps). ``bias_q`` shares ``acc_q``'s threshold (one int16 scale).
    Eval, or BN frozen: c = 1, b' = beta + gamma (b - mean_mv) / sqrt(var_mv + eps).
    Training before ``freeze_bn()``: c = sqrt(var_mv + eps) / sqrt(var_B + eps) and
    b' = beta + gamma (b - mean_B) / sqrt(var_B + eps) with the batch statistics of the float
    conv (un-Bessel-corrected variance); gradients flow through mean_B and var_B by autograd; the
    moving statistics are updated as BatchNorm does (``set_bn_statistics("quantized")``, opt-in with other
    numerics: the statistics of acc / f, the layer's own quantized-weight convolution over the fold factor
    f = gamma / sigma_mv, instead of the float conv). ``kind="scale"`` is a batch norm with no
    conv/linear before it: w = 1 per channel, i.e. a 1x1 depthwise conv holding gamma/sigma.
    Training speed: the batch statistics come from :class:`BatchMoments` (equal up to float rounding); with
    c = 1 ``q_acc`` is skipped where :meth:`unchanged_accumulator_range` proves it the identity, and with no
    activation ``q_out`` where :meth:`output_unchanged` does (both bit for bit).
    """

    roles = {"weight_q": "weight", "acc_q": "accumulator", "bias_q": "bias", "out_q": "activation"}
    bn_statistics = "float"  # class default (modules pickled before the option existed); set_bn_statistics

    def __init__(
        self,
        kind: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        bn: nn.modules.batchnorm._BatchNorm | None,
        activation: str,
        quantizers: dict[str, TQTQuantizer],
        conv_args: dict[str, Any] | None = None,
        bn_frozen: bool = True,
    ) -> None:
        super().__init__()
        if kind not in ("conv", "linear", "scale"):
            raise ValueError(f"unknown compute kind {kind!r}")
        self.kind = kind
        if kind == "scale":
            self.register_buffer("weight", weight.detach().clone())
        else:
            self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.bn = bn
        self.activation = activation
        self.conv_args = dict(conv_args or {})
        self.weight_q = quantizers["weight_q"]
        self.acc_q = quantizers["acc_q"]
        self.bias_q = quantizers["bias_q"]
        self.bias_q.log2_t = self.acc_q.log2_t  # one shared int16 scale for accumulator and bias
        self.out_q = quantizers["out_q"]
        self.register_buffer("bn_frozen", torch.tensor(bool(bn_frozen)))
        self.bn_statistics = "float"  # or "quantized": see set_bn_statistics
        self.input_grid: tuple[TQTQuantizer, ...] = ()  # (the quantizer whose grid the input is on,) if known

    def freeze_bn(self) -> None:
        """Switch from batch statistics + correction factor to the frozen moving statistics."""
        self.bn_frozen.fill_(True)

    def unfreeze_bn(self) -> None:
        self.bn_frozen.fill_(False)

    def set_bn_statistics(self, source: str) -> None:
        """Where training before ``freeze_bn()`` takes the batch statistics: ``"float"`` (default; the TQT /
        Graffitist / Jacob et al. definition: a second, float convolution sum w x) or ``"quantized"`` (one
        convolution: the statistics of acc / f, acc = sum q_w(w f) x; changed numerics, docs/quantization.md)."""
        if source not in BN_STATISTICS:
            raise ValueError(f"bn_statistics must be one of {BN_STATISTICS}, got {source!r}")
        self.bn_statistics = source

    def raw(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum w x: the convolution, matrix product or per-channel product (no bias)."""
        if self.kind == "conv":
            return F.conv2d(x, w, None, **self.conv_args)
        if self.kind == "linear":
            return F.linear(x, w)
        return x * channel_view(w, x.dim())

    def accumulate(self, x: torch.Tensor, quantized_weight: torch.Tensor) -> torch.Tensor:
        """sum q_w(w') q(x): float64 in eval; in training a convolution of the quantized data takes
        :class:`AdjointInputConv` (the input quantizer's threshold gradient without the input gradient)."""
        tangent: ThresholdTangent | None = getattr(x, TANGENT_ATTRIBUTE, None)
        if tangent is not None and self.training and self.kind == "conv":
            return AdjointInputConv.apply(x.detach(), quantized_weight, tangent.log2_t, tangent.r, self.conv_args)
        return self.raw(self.exact(x), self.exact(quantized_weight))

    def _weight_shape(self) -> tuple[int, ...]:
        return (-1,) + (1,) * (self.weight.dim() - 1)

    def folded(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(w', b', correction or None); ``x`` is needed only in training with BN not frozen."""
        bias = self.bias if self.bias is not None else torch.zeros(self.weight.shape[0], device=self.weight.device)
        bn = self.bn
        if bn is None:
            return self.weight, bias, None
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_var)
        inv_mv = torch.rsqrt(bn.running_var + bn.eps)
        weight = self.weight * (gamma * inv_mv).reshape(self._weight_shape())
        if not self.training or bool(self.bn_frozen):
            return weight, beta + gamma * (bias - bn.running_mean) * inv_mv, None
        if x is None:
            raise ValueError("training-time BN folding needs the layer input")
        if self.bn_statistics == "quantized":
            return weight, bias, None  # forward() takes the statistics from its own convolution
        return (weight, *self._batch_fold(self.raw(x, self.weight), bias, gamma, beta))

    def _batch_fold(
        self, raw: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(b', correction) from the batch statistics of ``raw`` (= sum w x, no bias); moving statistics updated."""
        bn = self.bn
        raw_mean, var = BatchMoments.apply(raw)
        mean = raw_mean + bias  # the statistics of y = raw + bias: the bias shifts the mean only
        inv_b = torch.rsqrt(var + bn.eps)
        correction = channel_view((bn.running_var + bn.eps).sqrt() * inv_b, raw.dim())
        self._update_running_stats(mean.detach(), var.detach(), raw.numel() // raw.shape[1])
        return beta + gamma * (bias - mean) * inv_b, correction

    def quantized_batch_fold(self, acc: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``bn_statistics="quantized"``: (b', correction) from the batch statistics of acc / f, the layer's own
        quantized-weight convolution acc = sum q_w(w f) x divided by the fold factor f = gamma / sigma_mv,
        instead of the float convolution sum w x (a channel with f = 0 has acc = 0 and takes 0)."""
        bn = self.bn
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_var)
        factor = gamma * torch.rsqrt(bn.running_var + bn.eps)
        factor = torch.where(factor == 0, torch.ones_like(factor), factor)
        return self._batch_fold(acc / channel_view(factor, acc.dim()), bias, gamma, beta)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        bn = self.bn
        bn.num_batches_tracked += 1
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        unbiased = var * count / max(count - 1, 1)
        bn.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        bn.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)

    def unchanged_accumulator_range(
        self, acc: torch.Tensor, quantized_weight: torch.Tensor
    ) -> tuple[float, float] | None:
        """(min, max) of ``acc`` where q_acc(acc) == acc exactly, else None; training then skips the
        accumulator quantizer (same values; its threshold gradient s ln2 (round(acc/s) - acc/s) is 0 on
        every element). q_acc is the identity when

        - every product w x lies on the grid 2^(k_w + k_x), a multiple of the step 2^k_acc (k_w + k_x >= k_acc;
          k_x from ``input_grid``, the quantizer whose grid the input is on);
        - the float32 sums are exact: per output channel sum |w| max|x| < 2^24 product steps (shown from the
          fan-in alone when fan-in x max|w code| x max|x code| < 2^24, else from the weights);
        - no accumulator value lies outside [n s, p s] (one min/max pass over acc).
        """
        if not self.input_grid or not (self.acc_q.enabled and self.weight_q.enabled and self.input_grid[0].enabled):
            return None
        input_q, acc_q, weight_q = self.input_grid[0], self.acc_q, self.weight_q
        weight_exponent, acc_exponent = weight_q.exponent, acc_q.exponent
        if weight_exponent + input_q.exponent < acc_exponent:
            return None
        input_codes = max(-input_q.format.qmin, input_q.format.qmax)
        weight_codes = max(-weight_q.format.qmin, weight_q.format.qmax)
        if quantized_weight[0].numel() * weight_codes * input_codes >= EXACT_FLOAT32_SUM:
            code_sums = quantized_weight.detach().abs().reshape(quantized_weight.shape[0], -1).sum(1).max()
            if float(code_sums) * input_codes >= math.ldexp(EXACT_FLOAT32_SUM, weight_exponent):  # w = codes 2^k_w
                return None
        low, high = (float(v) for v in torch.aminmax(acc.detach()))
        step = math.ldexp(1.0, acc_exponent)
        return (low, high) if acc_q.format.qmin * step <= low and high <= acc_q.format.qmax * step else None

    def output_unchanged(self, y: torch.Tensor, bound: tuple[float, float] | None = None) -> bool:
        """Whether q_out(y) == y exactly in training (an int16 output before a LeakyReLU, say), so that it
        may be skipped (same values; dq/dy = 1 and the threshold gradient is 0 on every element):

        - y = acc + q_bias(b') lies on the accumulator grid 2^k_acc: acc is q_acc's output or proven
          unchanged by it, q_bias shares q_acc's threshold, and the float32 sum of two int16 multiples of
          the step is exact; that grid is a multiple of q_out's step (k_acc >= k_out);
        - no y lies outside [n s, p s] of q_out: shown by ``bound`` (a known (min, max) bound of y) where it
          suffices, else by one min/max pass over y.
        """
        quantizers = (self.acc_q, self.bias_q, self.out_q)
        if y.dtype != torch.float32 or not all(q.enabled for q in quantizers):
            return False
        acc_exponent, out_q = self.acc_q.exponent, self.out_q
        if self.bias_q.exponent != acc_exponent or out_q.exponent > acc_exponent:
            return False
        low_limit, high_limit = out_q.format.qmin * out_q.scale, out_q.format.qmax * out_q.scale
        if bound is not None and low_limit <= bound[0] and bound[1] <= high_limit:
            return True
        low, high = torch.aminmax(y.detach())
        return low_limit <= float(low) and float(high) <= high_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias, correction = self.folded(x)
        quantized_weight = self.weight_q(weight)
        acc = self.accumulate(x, quantized_weight)
        if self.bn_statistics == "quantized" and self.bn is not None and self.training and not bool(self.bn_frozen):
            bias, correction = self.quantized_batch_fold(acc, bias)
        acc_range = None
        if correction is not None:
            acc = self.acc_q(acc * correction)
        elif self.training:
            acc_range = self.unchanged_accumulator_range(acc, quantized_weight)
            if acc_range is None:
                acc = self.acc_q(acc)
        else:
            acc = self.acc_q(acc)
        quantized_bias = self.bias_q(bias)
        y = acc.to(x.dtype) + channel_view(quantized_bias, x.dim())
        if self.training and self.activation == "none":
            bound = None
            if acc_range is not None:  # y = acc + b: min/max of acc plus those of the (small) bias
                bias_low, bias_high = (float(v) for v in torch.aminmax(quantized_bias.detach()))
                bound = (acc_range[0] + bias_low, acc_range[1] + bias_high)
            if self.output_unchanged(y, bound):
                return quantized_unchanged(y, self.out_q)
        return quantize_activation(self.out_q, y, self.activation)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, activation={self.activation}, bn={'yes' if self.bn is not None else 'no'}"


class QAvgPool(QuantModule):
    """Average pooling as a depthwise conv with the reciprocal 1/(kh kw) as an unsigned weight::

    y = q_out_floor( sum_window x * q_r(1 / (kh kw)) )   (zero padding counted, docs/quantization.md)
    """

    roles = {"recip_q": "reciprocal", "out_q": "activation"}

    def __init__(
        self,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        recip_q: TQTQuantizer,
        out_q: TQTQuantizer,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.padding = tuple(kernel), tuple(stride), tuple(padding)
        self.register_buffer("reciprocal", torch.tensor(1.0 / (self.kernel[0] * self.kernel[1])))
        self.recip_q = recip_q
        self.out_q = out_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xe = self.exact(x)
        window_sum = F.avg_pool2d(xe, self.kernel, self.stride, self.padding, divisor_override=1)
        return self.out_q(window_sum * self.recip_q(self.reciprocal).to(xe.dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, padding={self.padding}"


class TieSplitMaximum(torch.autograd.Function):
    """``torch.maximum(a, b)`` (same shapes) with its gradient, ties split in half, in two passes::

        share = (sign(a - b) + 1) / 2  (1 where a > b, 1/2 on ties, 0 where a < b)
        dL/da = share g,   dL/db = g - share g

    (torch's own backward builds eight temporaries for the same values.)
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(a, b)
        return torch.maximum(a, b)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = ctx.saved_tensors
        grad_a = torch.sub(a, b).sign_().add_(1.0).mul_(0.5).mul_(grad_out)
        return grad_a, grad_out - grad_a


class QLeakyReLU(QuantModule):
    """``q8( max( q16(x), q16( q16(alpha) q16(x) ) ) )``: the input (already int16) and the product
    share one threshold (docs/quantization.md); valid for 0 <= alpha <= 1."""

    roles = {"alpha_q": "alpha", "prod_q": "product", "out_q": "activation"}

    def __init__(self, negative_slope: float, alpha_q: TQTQuantizer, prod_q: TQTQuantizer, out_q: TQTQuantizer) -> None:
        super().__init__()
        self.register_buffer("alpha", torch.tensor(float(negative_slope)))
        self.alpha_q = alpha_q
        self.prod_q = prod_q
        self.out_q = out_q

    fused_training = True  # training runs FusedLeakyReLU where it applies (same values and gradients)

    def fusable(self, x: torch.Tensor) -> bool:
        """Training on float32 with both quantizers on the fast path and alpha's threshold frozen."""
        quantizers = (self.alpha_q, self.prod_q, self.out_q)
        return (
            self.fused_training
            and self.training
            and x.dtype == torch.float32
            and x.is_contiguous()
            and x.device.type == "cpu"
            and all(q.enabled for q in quantizers)
            and self.alpha_q.frozen
            and has_fast_path(self.prod_q)
            and has_fast_path(self.out_q)
        )

    def quantized_alpha(self) -> float:
        """float(alpha_q(alpha)), recomputed only when alpha, alpha_q's threshold or its format change (alpha_q
        is frozen on the fused path, so this is a constant of the training run, not a pass per step)."""
        key = (float(self.alpha), float(self.alpha_q.log2_t), self.alpha_q.format, self.alpha_q.rounding)
        cached = self.__dict__.get("_alpha_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_alpha_cache"] = (key, float(self.alpha_q(self.alpha)))
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fusable(x):
            alpha_q = self.quantized_alpha()
            prod_grid = fast_grid(self.prod_q.format, self.prod_q.exponent)
            out_grid = fast_grid(self.out_q.format, self.out_q.exponent)
            return FusedLeakyReLU.apply(x, self.prod_q.log2_t, self.out_q.log2_t, alpha_q, prod_grid, out_grid)
        xe = self.exact(x)
        product = self.prod_q(xe * self.alpha_q(self.alpha).to(xe.dtype)).to(x.dtype)
        return self.out_q(TieSplitMaximum.apply(x, product))


class QAdd(QuantModule):
    """Residual add ``q_out(act(a + b))`` (or ``a - b``); both inputs arrive quantized with one shared threshold."""

    roles = {"out_q": "activation"}

    def __init__(self, out_q: TQTQuantizer, activation: str = "none", subtract: bool = False) -> None:
        super().__init__()
        self.out_q = out_q
        self.activation = activation
        self.subtract = subtract

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return quantize_activation(self.out_q, a - b if self.subtract else a + b, self.activation)


class QMul(QuantModule):
    """Product of two quantized tensors (SE gating): ``q_out(a * b)``.

    The integer codes multiply exactly with exponent ``k_a + k_b`` (broadcasting as torch does), then
    one shift requantizes to ``out_q`` (TQT appendix A); in eval mode the product runs in float64.
    """

    roles = {"out_q": "activation"}

    def __init__(self, out_q: TQTQuantizer) -> None:
        super().__init__()
        self.out_q = out_q

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.out_q(self.exact(a) * self.exact(b)).to(a.dtype)


class QMean(QuantModule):
    """Mean over any dims as a sum times the reciprocal weight (the avg-pool rule of docs/quantization.md)::

    y = q_out_floor( sum_dims x * q_r(1 / n) )
    """

    roles = {"recip_q": "reciprocal", "out_q": "activation"}

    def __init__(
        self, dims: tuple[int, ...], keepdim: bool, count: int, recip_q: TQTQuantizer, out_q: TQTQuantizer
    ) -> None:
        super().__init__()
        self.dims, self.keepdim = tuple(dims), bool(keepdim)
        self.register_buffer("reciprocal", torch.tensor(1.0 / count))
        self.recip_q = recip_q
        self.out_q = out_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xe = self.exact(x)
        total = xe.sum(self.dims, keepdim=self.keepdim)
        return self.out_q(total * self.recip_q(self.reciprocal).to(xe.dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, keepdim={self.keepdim}"


def upsample_nearest(x: torch.Tensor, factor_h: int, factor_w: int) -> torch.Tensor:
    """Nearest upsampling of NCHW by integer factors: every pixel repeated (pure data movement)."""
    return x.repeat_interleave(factor_h, dim=2).repeat_interleave(factor_w, dim=3)


def apply_per_channel(
    fn: Callable[[torch.Tensor], torch.Tensor], values: torch.Tensor, channels: int, ndim: int
) -> torch.Tensor:
    """``fn`` on a 1-D tensor of values: (L,) when ``channels == 0``, else (channels, L) with the values
    laid along a non-channel dim of an ``ndim``-d probe (dim 0 of (L, C) for 2-d, dim 2 of (1, C, L, 1..))."""
    if not channels:
        return fn(values)
    if ndim == 2:
        return fn(values.reshape(-1, 1).repeat(1, channels)).t()
    probe = values.reshape(1, 1, -1, *([1] * (ndim - 3))).repeat(1, channels, *([1] * (ndim - 2)))
    return fn(probe).reshape(channels, -1)


class Elementwise(nn.Module):
    """A float element-wise function ``f(t)`` of one tensor: a module (``nn.Sigmoid``, ``nn.PReLU``), or
    a function called with ``t`` placed at ``slot`` (an index into ``args`` or a keyword) among constant
    arguments (``F.elu(t, alpha=0.5)``, ``t + 3``, ``torch.clamp(t, 0, 6)``)."""

    def __init__(
        self,
        target: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        slot: int | str = 0,
    ) -> None:
        super().__init__()
        self.module = target if isinstance(target, nn.Module) else None
        self.function = None if isinstance(target, nn.Module) else target
        self.args, self.kwargs, self.slot = tuple(args), dict(kwargs or {}), slot

    def _call(self, t: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        if isinstance(self.slot, str):
            return self.function(*args, **(kwargs | {self.slot: t}))
        return self.function(*args[: self.slot], t, *args[self.slot :], **kwargs)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.module is not None:
            return self.module(t)
        return self._call(t, self.args, self.kwargs)

    def float64(self, t: torch.Tensor) -> torch.Tensor:
        """``f(t)`` with every floating parameter, buffer and constant operand in float64."""

        def wide(v: Any) -> Any:
            return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

        if self.module is not None:  # a float64 copy: the table needs values, not gradients
            return copy.deepcopy(self.module).double()(t)
        return self._call(t, tuple(wide(a) for a in self.args), {k: wide(v) for k, v in self.kwargs.items()})

    def extra_repr(self) -> str:
        return "" if self.module is not None else getattr(self.function, "__name__", str(self.function))


class QLookup(QuantModule):
    """An element-wise function on b-bit codes as an exact 2^b-entry lookup table::

        T[i] = q_out( f( s_in * (n_in + i) ) ),   y = T[code(x) - n_in]

    ``in_q`` holds the input's threshold (shared with the quantizer that produced the input), so the
    table is the function restricted to the input grid. ``channels > 0``: one table per channel
    (``nn.PReLU``, a per-channel constant operand), T has shape (channels, 2^b). In eval mode the
    forward indexes the table (the integer program and ONNX ``Gather`` do the same); in training it is
    ``q_out(f(x))`` in float32, whose gradient is the float function's derivative (straight-through on
    the table) and trains ``out_q``'s threshold as any TQT quantizer.
    """

    roles = {"in_q": "lookup_input", "out_q": "activation"}

    def __init__(
        self, fn: Elementwise, in_q: TQTQuantizer, out_q: TQTQuantizer, channels: int = 0, ndim: int = 0
    ) -> None:
        super().__init__()
        self.fn = fn
        self.in_q = in_q
        self.out_q = out_q
        self.channels, self.ndim = int(channels), int(ndim)

    def grid(self) -> torch.Tensor:
        """The 2^b input values s_in * code, code = n_in .. p_in, in float64."""
        fmt = self.in_q.format
        return torch.arange(fmt.qmin, fmt.qmax + 1, dtype=torch.float64) * self.in_q.scale

    def table(self) -> torch.Tensor:
        """T (2^b,) or (channels, 2^b): output values on ``out_q``'s grid, computed in float64."""
        return self.out_q(apply_per_channel(self.fn.float64, self.grid(), self.channels, self.ndim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_q(x)
        if self.training or not self.bit_exact or not (self.in_q.enabled and self.out_q.enabled):
            return self.out_q(self.fn(x))
        table = self.table()
        index = (torch.round(x.double() / self.in_q.scale).long() - self.in_q.format.qmin).clamp_(
            0, table.shape[-1] - 1
        )
        if not self.channels:
            return table[index].to(x.dtype)
        channel = torch.arange(self.channels).reshape(1, -1, *([1] * (x.dim() - 2)))
        return table[channel, index].to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}" if self.channels else ""
