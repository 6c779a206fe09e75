"""The autograd-free online step (edgetrain.adapt.executor.DeviceStep) gives the same trajectory as the
autograd path bit for bit, and its numba kernels equal the torch operations they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgetrain as et
from edgetrain.adapt import DeviceNet, OnlineTrainer, make_rule
from edgetrain.adapt.device import Requantizer
from edgetrain.adapt.executor import (
    DeviceStep,
    _requantize_masked,
    batch1_executor,
    max_pool,
    max_pool_backward,
    unsupported_ops,
)
from edgetrain.adapt.qnet import PAPER_WIDE, ROUNDING_CODES, Grid, grid_round
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
