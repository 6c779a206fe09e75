"""Integer program and ONNX export: bit-exactness per op and per zoo net, round trip, corruption, ORT."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgetrain.export import IntegerProgram, IntegerProgramError, ort_session, to_integer, to_onnx
from edgetrain.export.program import FLOAT64_EXACT_BOUND, conv2d_int, exact_dot_dtype, linear_int, manifest_digest
from edgetrain.graph import QuantConfig, quantize
from edgetrain.models import create_model

torch.set_num_threads(1)


def images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def trained_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.5, 0.5)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def fake_quant(qmodel, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return qmodel.eval()(x).numpy()


def assert_bit_exact(qmodel, x: torch.Tensor) -> IntegerProgram:
    program = to_integer(qmodel)
    np.testing.assert_array_equal(program.run(x), fake_quant(qmodel, x))
    return program


class Leaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x), 0.2)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.a(x))
        return self.b(x) + x


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.relu(self.a(x)), F.max_pool2d(F.relu(x), 3, 1, 1)], 1)


PER_OP = {
    "conv_bn_relu": lambda: nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
    "depthwise_relu6": lambda: nn.Sequential(
        nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), nn.ReLU6()
    ),
    "linear_bn1d": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)),
    "orphan_bn": lambda: nn.Sequential(nn.Conv2d(1, 3, 3), nn.MaxPool2d(2), nn.ReLU(), nn.BatchNorm2d(3)),
    "leaky_relu": Leaky,
    "residual_add": Residual,
    "concat_maxpool": Concat,
    "avgpool_padded": lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(3, stride=2, padding=1)),
    "adaptive_avgpool": lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d(2), nn.Flatten()),
}


@pytest.mark.parametrize("name", sorted(PER_OP))
def test_integer_program_is_bit_exact_per_op(name: str) -> None:
    torch.manual_seed(0)
    x = images(16, seed=1)
    model = trained_stats(PER_OP[name](), x)
    assert_bit_exact(quantize(model, x[:1], x), images(8, seed=2) * 1.5)  # beyond the calibrated range too


def test_half_away_rounding_and_int4_weights_are_bit_exact() -> None:
    x = images(16)
    model = trained_stats(PER_OP["conv_bn_relu"](), x)
    config = QuantConfig(weight_bits=4, first_last_weight_bits=4, rounding="half_away")
    assert_bit_exact(quantize(model, x[:1], x, config), images(8, seed=5))


ZOO = ("mobilenetv2-tiny", "resnet-tiny", "inception-tiny", "darknet-tiny", "mnistnet")


@pytest.mark.parametrize("name", ZOO)
def test_integer_program_is_bit_exact_on_zoo_models(name: str) -> None:
    x = images(16, 28)
    model = trained_stats(create_model(name), x)
    qmodel = quantize(model, x[:1], x, QuantConfig(weight_bits=4), mode="retrain")
    assert_bit_exact(qmodel, images(6, 28, seed=3))


def test_retrained_model_stays_bit_exact_after_training_steps() -> None:
    x = images(32, 28)
    y = torch.arange(32) % 10
    model = trained_stats(create_model("resnet-tiny"), x)
    qmodel = quantize(model, x[:1], x, mode="retrain").train()
    opt = torch.optim.Adam(qmodel.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(qmodel(x), y).backward()
        opt.step()
    assert_bit_exact(qmodel, x[:6])


@pytest.fixture(scope="module")
def small_program() -> tuple[IntegerProgram, torch.Tensor]:
    x = images(16, seed=4)
    model = trained_stats(
        nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(108, 4)), x
    )
    return assert_bit_exact(quantize(model, x[:1], x), x), x


def test_save_load_round_trip(tmp_path, small_program) -> None:
    program, x = small_program
    program.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {"bits", "signed", "exponent", "rounding", "threshold"} <= set(manifest["quantizers"]["0.weight_q"])
    assert [op["op"] for op in manifest["ops"]] == ["quantize", "conv", "reshape", "linear"]
    loaded = IntegerProgram.load(tmp_path)
    np.testing.assert_array_equal(loaded.run(x), program.run(x))


def test_corrupt_manifest_gives_a_clear_error(tmp_path, small_program) -> None:
    program, _ = small_program
    program.save(tmp_path)
    path = tmp_path / "manifest.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(IntegerProgramError, match="not valid JSON"):
        IntegerProgram.load(tmp_path)
    manifest = json.loads(text)
    manifest["ops"][1]["op"] = "fft"
    path.write_text(json.dumps(manifest))
    with pytest.raises(IntegerProgramError, match="SHA-256 does not match its content"):
        IntegerProgram.load(tmp_path)
    path.write_text(json.dumps(manifest | {"manifest_sha256": manifest_digest(manifest)}))  # re-signed edits
    with pytest.raises(IntegerProgramError, match="unknown op 'fft'"):
        IntegerProgram.load(tmp_path)
    manifest = json.loads(text)
    del manifest["quantizers"]["0.acc_q"]
    path.write_text(json.dumps(manifest | {"manifest_sha256": manifest_digest(manifest)}))
    with pytest.raises(IntegerProgramError, match="unknown quantizer '0.acc_q'"):
        IntegerProgram.load(tmp_path)


def test_corrupt_weights_give_a_clear_error(tmp_path, small_program) -> None:
    program, _ = small_program
    program.save(tmp_path)
    path = tmp_path / "weights.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(IntegerProgramError, match="SHA-256"):
        IntegerProgram.load(tmp_path)
    path.write_bytes(b"not a safetensors file")
    manifest = json.loads((tmp_path / "manifest.json").read_text())

    manifest["weights_sha256"] = hashlib.sha256(b"not a safetensors file").hexdigest()
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegerProgramError, match="unreadable safetensors"):
        IntegerProgram.load(tmp_path)


def test_codes_out_of_range_are_rejected(small_program) -> None:
    program, _ = small_program
    bad = IntegerProgram(
        program.quantizers,
        program.ops,
        dict(program.tensors),
        program.input,
        program.output,
        program.input_shape,
        program.shapes,
    )
    bad.tensors["0.weight"] = bad.tensors["0.weight"] + 1000
    with pytest.raises(IntegerProgramError, match="outside int8 range"):
        bad.validate()


def test_float_ops_cannot_be_exported_to_integer() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softmax(dim=1))
    qmodel = quantize(model, images(1), images(4), QuantConfig(allow_float=True))
    with pytest.raises(IntegerProgramError, match="no integer implementation"):
        to_integer(qmodel)


@pytest.mark.parametrize("name", ["darknet-tiny", "inception-tiny", "mobilenetv2-tiny"])
def test_onnx_qdq_export_agrees_with_the_quantized_model(tmp_path, name: str) -> None:
    x = images(16, 28)
    model = trained_stats(create_model(name), x)
    qmodel = quantize(model, x[:1], x)
    path = to_onnx(qmodel, tmp_path / "model.onnx", x[:2])
    session = ort_session(path)
    test = images(16, 28, seed=9)
    out = session.run(None, {session.get_inputs()[0].name: test.numpy()})[0]
    reference = fake_quant(qmodel, test)
    assert (out.argmax(1) == reference.argmax(1)).all()
    assert np.mean(out == reference) > 0.95
    ops = {node.op_type for node in __import__("onnx").load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


@pytest.mark.parametrize("magnitude", [2**7, 2**26])  # float64 BLAS path, and int64 past the 2^53 bound
def test_integer_kernels_are_exact_in_both_arithmetic_paths(magnitude: int) -> None:
    rng = np.random.default_rng(magnitude)
    x = rng.integers(-magnitude, magnitude, (2, 4, 5, 6))
    w = rng.integers(-magnitude, magnitude, (6, 2, 3, 3))
    expected_dtype = np.float64 if 18 * magnitude**2 <= FLOAT64_EXACT_BOUND else np.int64
    assert exact_dot_dtype(x, w, 18) is expected_dtype
    out = conv2d_int(x, w, (2, 1), (1, 1), (1, 1), groups=2)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))).tolist()
    for n, o, i, j in np.ndindex(*out.shape):  # Python integers: exact at any size
        g = o // 3
        window = [xp[n][2 * g + c][2 * i + a][j + b] * int(w[o, c, a, b]) for c, a, b in np.ndindex(2, 3, 3)]
        assert out[n, o, i, j] == sum(window)
    xf, wf = x.reshape(2, -1)[:, :18], w.reshape(6, 18)
    expected = [[sum(int(a) * int(b) for a, b in zip(row, col, strict=True)) for col in wf] for row in xf]
    assert linear_int(xf, wf).tolist() == expected
