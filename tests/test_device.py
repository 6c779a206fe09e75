"""The exported integer program is the device: DeviceNet.from_program runs it bit for bit, adapts it with
the update rules, and exports the adapted device as a program equal to the device's forward."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import edgetrain as et
from edgetrain.adapt import DeviceNet, OnlineTrainer, make_rule
from edgetrain.adapt import device as device_module
from edgetrain.adapt.device import DeviceLayer, Requantizer
from edgetrain.adapt.qnet import (
    Grid,
    QuantChain,
    QuantStage,
    _laid_weights,
    _scattered_input_gradient,
    input_gradient,
    layer_gradient,
    nonzero_im2col,
)
from edgetrain.adapt.scenarios import make_scenario
from edgetrain.export import IntegerProgram
from edgetrain.fixedpoint import round_tensor
from edgetrain.models import LRTNet
from edgetrain.nvm import NVMArray

ZOO = ["mnistnet", "resnet-tiny", "mobilenetv2-tiny", "inception-tiny", "darknet-tiny", "lrt-cnn"]
SAMPLES = 120


@pytest.fixture(scope="module")
def stream():
    return make_scenario("digital-drift", dataset="mnist", samples=SAMPLES, seed=0)


def _program(name: str, images: torch.Tensor, weight_bits: int) -> IntegerProgram:
    torch.manual_seed(0)
    # the LRT paper's net at a narrow width (same graph, 16 instead of 128 channels) keeps the test fast
    model = (LRTNet(width=16, hidden=64) if name == "lrt-cnn" else et.create_model(name)).eval()
    qmodel = et.quantize(model, images[:1], images, et.QuantConfig(weight_bits=weight_bits), mode="static")
    return et.to_integer(qmodel, meta={"model": name})


def _mismatches(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.any(a != b, axis=1).sum())


@pytest.mark.parametrize("name", ZOO)
def test_zoo_net_adapts_from_its_program_and_exports_bit_exact(name, stream, tmp_path, one_thread):
    images, _ = stream.batch(0, 64)
    program = _program(name, images, weight_bits=4 if name in ("mobilenetv2-tiny", "resnet-tiny") else 8)
    device = DeviceNet.from_program(program)
    probe = images[:16]
    with torch.no_grad():
        assert _mismatches(device.eval()(probe).numpy(), program.run(probe)) == 0  # the program, as loaded

    before = {layer.name: layer.codes().copy() for layer in device.weight_layers}
    trainer = OnlineTrainer(device, make_rule("lowrank", rank=2, lr=0.05), stream, seed=0)
    xs, ys = stream.batch(0, SAMPLES)
    for x, y in zip(xs, ys.tolist(), strict=True):
        trainer.learn_sample(x, y)
    changed = sum(int((layer.codes() != before[layer.name]).sum()) for layer in device.weight_layers)
    assert changed > 0, "real LowRank updates must have written some weights"

    adapted = device.to_program()
    adapted.save(tmp_path / "program")
    loaded = IntegerProgram.load(tmp_path / "program")
    with torch.no_grad():
        expected = device.eval()(probe).numpy()
    assert _mismatches(loaded.run(probe), expected) == 0
    with torch.no_grad():
        assert _mismatches(DeviceNet.from_program(loaded).eval()(probe).numpy(), expected) == 0


def test_requantizer_forward_and_straight_through_gradient():
    """clip(round(v / 2^k), lo, hi) 2^k; gradient 1 inside [lo, hi] (and v > 0 after ReLU), else 0."""
    spec = {"bits": 4, "signed": True, "exponent": -2, "rounding": "half_even"}
    v = torch.tensor([-3.0, -0.125, 0.375, 0.6, 1.9, 2.5], dtype=torch.float64, requires_grad=True)
    plain = Requantizer(spec)
    out = plain(v)
    # codes: round(v * 4) = -12, -0 (half even), 2 (1.5 -> 2), 2 (2.4), 8 -> clip 7, 10 -> 7
    assert out.tolist() == [-2.0, 0.0, 0.5, 0.5, 1.75, 1.75]
    out.sum().backward()
    assert v.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    v.grad = None
    relu = Requantizer(spec, "relu")
    out = relu(v)
    assert out.tolist() == [0.0, 0.0, 0.5, 0.5, 1.75, 1.75]
    out.sum().backward()
    assert v.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rounding", ["half_even", "half_away", "floor"])
def test_fused_quant_chain_equals_the_torch_quantizer_ops(dtype, rounding):
    """QuantChain (one fused pass) = the torch ops clip(round(v / 2^k), lo, hi) 2^k stage by stage,
    bias after the first stage, bit for bit in z's dtype (ties, clipping, +-0, float32 sums), with the
    straight-through masks (inside [lo, hi]; v > 0 for the ReLU stage)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randint(-3000, 3000, (2, 5, 4, 3), generator=gen).to(dtype) / 8 + 2.0**-30 * (dtype == torch.float32)
    z[0, 0, 0, :3] = torch.tensor([2.5, -2.5, 0.49999997])  # ties and float32's 0.5 - ulp
    bias = torch.randint(-200, 200, (5,), generator=gen).to(dtype) / 4
    stages = [QuantStage(0.5, -1000, 1000, rounding), QuantStage(2.0, 0, 127, rounding, relu=True)]
    out, masks = QuantChain(stages)(z, bias)
    v, expected_masks = z.clone(), []
    for i, q in enumerate(stages):
        codes = round_tensor(v / q.step, rounding)
        inside = (codes >= q.lo) & (codes <= q.hi)
        expected_masks.append(inside & (v > 0) if q.relu else inside)
        v = codes.clamp(q.lo, q.hi) * q.step
        if i == 0:
            v = v + bias.view(1, -1, 1, 1)
    assert out.dtype == dtype and torch.equal(out, v)
    assert all(torch.equal(m, e) for m, e in zip(masks, expected_masks, strict=True))
    assert QuantChain(stages)(z, bias, np.float64)[0].dtype == torch.float64


