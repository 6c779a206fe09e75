"""ONNX QDQ export of a quantized model, built from its integer program (one source of truth).

Every quantizer becomes ``QuantizeLinear -> DequantizeLinear`` with scale 2^k and zero point 0
(int8/uint8/int16 containers, opset 21; other bit-widths clip to their range first). Weights and
biases are integer initializers behind ``DequantizeLinear``. A floor-rounded quantizer (avg-pool
output) floors ``x / s`` explicitly before its QDQ pair; half-away rounding is spelled out the same way.
Float ops (Conv, Gemm, Add, Max) run in float32 in the runtime, so the ONNX model agrees with the
fake-quantized one up to rare ties; the integer program is the bit-exact reference.

Open the file with :func:`ort_session`: onnxruntime 1.31's ``QDQS8ToU8Transformer`` followed by its QDQ
propagation emits an invalid QuantizeLinear (int8 ``output_dtype`` with a uint8 zero point) on some
of these graphs (the LeakyReLU/avg-pool net), so that one optimizer is switched off.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgetrain.atomic import atomic_write
from edgetrain.export.exporter import to_integer
from edgetrain.export.program import IntegerProgram
from edgetrain.fixedpoint import RELU6_CEILING, FixedPointFormat, Rounding
from edgetrain.graph.quantize import QuantizedModel

OPSET = 21
DISABLED_ORT_OPTIMIZERS = ["QDQS8ToU8Transformer"]


class _Builder:
    def __init__(self, program: IntegerProgram) -> None:
        self.program = program
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.count = 0
        self.quantizer_of: dict[str, str] = {}  # tensor -> the quantizer whose grid it lies on
        self.last_quantizer = ""
        self.alias: dict[str, str] = {}  # program tensor -> ONNX value name
        self.channels = self.ndim = 0  # of the current op's first input

    def const(self, name: str, value: np.ndarray) -> str:
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.asarray(value), name)
        return name

    def node(self, op_type: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        self.count += 1
        output = output or f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=f"{op_type}_{self.count}", **attrs))
        return output

    def scale_zero(self, qname: str) -> tuple[str, str, FixedPointFormat, float]:
        q = self.program.quantizers[qname]
        fmt = FixedPointFormat(int(q["bits"]), bool(q["signed"]))
        scale = float(np.ldexp(1.0, int(q["exponent"])))
        wide = fmt.bits > 8
        dtype = {(False, True): np.int8, (False, False): np.uint8, (True, True): np.int16, (True, False): np.uint16}
        zero = np.array(0, dtype=dtype[(wide, fmt.signed)])
        return (self.const(f"{qname}.scale", np.float32(scale)), self.const(f"{qname}.zero_point", zero), fmt, scale)

    def qdq(self, x: str, qname: str) -> str:
        """Fake-quantize ``x`` with quantizer ``qname``: clip(round(x / s), n, p) * s."""
        self.last_quantizer = qname
        scale, zero, fmt, s = self.scale_zero(qname)
        rounding = Rounding.parse(self.program.quantizers[qname]["rounding"])
        if rounding is not Rounding.HALF_EVEN:
            inv = self.const(f"{qname}.inv_scale", np.float32(1.0 / s))
        if rounding is Rounding.FLOOR:
            x = self.node("Mul", [self.node("Floor", [self.node("Mul", [x, inv])]), scale])
        elif rounding is Rounding.HALF_AWAY:
            half = self.const("half", np.float32(0.5))
            scaled = self.node("Mul", [x, inv])
            magnitude = self.node("Floor", [self.node("Add", [self.node("Abs", [scaled]), half])])
            x = self.node("Mul", [self.node("Mul", [self.node("Sign", [scaled]), magnitude]), scale])
        if fmt.bits not in (8, 16):
            lo = self.const(f"{qname}.min", np.float32(fmt.qmin * s))
            hi = self.const(f"{qname}.max", np.float32(fmt.qmax * s))
            x = self.node("Clip", [x, lo, hi])
        return self.node("DequantizeLinear", [self.node("QuantizeLinear", [x, scale, zero]), scale, zero])

    def tensor(self, key: str, qname: str, shape: tuple[int, ...] | None = None) -> str:
        """DequantizeLinear of an integer initializer holding the codes of ``key``."""
        scale, zero, _, _ = self.scale_zero(qname)
        codes = self.program.tensors[key]
        if shape is not None:
            codes = codes.reshape(shape)
        codes = codes.astype(helper.tensor_dtype_to_np_dtype(self.initializers[zero].data_type))
        return self.node("DequantizeLinear", [self.const(f"{key}.codes", codes), scale, zero])

    def activation(self, x: str, activation: str) -> str:
        if activation == "relu":
            return self.node("Relu", [x])
        if activation == "relu6":
            lo, hi = self.const("zero", np.float32(0.0)), self.const("six", np.float32(RELU6_CEILING))
            return self.node("Clip", [x, lo, hi])
        return x

    def shape(self, name: str) -> list[int]:
        return self.program.input_shape if name == self.program.input else self.program.shapes[name]

    def emit(self, op: dict[str, Any]) -> None:
        kind, out = op["op"], op["output"]
        source = op["inputs"][0] if "inputs" in op else op["input"]
        self.channels = self.shape(source)[1] if len(self.shape(source)) > 1 else 0
        self.ndim = len(self.shape(source))
        op = op | {
            k: [self.alias[n] for n in op[k]] if k == "inputs" else self.alias.get(op[k], op[k])
            for k in ("input", "inputs")
            if k in op
        }
        if kind == "quantize":
            y = self.qdq(op["input"], op["quantizer"])
        elif kind == "requantize":
            y = self.qdq(self.activation(op["input"], op["activation"]), op["quantizer"])
        elif kind in ("conv", "linear", "scale"):
            y = self.compute(op)
        elif kind == "avgpool":
            channels = self.channels
            ones = self.const(f"{out}.ones", np.ones((channels, 1, *op["kernel"]), np.float32))
            window_sum = self.node(
                "Conv",
                [op["input"], ones],
                group=channels,
                strides=op["stride"],
                pads=op["padding"] * 2,
                kernel_shape=op["kernel"],
            )
            y = self.qdq(self.node("Mul", [window_sum, self.tensor(op["reciprocal"], op["recip_q"], ())]), op["out_q"])
        elif kind in ("add", "sub"):
            y = self.node("Add" if kind == "add" else "Sub", op["inputs"])
            y = self.qdq(self.activation(y, op["activation"]), op["out_q"])
        elif kind == "mul":
            y = self.qdq(self.node("Mul", op["inputs"]), op["out_q"])
        elif kind == "mean":
            axes = self.const(f"{out}.axes", np.array(op["axes"], np.int64))
            total = self.node("ReduceSum", [op["input"], axes], keepdims=int(bool(op["keepdim"])))
            y = self.qdq(self.node("Mul", [total, self.tensor(op["reciprocal"], op["recip_q"], ())]), op["out_q"])
        elif kind == "lookup":
            y = self.qdq(self.lookup(op, self.shape(source)), op["out_q"])
        elif kind == "leaky_relu":
            alpha = self.tensor(op["alpha"], op["alpha_q"], ())
            product = self.qdq(self.node("Mul", [op["input"], alpha]), op["prod_q"])
            y = self.qdq(self.node("Max", [op["input"], product]), op["out_q"])
        else:  # scale-preserving ops; a QDQ pair of the input's quantizer follows (exact: on-grid values)
            if kind == "maxpool":
                y = self.node(
                    "MaxPool",
                    [op["input"]],
                    kernel_shape=op["kernel"],
                    strides=op["stride"],
                    pads=op["padding"] * 2,
                    dilations=op["dilation"],
                    ceil_mode=int(op.get("ceil_mode", False)),
                )
            elif kind == "concat":
                y = self.node("Concat", op["inputs"], axis=int(op["axis"]))
            elif kind in ("pad", "upsample", "transpose", "slice"):
                y = self.move(op, self.shape(source))
            else:
                shape = self.const(f"{out}.shape", np.array(op["shape"], np.int64))
                y = self.node("Reshape", [op["input"], shape])
            y = self.qdq(y, self.quantizer_of[source])
        self.quantizer_of[out] = self.last_quantizer  # every op ends with the QDQ of its output quantizer
        self.alias[out] = y

    def lookup(self, op: dict[str, Any], shape: list[int]) -> str:
        """Gather from the table's values at ``code - n_in`` (+ ``channel * 2^b`` for per-channel tables)."""
        fmt, k_in = self.program.fmt(op["in_q"]), int(self.program.quantizers[op["in_q"]]["exponent"])
        table = self.program.tensors[op["table"]]
        k_out = int(self.program.quantizers[op["out_q"]]["exponent"])
        values = self.const(f"{op['output']}.table", np.ldexp(table.reshape(-1), k_out).astype(np.float32))
        inverse = self.const(f"{op['in_q']}.inv_scale", np.float32(np.ldexp(1.0, -k_in)))
        scaled = self.node("Mul", [op["input"], inverse])
        index = self.node("Cast", [scaled], to=TensorProto.INT64)  # exact: the input lies on the grid
        offset = np.array(-fmt.qmin, np.int64)
        if table.ndim == 2:  # row of channel c starts at c * 2^b
            rows = np.arange(table.shape[0], dtype=np.int64).reshape(1, -1, *([1] * (len(shape) - 2)))
            offset = offset + rows * table.shape[1]
        index = self.node("Add", [index, self.const(f"{op['output']}.offset", offset)])
        return self.node("Gather", [values, index], axis=0)

    def move(self, op: dict[str, Any], shape: list[int]) -> str:
        """Pad (zeros), nearest upsampling (repeat via Expand), Transpose or Slice: codes move, scale kept."""
        kind, x, out = op["op"], op["input"], op["output"]
        if kind == "pad":
            return self.node("Pad", [x, self.const(f"{out}.pads", np.array(op["pads"], np.int64))], mode="constant")
        if kind == "transpose":
            return self.node("Transpose", [x], perm=[int(d) for d in op["perm"]])
        if kind == "slice":
            start, axis = int(op["start"]), int(op["axis"])
            bounds = [np.array([v], np.int64) for v in (start, start + int(op["length"]), axis)]
            names = [self.const(f"{out}.{k}", v) for k, v in zip(("starts", "ends", "axes"), bounds, strict=True)]
            return self.node("Slice", [x, *names])
        (_, c, h, w), (sh, sw) = shape, op["scale"]
        split = self.node("Reshape", [x, self.const(f"{out}.split", np.array([-1, c, h, 1, w, 1], np.int64))])
        tiled = self.node("Expand", [split, self.const(f"{out}.tile", np.array([1, 1, 1, sh, 1, sw], np.int64))])
        return self.node("Reshape", [tiled, self.const(f"{out}.shape", np.array([-1, c, h * sh, w * sw], np.int64))])

    def compute(self, op: dict[str, Any]) -> str:
        bias_shape = (-1,) + (1,) * (self.ndim - 2)
        if op["op"] == "conv":
            weight = self.tensor(op["weight"], op["weight_q"])
            p = op["padding"]
            acc = self.node(
                "Conv",
                [op["input"], weight],
                strides=op["stride"],
                pads=[p[0], p[1], p[0], p[1]],
                dilations=op["dilation"],
                group=int(op["groups"]),
            )
        elif op["op"] == "linear":
            acc = self.node("Gemm", [op["input"], self.tensor(op["weight"], op["weight_q"])], transB=1)
        else:
            acc = self.node("Mul", [op["input"], self.tensor(op["weight"], op["weight_q"], bias_shape)])
        y = self.node("Add", [self.qdq(acc, op["acc_q"]), self.tensor(op["bias"], op["bias_q"], bias_shape)])
        return self.qdq(self.activation(y, op["activation"]), op["out_q"])

    def model(self) -> onnx.ModelProto:
        p = self.program
        self.alias[p.input] = p.input
        for op in p.ops:
            self.emit(op)
        self.node("Identity", [self.alias[p.output]], p.output)
        x = helper.make_tensor_value_info(p.input, TensorProto.FLOAT, ["N", *p.input_shape[1:]])
        y = helper.make_tensor_value_info(p.output, TensorProto.FLOAT, ["N", *p.shapes[p.output][1:]])
        graph = helper.make_graph(self.nodes, "edgetrain_qdq", [x], [y], list(self.initializers.values()))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgetrain")
        model.ir_version = 10
        onnx.checker.check_model(model, full_check=True)
        return model


