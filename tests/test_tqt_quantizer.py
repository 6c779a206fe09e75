"""The TQT quantizer's forward and its exact gradients (DESIGN.md section 3; TQT section 3)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetrain.fixedpoint import FixedPointFormat
from edgetrain.tqt import TQTQuantizer, tqt_quantize
from edgetrain.tqt.quantizer import _TQTQuantizeFunction

BITS = list(range(2, 17))


def closed_form(x: np.ndarray, g: np.ndarray, log2_t: float, bits: int, signed: bool):
    """Reference forward and gradients in float64 NumPy, straight from the formulas."""
    fmt = FixedPointFormat(bits, signed)
    s = 2.0 ** math.ceil(log2_t) / 2.0**fmt.mantissa_bits
    xs = x / s
    r = np.round(xs)  # NumPy rounds half to even
    inside = (r >= fmt.qmin) & (r <= fmt.qmax)
    q = np.clip(r, fmt.qmin, fmt.qmax) * s
    grad_x = g * inside
    dq_ds = np.where(inside, r - xs, np.where(r < fmt.qmin, fmt.qmin, fmt.qmax))
    grad_t = float(np.sum(g * s * math.log(2) * dq_ds))
    return q, grad_x, grad_t


def autograd_grads(x: torch.Tensor, g: torch.Tensor, log2_t: float, bits: int, signed: bool):
    xv = x.clone().requires_grad_(True)
    t = torch.tensor(log2_t, dtype=x.dtype, requires_grad=True)
    q = tqt_quantize(xv, t, bits, signed)
    q.backward(g)
    return q.detach(), xv.grad, float(t.grad)


def ste_reference(x: torch.Tensor, g: torch.Tensor, log2_t: float, bits: int, signed: bool):
    """The same quantizer written with straight-through round/ceil and plain autograd."""
    fmt = FixedPointFormat(bits, signed)
    xv = x.clone().requires_grad_(True)
    t = torch.tensor(log2_t, dtype=x.dtype, requires_grad=True)
    ceil_t = t + (torch.ceil(t) - t).detach()
    s = torch.exp2(ceil_t) / 2.0**fmt.mantissa_bits
    xs = xv / s
    r = xs + (torch.round(xs) - xs).detach()
    q = torch.clamp(r, fmt.qmin, fmt.qmax) * s
    q.backward(g)
    return q.detach(), xv.grad, float(t.grad)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_gradients_match_closed_form_random(bits: int, signed: bool) -> None:
    rng = np.random.default_rng(bits * 2 + signed)
    x = rng.normal(0, 1.5, 2000)
    g = rng.normal(0, 1, 2000)
    log2_t = float(rng.uniform(-0.9, 0.9))
    q_ref, gx_ref, gt_ref = closed_form(x, g, log2_t, bits, signed)
    q, gx, gt = autograd_grads(torch.from_numpy(x), torch.from_numpy(g), log2_t, bits, signed)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    np.testing.assert_array_equal(gx.numpy(), gx_ref)
    assert gt == pytest.approx(gt_ref, rel=1e-9, abs=1e-12)
    q2, gx2, gt2 = ste_reference(torch.from_numpy(x), torch.from_numpy(g), log2_t, bits, signed)
    np.testing.assert_array_equal(q.numpy(), q2.numpy())
    np.testing.assert_array_equal(gx.numpy(), gx2.numpy())
    assert gt == pytest.approx(gt2, rel=1e-9, abs=1e-12)


def test_ties_round_half_even_and_residual_sign() -> None:
    # int8, log2_t = 0 -> s = 2^-7. x/s = 2.5 rounds to 2 (residual -0.5), 3.5 to 4 (+0.5)
    s = 2.0**-7
    x = torch.tensor([2.5 * s, 3.5 * s, -2.5 * s], dtype=torch.float64)
    q, gx, gt = autograd_grads(x, torch.ones(3, dtype=torch.float64), 0.0, 8, True)
    assert (q / s).tolist() == [2.0, 4.0, -2.0]
    assert gx.tolist() == [1.0, 1.0, 1.0]
    assert gt == pytest.approx(s * math.log(2) * (-0.5 + 0.5 + 0.5))


@pytest.mark.parametrize("signed", [True, False])
def test_clip_boundaries(signed: bool) -> None:
    fmt = FixedPointFormat(8, signed)
    s = fmt.scale(0.0)
    n, p = fmt.qmin, fmt.qmax
    # p + 0.4 rounds to p: inside; p + 0.6 rounds to p + 1: clipped; n - 0.5 ties to the even n: inside
    ratios = [p + 0.4, p + 0.6, n - 0.5, n - 0.6] if signed else [p + 0.4, p + 0.6, -0.4, -0.6]
    x = torch.tensor([r * s for r in ratios], dtype=torch.float64)
    g = torch.tensor([1.0, 10.0, 100.0, 1000.0], dtype=torch.float64)
    q, gx, gt = autograd_grads(x, g, 0.0, 8, signed)
    if signed:
        assert (q / s).tolist() == [p, p, n, n]
        assert gx.tolist() == [1.0, 0.0, 100.0, 0.0]
        expected = 1.0 * (p - (p + 0.4)) + 10.0 * p + 100.0 * (n - (n - 0.5)) + 1000.0 * n
    else:
        assert (q / s).tolist() == [p, p, 0, 0]
        assert gx.tolist() == [1.0, 0.0, 100.0, 0.0]  # -0.4 rounds to -0 (inside), -0.6 to -1 (clipped)
        expected = 1.0 * (p - (p + 0.4)) + 10.0 * p + 100.0 * (0 - (-0.4)) + 1000.0 * 0
    assert gt == pytest.approx(s * math.log(2) * expected, rel=1e-12)


def test_threshold_gradient_by_finite_differences_of_the_relaxed_quantizer() -> None:
    # With ceil relaxed (s = 2^log2_t / 2^(b-1)) and round frozen at its current value, the loss
    # sum(g * q) is smooth in log2_t; its finite difference must equal the TQT threshold gradient.
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 500)
    g = rng.normal(0, 1, 500)
    log2_t, bits = 0.0, 6  # log2_t on an integer: the relaxed and the ceiled scales coincide
    fmt = FixedPointFormat(bits, True)
    s0 = 2.0**log2_t / 2.0 ** (bits - 1)
    r = np.clip(np.round(x / s0), fmt.qmin, fmt.qmax)
    inside = (np.round(x / s0) >= fmt.qmin) & (np.round(x / s0) <= fmt.qmax)

    def loss(lt: float) -> float:
        s = 2.0**lt / 2.0 ** (bits - 1)
        # q = s * (x/s + (round - x/s)) inside = x + s*(r - x/s0) ; outside = s * clip value
        q = np.where(inside, x + s * (r - x / s0), s * r)
        return float(np.sum(g * q))

    h = 1e-6
    fd = (loss(log2_t + h) - loss(log2_t - h)) / (2 * h)
    _, _, gt = autograd_grads(torch.from_numpy(x), torch.from_numpy(g), log2_t, bits, True)
    assert gt == pytest.approx(fd, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    xs=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=40),
    log2_t=st.floats(-8, 8, allow_nan=False),
    bits=st.integers(2, 16),
    signed=st.booleans(),
)
def test_outputs_on_grid_and_idempotent(xs: list[float], log2_t: float, bits: int, signed: bool) -> None:
    fmt = FixedPointFormat(bits, signed)
    x = torch.tensor(xs, dtype=torch.float64)
    q = tqt_quantize(x, torch.tensor(log2_t, dtype=torch.float64), bits, signed)
    s = fmt.scale(log2_t)
    assert math.log2(s) == int(math.log2(s))  # a power of two
    k = q / s
    assert torch.equal(k, torch.round(k))
    assert int(k.min()) >= fmt.qmin and int(k.max()) <= fmt.qmax
    assert torch.equal(tqt_quantize(q, torch.tensor(log2_t, dtype=torch.float64), bits, signed), q)


@given(k=st.integers(-10, 10), eps=st.floats(1e-6, 0.999))
def test_ceil_moves_the_scale_exactly_at_integers(k: int, eps: float) -> None:
    fmt = FixedPointFormat(8, True)
    assert fmt.scale(k) == 2.0 ** (k - 7)
    assert fmt.scale(k - eps) == 2.0 ** (k - 7)  # anywhere in (k-1, k]: same scale
    assert fmt.scale(k + eps) == 2.0 ** (k + 1 - 7)


def test_module_freeze_and_properties() -> None:
    q = TQTQuantizer(8, signed=False, log2_t=1.5)
    assert (q.exponent, q.scale, q.threshold) == (2 - 8, 2.0**-6, 4.0)
    x = torch.linspace(-1, 5, 50, requires_grad=True)
    q(x).sum().backward()
    assert q.log2_t.grad is not None and x.grad is not None
    q.log2_t.grad = None
    q.freeze()
    assert q.frozen
    q(x).sum().backward()
    assert q.log2_t.grad is None
    q.unfreeze()
    assert not q.frozen
    q.enabled = False
    assert torch.equal(q(x), x)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="out of range"):
        TQTQuantizer(1)
    with pytest.raises(ValueError, match="out of range"):
        tqt_quantize(torch.ones(3), torch.tensor(0.0), 17)
    with pytest.raises(ValueError, match="scalar"):
        tqt_quantize(torch.ones(3), torch.zeros(2), 8)
    with pytest.raises(ValueError, match="not finite"):
        tqt_quantize(torch.ones(3), torch.tensor(float("nan")), 8)
    with pytest.raises(ValueError, match="finite"):
        TQTQuantizer(8).set_log2_t(float("inf"))


def test_empty_tensor_passes() -> None:
    assert tqt_quantize(torch.zeros(0), torch.tensor(0.0), 8).shape == (0,)


def edge_codes(fmt: FixedPointFormat) -> torch.Tensor:
    """x/s at the clip edges and ties: n - 1/2 (ties to the even n: inside), p + 1/2 (ties to p + 1:
    clipped), their neighbours one float32 step away, interior ties, zeros of both signs."""
    n, p = float(fmt.qmin), float(fmt.qmax)
    edges = [n - 0.5, n - 0.75, n - 0.25, p + 0.5, p + 0.25, p + 0.75, 0.5, -0.5, 1.5, -1.5, 2.5, 0.0, -0.0]
    bounds = torch.tensor([n - 0.5, p + 0.5])
    steps = torch.cat([torch.nextafter(bounds, bounds - 1), torch.nextafter(bounds, bounds + 1)])
    interior_ties = torch.arange(n, p, max(1.0, (p - n) // 40)) + 0.5
    return torch.cat([torch.tensor(edges), steps, interior_ties])


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
def test_fast_float32_path_equals_the_reference_function(frozen: bool, relu: bool) -> None:
    """float32 half-even runs the fused Function: the reference Function's values, dq/dx and threshold
    gradient (on relu(x) through autograd's ReLU when the ReLU is fused), every width, edges and ties."""
    torch.manual_seed(0)
    for bits in BITS:
        for signed in (True, False):
            log2_t = float(torch.empty(()).uniform_(-3, 3))
            quantizer = TQTQuantizer(bits, signed, log2_t=log2_t).train()
            if frozen:
                quantizer.freeze()
            x = torch.randn(2, 3, 9, 9) * quantizer.threshold * 1.3
            codes = edge_codes(quantizer.format)
            x.view(-1)[: len(codes)] = codes * quantizer.scale  # exact in float32: at most 17 significant bits
            g = torch.randn_like(x)
            xv = x.clone().requires_grad_()
            y = quantizer(xv, relu=relu)
            (y * g).sum().backward()
            xr, tr = x.clone().requires_grad_(), torch.tensor(log2_t, requires_grad=True)
            reference_input = torch.relu(xr) if relu else xr
            reference = _TQTQuantizeFunction.apply(reference_input, tr, quantizer.format, quantizer.rounding)
            (reference * g).sum().backward()
            assert torch.equal(y, reference), (bits, signed)
            assert torch.equal(xv.grad, xr.grad), (bits, signed)
            if frozen:
                assert quantizer.log2_t.grad is None
            else:
                torch.testing.assert_close(quantizer.log2_t.grad, tr.grad, rtol=1e-5, atol=1e-5 * quantizer.threshold)


def test_fast_path_threshold_gradient_is_the_closed_form() -> None:
    """The fused float32 threshold gradient ln2 (g.q - (g dq/dx).x) equals the float64 closed form."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1.5, 4000).astype(np.float32)
    g = rng.normal(0, 1, 4000).astype(np.float32)
    for bits, signed, log2_t in ((8, True, 0.3), (4, False, 1.0), (16, True, -0.5)):
        q_ref, gx_ref, gt_ref = closed_form(x.astype(np.float64), g.astype(np.float64), log2_t, bits, signed)
        q, gx, gt = autograd_grads(torch.from_numpy(x), torch.from_numpy(g), log2_t, bits, signed)
        np.testing.assert_array_equal(q.numpy(), q_ref)
        np.testing.assert_array_equal(gx.numpy(), gx_ref)
        assert gt == pytest.approx(gt_ref, rel=1e-5, abs=1e-6)


def test_disabled_quantizer_still_applies_the_fused_relu() -> None:
    quantizer = TQTQuantizer(8, signed=False)
    quantizer.enabled = False
    x = torch.linspace(-2, 2, 9)
    assert torch.equal(quantizer(x, relu=True), torch.relu(x))