@pytest.mark.parametrize(("stride", "padding", "dilation"), [((1, 1), (0, 0), (1, 1)), ((2, 1), (1, 2), (2, 1))])
def test_nonzero_im2col_is_the_unfold_rows_with_nonzero_gradient(stride, padding, dilation):
    """The patches cut at the kept pixels equal F.unfold's rows there (any stride, padding, dilation)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-8, 8, (1, 3, 9, 8), generator=gen).double() / 4
    a_all = torch.nn.functional.unfold(x, (3, 2), dilation, padding, stride)[0].T
    out_hw = [
        (n + 2 * p - d * (k - 1) - 1) // st + 1
        for n, p, d, k, st in zip((9, 8), padding, dilation, (3, 2), stride, strict=True)
    ]
    dz = torch.zeros(1, 4, *out_hw, dtype=torch.float64)
    dz[0, 1, 0, 1], dz[0, 3, 2, 0], dz[0, 0, -1, -1] = 0.5, -0.25, 1.0
    rows = dz[0].flatten(1).T
    keep = (rows != 0).any(1)
    a, d = nonzero_im2col(x, dz, (3, 2), stride, padding, dilation, is_conv=True)
    assert a.dtype == d.dtype == torch.float32
    assert torch.equal(a, a_all[keep].float()) and torch.equal(d, rows[keep].float())
    empty = nonzero_im2col(x, torch.zeros_like(dz), (3, 2), stride, padding, dilation, is_conv=True)
    assert empty[0].shape == (0, 18) and empty[1].shape == (0, 4)


@pytest.mark.parametrize(("stride", "padding", "dilation"), [((1, 1), (0, 0), (1, 1)), ((2, 1), (1, 2), (2, 1))])
def test_input_gradient_at_few_pixels_equals_conv2d_input_and_falls_back_when_it_could_be_inexact(
    stride, padding, dilation
):
    """W^T dz with the gradient at few pixels (one pixel's full dz column and one more entry) is the
    entry scatter, = conv2d_input exactly; off the dz grid, above the 2^24 bound or with more than a
    quarter of the entries non-zero the scatter declines (None) and the dense kernel runs."""
    layer = SimpleNamespace(is_conv=True, stride=stride, padding=padding, dilation=dilation, groups=1)
    gen = torch.Generator().manual_seed(2)
    weight = torch.randint(-127, 128, (6, 3, 3, 2), generator=gen).float() / 128
    shape = torch.Size((1, 3, 11, 9))
    out_hw = [
        (n + 2 * p - d * (k - 1) - 1) // st + 1
        for n, p, d, k, st in zip((11, 9), padding, dilation, (3, 2), stride, strict=True)
    ]
    dz = torch.zeros(1, 6, *out_hw)
    dz[0, :, 1, 2] = torch.randint(-127, 128, (6,), generator=gen).float() / 128
    dz[0, 2, -1, 0] = -0.5
    units = (1 / 128, 1 / 128)

    def dense(grad: torch.Tensor, w: torch.Tensor = weight) -> torch.Tensor:
        return torch.nn.grad.conv2d_input(shape, w, grad, stride, padding, dilation)

    scattered = _scattered_input_gradient(shape, weight, dz, layer, units)
    assert scattered is not None and torch.equal(scattered, dense(dz))
    assert torch.equal(input_gradient(shape, weight, dz, layer, units), dense(dz))
    off_grid = dz + 2.0**-12 * (dz != 0)
    assert _scattered_input_gradient(shape, weight, off_grid, layer, units) is None
    assert torch.equal(input_gradient(shape, weight, off_grid, layer, units), dense(off_grid))
    assert _scattered_input_gradient(shape, weight * 2**20, dz, layer, units) is None
    assert torch.equal(input_gradient(shape, weight * 2**20, dz, layer, units), dense(dz, weight * 2**20))
    crowded = torch.zeros_like(dz)  # a third of the pixels, every channel: over a quarter of the entries
    pixels = crowded.shape[2] * crowded.shape[3]
    columns = torch.randperm(pixels, generator=gen)[: pixels // 3]
    crowded.view(6, -1)[:, columns] = torch.randint(1, 128, (6, len(columns)), generator=gen).float() / 128
    assert _scattered_input_gradient(shape, weight, crowded, layer, units) is None
    assert torch.equal(input_gradient(shape, weight, crowded, layer, units), dense(crowded))


@pytest.mark.parametrize("quantize", [True, False])
def test_fused_layer_gradient_equals_the_torch_ops(quantize):
    """layer_gradient = m_mid q_g(m_pre g) (bias source), m_post of it (dL/dz) and wmult times that."""
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(1, 4, 5, 5, generator=gen, dtype=torch.float64) * 2
    pre, mid, post = (torch.rand(1, 4, 5, 5, generator=gen) < 0.7 for _ in range(3))
    grid = Grid(8, True, 0)
    bias_g, g, dz, nonzero = layer_gradient(grad, grid if quantize else None, post, pre, mid, wmult=0.25)
    expected = grad * pre
    if quantize:
        expected = torch.round(expected / grid.lsb).clamp(grid.fmt.qmin, grid.fmt.qmax) * grid.lsb
    expected = expected * mid
    assert torch.equal(bias_g, expected) and torch.equal(g, expected * post) and torch.equal(dz, expected * post * 0.25)
    assert nonzero and not layer_gradient(grad * 0, grid, post, pre)[3]


def test_relu6_ceiling_is_the_quantized_six():
    spec = {"bits": 8, "signed": False, "exponent": -4, "rounding": "half_even"}  # up to 255/16 = 15.94
    out = Requantizer(spec, "relu6")(torch.tensor([7.0, 5.99, -1.0], dtype=torch.float64))
    assert out.tolist() == [6.0, 6.0, 0.0]


def test_streaming_bn_statistics_and_fold(stream, one_thread):
    """The lrt-cnn's unfoldable BNs become streaming BN: EMAs with eta = 1 - 1/B, w = q(gamma / sigma)."""
    images, _ = stream.batch(0, 64)
    program = _program("lrt-cnn", images, 8)
    device = DeviceNet.from_program(program, bn_batch=10)
    assert [bn.name for bn in device.bn_layers] == ["bn2", "bn4"]
    bn = device.bn_layers[0]
    mean0, msq0 = bn.mean_ema.clone(), bn.msq_ema.clone()
    seen = {}
    hook = bn.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0].detach().clone()))
    device.train()
    with torch.no_grad():
        device(images[:1])
    hook.remove()
    x = seen["x"]
    eta = 0.9
    assert torch.allclose(bn.mean_ema, eta * mean0 + (1 - eta) * x.mean((0, 2, 3)))
    assert torch.allclose(bn.msq_ema, eta * msq0 + (1 - eta) * (x * x).mean((0, 2, 3)))
    mu, sigma = bn.statistics()
    correction = 1 - eta ** int(bn.step)
    assert torch.allclose(mu, bn.mean_ema / correction)
    w, _ = bn.folded()
    step = math.ldexp(1.0, bn.weight_q.exponent)
    expected = torch.clamp(torch.round(bn.gamma.detach() / sigma / step), bn.weight_q.lo, bn.weight_q.hi) * step
    assert torch.equal(w.detach(), expected)
    # the export writes exactly the fold the device computes with
    with torch.no_grad():
        assert _mismatches(device.to_program().run(images[:8]), device.eval()(images[:8]).numpy()) == 0


