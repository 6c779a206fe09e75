"""QAT speed paths that must change nothing: the fused LeakyReLU kernel and the skipped identity output
quantizer give the same outputs and gradients bit for bit (float32 bit patterns, thresholds included) as
the unfused modules, on single modules with rounding ties and clipping and on whole zoo nets. The adjoint
first convolution (the input threshold's gradient without the input gradient) gives the same outputs and
weight gradients, and the threshold gradient of the adjoint identity, checked against float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from edgetrain.graph import QuantConfig, modules, quantize
from edgetrain.graph.fused import release_scratch, scratch
from edgetrain.graph.modules import TANGENT_ATTRIBUTE, AdjointInputConv, QActivation, QCompute, QLeakyReLU
from edgetrain.models import create_model
from edgetrain.tqt import TQTQuantizer


def bit_patterns(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.int32)


def assert_bit_identical(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert (u is None) == (v is None)
        if u is not None:
            assert torch.equal(bit_patterns(u), bit_patterns(v))


def leaky_step(module: QLeakyReLU, x: torch.Tensor, grad: torch.Tensor, fused: bool) -> list[torch.Tensor | None]:
    module.fused_training = fused
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = module(x)
    out.backward(grad)
    return [out, x.grad, module.prod_q.log2_t.grad, module.out_q.log2_t.grad]


@pytest.mark.parametrize("slope", [0.1, 0.01, 0.5, 1.0, 0.0])
def test_fused_leaky_relu_is_bit_identical_to_the_unfused_modules(slope: float) -> None:
    generator = torch.Generator().manual_seed(0)
    for trial in range(12):
        prod_log2_t = float(torch.rand(1, generator=generator)) * 6 - 3
        out_log2_t = prod_log2_t + float(torch.rand(1, generator=generator)) * 4 - 3
        module = QLeakyReLU(
            slope,
            TQTQuantizer(16, log2_t=-3.3).freeze(),
            TQTQuantizer(16, log2_t=prod_log2_t),
            TQTQuantizer(8, log2_t=out_log2_t),
        ).train()
        if trial % 4 == 3:
            module.out_q.freeze()
        step = module.prod_q.scale
        x = torch.randn(4, 3, 5, 7, generator=generator) * 2**prod_log2_t
        if trial % 2:  # on the int16 grid, as a conv's output quantizer leaves it
            x = torch.round(x / step) * step
        x.view(-1)[:20] = (torch.arange(20) - 10) * step * 0.5  # rounding ties
        x.view(-1)[20:24] = torch.tensor([0.0, -0.0, 1e4, -1e4])  # zeros and clipped values
        grad = torch.randn(x.shape, generator=generator)
        assert module.fusable(x)
        assert_bit_identical(leaky_step(module, x, grad, True), leaky_step(module, x, grad, False))


def test_fused_leaky_relu_scratch_reuse_keeps_bits() -> None:
    """The backward's scratch rows are reused across calls of every size (grown, then sliced) and start
    64-byte aligned (torch.dot's MKL sum order depends on the alignment): still bit-identical to unfused."""
    generator = torch.Generator().manual_seed(1)
    module = QLeakyReLU(
        0.1, TQTQuantizer(16, log2_t=-3.3).freeze(), TQTQuantizer(16, log2_t=1.0), TQTQuantizer(8, log2_t=0.5)
    ).train()
    release_scratch()
    for shape in [(3, 5, 7, 11), (64, 17, 9, 9), (2, 3, 5, 7), (64, 17, 9, 9), (1, 1, 1, 13)]:  # none a multiple of 16
        x = torch.randn(shape, generator=generator) * 2.0
        grad = torch.randn(shape, generator=generator)
        assert_bit_identical(leaky_step(module, x, grad, True), leaky_step(module, x, grad, False))
        rows = scratch(6, x.numel())
        assert all(row.data_ptr() % 64 == 0 for row in rows)
    release_scratch()


def test_fused_leaky_relu_follows_a_changed_alpha_threshold() -> None:
    """The fused path caches alpha_q(alpha); a new threshold or slope recomputes it (still bit-identical)."""
    generator = torch.Generator().manual_seed(2)
    module = QLeakyReLU(
        0.1, TQTQuantizer(16, log2_t=-3.3).freeze(), TQTQuantizer(16, log2_t=1.0), TQTQuantizer(8, log2_t=0.5)
    ).train()
    x = torch.randn(2, 3, 4, 5, generator=generator)
    grad = torch.randn(x.shape, generator=generator)
    for alpha_log2_t, slope in [(-3.3, 0.1), (-1.2, 0.1), (-1.2, 0.3)]:
        module.alpha_q.set_log2_t(alpha_log2_t)
        module.alpha.fill_(slope)
        assert module.quantized_alpha() == float(module.alpha_q(module.alpha))
        assert_bit_identical(leaky_step(module, x, grad, True), leaky_step(module, x, grad, False))


def qat_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor | None]:
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    nn.functional.cross_entropy(out, labels).backward()
    return [out, *(p.grad for p in model.parameters())]


