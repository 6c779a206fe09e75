"""The autograd-free online step (edgetrain.adapt.executor.DeviceStep) gives the same trajectory as the
autograd path bit for bit, and its numba kernels equal the torch operations they replace."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import edgetrain as et
from edgetrain.adapt import DeviceNet, OnlineTrainer, make_rule
from edgetrain.adapt.device import Requantizer, _requantize_masked
from edgetrain.adapt.executor import (
    DeviceStep,
    _bn_backward_pass,
    batch1_executor,
    max_pool,
    max_pool_backward,
    unsupported_ops,
)
from edgetrain.adapt.qnet import (
    PAPER_WIDE,
    ROUNDING_CODES,
    Grid,
    _scattered_input_gradient,
    grid_round,
    input_gradient,
)
from edgetrain.adapt.scenarios import make_scenario
from edgetrain.models import LRTNet

SAMPLES = 120


@pytest.fixture(scope="module")
def stream():
    return make_scenario("digital-drift", dataset="mnist", samples=SAMPLES, seed=0)


def _program(name: str, images: torch.Tensor) -> et.IntegerProgram:
    torch.manual_seed(0)
    model = (LRTNet(width=16, hidden=64) if name == "lrt-cnn" else et.create_model(name)).eval()
    bits = 4 if name in ("mobilenetv2-tiny", "resnet-tiny") else 8
    qmodel = et.quantize(model, images[:1], images, et.QuantConfig(weight_bits=bits), mode="static")
    return et.to_integer(qmodel, meta={"model": name})


def _trajectory(program: et.IntegerProgram, stream, executor: bool) -> dict:
    """Every forward's logits, and the net state, NVM codes, write/pulse counts and update events after
    every 40 samples, of a LowRank run that writes often (rank 2, lr 0.05)."""
    net = DeviceNet.from_program(program)
    trainer = OnlineTrainer(net, make_rule("lowrank", rank=2, lr=0.05), stream, seed=0, executor=executor)
    assert (trainer.step_executor is not None) == executor
    forward = trainer.step_executor.forward if executor else net.forward
    logits: list[torch.Tensor] = []

    def recording(x: torch.Tensor) -> torch.Tensor:
        out = forward(x)
        logits.append(out.detach().clone())
        return out

    if executor:
        trainer.step_executor.forward = recording
    else:
        net.forward = recording
    snapshots = []
    images, labels = stream.batch(0, SAMPLES)
    for i, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        trainer.learn_sample(image, label)
        if (i + 1) % 40 == 0:
            snapshots.append(
                {
                    "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
                    "codes": {k: a.codes.copy() for k, a in trainer.arrays.items()},
                    "writes": {k: a.write_counts.copy() for k, a in trainer.arrays.items()},
                    "pulses": trainer.pulse_max_writes,
                    "events": dict(trainer.rule.update_events),
                }
            )
    return {"logits": torch.stack(logits), "snapshots": snapshots, "writes": trainer.total_writes}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("name", ["lrt-cnn", "resnet-tiny", "mobilenetv2-tiny"])
def test_executor_trajectory_is_identical_to_the_autograd_path(name, stream, one_thread):
    """lrt-cnn: streaming BN, max-pool; resnet-tiny: residual adds, avg-pool; mobilenetv2-tiny:
    depthwise convs (dense accumulator), ReLU6, INT4."""
    program = _program(name, stream.batch(0, 64)[0])
    reference = _trajectory(program, stream, executor=False)
    fast = _trajectory(program, stream, executor=True)
    assert reference["writes"] > 0, "the run must write weights for the comparison to mean something"
    assert _equal(reference["logits"], fast["logits"])
    for ref, new in zip(reference["snapshots"], fast["snapshots"], strict=True):
        for key in ref:
            assert _equal(ref[key], new[key]), f"{key} differs"


def test_ops_outside_the_executor_fall_back_to_autograd(stream):
    program = _program("inception-tiny", stream.batch(0, 64)[0])  # concat
    net = DeviceNet.from_program(program)
    assert "concat" in unsupported_ops(net)
    assert batch1_executor(net) is None
    with pytest.raises(ValueError, match="concat"):
        DeviceStep(net)
    trainer = OnlineTrainer(net, make_rule("lowrank"), stream, seed=0)
    assert trainer.step_executor is None
    trainer.learn_sample(*[t[0] for t in stream.batch(0, 1)])  # the autograd path still runs


@pytest.mark.parametrize(
    ("kernel", "stride", "shape"), [(2, 2, (1, 3, 8, 8)), (3, 2, (1, 2, 9, 7)), (2, 1, (1, 2, 5, 6))]
)
def test_max_pool_equals_torch_with_ties(kernel, stride, shape):
    """Values on a coarse grid (many ties, zeros): the same values, the same first-maximum indices
    and the same backward scatter as aten's max_pool2d_with_indices."""
    torch.manual_seed(0)
    v = torch.randint(-2, 3, shape).double() / 4
    args = ([kernel, kernel], [stride, stride], [0, 0], [1, 1], False)
    values, index = max_pool(v, *args)
    ref_values, ref_index = torch.ops.aten.max_pool2d_with_indices(v, *args)
    assert torch.equal(values, ref_values) and torch.equal(index, ref_index)
    grad = torch.randint(-5, 6, values.shape).double()
    expected = torch.ops.aten.max_pool2d_with_indices_backward(grad, v, *args, ref_index)
    assert torch.equal(max_pool_backward(grad, v, index, args), expected)


