"""Integer semantics under bad inputs: +-inf and huge values saturate identically in the integer
program, the fake-quant model and onnxruntime; NaN is rejected with the same error in the program
and the fake-quant model; accumulator saturation is counted; MAC widths are right; a manifest or
weight file that was edited or crafted is refused."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from torch import nn

from edgetrain.export import IntegerProgram, IntegerProgramError, ort_session, to_integer, to_onnx
from edgetrain.export.program import ExecutionStats, linear_int, manifest_digest, signed_bits
from edgetrain.fixedpoint import FixedPointFormat, NaNInputError, quantize_to_codes, shift_round
from edgetrain.graph import QuantConfig, quantize

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def linear_net():
    """A one-layer int8 net on 1 x 4 x 4 inputs: its program, fake-quant model and ONNX session."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    x = torch.randn(64, 1, 4, 4)
    qmodel = quantize(net, x[:1], x, QuantConfig(weight_bits=8), mode="static").eval()
    return qmodel, to_integer(qmodel), x


@pytest.fixture(scope="module")
def onnx_session(linear_net, tmp_path_factory):
    qmodel, _, x = linear_net
    path = to_onnx(qmodel, tmp_path_factory.mktemp("onnx") / "m.onnx", x[:1])
    return ort_session(path)


def test_input_codes_saturate_for_inf_and_huge_values() -> None:
    fmt = FixedPointFormat(8)
    values = np.array([np.inf, 1e17, 3e38, 1e300, -np.inf, -1e17, -1e300, 0.26])
    codes = quantize_to_codes(values, -2, fmt)
    np.testing.assert_array_equal(codes, [127, 127, 127, 127, -128, -128, -128, 1])


@pytest.mark.parametrize("value", [np.inf, -np.inf, 1e17, -1e17, 3e38, -3e38])
def test_inf_and_huge_inputs_give_identical_outputs_everywhere(linear_net, onnx_session, value) -> None:
    qmodel, program, x = linear_net
    batch = x[:3].clone()
    batch[:, 0, 0, 0] = float(value)
    batch[1, 0, 2, 3] = -float(value)
    with torch.no_grad():
        fake = qmodel(batch).numpy()
    integer = program.run(batch)
    onnx = onnx_session.run(None, {onnx_session.get_inputs()[0].name: batch.numpy()})[0]
    np.testing.assert_array_equal(integer, fake)
    np.testing.assert_array_equal(onnx, fake)


def test_nan_is_rejected_with_the_same_error_by_program_and_fake_quant(linear_net) -> None:
    qmodel, program, x = linear_net
    batch = x[:2].clone()
    batch[1, 0, 1, 1] = float("nan")
    with pytest.raises(NaNInputError, match="contains NaN, which has no integer code"):
        program.run(batch)
    with pytest.raises(NaNInputError, match="contains NaN, which has no integer code"), torch.no_grad():
        qmodel(batch)


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda x: (x.numpy() * 255).astype(np.uint8), "input dtype uint8 is not floating point"),
        (lambda x: x.numpy().astype(np.int64), "input dtype int64 is not floating point"),
        (lambda x: x[:0], "empty batch"),
        (lambda x: x.permute(0, 2, 3, 1), "does not match the program's input N x 1 x 4 x 4"),
        (lambda x: x[0], "does not match the program's input N x 1 x 4 x 4"),
    ],
)
def test_program_rejects_malformed_batches(linear_net, make_input, message) -> None:
    _, program, x = linear_net
    with pytest.raises(ValueError, match=message):
        program.run(make_input(x[:2]))


def _layer_macs(program: IntegerProgram, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, str]:
    """The linear layer's exact MACs and the values shifted into its accumulator, computed here."""
    quantize_op, linear = program.ops[0], next(op for op in program.ops if op["op"] == "linear")
    k_in = program.quantizers[quantize_op["quantizer"]]["exponent"]
    codes = quantize_to_codes(x.numpy(), k_in, program.fmt(quantize_op["quantizer"])).reshape(len(x), -1)
    mac = linear_int(codes, program.tensors[linear["weight"]])
    k_w, k_acc = (program.quantizers[linear[q]]["exponent"] for q in ("weight_q", "acc_q"))
    return mac, shift_round(mac, k_acc - k_in - k_w), linear


