"""Graph quantizer: BN folding, each DESIGN.md section 4 rule on a minimal graph, errors, custom modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgetrain.graph import QuantConfig, UnsupportedOpError, build_quantized_model, quantize
from edgetrain.graph.modules import BatchMoments, QCompute
from edgetrain.models import create_model

torch.set_num_threads(1)


def calib(n: int = 8, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def with_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give every BN non-trivial moving statistics and affine parameters, then eval."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


def rows(qmodel) -> dict[str, object]:
    return {q.name: q for q in qmodel.quantizers()}


def quantizers_of(qmodel, prefix: str) -> dict[str, object]:
    return {q.name.split(".")[-1]: q for q in qmodel.quantizers() if q.name.rsplit(".", 1)[0] == prefix}


def disable_quantizers(qmodel) -> None:
    for _, _, q in qmodel.named_quantizers():
        q.enabled = False


# --- batch-norm folding ---------------------------------------------------------------------


def conv_bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 6),
        nn.BatchNorm1d(6),
        nn.Linear(6, 3),
    )


def test_bn_folding_equals_unfolded_float_net_in_eval() -> None:
    x = calib(16)
    model = with_stats(conv_bn_net(), x)
    qmodel = build_quantized_model(model, x[:1])
    disable_quantizers(qmodel)
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), model(x), rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, QCompute) for m in qmodel.modules()) == 3  # BN folded, no separate layers


def test_training_fold_matches_batch_statistics_and_gradient_shapes() -> None:
    """Before freeze_bn(): c * conv(x, w') + b' equals BN with batch statistics; gradients match in shape."""
    x = calib(16)
    model = with_stats(conv_bn_net(), x)
    qmodel = build_quantized_model(model, x[:1], mode="retrain").train()
    disable_quantizers(qmodel)
    model.train()
    torch.testing.assert_close(qmodel(x), model(x), rtol=1e-4, atol=1e-5)
    qmodel(x).square().sum().backward()
    model(x).square().sum().backward()
    fused = [m for m in qmodel.modules() if isinstance(m, QCompute)]
    originals = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for q, m in zip(fused, originals, strict=True):
        assert q.weight.grad.shape == m.weight.grad.shape
        torch.testing.assert_close(q.weight.grad, m.weight.grad, rtol=1e-3, atol=1e-4)


def test_freeze_bn_switches_to_moving_statistics() -> None:
    x = calib(16)
    model = with_stats(conv_bn_net(), x)
    qmodel = build_quantized_model(model, x[:1], mode="retrain").train()
    disable_quantizers(qmodel)
    for m in qmodel.modules():
        if hasattr(m, "freeze_bn"):
            m.freeze_bn()
    before = [m.bn.running_mean.clone() for m in qmodel.modules() if isinstance(m, QCompute) and m.bn is not None]
    out = qmodel(x)
    after = [m.bn.running_mean for m in qmodel.modules() if isinstance(m, QCompute) and m.bn is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    torch.testing.assert_close(out, model.eval()(x), rtol=1e-5, atol=1e-5)


def test_retrain_mode_converges_and_keeps_shared_scales_shared() -> None:
    torch.manual_seed(0)
    x = calib(64, seed=3)
    y = (x.mean((1, 2, 3)) > x.mean()).long()
    model = with_stats(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 2)), x
    )
    qmodel = quantize(model, x[:1], x, mode="retrain").train()
    opt = torch.optim.Adam(qmodel.parameters(), lr=1e-2)
    first = last = None
    for _ in range(60):
        opt.zero_grad()
        loss = F.cross_entropy(qmodel(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
        last = loss.item()
    assert last < 0.5 * first
    conv = quantizers_of(qmodel, "0")
    assert conv["acc_q"].log2_t == conv["bias_q"].log2_t
    net = dict(qmodel.net.named_modules())["0"]
    assert net.acc_q.log2_t is net.bias_q.log2_t


# --- rules on minimal graphs ------------------------------------------------------------------


def test_conv_linear_rule_formats_and_bias_shares_accumulator() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3))
    q = rows(quantize(model, calib(1), calib()))
    assert (q["input_quant.out_q"].bits, q["input_quant.out_q"].signed) == (8, True)
    assert (q["0.weight_q"].bits, q["0.acc_q"].bits, q["0.bias_q"].bits) == (8, 16, 16)
    assert q["0.bias_q"].group == q["0.acc_q"].group == "0.acc_q"
    assert (q["0.out_q"].bits, q["0.out_q"].signed) == (8, False)  # ReLU merged: uint8
    assert (q["3.out_q"].bits, q["3.out_q"].signed) == (8, True)
    assert q["0.weight_q"].role == "weight" and q["0.acc_q"].role == "accumulator" and q["0.bias_q"].role == "bias"
    assert not any(name.startswith("1.") for name in q)  # no separate ReLU layer


def test_int4_keeps_first_and_last_layers_at_8_bits() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128, 3),
    )
    q = rows(quantize(model, calib(1), calib(), QuantConfig(weight_bits=4), mode="retrain"))
    assert [q[f"{i}.weight_q"].bits for i in (0, 2, 5)] == [8, 4, 8]
    assert not q["0.weight_q"].frozen and q["0.out_q"].group is None


def test_relu6_clips_at_six_before_quantizing() -> None:
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU6())
    model[0].weight.data.fill_(10.0)
    qmodel = quantize(model, calib(1), calib())
    assert rows(qmodel)["0.out_q"].signed is False
    assert qmodel(torch.ones(1, 1, 8, 8)).max().item() <= 6.0


class Leaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x), 0.1)


def test_leaky_relu_decomposition_shares_the_max_inputs_scale() -> None:
    q = rows(quantize(Leaky(), calib(1), calib()))
    assert (q["conv.out_q"].bits, q["conv.out_q"].signed) == (16, True)  # q16(x)
    assert (q["leaky_relu.alpha_q"].bits, q["leaky_relu.prod_q"].bits, q["leaky_relu.out_q"].bits) == (16, 16, 8)
    assert q["leaky_relu.prod_q"].group == q["conv.out_q"].group == "conv.out_q"
    assert q["leaky_relu.alpha_q"].frozen


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.body = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        return torch.relu(self.body(x) + x)


def test_residual_add_shares_threshold_and_rescales_the_identity_branch() -> None:
    q = rows(quantize(Residual(), calib(1), calib()))
    assert "add_in1_rescale.out_q" in q  # identity branch (the stem output also feeds body)
    assert q["add_in1_rescale.out_q"].role == "rescale"
    assert q["body.out_q"].group == q["add_in1_rescale.out_q"].group is not None
    assert (q["body.out_q"].bits, q["body.out_q"].signed) == (8, True)
    assert (q["add.out_q"].bits, q["add.out_q"].signed) == (8, False)  # ReLU after the add merged


def test_projection_shortcut_shares_the_two_layer_outputs() -> None:
    q = rows(quantize(create_model("resnet-tiny"), calib(1, 28), calib(4, 28)))
    assert q["layers.1.body.3.out_q"].group == q["layers.1.shortcut.0.out_q"].group is not None
    assert not any(name.startswith("add_1_in") for name in q)  # no rescale needed


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 1)
        self.b = nn.Conv2d(1, 2, 1)
        self.pool = nn.MaxPool2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)
        inner = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return torch.cat([inner, self.pool(x)], 1)


def test_concat_of_concat_collapses_and_shares_one_threshold() -> None:
    qmodel = quantize(Concat(), calib(1), calib())
    q = rows(qmodel)
    cats = [n for n in qmodel.net.graph.nodes if n.target is torch.cat]
    assert len(cats) == 1 and len(cats[0].args[0]) == 3
    pool_rescale = [name for name in q if name.endswith("_rescale.out_q")]
    assert len(pool_rescale) == 1 and q[pool_rescale[0]].signed is False  # bare max-pool branch: uint8
    assert q["a.out_q"].group == q["b.out_q"].group == q[pool_rescale[0]].group is not None


def test_maxpool_is_passthrough_and_avgpool_is_a_floor_rounded_reciprocal_conv() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    q = rows(quantize(model, calib(1), calib()))
    assert not any(name.startswith("2.") for name in q)
    for pool in ("3", "4"):
        assert (q[f"{pool}.recip_q"].bits, q[f"{pool}.recip_q"].signed, q[f"{pool}.recip_q"].role) == (
            8,
            False,
            "reciprocal",
        )
        assert q[f"{pool}.out_q"].rounding == "floor" and q[f"{pool}.out_q"].signed is False


class SpatialMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.conv(x).mean((2, 3)))


def test_spatial_mean_becomes_global_avgpool_and_dropout_is_removed() -> None:
    qmodel = quantize(SpatialMean(), calib(1), calib())
    q = rows(qmodel)
    assert q["mean.out_q"].rounding == "floor" and q["mean.out_q"].signed is True
    assert qmodel(calib(2)).shape == (2, 3)
    assert not any("drop" in n.name for n in qmodel.net.graph.nodes)


def test_orphan_batchnorm_becomes_a_per_channel_scale_layer() -> None:
    x = calib(16, 28)
    model = with_stats(create_model("lrt-cnn"), x)
    qmodel = quantize(model, x[:1], x)
    q = rows(qmodel)
    assert q["bn2.weight_q"].bits == 8 and q["bn2.bias_q"].group == "bn2.acc_q"
    assert q["relu_1.out_q"].signed is False  # the ReLU after max-pool has its own uint8 quantizer
    disable_quantizers(qmodel)
    torch.testing.assert_close(qmodel(x), model(x), rtol=1e-4, atol=1e-4)


def test_static_mode_calibrates_in_topological_order_and_freezes() -> None:
    x = calib(32, 28)
    model = with_stats(create_model("mobilenetv2-tiny"), x)
    qmodel = quantize(model, x[:1], x)
    infos = qmodel.quantizers()
    assert all(q.frozen for q in infos)
    assert len({q.log2_t for q in infos}) > 5  # calibrated, not left at 0
    with torch.no_grad():
        agree = (qmodel(x).argmax(1) == model(x).argmax(1)).float().mean()
    assert agree >= 0.8
    assert "weight" in qmodel.quantizer_table() and "accumulator" in qmodel.quantizer_table()


# --- errors, custom modules ---------------------------------------------------------------


class WithSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.act(self.conv(x)), 1)


def test_unsupported_op_error_names_module_op_and_supported_list() -> None:
    with pytest.raises(UnsupportedOpError) as err:
        quantize(WithSoftmax(), calib(1), calib())
    message = str(err.value)
    assert "Softmax" in message and "'act'" in message and "Conv2d" in message and "allow_float" in message


def test_unsupported_function_names_its_owner_module() -> None:
    class Sig(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(x, 1)

    model = nn.Sequential(nn.Conv2d(1, 1, 1), Sig())
    with pytest.raises(UnsupportedOpError, match=r"cumsum.*module '1'.*test_graph.py:\d+: return torch.cumsum"):
        quantize(model, calib(1), calib())


def test_allow_float_leaves_the_op_in_float_with_a_rescale_after() -> None:
    qmodel = quantize(WithSoftmax(), calib(1), calib(), QuantConfig(allow_float=True))
    assert any(isinstance(m, nn.Softmax) for m in qmodel.modules())
    assert any(q.role == "rescale" for q in qmodel.quantizers())
    assert qmodel(calib(2)).shape == (2, 72)


class CustomBlock(nn.Module):
    """A user-defined module: traced through, its conv-BN-ReLU fused like any other."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def test_model_with_a_custom_module() -> None:
    model = nn.Sequential(CustomBlock(), nn.Flatten(), nn.Linear(192, 2))
    qmodel = quantize(model, calib(1), calib())
    q = rows(qmodel)
    assert (q["0.conv.out_q"].bits, q["0.conv.out_q"].signed) == (8, False)
    assert qmodel(calib(3)).shape == (3, 2)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        QuantConfig(weight_bits=1)
    with pytest.raises(ValueError):
        QuantConfig(activation_calibration="bogus")
    with pytest.raises(ValueError):
        build_quantized_model(nn.Conv2d(1, 1, 1), calib(1), mode="dynamic")


# --- training speed paths: the plain formulas (BatchMoments equal up to rounding, the q_acc skip bit for bit)


def test_batch_moments_equal_mean_and_biased_variance_with_their_gradients() -> None:
    for shape in ((5, 3, 4, 4), (7, 4)):
        y = (
            torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3 + 5
        ).requires_grad_()
        mean, var = BatchMoments.apply(y)
        dims = [d for d in range(y.dim()) if d != 1]
        torch.testing.assert_close(mean, y.mean(dims))
        torch.testing.assert_close(var, y.var(dims, unbiased=False))
        assert torch.autograd.gradcheck(BatchMoments.apply, (y,))
        assert torch.autograd.gradcheck(lambda t: BatchMoments.apply(t)[1], (y,))  # an unused output


def step_outputs(qmodel: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    qmodel.zero_grad(set_to_none=True)
    out = qmodel(x)
    out.square().sum().backward()
    return out.detach(), [p.grad for p in qmodel.parameters()]


def test_training_skips_the_accumulator_quantizer_only_where_it_changes_nothing(monkeypatch) -> None:
    """BN frozen: skipping q_acc where unchanged_accumulator_range() proves it the identity gives bit-identical
    outputs and gradients (thresholds included); a coarser accumulator step or a clipped value is not skipped."""
    x = calib(16)
    qmodel = quantize(with_stats(conv_bn_net(), x), x[:1], x, QuantConfig(), mode="retrain").train()
    for m in qmodel.modules():
        if hasattr(m, "freeze_bn"):
            m.freeze_bn()
    layers = [m for m in qmodel.modules() if isinstance(m, QCompute)]
    assert all(len(m.input_grid) == 1 for m in layers)
    decided: list[bool] = []
    proof = QCompute.unchanged_accumulator_range

    def recorded(self: QCompute, acc: torch.Tensor, quantized_weight: torch.Tensor) -> tuple[float, float] | None:
        found = proof(self, acc, quantized_weight)
        decided.append(found is not None)
        return found

    monkeypatch.setattr(QCompute, "unchanged_accumulator_range", recorded)
    skipped = step_outputs(qmodel, x)
    monkeypatch.setattr(QCompute, "unchanged_accumulator_range", lambda *_: None)
    reference = step_outputs(qmodel, x)
    assert any(decided)
    assert torch.equal(skipped[0], reference[0])
    for a, b in zip(skipped[1], reference[1], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    monkeypatch.setattr(QCompute, "unchanged_accumulator_range", proof)
    layer, acc_q = layers[0], layers[0].acc_q
    quantized_weight = layer.weight_q(layer.folded()[0]).detach()
    product_exponent = layer.weight_q.exponent + layer.input_grid[0].exponent
    acc = torch.zeros(2, quantized_weight.shape[0], 3, 3)
    acc_q.set_log2_t(product_exponent + acc_q.format.mantissa_bits)  # step 2^k_acc = the product grid's
    assert layer.unchanged_accumulator_range(acc, quantized_weight) == (0.0, 0.0)
    acc[0, 0, 0, 0] = (acc_q.format.qmax + 1) * acc_q.scale  # a value q_acc clips
    assert layer.unchanged_accumulator_range(acc, quantized_weight) is None
    acc_q.set_log2_t(product_exponent + 1 + acc_q.format.mantissa_bits)  # a coarser step: q_acc rounds
    assert layer.unchanged_accumulator_range(torch.zeros_like(acc), quantized_weight) is None