def speed_paths_vs_unfused(monkeypatch, qmodel: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> list[bool]:
    """One QAT step with the speed paths and one with every quantizer unfused, from the same state (the
    BN-statistics phase moves the running statistics): asserts them bit-identical; returns which output
    quantizers were skipped."""
    state = copy.deepcopy(qmodel.state_dict())
    skipped_outputs: list[bool] = []
    output_proof = QCompute.output_unchanged

    def recorded(self: QCompute, y: torch.Tensor, bound: tuple[float, float] | None = None) -> bool:
        skipped_outputs.append(output_proof(self, y, bound))
        return skipped_outputs[-1]

    monkeypatch.setattr(modules, "threshold_tangent", lambda *_: None)  # the adjoint conv: tested below
    with monkeypatch.context() as patch:
        patch.setattr(QCompute, "output_unchanged", recorded)
        fast = qat_step(qmodel, x, labels)
    qmodel.load_state_dict(state)
    with monkeypatch.context() as patch:
        patch.setattr(QLeakyReLU, "fused_training", False)
        patch.setattr(QCompute, "unchanged_accumulator_range", lambda *_: None)
        patch.setattr(QCompute, "output_unchanged", lambda *_: False)
        reference = qat_step(qmodel, x, labels)
    qmodel.load_state_dict(state)
    assert_bit_identical(fast, reference)
    return skipped_outputs


def qat_zoo_net(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A zoo net quantized for retraining (max calibration, non-trivial moving statistics), a batch of 8 and
    its labels."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (8,), generator=generator)
    torch.manual_seed(0)
    model = create_model(name).train()
    with torch.no_grad():
        model(x)  # non-trivial moving statistics
    return quantize(model.eval(), x[:1], x, QuantConfig(activation_calibration="max"), mode="retrain"), x, labels


@pytest.mark.parametrize("name", ["darknet-tiny", "resnet-tiny"])
def test_qat_step_speed_paths_are_bit_identical_on_zoo_nets(monkeypatch, name: str) -> None:
    """Fused LeakyReLU + skipped identity q_acc / q_out vs every quantizer run unfused:
    same outputs and gradients bit for bit, in both phases of the recipe (BN statistics, then BN frozen)."""
    qmodel, x, labels = qat_zoo_net(name)
    speed_paths_vs_unfused(monkeypatch, qmodel, x, labels)
    for module in qmodel.modules():
        if hasattr(module, "freeze_bn"):
            module.freeze_bn()
    skipped_outputs = speed_paths_vs_unfused(monkeypatch, qmodel, x, labels)
    if name == "darknet-tiny":  # its convs feed LeakyReLUs through an int16 output quantizer
        assert any(skipped_outputs)


def test_output_quantizer_is_skipped_only_where_it_is_the_identity() -> None:
    layer = next(
        m
        for m in quantize(nn.Sequential(nn.Conv2d(1, 2, 3)), torch.rand(1, 1, 6, 6), torch.rand(4, 1, 6, 6)).modules()
        if isinstance(m, QCompute)
    ).train()
    acc_q, out_q = layer.acc_q, layer.out_q
    out_q.format = acc_q.format  # an int16 output, as before a LeakyReLU
    out_q.set_log2_t(float(acc_q.log2_t))
    y = torch.arange(-5.0, 5.0).reshape(1, 2, 5, 1) * acc_q.scale
    assert layer.output_unchanged(y)
    assert layer.output_unchanged(y, bound=(-5 * acc_q.scale, 4 * acc_q.scale))
    out_q.set_log2_t(float(acc_q.log2_t) + 1)  # a coarser output step: q_out rounds
    assert not layer.output_unchanged(y)
    out_q.set_log2_t(float(acc_q.log2_t) - 14)  # a finer step and a range of +-2 accumulator steps: q_out clips
    assert not layer.output_unchanged(y)
    assert not layer.output_unchanged(y, bound=(-5 * acc_q.scale, 4 * acc_q.scale))


@pytest.mark.parametrize(
    "conv_args",
    [
        {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1},
        {"stride": (2, 2), "padding": (2, 0), "dilation": (1, 2), "groups": 2},
    ],
)
def test_adjoint_input_conv_gradients(conv_args: dict) -> None:
    """dL/dw as F.conv2d's; dL/dlog2_t = ln2 <G, conv(r, w)> equals ln2 <conv^T(G, w), r> (float64 reference)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 9, 8, generator=generator)
    r = torch.randn(3, 2, 9, 8, generator=generator)
    w = torch.randn(4, 2 // conv_args["groups"], 3, 3, generator=generator, requires_grad=True)
    log2_t = torch.tensor(0.5, requires_grad=True)
    y = AdjointInputConv.apply(x, w, log2_t, r, conv_args)
    assert torch.equal(y, nn.functional.conv2d(x, w, None, **conv_args))
    grad_out = torch.randn(y.shape, generator=generator)
    grad_w, grad_log2_t = torch.autograd.grad(y, (w, log2_t), grad_out)
    ref_grad_w = torch.autograd.grad(nn.functional.conv2d(x, w, None, **conv_args), w, grad_out)[0]
    torch.testing.assert_close(grad_w, ref_grad_w)
    grad_x64 = nn.grad.conv2d_input(x.shape, w.detach().double(), grad_out.double(), **conv_args)  # conv^T(G, w)
    expected = math.log(2.0) * float((grad_x64 * r.double()).sum())
    assert float(grad_log2_t) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ["darknet-tiny", "mobilenetv2-tiny"])
def test_adjoint_first_conv_on_zoo_nets(name: str) -> None:
    """A QAT step on data (no input gradient) takes the adjoint first convolution; against the same step with
    the data requiring a gradient (the quantizer-then-conv autograd chain): outputs and every weight gradient
    equal, the input threshold's gradient the float64 value of <dL/dq, r> within 1e-5 of its terms' magnitude."""
    qmodel, x, labels = qat_zoo_net(name)
    for module in qmodel.modules():
        if hasattr(module, "freeze_bn"):
            module.freeze_bn()
    reference_model = copy.deepcopy(qmodel)
    input_layer = next(m for m in qmodel.modules() if isinstance(m, QActivation) and m.role == "input")
    captured: dict[str, torch.Tensor] = {}
    input_layer.register_forward_hook(lambda m, i, y: captured.update(tangent=getattr(y, TANGENT_ATTRIBUTE).r))
    adjoint = qat_step(qmodel, x, labels)
    reference_input = next(m for m in reference_model.modules() if isinstance(m, QActivation) and m.role == "input")

    def keep_gradient(module: nn.Module, inputs: tuple, y: torch.Tensor) -> None:
        y.retain_grad()
        captured["quantized"] = y

    reference_input.register_forward_hook(keep_gradient)
    reference = qat_step(reference_model, x.clone().requires_grad_(True), labels)
    assert torch.equal(adjoint[0], reference[0])
    names = [n for n, _ in qmodel.named_parameters()]
    threshold = names.index(next(n for n in names if n.startswith("net.input_quant")))
    for i, (a, b) in enumerate(zip(adjoint[1:], reference[1:], strict=True)):
        if i != threshold:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    terms = captured["quantized"].grad.double() * captured["tangent"].double()
    exact = math.log(2.0) * float(terms.sum())
    scale = math.log(2.0) * float(terms.abs().sum())
    assert abs(float(adjoint[1 + threshold]) - exact) <= 1e-5 * scale