def test_accumulator_saturation_is_counted(linear_net) -> None:
    _, program, x = linear_net
    forced = dataclasses.replace(program, quantizers=copy.deepcopy(program.quantizers), stats=ExecutionStats())
    acc_q = next(op for op in forced.ops if op["op"] == "linear")["acc_q"]
    forced.quantizers[acc_q]["exponent"] -= 9  # a finer accumulator grid: large MACs overflow int16
    batch = x * 4
    forced.run(batch)
    mac, shifted, linear = _layer_macs(forced, batch)
    fmt = forced.fmt(acc_q)
    expected = int(((shifted < fmt.qmin) | (shifted > fmt.qmax)).sum())
    assert expected > 0
    assert forced.stats.accumulator_saturated[linear["weight"]] == expected == forced.stats.saturated_total
    assert forced.stats.accumulator_values[linear["weight"]] == mac.size
    assert forced.stats.samples == len(batch)


def test_mac_widths_worst_case_and_observed(linear_net, tmp_path) -> None:
    _, program, x = linear_net
    fresh = IntegerProgram.load(program.save(tmp_path / "a"))
    before = fresh.mac_bits()
    linear_weight = next(op for op in fresh.ops if op["op"] == "linear")["weight"]
    assert before[linear_weight]["observed"] is None
    w = fresh.tensors[linear_weight]
    worst = int(np.abs(w).sum(axis=1).max()) * 128  # int8 input codes reach |-128|
    assert before[linear_weight]["worst_case"] == signed_bits(worst) == worst.bit_length() + 1
    fresh.run(x)
    mac, _, _ = _layer_macs(fresh, x)
    after = fresh.mac_bits()[linear_weight]
    assert after["observed"] == signed_bits(int(np.abs(mac).max())) <= after["worst_case"]
    assert after["observed_samples"] == len(x) and after["accumulator"] == 16
    fresh.save(tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "manifest.json").read_text())["mac_bits"][linear_weight]
    assert saved == after


def _resign(folder, manifest: dict) -> None:
    manifest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    (folder / "manifest.json").write_text(json.dumps(manifest | {"manifest_sha256": manifest_digest(manifest)}))


def test_edited_manifest_shift_is_refused(linear_net, tmp_path) -> None:
    _, program, _ = linear_net
    program.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["quantizers"][next(iter(manifest["quantizers"]))]["exponent"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegerProgramError, match="its SHA-256 does not match its content"):
        IntegerProgram.load(tmp_path)
    del manifest["manifest_sha256"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))  # no digest at all: also refused
    with pytest.raises(IntegerProgramError, match="export the program again"):
        IntegerProgram.load(tmp_path)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (struct.pack("<Q", 2**62) + b"{}", "unreadable safetensors file"),
        (struct.pack("<Q", 40) + b'{"w": {"dtype": "I8", "shape": [99999], ' + b"x" * 8, "unreadable safetensors"),
        (struct.pack("<Q", 2) + b"[]", "unreadable safetensors file"),
    ],
)
def test_crafted_safetensors_headers_are_refused(linear_net, tmp_path, blob, message) -> None:
    _, program, _ = linear_net
    program.save(tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(blob)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    _resign(tmp_path, manifest | {"weights_sha256": hashlib.sha256(blob).hexdigest()})
    with pytest.raises(IntegerProgramError, match=message):
        IntegerProgram.load(tmp_path)


def test_float_tensors_in_the_weight_file_are_refused(linear_net, tmp_path) -> None:
    _, program, _ = linear_net
    program.save(tmp_path)
    path = tmp_path / "weights.safetensors"
    save_file({name: codes.astype(np.float32) for name, codes in program.tensors.items()}, str(path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    _resign(tmp_path, manifest | {"weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    with pytest.raises(IntegerProgramError, match="are not integer codes"):
        IntegerProgram.load(tmp_path)
