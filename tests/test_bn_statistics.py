"""Where the BN-statistics phase of QAT takes its batch statistics: the float convolution (default, the TQT /
Graffitist / Jacob et al. definition) or, opt-in, the layer's own quantized-weight convolution."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgetrain.data import load_dataset
from edgetrain.graph import QuantConfig, quantize
from edgetrain.graph.modules import QCompute
from edgetrain.tqt import RetrainConfig, retrain, set_bn_statistics


def conv_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, bias=True),
        nn.BatchNorm2d(4),
        nn.Flatten(),
    )


def quantized_net(x: torch.Tensor) -> nn.Module:
    model = conv_bn_net().train()
    with torch.no_grad():
        for _ in range(3):  # moving statistics that differ from the batch's
            model(x * 1.5 + 0.2)
    return quantize(model.eval(), x[:1], x, QuantConfig(), mode="retrain").train()


def layers(qmodel: nn.Module) -> list[QCompute]:
    return [m for m in qmodel.modules() if isinstance(m, QCompute) and m.bn is not None]


def layer_inputs(qmodel: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every folded layer in one training forward (then the state is restored)."""
    state = copy.deepcopy(qmodel.state_dict())
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach())) for m in layers(qmodel)]
    qmodel(x)
    for hook in hooks:
        hook.remove()
    qmodel.load_state_dict(state)
    return seen


def expected_running_stats(layer: QCompute, x: torch.Tensor, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm's moving-statistics update from the batch statistics of sum w x (float) or of
    acc / f with acc = sum q_w(w f) x, f = gamma / sigma_mv (quantized), written out independently."""
    bn = layer.bn
    with torch.no_grad():
        factor = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        if source == "float":
            raw = F.conv2d(x, layer.weight, None, **layer.conv_args)
        else:
            quantized_weight = layer.weight_q(layer.weight * factor.reshape(-1, 1, 1, 1))
            raw = F.conv2d(x, quantized_weight, None, **layer.conv_args) / factor.reshape(1, -1, 1, 1)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(factor)
        mean = raw.mean((0, 2, 3)) + bias
        var = raw.var((0, 2, 3), unbiased=True)
        momentum = bn.momentum
        return (1 - momentum) * bn.running_mean + momentum * mean, (1 - momentum) * bn.running_var + momentum * var


@pytest.mark.parametrize("source", ["float", "quantized"])
def test_batch_statistics_come_from_the_chosen_convolution(source: str) -> None:
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    qmodel = quantized_net(x)
    set_bn_statistics(qmodel, source)
    inputs = layer_inputs(qmodel, x)
    expected = [expected_running_stats(layer, xi, source) for layer, xi in zip(layers(qmodel), inputs, strict=True)]
    other = "quantized" if source == "float" else "float"
    others = [expected_running_stats(layer, xi, other) for layer, xi in zip(layers(qmodel), inputs, strict=True)]
    qmodel(x)
    for layer, (mean, var), (other_mean, other_var) in zip(layers(qmodel), expected, others, strict=True):
        torch.testing.assert_close(layer.bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.bn.running_var, var, rtol=1e-5, atol=1e-6)
        # the two sources differ (the weight quantization error), by more than the float tolerance above
        assert not torch.allclose(layer.bn.running_var, other_var, rtol=1e-6, atol=0) or not torch.allclose(
            layer.bn.running_mean, other_mean, rtol=1e-6, atol=0
        )


def test_quantized_statistics_train_every_parameter_and_stop_at_freeze_bn() -> None:
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(2))
    qmodel = quantized_net(x)
    frozen = copy.deepcopy(qmodel)
    set_bn_statistics(qmodel, "quantized")
    nn.functional.cross_entropy(qmodel(x).reshape(16, -1)[:, :4], labels).backward()
    for name, parameter in qmodel.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    # gamma and beta are trained through the batch statistics (beta - gamma mean_B / sigma_B)
    assert all(float(layer.bn.weight.grad.abs().sum()) > 0 for layer in layers(qmodel))
    # after freeze_bn() the source no longer matters: the same step as a model that never had the option
    for model in (qmodel, frozen):
        for layer in layers(model):
            layer.freeze_bn()
    frozen.load_state_dict(qmodel.state_dict())
    assert torch.equal(qmodel(x), frozen(x))


def test_bn_statistics_option_is_validated_and_float_by_default() -> None:
    assert RetrainConfig().bn_statistics == "float"
    x = torch.randn(4, 1, 8, 8)
    assert all(layer.bn_statistics == "float" for layer in layers(quantized_net(x)))
    with pytest.raises(ValueError, match="bn_statistics"):
        RetrainConfig(bn_statistics="approximate")
    with pytest.raises(ValueError, match="bn_statistics"):
        set_bn_statistics(quantized_net(x), "batch")


def test_retrain_applies_the_chosen_source() -> None:
    train = load_dataset("digits", "train").subset(64)
    example = train.images[:8]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    model(example)
    qmodel = quantize(model.eval(), example[:1], example, QuantConfig(), mode="retrain")
    config = RetrainConfig(epochs=1, batch_size=32, weight_lr=1e-3, bn_statistics="quantized")
    retrain(qmodel, train, None, config, progress=False)
    assert [layer.bn_statistics for layer in layers(qmodel)] == ["quantized"]
