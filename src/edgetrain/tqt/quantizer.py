"""The TQT quantizer: power-of-2 scale, trained log2 threshold (Jain et al. 2020, section 3).

Forward (docs/fixed-point.md)::

    s    = 2^ceil(log2_t) / 2^(b-1)  (signed)   or   2^ceil(log2_t) / 2^b  (unsigned)
    q(x) = clip(round(x / s), n, p) * s

Backward, with ceil and round straight-through (the paper's exact threshold gradient)::

    dq/dx       = 1  if n <= round(x/s) <= p  else 0
    dq/dlog2_t  = s * ln2 * { round(x/s) - x/s  inside;  n  below;  p  above }

The gradient with respect to ``log2_t`` is summed over the whole tensor (one threshold per tensor).

The float32 round-half-even case (the training hot path) runs :class:`_FastTQTQuantizeFunction`:
the same values and gradients in a few in-place passes (one new tensor forward, one backward)::

    q = (clamp(x, n s, p s) + c) - c,   c = 1.5 * 2^23 * s
        (float32 addition rounds to the nearest multiple of ulp(c) = s, ties to even: round(x/s) s)
    dq/dx       = 1  if (n - 1/2) s <= x < (p + 1/2) s  else 0   (n even, p odd: half-even ties)
    dL/dlog2_t  = ln2 * ( sum g q  -  sum (g dq/dx) x )

the last line because s * {round(x/s) - x/s inside; n, p outside} = q - x * dq/dx, so the sum needs two
dot products and no per-element temporary. ``relu=True`` fuses a preceding ReLU: q(relu(x)) clamps
at 0 instead of n s, and dq/dx = 1 on 0 < x < (p + 1/2) s; a ReLU'd element contributes q = 0 to the
threshold gradient, as in the unfused form. Every other case (float64, other rounding modes)
runs the autograd Function below, the reference these formulas are tested against.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
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


MAGIC_EXPONENT = 23  # float32 mantissa bits: c = 1.5 * 2^23 * s has ulp(c) = s
MIN_FAST_EXPONENT, MAX_FAST_EXPONENT = -100, 100  # s, c and the clip bounds are normal float32 numbers


class FastGrid(NamedTuple):
    """The float32 constants of the fused quantizer on the grid s = 2^k: clamp bounds [low, high], the
    rounding constant magic = 1.5 2^23 s, and the open interval (grad_low, grad_high) where dq/dx = 1."""

    low: float
    high: float
    magic: float
    grad_low: float
    grad_high: float


@functools.lru_cache(maxsize=1024)
def fast_grid(fmt: FixedPointFormat, exponent: int, relu: bool = False) -> FastGrid:
    """:class:`FastGrid` of ``fmt`` at exponent k (module docstring; ``relu``: q(relu(x))); cached (the
    float32 ``nextafter`` costs ~80 us, more than the quantization of a small tensor)."""
    scale = math.ldexp(1.0, exponent)
    lower = 0.0 if relu else float(np.nextafter(np.float32((fmt.qmin - 0.5) * scale), np.float32(-np.inf)))
    return FastGrid(
        0.0 if relu else fmt.qmin * scale,
        fmt.qmax * scale,
        math.ldexp(1.5, exponent + MAGIC_EXPONENT),
        lower,
        (fmt.qmax + 0.5) * scale,
    )


def has_fast_path(quantizer: TQTQuantizer) -> bool:
    """Whether training runs ``quantizer`` on the fused float32 path (half-even rounding, exponent in range)."""
    return quantizer.rounding is Rounding.HALF_EVEN and MIN_FAST_EXPONENT <= quantizer.exponent <= MAX_FAST_EXPONENT


class _FastTQTQuantizeFunction(torch.autograd.Function):
    """float32 round-half-even q(x) (or q(relu(x))) with the TQT gradients (module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        log2_t: torch.Tensor,
        fmt: FixedPointFormat,
        exponent: int,
        relu: bool,
    ) -> torch.Tensor:
        grid = fast_grid(fmt, exponent, relu)
        quantized = x.clamp(grid.low, grid.high)
        quantized.add_(grid.magic).sub_(grid.magic)
        ctx.save_for_backward(x, quantized)
        ctx.lower, ctx.upper = grid.grad_low, grid.grad_high
        return quantized

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        x, quantized = ctx.saved_tensors
        grad_x = torch.ops.aten.hardtanh_backward(grad_out, x, ctx.lower, ctx.upper)
        grad_log2_t = None
        if ctx.needs_input_grad[1]:
            grad_flat = grad_out.reshape(-1)
            dot_q = torch.dot(grad_flat, quantized.reshape(-1))
            grad_log2_t = (dot_q - torch.dot(grad_x.reshape(-1), x.reshape(-1))).mul(LN2).reshape(())
        return grad_x if ctx.needs_input_grad[0] else None, grad_log2_t, None, None, None


