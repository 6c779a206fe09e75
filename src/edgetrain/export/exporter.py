"""The exporter: a fake-quantized :class:`~edgetrain.graph.QuantizedModel` to its :class:`IntegerProgram`.

``to_integer(qmodel)`` walks the fx graph and records, per quantizer, bits, sign, exponent k (scale
2^k), rounding and threshold, and per layer the integer codes of its (BN-folded) weights and biases
(TQT appendix A: every requantization is a shift; ``docs/quantization.md``). The program's outputs
equal the fake-quantized model's eval-mode outputs bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from edgetrain.export.program import IntegerProgram, IntegerProgramError
from edgetrain.graph.modules import (
    QActivation,
    QAdd,
    QAvgPool,
    QCompute,
    QLeakyReLU,
    QLookup,
    QMean,
    QMul,
    upsample_nearest,
)
from edgetrain.graph.quantize import QuantizedModel


def _bn_record(bn: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    """The float statistics and parameters of a BN that stays a ``scale`` op (device metadata)."""
    channels = bn.running_mean.numel()
    gamma = bn.weight if bn.affine else torch.ones(channels)
    beta = bn.bias if bn.affine else torch.zeros(channels)
    return {
        "mean": bn.running_mean.tolist(),
        "var": bn.running_var.tolist(),
        "eps": float(bn.eps),
        "gamma": gamma.detach().tolist(),
        "beta": beta.detach().tolist(),
    }


def _codes(quantizer: nn.Module, values: torch.Tensor) -> np.ndarray:
    """Integer codes of ``quantizer(values)`` (exact: a multiple of a power of two)."""
    return torch.round(quantizer(values).double() / quantizer.scale).to(torch.int64).numpy()


MOVES: dict[Any, str] = {  # data-movement functions of the quantized graph -> program ops
    torch.reshape: "reshape",
    F.pad: "pad",
    upsample_nearest: "upsample",
    torch.permute: "transpose",
    torch.narrow: "slice",
}


def _move_fields(node: fx.Node) -> dict[str, Any]:
    """The parameters of a data-movement op (pads in ONNX order: every axis' begin, then its end)."""
    kind, args = MOVES[node.target], node.args[1:]
    if kind == "reshape":
        return {"shape": [int(s) for s in args[0]]}
    if kind == "pad":
        ndim = len(node.args[0].meta["tensor_meta"].shape)
        torch_pads = list(args[0]) + [0] * (2 * ndim - len(args[0]))  # last axis first, (begin, end) pairs
        begins = [int(torch_pads[2 * (ndim - 1 - d)]) for d in range(ndim)]
        ends = [int(torch_pads[2 * (ndim - 1 - d) + 1]) for d in range(ndim)]
        return {"pads": begins + ends}
    if kind == "upsample":
        return {"scale": [int(args[0]), int(args[1])]}
    if kind == "transpose":
        return {"perm": [int(d) for d in args[0]]}
    return {"axis": int(args[0]), "start": int(args[1]), "length": int(args[2])}


class _Exporter:
    def __init__(self, qmodel: QuantizedModel) -> None:
        self.qmodel = qmodel
        self.net = qmodel.net
        self.modules = dict(self.net.named_modules())
        self.names = {id(q): name for name, _, q in qmodel.named_quantizers()}
        self.ops: list[dict[str, Any]] = []
        self.tensors: dict[str, np.ndarray] = {}

    def qname(self, quantizer: nn.Module) -> str:
        return self.names[id(quantizer)]

    def run(self) -> IntegerProgram:
        ShapeProp(self.net).propagate(torch.zeros(1, *self.qmodel.input_shape[1:]))
        handlers: dict[type, Callable[[fx.Node, Any], dict[str, Any]]] = {
            QActivation: self.activation,
            QCompute: self.compute,
            QAvgPool: self.avgpool,
            QAdd: self.add,
            QLeakyReLU: self.leaky,
            QLookup: self.lookup,
            QMul: self.mul,
            QMean: self.mean,
            nn.MaxPool2d: self.maxpool,
        }
        shapes: dict[str, list[int]] = {}
        input_name = output_name = ""
        for node in self.net.graph.nodes:
            if node.op == "placeholder":
                input_name = node.name
                continue
            if node.op == "output":
                output_name = node.args[0].name if isinstance(node.args[0], fx.Node) else ""
                if not output_name:
                    raise IntegerProgramError("only models with a single tensor output can be exported")
                continue
            if node.op == "call_module" and type(self.modules[node.target]) in handlers:
                op = handlers[type(self.modules[node.target])](node, self.modules[node.target])
            elif node.op == "call_function" and node.target is torch.cat:
                op = {"op": "concat", "inputs": [a.name for a in node.args[0]], "axis": int(node.args[1])}
            elif node.op == "call_function" and node.target in MOVES:
                op = {"op": MOVES[node.target], "input": node.args[0].name} | _move_fields(node)
            else:
                raise IntegerProgramError(
                    f"node {node.name!r} ({node.op} {node.target}) has no integer implementation; "
                    "ops left in float (allow_float=True) cannot be exported to an integer program"
                )
            op["output"] = node.name
            shapes[node.name] = list(node.meta["tensor_meta"].shape)
            self.ops.append(op)
        quantizers = {
            q.name: {
                "role": q.role,
                "bits": q.bits,
                "signed": q.signed,
                "exponent": q.exponent,
                "rounding": q.rounding,
                "threshold": q.threshold,
                "log2_t": q.log2_t,
                "group": q.group,
            }
            for q in self.qmodel.quantizers()
        }
        program = IntegerProgram(
            quantizers, self.ops, self.tensors, input_name, output_name, list(self.qmodel.input_shape), shapes
        )
        program.validate()
        return program

    def activation(self, node: fx.Node, m: QActivation) -> dict[str, Any]:
        if m.role == "input":
            return {"op": "quantize", "input": node.args[0].name, "quantizer": self.qname(m.out_q)}
        return {
            "op": "requantize",
            "input": node.args[0].name,
            "quantizer": self.qname(m.out_q),
            "activation": m.activation,
        }

    def compute(self, node: fx.Node, m: QCompute) -> dict[str, Any]:
        weight, bias, _ = m.folded()
        self.tensors[f"{node.target}.weight"] = _codes(m.weight_q, weight)
        self.tensors[f"{node.target}.bias"] = _codes(m.bias_q, bias)
        op = {
            "op": m.kind,
            "input": node.args[0].name,
            "weight": f"{node.target}.weight",
            "bias": f"{node.target}.bias",
            "weight_q": self.qname(m.weight_q),
            "acc_q": self.qname(m.acc_q),
            "bias_q": self.qname(m.bias_q),
            "out_q": self.qname(m.out_q),
            "activation": m.activation,
        }
        if m.kind == "conv":
            op |= {k: list(v) if isinstance(v, tuple) else v for k, v in m.conv_args.items()}
        if m.kind == "scale" and m.bn is not None:
            op["bn"] = _bn_record(m.bn)  # the device keeps it as a streaming batch norm
        return op

    def avgpool(self, node: fx.Node, m: QAvgPool) -> dict[str, Any]:
        self.tensors[f"{node.target}.reciprocal"] = _codes(m.recip_q, m.reciprocal).reshape(1)
        return {
            "op": "avgpool",
            "input": node.args[0].name,
            "reciprocal": f"{node.target}.reciprocal",
            "recip_q": self.qname(m.recip_q),
            "out_q": self.qname(m.out_q),
            "kernel": list(m.kernel),
            "stride": list(m.stride),
            "padding": list(m.padding),
        }

    def add(self, node: fx.Node, m: QAdd) -> dict[str, Any]:
        return {
            "op": "sub" if m.subtract else "add",
            "inputs": [a.name for a in node.args],
            "out_q": self.qname(m.out_q),
            "activation": m.activation,
        }

    def leaky(self, node: fx.Node, m: QLeakyReLU) -> dict[str, Any]:
        self.tensors[f"{node.target}.alpha"] = _codes(m.alpha_q, m.alpha).reshape(1)
        return {
            "op": "leaky_relu",
            "input": node.args[0].name,
            "alpha": f"{node.target}.alpha",
            "alpha_q": self.qname(m.alpha_q),
            "prod_q": self.qname(m.prod_q),
            "out_q": self.qname(m.out_q),
        }

    def lookup(self, node: fx.Node, m: QLookup) -> dict[str, Any]:
        self.tensors[f"{node.target}.table"] = _codes(m.out_q, m.table())
        return {
            "op": "lookup",
            "input": node.args[0].name,
            "table": f"{node.target}.table",
            "in_q": self.qname(m.in_q),
            "out_q": self.qname(m.out_q),
        }

    def mul(self, node: fx.Node, m: QMul) -> dict[str, Any]:
        return {"op": "mul", "inputs": [a.name for a in node.args], "out_q": self.qname(m.out_q)}

    def mean(self, node: fx.Node, m: QMean) -> dict[str, Any]:
        self.tensors[f"{node.target}.reciprocal"] = _codes(m.recip_q, m.reciprocal).reshape(1)
        return {
            "op": "mean",
            "input": node.args[0].name,
            "axes": list(m.dims),
            "keepdim": m.keepdim,
            "reciprocal": f"{node.target}.reciprocal",
            "recip_q": self.qname(m.recip_q),
            "out_q": self.qname(m.out_q),
        }

    def maxpool(self, node: fx.Node, m: nn.MaxPool2d) -> dict[str, Any]:
        def pair(v: Any) -> list[int]:
            return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]

        return {
            "op": "maxpool",
            "input": node.args[0].name,
            "kernel": pair(m.kernel_size),
            "stride": pair(m.stride if m.stride is not None else m.kernel_size),
            "padding": pair(m.padding),
            "dilation": pair(m.dilation),
        } | ({"ceil_mode": True} if m.ceil_mode else {})


@torch.no_grad()
def to_integer(qmodel: QuantizedModel, meta: dict[str, Any] | None = None) -> IntegerProgram:
    """The integer program of a quantized model (its eval-mode behaviour: BN frozen to moving stats).

    ``meta`` (JSON-able) is stored in the manifest: the model and dataset it came from, so that
    ``edgetrain adapt --program`` and ``eval --program`` need no further flags.
    """
    was_training = qmodel.training
    qmodel.eval()
    try:
        program = _Exporter(qmodel).run()
        program.meta = dict(meta or {})
        return program
    finally:
        qmodel.train(was_training)
