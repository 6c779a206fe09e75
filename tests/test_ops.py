"""Op coverage for real PyTorch CNNs: each op, written the way models are written (subclasses,
functional calls, shape checks in forward), quantized statically, then checked bit for bit in the
integer program and on the adapting device (``DeviceNet``), and value for value in onnxruntime, on
random and on real images (scikit-learn's digits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from edgetrain.adapt.device import DeviceNet, LookupTable
from edgetrain.export import ort_session, to_integer
from edgetrain.export.onnx import program_to_onnx
from edgetrain.graph import QuantConfig, UnsupportedOpError, quantize, register_elementwise
from edgetrain.graph.modules import QLookup, QMul

torch.set_num_threads(1)


def random_images(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def real_images(n: int = 48) -> torch.Tensor:
    """scikit-learn's 8x8 handwritten digits (shipped with the package), scaled to [0, 1]."""
    return torch.tensor(load_digits().images[:n] / 16.0, dtype=torch.float32).unsqueeze(1)


def with_stats(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    model.train()
    with torch.no_grad():
        model(random_images(32, seed=5))
    return model.eval()


def check_exact(model: nn.Module, tmp_path, config: QuantConfig | None = None) -> torch.nn.Module:
    """Static quantization, then 0 integer mismatches and identical ONNX outputs on random and real images."""
    torch.manual_seed(0)
    model = with_stats(model)
    calib = torch.cat([random_images(16, seed=1), real_images(16)])
    qmodel = quantize(model, calib[:1], calib, config)
    program = to_integer(qmodel)
    device = DeviceNet.from_program(program)
    path = tmp_path / "model.onnx"
    import onnx

    onnx.save(program_to_onnx(program), str(path))
    session = ort_session(path)
    for x in (random_images(), real_images()):
        with torch.no_grad():
            expected = qmodel(x).numpy()
        np.testing.assert_array_equal(program.run(x), expected)
        np.testing.assert_array_equal(device(x).detach().numpy(), expected)  # the adapting device too
        (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        np.testing.assert_array_equal(onnx_out, expected)
        assert (onnx_out.reshape(len(x), -1).argmax(1) == expected.reshape(len(x), -1).argmax(1)).all()
    return qmodel


# --- padding, subclasses and functional layers ---------------------------------------------------


class StaticSamePadConv(nn.Conv2d):
    """EfficientNet-style: a Conv2d subclass that pads in its own forward, then calls F.conv2d."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1) -> None:
        super().__init__(c_in, c_out, kernel, stride, bias=False)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1)) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FrozenBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass with its own forward (always the running statistics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class MyConv(nn.Conv2d):
    """A subclass that keeps nn.Conv2d's forward: matched as a Conv2d."""


class MyLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 2, "flatten first"
        return F.linear(x, self.weight, self.bias)


class StandardizedConv(nn.Conv2d):
    """Weight standardization: the weight is computed from the parameter in forward (a constant)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class PaddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = StaticSamePadConv(1, 4, 3, stride=2)
        self.bn = FrozenBN(4)
        self.pad = nn.ZeroPad2d(1)
        self.conv = MyConv(4, 6, 3)
        self.same = nn.Conv2d(6, 6, 4, padding="same")
        self.ws = StandardizedConv(6, 4, 1)
        self.fc = MyLinear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1:
            raise ValueError("one channel")
        x = F.relu(self.bn(self.stem(x)))
        x = self.same(self.conv(self.pad(x)))
        x = F.max_pool2d(F.pad(x, (1, 0, 1, 0)), 2, 1)
        return self.fc(torch.flatten(self.ws(x), 1))


def test_padding_subclasses_and_functional_layers(tmp_path) -> None:
    qmodel = check_exact(PaddingNet(), tmp_path)
    net = dict(qmodel.net.named_modules())
    assert net["conv"].conv_args["padding"] == (1, 1)  # ZeroPad2d(1) folded into the conv
    assert net["stem"].bn is not None  # the functional batch norm of the subclass folded into the conv
    program = to_integer(qmodel)
    ops = [op["op"] for op in program.ops]
    assert ops.count("pad") == 3  # asymmetric: the stem's, the 'same' 4x4 conv's and the one before max-pool
    assert ops.count("conv") == 4 and ops.count("linear") == 1


# --- element-wise functions as lookup tables ----------------------------------------------------


@register_elementwise
def squash(x: torch.Tensor) -> torch.Tensor:
    """A user's own element-wise function."""
    return x / (1 + x.abs())


ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "hardsigmoid": nn.Hardsigmoid(),
    "silu": F.silu,
    "hardswish": nn.Hardswish(),
    "tanh": lambda t: t.tanh(),
    "gelu": nn.GELU(approximate="tanh"),
    "elu": lambda t: F.elu(t, alpha=0.5),
    "prelu": nn.PReLU(4),
    "hardtanh": nn.Hardtanh(-0.5, 0.5),
    "clamp": lambda t: torch.clamp(t, min=-0.25, max=1.0),
    "leaky_steep": nn.LeakyReLU(2.0),
    "manual_hardswish": lambda t: t * F.relu6(t + 3.0) / 6.0,
    "registered": squash,
}


class ActivationNet(nn.Module):
    def __init__(self, act) -> None:  # noqa: ANN001
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = act if isinstance(act, nn.Module) else None
        self.fn = None if isinstance(act, nn.Module) else act
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = self.act(y) if self.act is not None else self.fn(y)
        return self.fc(F.max_pool2d(y, 2).flatten(1))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_elementwise_functions_are_exact_lookup_tables(tmp_path, name: str) -> None:
    with torch.no_grad():
        if isinstance(ACTIVATIONS[name], nn.PReLU):
            ACTIVATIONS[name].weight.copy_(torch.tensor([0.25, -0.5, 1.5, 0.0]))
    qmodel = check_exact(ActivationNet(ACTIVATIONS[name]), tmp_path)
    lookups = [m for m in qmodel.modules() if isinstance(m, QLookup)]
    assert lookups, "the function became a lookup table"
    for m in lookups:  # the table is f on the input grid, quantized by out_q
        table = m.table()
        assert table.shape[-1] == 256
        with torch.no_grad():
            expected = m.out_q(m.fn.float64(m.grid())) if not m.channels else table
        torch.testing.assert_close(table, expected, rtol=0, atol=0)
    if name in ("sigmoid", "hardsigmoid"):
        assert not lookups[0].out_q.signed  # non-negative functions get uint8 outputs
    if name == "prelu":
        assert lookups[0].channels == 4


def test_lookup_table_gradient_is_the_float_derivative() -> None:
    """Retraining: the table's backward is f'(x) (straight-through on the table)."""
    model = ActivationNet(nn.Sigmoid())
    x = random_images(8)
    qmodel = quantize(model, x[:1], x, mode="retrain").train()
    lookup = next(m for m in qmodel.modules() if isinstance(m, QLookup))
    inputs = torch.linspace(-2, 2, 64, requires_grad=True)
    lookup.out_q.enabled = False
    lookup(inputs).sum().backward()
    s = torch.sigmoid(lookup.in_q(inputs.detach()))
    codes = torch.round(inputs.detach() / lookup.in_q.scale)
    inside = ((codes >= lookup.in_q.format.qmin) & (codes <= lookup.in_q.format.qmax)).float()
    torch.testing.assert_close(inputs.grad, s * (1 - s) * inside)


def test_device_lookup_backward_is_the_table_slope() -> None:
    """On the device, the gradient through a table is its own slope (straight-through on the table)."""
    x = random_images(8)
    program = to_integer(quantize(ActivationNet(nn.Sigmoid()), x[:1], x))
    op = next(op for op in program.ops if op["op"] == "lookup")
    table = LookupTable(op, program)
    codes = torch.arange(-128, 128, dtype=torch.float64)
    v = (codes * table.step).requires_grad_()
    out = table(v)
    out.sum().backward()
    values = table.values[0]
    torch.testing.assert_close(out.detach(), values)
    torch.testing.assert_close(v.grad[1:-1], (values[2:] - values[:-2]) / (2 * table.step))


# --- two-tensor arithmetic, upsampling, means and data movement -------------------------------------


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, 2, 1)
        self.expand = nn.Conv2d(2, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(s))))


class ArithmeticNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 3, padding=1)
        self.se = SqueezeExcite(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.se(F.hardswish(self.a(x))) - self.b(x)
        d = F.hardtanh(d * torch.sigmoid(self.b(x)), -1.0, 1.0)
        return self.fc(d.mean(3).mean(2))


def test_products_subtraction_clamp_and_means(tmp_path) -> None:
    qmodel = check_exact(ArithmeticNet(), tmp_path)
    ops = [op["op"] for op in to_integer(qmodel).ops]
    assert ops.count("mul") == 2 and "sub" in ops and ops.count("mean") == 2 and "avgpool" in ops
    mul = next(m for m in qmodel.modules() if isinstance(m, QMul))
    assert mul.out_q.bits == 8


class TinyUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.skip = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.relu(self.mid(F.relu(self.down(x))))
        merged = torch.cat([self.up(low), F.relu(self.skip(x))], dim=1)
        smaller = F.interpolate(low, scale_factor=2)
        return self.head(merged) + smaller[:, :2]


def test_nearest_upsampling_concat_and_slicing(tmp_path) -> None:
    qmodel = check_exact(TinyUNet(), tmp_path)
    ops = [op["op"] for op in to_integer(qmodel).ops]
    assert ops.count("upsample") == 2 and "concat" in ops and "slice" in ops


class ShuffleNet(nn.Module):
    """Channel shuffle (view, transpose, contiguous, view), chunk, split and permute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        left, right = x.chunk(2, dim=1)
        top, bottom = torch.split(x, [3, 5], dim=1)
        y = torch.cat([left + right, top[:, :1], bottom[:, 1:4]], 1)
        return self.fc(y.permute(0, 2, 3, 1).flatten(1))


def test_data_movement_ops(tmp_path) -> None:
    ops = [op["op"] for op in to_integer(check_exact(ShuffleNet(), tmp_path)).ops]
    assert ops.count("transpose") == 2 and ops.count("slice") >= 4


def test_ceil_mode_maxpool(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 2), nn.PReLU(3), nn.MaxPool2d(3, 2, ceil_mode=True), nn.Flatten())
    qmodel = check_exact(model, tmp_path)
    assert qmodel(random_images(2)).shape == (2, 3 * 3 * 3)  # 7x7 -> 3x3 with ceil_mode


# --- what stays unsupported says where it is ------------------------------------------------------


class WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.rnn = nn.LSTM(36, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.conv(x).flatten(2))
        return out


class WithMatmul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.w = nn.Parameter(torch.randn(72, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.conv(x).flatten(1), self.w)


def test_unsupported_ops_name_the_op_the_module_path_and_the_source_line() -> None:
    x = random_images(4)
    with pytest.raises(UnsupportedOpError, match=r"LSTM module 'rnn'"):
        quantize(WithLSTM(), x[:1], x)
    with pytest.raises(UnsupportedOpError) as err:
        quantize(nn.Sequential(WithMatmul()), x[:1], x)
    message = str(err.value)
    assert "'matmul'" in message and "module '0'" in message
    assert "test_ops.py" in message and "torch.matmul(self.conv(x).flatten(1), self.w)" in message