def test_max_pool_with_padding_uses_torch():
    v = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    args = ([3, 3], [2, 2], [1, 1], [1, 1], True)
    values, index = max_pool(v, *args)
    ref_values, ref_index = torch.ops.aten.max_pool2d_with_indices(v, *args)
    assert torch.equal(values, ref_values) and torch.equal(index, ref_index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grid_round_and_descend_equal_the_torch_expressions(dtype):
    """clip(round(x / lsb), n, p) lsb (ties at .5 to even, saturation, NaN kept) and the bias step
    p <- q(p - q(lr g)) in the tensor's own dtype, element for element."""
    grid = Grid(8, True, 0)
    x = torch.cat([torch.randn(200) * 3, (torch.arange(-20, 21) + 0.5) * grid.lsb, torch.tensor([float("nan")])])
    x = x.to(dtype)
    expected = torch.round(x / grid.lsb).clamp_(grid.fmt.qmin, grid.fmt.qmax).mul_(grid.lsb)
    assert torch.equal(grid_round(x, grid.lsb, grid.fmt.qmin, grid.fmt.qmax).nan_to_num(7.0), expected.nan_to_num(7.0))
    param, g = (torch.randn(300, dtype=dtype) for _ in range(2))
    param = PAPER_WIDE.quantize(param)
    expected = PAPER_WIDE.quantize(param - PAPER_WIDE.quantize(0.013 * g))
    PAPER_WIDE.descend_(param, g, 0.013)
    assert torch.equal(param, expected)


@pytest.mark.parametrize("rounding", ["half_even", "half_away", "floor"])
def test_bn_fold_requantizer_equals_the_device_requantizer(rounding):
    """The scalar requantizer of DeviceStep's BN fold = Requantizer.forward_masked (ties, clipping)."""
    quantizer = Requantizer({"bits": 4, "signed": True, "exponent": -2, "rounding": rounding})
    values = torch.cat([torch.arange(-12, 13) * 0.125, torch.tensor([-9.0, 9.0, 0.3, -0.3])]).double()
    expected, mask = quantizer.forward_masked(values)
    got = [
        _requantize_masked(float(v), quantizer.step, quantizer.lo, quantizer.hi, ROUNDING_CODES[rounding])
        for v in values
    ]
    assert torch.equal(torch.tensor([value for value, _ in got], dtype=torch.float64), expected)
    assert torch.equal(torch.tensor([inside for _, inside in got]), mask)


def _scatter_case(seed: int) -> tuple:
    """A random conv (groups, stride, padding, dilation, kernel) with an 8-bit dz ~5% non-zero."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi, n=1: torch.randint(lo, hi, (n,), generator=gen).tolist()  # noqa: E731
    groups = [1, 1, 2, 4][rand(0, 4)[0]]
    c_in, c_out = groups * rand(1, 5)[0], groups * rand(1, 5)[0]
    kernel, stride, padding, dilation = rand(1, 4, 2), rand(1, 3, 2), rand(0, 2, 2), rand(1, 3, 2)
    height, width = rand(7, 12, 2)
    layer = SimpleNamespace(is_conv=True, stride=stride, padding=padding, dilation=dilation, groups=groups)
    weight = torch.randint(-127, 128, (c_out, c_in // groups, *kernel), generator=gen).float() / 128
    shape = torch.Size((1, c_in, height, width))
    out_hw = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip((height, width), padding, dilation, kernel, stride, strict=True)
    ]
    dz = torch.randint(-127, 128, (1, c_out, *out_hw), generator=gen).float() / 128
    dz = dz * (torch.rand(dz.shape, generator=gen) < 0.05)
    dz.view(-1)[0] = 0.5  # at least one entry
    return layer, weight, shape, dz


@pytest.mark.parametrize("seed", range(12))
def test_scattered_input_gradient_equals_conv2d_input(seed):
    """W^T dz entry by entry (any groups, stride, padding, dilation) = conv2d_input bit for bit."""
    layer, weight, shape, dz = _scatter_case(seed)
    dense = torch.nn.grad.conv2d_input(shape, weight, dz, layer.stride, layer.padding, layer.dilation, layer.groups)
    scattered = _scattered_input_gradient(shape, weight, dz, layer, (1 / 128, 1 / 128))
    assert scattered is not None and torch.equal(scattered, dense)
    assert torch.equal(input_gradient(shape, weight, dz, layer, (1 / 128, 1 / 128)), dense)


def test_scattered_input_gradient_declines_where_it_could_be_inexact_or_dense():
    layer, weight, shape, dz = _scatter_case(0)
    units = (1 / 128, 1 / 128)
    assert _scattered_input_gradient(shape, weight, dz + 2.0**-12 * (dz != 0), layer, units) is None  # off grid
    assert _scattered_input_gradient(shape, weight * 2**20, dz, layer, units) is None  # above 2^24
    assert _scattered_input_gradient(shape, weight, dz.double(), layer, units) is None  # float64: dense kernel
    dense_dz = torch.randint(1, 128, dz.shape).float() / 128
    assert _scattered_input_gradient(shape, weight, dense_dz, layer, units) is None  # too many entries


def test_scattered_input_gradient_format_bound_and_linear():
    """With a weight format the column sums are bounded from it first; where that bound is too loose
    the weights' own column sums decide (the result is still exact). Linear layers scatter rows."""
    layer, weight, shape, dz = _scatter_case(3)
    layer.formats = SimpleNamespace(weight=SimpleNamespace(bits=30))  # format bound far above 2^24
    dense = torch.nn.grad.conv2d_input(shape, weight, dz, layer.stride, layer.padding, layer.dilation, layer.groups)
    assert torch.equal(_scattered_input_gradient(shape, weight, dz, layer, (1 / 128, 1 / 128)), dense)
    linear = SimpleNamespace(is_conv=False, formats=SimpleNamespace(weight=SimpleNamespace(bits=8)))
    w = torch.randint(-127, 128, (300, 260)).float() / 128
    g = torch.randint(-127, 128, (1, 300)).float() / 128 * (torch.rand(1, 300) < 0.1)
    assert torch.equal(_scattered_input_gradient(torch.Size((1, 260)), w, g, linear, (1 / 128, 1 / 128)), g @ w)
    assert torch.equal(input_gradient(torch.Size((1, 260)), w, g, linear, (1 / 128, 1 / 128)), g @ w)


def test_scatter_weights_follow_set_codes(stream):
    """The scatter's laid-out weights are dropped when the codes change (a write or drift)."""
    net = DeviceNet.from_program(_program("lrt-cnn", stream.batch(0, 64)[0]))
    layer = next(layer for layer in net.weight_layers if layer.is_conv and layer.shape2d[1] > 9)
    x_shape = torch.Size((1, layer.weight_shape[1], 10, 10))
    dz = torch.zeros(1, layer.weight_shape[0], 8, 8)
    dz[0, 1, 2, 3], dz[0, 0, 5, 5] = 2.0**-6, -(2.0**-7)
    units = (2.0**-7, math.ldexp(1.0, layer.k_w))
    for codes in (layer.codes(), -layer.codes()):
        layer.set_codes(codes)
        expected = torch.nn.grad.conv2d_input(x_shape, layer.weight32(), dz)
        got = _scattered_input_gradient(x_shape, layer.weight32(), dz, layer, units)
        assert got is not None and torch.equal(got, expected)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("quantize", [False, True])
def test_bn_backward_pass_equals_the_torch_expressions(relu: bool, quantize: bool) -> None:
    """Streaming BN's fused element-wise backward = the torch expressions it replaces, bit for bit
    (signs of zero and NaN included): g_y = q(g m_out) after a ReLU, g_acc = g_y m_acc, g_acc x,
    dx = q(g_acc w) (q: torch.round(v / lsb).clamp_(lo, hi).mul_(lsb), only when quantizing)."""
    gen = torch.Generator().manual_seed(0)
    shape = (2, 3, 5)
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    g[0, 0, :3] = torch.tensor([float("nan"), -0.0, 2.5 / 64])  # NaN, -0, a tie on the 2^-6 grid
    out_mask, acc_mask = (torch.rand(shape, generator=gen) < 0.7 for _ in range(2))
    w = torch.randn(3, generator=gen, dtype=torch.float64)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    lsb, lo, hi = 2.0**-6, -128, 127

    def q(v: torch.Tensor) -> torch.Tensor:
        return torch.round(v / lsb).clamp_(lo, hi).mul_(lsb) if quantize else v

    g_y = g * out_mask
    g_y = q(g_y) if relu else g_y
    g_acc = g_y * acc_mask
    expected = (g_y, g_acc * x, q(g_acc * w.view(1, -1, 1)))
    got = torch.empty((3, *shape), dtype=torch.float64)
    _bn_backward_pass(
        g.numpy(), out_mask.numpy(), acc_mask.numpy(), w.numpy(), x.numpy(), relu, quantize, lsb, float(lo),
        float(hi), *(t.numpy() for t in got.unbind(0)),
    )  # fmt: skip
    for value, reference in zip(got.unbind(0), expected, strict=True):
        assert torch.equal(value.isnan(), reference.isnan())
        finite = ~reference.isnan()
        assert torch.equal(value[finite], reference[finite])
        assert torch.equal(value[finite].signbit(), reference[finite].signbit())