def test_device_rejects_wrong_shape_and_nan(stream):
    images, _ = stream.batch(0, 8)
    device = DeviceNet.from_program(_program("mnistnet", images, 8))
    with pytest.raises(ValueError, match="does not match the program"):
        device(torch.zeros(1, 1, 14, 14))
    bad = images[:1].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        device(bad)


def test_float32_products_are_exact_within_their_bound_and_fall_back_above_it(stream, one_thread):
    """The conv/linear product runs in float32 only when max_o sum_j |w_oj| * max|x| <= 2^24 (every
    partial sum exact); with worst-case codes inside the bound, and with the float64 fallback, the
    device still equals the integer program bit for bit."""
    images, _ = stream.batch(0, 64)
    device = DeviceNet.from_program(_program("lrt-cnn", images, 8))
    rng = np.random.default_rng(0)
    for layer in device.weight_layers:  # the largest codes, random signs: the largest row sums there are
        n_out, n_in = layer.shape2d
        layer.set_codes(np.where(rng.random((n_out, n_in)) < 0.5, -128, 127))
        bound = 128 * n_in * layer.input_code_max
        assert layer.exact32 == (bound <= 2**24)
    assert all(layer.exact32 for layer in device.weight_layers)  # the narrow net fits float32 everywhere
    probe = torch.cat([images[:8], torch.ones(1, *images.shape[1:])])
    program = device.to_program()
    with torch.no_grad():
        assert _mismatches(device.eval()(probe).numpy(), program.run(probe)) == 0
        for layer in device.weight_layers:
            layer.input_code_max = 2**24  # forces the float64 product
            layer.set_codes(layer.codes())
            assert not layer.exact32
        assert _mismatches(device(probe).numpy(), program.run(probe)) == 0