def ort_session(path: str | os.PathLike[str]) -> Any:
    """An onnxruntime CPU session for an exported model (see the module docstring)."""
    import onnxruntime as ort

    return ort.InferenceSession(
        str(path), providers=["CPUExecutionProvider"], disabled_optimizers=DISABLED_ORT_OPTIMIZERS
    )


def program_to_onnx(program: IntegerProgram) -> onnx.ModelProto:
    """The QDQ ONNX graph of an integer program."""
    return _Builder(program).model()


def to_onnx(qmodel: QuantizedModel, path: str | os.PathLike[str], example_inputs: torch.Tensor) -> Path:
    """Write the QDQ ONNX model of ``qmodel`` to ``path`` (atomically) and check that onnxruntime runs
    it on ``example_inputs`` with the right output shape."""
    model = program_to_onnx(to_integer(qmodel))
    path = atomic_write(path, lambda tmp: onnx.save(model, str(tmp)))
    example = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    session = ort_session(path)
    (out,) = session.run(None, {session.get_inputs()[0].name: example.detach().cpu().numpy().astype(np.float32)})
    with torch.no_grad():
        expected = qmodel.eval()(example)
    if tuple(out.shape) != tuple(expected.shape):
        raise RuntimeError(f"onnxruntime output shape {out.shape} != quantized model's {tuple(expected.shape)}")
    return path