class _UnchangedFunction(torch.autograd.Function):
    """q(x) where q is proven the identity on x: x on q's grid, nothing clipped. Then dq/dx = 1 and the
    threshold gradient ln2 (sum g q - sum g x) is exactly 0, which is what this returns (no pass over x)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, log2_t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return grad_out, grad_out.new_zeros(()) if ctx.needs_input_grad[1] else None


def quantized_unchanged(x: torch.Tensor, quantizer: TQTQuantizer) -> torch.Tensor:
    """``quantizer(x)`` for an ``x`` the caller has proven on the quantizer's grid and inside its range:
    the same values and gradients (the threshold's gradient is 0) without the passes over ``x``."""
    return _UnchangedFunction.apply(x, quantizer.log2_t)


class ThresholdTangent:
    """d q(x) / d log2_t of a quantizer output, per element, over ln2: r = q - x dq/dx, so that the threshold
    gradient of any consumer f is dL/dlog2_t = ln2 <df/dq, r> (module docstring). ``r`` is computed when a
    consumer first reads it (an element-wise pass over the batch that other consumers never pay for)."""

    def __init__(self, log2_t: torch.Tensor, x: torch.Tensor, quantized: torch.Tensor, low: float, high: float) -> None:
        self.log2_t, self._x, self._quantized, self._low, self._high = log2_t, x, quantized, low, high

    @functools.cached_property
    def r(self) -> torch.Tensor:
        with torch.no_grad():
            inside = (self._x > self._low) & (self._x < self._high)  # dq/dx = 1 (hardtanh_backward's open interval)
            return self._quantized.detach() - torch.where(inside, self._x, 0.0)


def threshold_tangent(quantizer: TQTQuantizer, x: torch.Tensor, quantized: torch.Tensor) -> ThresholdTangent | None:
    """The :class:`ThresholdTangent` of ``quantized = quantizer(x)`` on the fused float32 path (no ReLU), or None
    where it does not apply (another path, or the threshold frozen). Lets a linear consumer A take the threshold
    gradient as ln2 <G, A r> from its output gradient G instead of ln2 <A^T G, r> (A^T G is never formed)."""
    if not (quantizer.training and quantizer.enabled and not quantizer.frozen and x.dtype == torch.float32):
        return None
    if not has_fast_path(quantizer):
        return None
    grid = fast_grid(quantizer.format, quantizer.exponent)
    return ThresholdTangent(quantizer.log2_t, x, quantized, grid.grad_low, grid.grad_high)


def _fake_quantize(
    x: torch.Tensor, log2_t: torch.Tensor, fmt: FixedPointFormat, rounding: Rounding, relu: bool = False
) -> torch.Tensor:
    """q(x), or q(relu(x)) with ``relu``, with the TQT gradients; the fused path where it applies."""
    exponent = fmt.exponent(log2_t.item())
    fast = x.dtype == torch.float32 and rounding is Rounding.HALF_EVEN
    if fast and MIN_FAST_EXPONENT <= exponent <= MAX_FAST_EXPONENT:
        return _FastTQTQuantizeFunction.apply(x, log2_t, fmt, exponent, relu)
    return _TQTQuantizeFunction.apply(torch.relu(x) if relu else x, log2_t, fmt, rounding)


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
    through unchanged (used while calibrating downstream quantizers in topological order);
    ``calibration`` names the method that set the threshold (informational, not in the state dict).
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
        self.calibration: str | None = None

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
        """Overwrite the threshold (e.g. from calibration); ``calibration`` is cleared (the caller names it)."""
        if not math.isfinite(value):
            raise ValueError(f"log2_t must be finite, got {value}")
        with torch.no_grad():
            self.log2_t.fill_(float(value))
        self.calibration = None

    @property
    def exponent(self) -> int:
        """k with scale s = 2^k: ceil(log2_t) - (b-1) signed, ceil(log2_t) - b unsigned."""
        return self.format.exponent(self.log2_t.item())

    @property
    def scale(self) -> float:
        return math.ldexp(1.0, self.exponent)

    @property
    def threshold(self) -> float:
        """The power-of-2 threshold 2^ceil(log2_t) actually used."""
        return math.ldexp(1.0, int(math.ceil(float(self.log2_t.detach()))))

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        """q(x); with ``relu``, q(relu(x)) in one fused pass (forward pre-hooks then see x before the ReLU)."""
        if not self.enabled:
            return torch.relu(x) if relu else x
        if not self.training:  # inference: NaN is an error, as in the integer program (fixedpoint.reject_nan)
            reject_nan(bool(torch.isnan(x).any()), "the input of a quantizer")
        return _fake_quantize(x, self.log2_t, self.format, self.rounding, relu)

    def extra_repr(self) -> str:
        state = "frozen" if self.frozen else "trained"
        return (
            f"{self.format}, rounding={self.rounding.value}, log2_t={float(self.log2_t.detach()):.4f} "
            f"(scale=2^{self.exponent}, {state})"
        )