@pytest.mark.parametrize("kind", ["digital", "analog"])
def test_reloading_only_the_drifted_cells_equals_a_full_reload(stream, one_thread, kind):
    """``set_codes(codes, array.drifted_cells)`` (what the trainer does after a drift event) leaves the
    weights, their float32 copy, the input-gradient layout and the exact32 bound as a full reload does."""
    images, _ = stream.batch(0, 64)
    program = _program("lrt-cnn", images, 8)
    partial, full = DeviceNet.from_program(program), DeviceNet.from_program(program)
    rng = np.random.default_rng(1)
    for layer, reference in zip(partial.weight_layers, full.weight_layers, strict=True):
        array = NVMArray(layer.codes(), layer.formats.weight.fmt)
        layer.set_codes(array.codes)
        if layer.is_conv:  # the layout input_gradient caches, to be kept up to date in place
            _laid_weights(layer, layer.weight32())
        for _ in range(3):
            before = array.codes.copy()
            changed = array.apply_digital_drift(0.01, rng) if kind == "digital" else array.apply_analog_drift(0.6, rng)
            np.testing.assert_array_equal(np.flatnonzero(array.codes != before), np.sort(array.drifted_cells))
            assert changed == array.drifted_cells.size > 0
            layer.set_codes(array.codes, array.drifted_cells)
        reference.set_codes(array.codes)
        assert torch.equal(layer.weight, reference.weight)
        assert torch.equal(layer.weight32(), reference.weight32())
        np.testing.assert_array_equal(layer._row_l1, reference._row_l1)
        assert layer.exact32 == reference.exact32
        if layer.is_conv:
            cached = layer._input_grad_cache[1]
            np.testing.assert_array_equal(cached, _laid_weights(reference, reference.weight32()))


