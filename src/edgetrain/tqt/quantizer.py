"""The TQT quantizer: power-of-2 scale, trained log2 threshold (Jain et al. 2020, section 3).

Forward (docs/fixed-point.md)::

    s    = 2^ceil(log2_t) / 2^(b-1)  (signed)   or   2^ceil(log2_t) / 2^b  (unsigned)
    q(x) = clip(round(x / s), n, p) * s

Backward, with ceil and round straight-through (the paper's exact threshold gradient)::

    dq/dx       = 1  if n <= round(x/s) <= p  else 0
    dq/dlog2_t  = s * ln2 * { round(x/s) - x/s  inside;  n  below;  p  above }

The gradient with respect to ``log2_t`` is summed over the whole tensor (one threshold per tensor).

The float32 round-half-even case (the training hot path) runs torch's fused fake-quant kernels: its
learnable per-tensor kernel computes dq/dx and dq/ds = {round(x/s) - x/s inside; n below; p above}
summed over the tensor (LSQ's form), and with s = 2^ceil(log2_t) / 2^m built through a
straight-through ceil, ds/dlog2_t = s ln2: exactly the TQT gradient above. Every other case (float64,
other rounding modes, formats wider than 16 bits) runs the autograd Function below.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgetrain.fixedpoint import FixedPointFormat, Rounding, reject_nan, round_tensor

LN2 = math.log(2.0)


class _TQTQuantizeFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        log2_t: torch.Tensor,
        fmt: FixedPointFormat,
        rounding: Rounding,
    ) -> torch.Tensor:
        exponent = int(torch.ceil(log2_t.detach()).item()) - fmt.mantissa_bits
        scale = math.ldexp(1.0, exponent)
        scaled = x / scale  # exact: dividing by a power of two
        codes = round_tensor(scaled, rounding).clamp_(fmt.qmin, fmt.qmax)
        ctx.save_for_backward(scaled)
        ctx.scale = scale
        ctx.fmt = fmt
        ctx.rounding = rounding
        return codes.mul_(scale)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        (scaled,) = ctx.saved_tensors
        fmt: FixedPointFormat = ctx.fmt
        rounded = round_tensor(scaled, ctx.rounding)
        inside = (rounded >= fmt.qmin) & (rounded <= fmt.qmax)
        grad_x = grad_out * inside if ctx.needs_input_grad[0] else None
        grad_log2_t = None
        if ctx.needs_input_grad[1]:
            # inside: round(x/s) - x/s ; outside: the clip value n or p (== clamp(round(x/s), n, p))
            dq_ds = torch.where(inside, rounded - scaled, rounded.clamp(fmt.qmin, fmt.qmax))
            grad_log2_t = (grad_out * dq_ds).sum().mul(ctx.scale * LN2).reshape(())
        return grad_x, grad_log2_t, None, None


def _fake_quantize(x: torch.Tensor, log2_t: torch.Tensor, fmt: FixedPointFormat, rounding: Rounding) -> torch.Tensor:
    """q(x) with the TQT gradients; torch's fused kernels where they compute exactly that (module docstring)."""
    if x.dtype != torch.float32 or rounding is not Rounding.HALF_EVEN or fmt.bits > 16:
        return _TQTQuantizeFunction.apply(x, log2_t, fmt, rounding)
    scale = math.ldexp(1.0, fmt.exponent(float(log2_t.detach())))
    if not log2_t.requires_grad:
        return torch.fake_quantize_per_tensor_affine(x, scale, 0, fmt.qmin, fmt.qmax)
    ceil = log2_t + (torch.ceil(log2_t) - log2_t).detach()  # value ceil(log2_t), gradient 1
    smooth = torch.exp2(ceil - fmt.mantissa_bits)
    scale_t = (scale + (smooth - smooth.detach())).reshape(1)  # value exactly 2^k, gradient s ln2
    return torch._fake_quantize_learnable_per_tensor_affine(x, scale_t, x.new_zeros(1), fmt.qmin, fmt.qmax, 1.0)


def tqt_quantize(
    x: torch.Tensor,
    log2_t: torch.Tensor,
    bits: int,
    signed: bool = True,
    rounding: Rounding | str = Rounding.HALF_EVEN,
) -> torch.Tensor:
    """Fake-quantize ``x`` with threshold ``2^ceil(log2_t)`` on a ``bits``-wide grid.

    Differentiable in ``x`` and in the scalar ``log2_t`` with the TQT gradients (module docstring).
    """
    fmt = FixedPointFormat(bits, signed)
    if not isinstance(log2_t, torch.Tensor):
        log2_t = torch.tensor(float(log2_t))
    if log2_t.numel() != 1:
        raise ValueError(f"log2_t must be a scalar (one threshold per tensor), got shape {tuple(log2_t.shape)}")
    if not torch.isfinite(log2_t).all():
        raise ValueError(f"log2_t is not finite ({log2_t.item()}): calibrate the quantizer first")
    return _fake_quantize(x, log2_t.reshape(()), fmt, Rounding.parse(rounding))


class TQTQuantizer(nn.Module):
    """A per-tensor power-of-2 quantizer whose threshold ``2^ceil(log2_t)`` is a trained parameter.

    ``freeze()`` stops the threshold from training (its gradient is not computed; use it for
    calibrated-and-fixed thresholds or incremental freezing); ``enabled = False`` passes values
    through unchanged (used while calibrating downstream quantizers in topological order).
    """

    def __init__(
        self,
        bits: int = 8,
        signed: bool = True,
        rounding: Rounding | str = Rounding.HALF_EVEN,
        log2_t: float = 0.0,
    ) -> None:
        super().__init__()
        self.format = FixedPointFormat(bits, signed)
        self.rounding = Rounding.parse(rounding)
        self.log2_t = nn.Parameter(torch.tensor(float(log2_t)))
        self.enabled = True

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def signed(self) -> bool:
        return self.format.signed

    @property
    def frozen(self) -> bool:
        return not self.log2_t.requires_grad

    def freeze(self) -> TQTQuantizer:
        """Stop training ``log2_t`` (the quantizer keeps quantizing)."""
        self.log2_t.requires_grad_(False)
        return self

    def unfreeze(self) -> TQTQuantizer:
        self.log2_t.requires_grad_(True)
        return self

    def set_log2_t(self, value: float) -> None:
        """Overwrite the threshold (e.g. from calibration)."""
        if not math.isfinite(value):
            raise ValueError(f"log2_t must be finite, got {value}")
        with torch.no_grad():
            self.log2_t.fill_(float(value))

    @property
    def exponent(self) -> int:
        """k with scale s = 2^k: ceil(log2_t) - (b-1) signed, ceil(log2_t) - b unsigned."""
        return self.format.exponent(float(self.log2_t.detach()))

    @property
    def scale(self) -> float:
        return math.ldexp(1.0, self.exponent)

    @property
    def threshold(self) -> float:
        """The power-of-2 threshold 2^ceil(log2_t) actually used."""
        return math.ldexp(1.0, int(math.ceil(float(self.log2_t.detach()))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.training:  # inference: NaN is an error, as in the integer program (fixedpoint.reject_nan)
            reject_nan(bool(torch.isnan(x).any()), "the input of a quantizer")
        return _fake_quantize(x, self.log2_t, self.format, self.rounding)

    def extra_repr(self) -> str:
        state = "frozen" if self.frozen else "trained"
        return (
            f"{self.format}, rounding={self.rounding.value}, log2_t={float(self.log2_t.detach()):.4f} "
            f"(scale=2^{self.exponent}, {state})"
        )