@pytest.mark.parametrize("name", ZOO)
def test_int8_products_equal_the_float_products_through_adaptation(name, stream, one_thread, monkeypatch):
    """The int8 product (``torch._int_mm`` on the codes, uint8 inputs shifted by 128 and the shift's
    share added back, padded taps included) gives the float product's values bit for bit, forced on
    every groups = 1 layer whatever this CPU: the same adaptation trajectory (codes after LowRank
    writes and drift, whose partial reloads update the int8 codes in place) and the same outputs."""
    images, _ = stream.batch(0, 64)
    program = _program(name, images, weight_bits=4 if name in ("mobilenetv2-tiny", "resnet-tiny") else 8)
    taken = []
    product = DeviceLayer.int8_product

    def counted(layer: DeviceLayer, x: torch.Tensor) -> torch.Tensor | None:
        z = product(layer, x)
        if x.shape[0] == 1:  # the online step (large evaluation batches may decline: INT8_MAX_PATCH_BYTES)
            taken.append(z is not None)
        return z

    monkeypatch.setattr(DeviceLayer, "int8_product", counted)
    devices = []
    for int8 in (True, False):
        device = DeviceNet.from_program(program)
        for layer in device.weight_layers:
            layer.int8_products = int8 and layer.groups == 1
        trainer = OnlineTrainer(device, make_rule("lowrank", rank=2, lr=0.05), stream, seed=0)
        trainer.run(40)
        devices.append(device)
    assert taken and all(taken)  # every forced batch-1 product ran on int8 codes (none fell back)
    probe = images[:16]
    with torch.no_grad():
        assert torch.equal(devices[0].eval()(probe), devices[1].eval()(probe))
    for fast, reference in zip(devices[0].weight_layers, devices[1].weight_layers, strict=True):
        np.testing.assert_array_equal(fast.codes(), reference.codes())
    conv = next(layer for layer in devices[0].weight_layers if layer.is_conv and layer.int8_products)
    monkeypatch.setattr(device_module, "INT8_MAX_PATCH_BYTES", 0)  # patches over the cap: the float product
    assert product(conv, conv.cache_input) is None


@pytest.mark.parametrize("rounding", ["half_even", "half_away", "floor"])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
def test_requantizer_numba_pass_equals_the_torch_ops(rounding, activation):
    """Requantizer.forward_masked's float64 pass = clip(round_tensor(v / 2^k), lo, hi) 2^k with the mask
    (code inside [lo, hi], and v > 0 after a ReLU), bit for bit: ties, clipping, -0, NaN."""
    spec = {"bits": 8, "signed": activation == "none", "exponent": -3, "rounding": rounding}
    quantizer = Requantizer(spec, activation)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(400, generator=gen, dtype=torch.float64) * 20
    v[:6] = torch.tensor([2.5 / 8, -2.5 / 8, -0.0, float("nan"), 1e6, -1e6])
    codes = round_tensor(v / quantizer.step, quantizer.rounding)
    inside = (codes >= quantizer.lo) & (codes <= quantizer.hi)
    expected_mask = inside & (v > 0) if quantizer.relu else inside
    expected = codes.clamp(quantizer.lo, quantizer.hi) * quantizer.step
    out, mask = quantizer.forward_masked(v)
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().sum() == 1
    finite = ~expected.isnan()
    assert torch.equal(out[finite], expected[finite])
    assert torch.equal(out[finite].signbit(), expected[finite].signbit())
    assert torch.equal(mask, expected_mask)
    assert quantizer.forward_masked(v, keep_mask=False)[1] is None
