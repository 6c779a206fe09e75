"""The graph quantizer: trace a float CNN with torch.fx, apply the Graffitist-style rules of docs/quantization.md, calibrate.

``quantize(model, example_inputs, calib_data, config, mode)`` does what Graffitist's
``fold_batch_norms`` + ``preprocess_layers`` + ``quantize`` transforms did to TF graphs (TQT paper
the TQT paper, section 3 and appendix A):

1. trace (torch.fx; custom modules are traced through), drop dropout/identity, collapse concat of concat;
2. re-emit the graph with fake-quantized layers: conv/linear (+ folded BN, + merged ReLU/ReLU6),
   residual add, concat, LeakyReLU, avg-pool, max-pool and reshape passthrough;
3. share thresholds (accumulator + bias; add and concat inputs; LeakyReLU's two max inputs) by making
   the quantizers of a group hold one ``log2_t`` Parameter object, so they stay shared in training;
4. calibrate each group in topological order with the upstream quantizers on (static: weights ``max``;
   retrain: weights ``3sd``; everything else ``kl_j``).

A batch norm that does not follow a conv/linear (``lrt-cnn`` puts it after ReLU after max-pool) becomes
a per-channel scale layer (a 1x1 depthwise conv with weight gamma/sigma, bias beta - mu gamma/sigma);
its weights keep ``first_last_weight_bits`` in INT4 mode since a 4-bit per-tensor grid cannot hold a
per-channel scale.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from edgetrain.fixedpoint import FixedPointFormat, Rounding
from edgetrain.graph.modules import QActivation, QAdd, QAvgPool, QCompute, QLeakyReLU, QuantModule
from edgetrain.tqt import CALIBRATION_METHODS, TQTQuantizer, calibrate

MODES = ("static", "retrain")
SUPPORTED_OPS = (
    "Conv2d (incl. depthwise/grouped)",
    "Linear",
    "BatchNorm1d/2d",
    "ReLU / relu",
    "ReLU6 / relu6",
    "LeakyReLU / leaky_relu (0 <= slope <= 1)",
    "add of two tensors (+, torch.add)",
    "torch.cat",
    "MaxPool2d / max_pool2d",
    "AvgPool2d / avg_pool2d",
    "AdaptiveAvgPool2d / adaptive_avg_pool2d (output size divides input)",
    "mean over H,W",
    "Flatten / flatten / view / reshape",
    "Dropout / dropout / Identity",
)
PARAMETER_ROLES = ("weight", "reciprocal", "alpha")  # quantizers whose input is a constant, not data
CONSTANT_ROLES = ("reciprocal", "alpha")  # never trained


class UnsupportedOpError(ValueError):
    """An op the graph rules do not cover (pass ``allow_float=True`` to leave it in float)."""


@dataclass
class QuantConfig:
    """Bit-widths, calibration and rounding of the graph quantizer (defaults: Graffitist's, docs/fixed-point.md).

    weight_bits: conv/linear weights (8, or 4 for INT4; the first and last layer use
        ``first_last_weight_bits``). act_bits: int8 activations (input, layer outputs, add, rescale).
    accum_bits: int16 accumulator, bias, LeakyReLU product. relu_bits: unsigned output after ReLU/ReLU6.
    avgpool_reciprocal_bits: the unsigned 1/(kh kw) weight of an avg-pool.
    weight_calibration: ``None`` picks ``max`` (static) or ``3sd`` (retrain).
    activation_calibration: every other quantizer (``kl_j``; int16 ones fall back to ``max``).
    rounding: every quantizer except the avg-pool output (floor).
    allow_float: leave unsupported ops in float instead of raising (a rescale quantizer follows them).
    calibration_batch_size: images per forward pass while calibrating.
    """

    weight_bits: int = 8
    act_bits: int = 8
    accum_bits: int = 16
    relu_bits: int = 8
    first_last_weight_bits: int = 8
    avgpool_reciprocal_bits: int = 8
    weight_calibration: str | None = None
    activation_calibration: str = "kl_j"
    rounding: Rounding = Rounding.HALF_EVEN
    allow_float: bool = False
    calibration_batch_size: int = 256

    def __post_init__(self) -> None:
        self.rounding = Rounding.parse(self.rounding)
        for name in (
            "weight_bits",
            "act_bits",
            "accum_bits",
            "relu_bits",
            "first_last_weight_bits",
            "avgpool_reciprocal_bits",
        ):
            FixedPointFormat(getattr(self, name))  # raises on a bad bit-width
        for method in (self.weight_calibration, self.activation_calibration):
            if method is not None and method not in CALIBRATION_METHODS:
                raise ValueError(f"unknown calibration method {method!r}; choose one of {CALIBRATION_METHODS}")
        if self.calibration_batch_size < 1:
            raise ValueError("calibration_batch_size must be >= 1")

    def weight_method(self, mode: str) -> str:
        return self.weight_calibration or ("max" if mode == "static" else "3sd")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rounding"] = self.rounding.value
        return d


@dataclass(frozen=True)
class QuantizerInfo:
    """One row of :meth:`QuantizedModel.quantizers`."""

    name: str
    role: str
    bits: int
    signed: bool
    rounding: str
    log2_t: float
    exponent: int
    threshold: float
    group: str | None  # the first member's name, for quantizers sharing one threshold
    frozen: bool


class QuantizedModel(nn.Module):
    """The fake-quantized network (an fx ``GraphModule`` in ``self.net``), run in float."""

    def __init__(self, net: fx.GraphModule, config: QuantConfig, mode: str, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.config = config
        self.mode = mode
        self.input_shape = tuple(int(s) for s in input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def named_quantizers(self) -> Iterator[tuple[str, str, TQTQuantizer]]:
        """(name, role, quantizer) in graph order."""
        for module_name, module in self.net.named_modules():
            if isinstance(module, QuantModule):
                for attr, role in module.quantizer_roles().items():
                    yield f"{module_name}.{attr}", role, getattr(module, attr)

    def quantizers(self) -> list[QuantizerInfo]:
        """Every quantizer: name, role, bits, sign, rounding, log2_t, exponent, threshold, shared group."""
        rows = list(self.named_quantizers())
        members: dict[int, list[str]] = {}
        for name, _, q in rows:
            members.setdefault(id(q.log2_t), []).append(name)
        return [
            QuantizerInfo(
                name=name,
                role=role,
                bits=q.bits,
                signed=q.signed,
                rounding=q.rounding.value,
                log2_t=float(q.log2_t.detach()),
                exponent=q.exponent,
                threshold=q.threshold,
                group=members[id(q.log2_t)][0] if len(members[id(q.log2_t)]) > 1 else None,
                frozen=q.frozen,
            )
            for name, role, q in rows
        ]

    def quantizer_table(self) -> str:
        """The quantizers as a fixed-width text table."""
        header = f"{'quantizer':<40} {'role':<12} {'format':<7} {'log2_t':>8} {'exp':>4} {'round':<9} group"
        lines = [header, "-" * len(header)]
        for q in self.quantizers():
            fmt = f"{'int' if q.signed else 'uint'}{q.bits}"
            lines.append(
                f"{q.name:<40} {q.role:<12} {fmt:<7} {q.log2_t:>8.3f} {q.exponent:>4} {q.rounding:<9} {q.group or ''}"
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# op classification


def _is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("tensor_meta"), TensorMetadata)


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


FUNCTION_KINDS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    F.leaky_relu: "leaky",
    operator.add: "add",
    torch.add: "add",
    torch.cat: "concat",
    torch.concat: "concat",
    F.max_pool2d: "maxpool",
    F.avg_pool2d: "avgpool",
    F.adaptive_avg_pool2d: "avgpool",
    torch.flatten: "reshape",
    torch.reshape: "reshape",
    F.dropout: "identity",
    torch.mean: "mean",
}
METHOD_KINDS = {"relu": "relu", "flatten": "reshape", "view": "reshape", "reshape": "reshape", "mean": "mean"}
MODULE_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Conv2d, "conv"),
    (nn.Linear, "linear"),
    (nn.BatchNorm2d, "bn"),
    (nn.BatchNorm1d, "bn"),
    (nn.ReLU, "relu"),
    (nn.ReLU6, "relu6"),
    (nn.LeakyReLU, "leaky"),
    (nn.MaxPool2d, "maxpool"),
    (nn.AvgPool2d, "avgpool"),
    (nn.AdaptiveAvgPool2d, "avgpool"),
    (nn.Flatten, "reshape"),
    (nn.Dropout, "identity"),
    (nn.Identity, "identity"),
)


def _classify(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The rule that handles ``node``, 'meta' for non-tensor helpers (x.size(0)), None if unsupported."""
    if node.op in ("placeholder", "output"):
        return node.op
    if not _is_tensor(node):
        return "meta"
    if node.op == "call_module":
        module = modules[node.target]
        for cls, kind in MODULE_KINDS:
            if type(module) is cls:
                return kind
        return None
    if node.op == "call_function":
        return FUNCTION_KINDS.get(node.target)
    if node.op == "call_method":
        return METHOD_KINDS.get(node.target)
    return None


def _op_description(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} module '{node.target}'"
    target = getattr(node.target, "__name__", str(node.target))
    stack = node.meta.get("nn_module_stack") or {}
    owner = next(reversed(stack.values()))[0] if stack else "<top level>"
    return f"{node.op} '{target}' (node '{node.name}' in module '{owner}')"


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


# ----------------------------------------------------------------------------------------------
# the graph pass


class _Builder:
    """Re-emits a normalised float graph as a fake-quantized one (one instance per ``quantize`` call)."""

    def __init__(self, gm: fx.GraphModule, config: QuantConfig, mode: str) -> None:
        self.gm = gm
        self.config = config
        self.mode = mode
        self.modules = dict(gm.named_modules())
        self.graph = fx.Graph()
        self.new_modules: dict[str, nn.Module] = {}
        self.env: dict[fx.Node, fx.Node] = {}
        self.absorbed: set[fx.Node] = set()
        self.owner: dict[fx.Node, QuantModule] = {}  # new node -> the module whose out_q produced it
        self.unsigned: dict[fx.Node, bool] = {}  # new node -> its codes are unsigned
        weight_layers = [n for n in gm.graph.nodes if self.kind(n) in ("conv", "linear")]
        self.first_last = {weight_layers[0], weight_layers[-1]} if weight_layers else set()

    # -- helpers
    def kind(self, node: fx.Node) -> str | None:
        return _classify(node, self.modules)

    def quantizer(self, bits: int, signed: bool, rounding: Rounding | None = None) -> TQTQuantizer:
        return TQTQuantizer(bits, signed, rounding or self.config.rounding)

    @staticmethod
    def name_of(node: fx.Node) -> str:
        """The module path for module calls (``layers.0.conv``), the node name otherwise."""
        return str(node.target) if node.op == "call_module" else node.name

    def add_module(self, name: str, module: nn.Module) -> str:
        base, i = name, 1
        while name in self.new_modules:
            name, i = f"{base}_{i}", i + 1
        self.new_modules[name] = module
        return name

    def call(self, name: str, module: nn.Module, args: tuple[Any, ...], unsigned: bool) -> fx.Node:
        node = self.graph.call_module(self.add_module(name, module), args)
        if isinstance(module, QuantModule) and "out_q" in module.quantizer_roles():
            self.owner[node] = module
        self.unsigned[node] = unsigned
        return node

    def quantized_input(
        self, node: fx.Node, user: fx.Node, bits: int, signed: bool, tag: str
    ) -> tuple[fx.Node, TQTQuantizer]:
        """``node`` (a float-graph input of ``user``) as a tensor with its own quantizer of the given
        format: the producer's output quantizer when it feeds only ``user`` and has that format,
        else an inserted rescale quantizer (Graffitist's eltw/concat rescale)."""
        new = self.env[node]
        producer = self.owner.get(new)
        if producer is not None and len(node.users) == 1 and user in node.users:
            q = producer.out_q
            if q.bits == bits and q.signed == signed:
                return new, q
        rescale = QActivation(self.quantizer(bits, signed), role="rescale")
        out = self.call(f"{user.name}_{tag}_rescale", rescale, (new,), unsigned=not signed)
        return out, rescale.out_q

    def share(self, quantizers: list[TQTQuantizer]) -> None:
        """Make the quantizers hold one ``log2_t`` Parameter object (a shared-scale group)."""
        for q in quantizers[1:]:
            q.log2_t = quantizers[0].log2_t

    def fuse_activation(self, node: fx.Node) -> tuple[str, fx.Node]:
        """ReLU/ReLU6 following ``node`` as its only user is merged into the producer."""
        user = _single_user(node)
        if user is not None and self.kind(user) in ("relu", "relu6"):
            self.absorbed.add(user)
            return self.kind(user), user
        return "none", node

    def unsupported(self, node: fx.Node, why: str = "") -> None:
        if self.config.allow_float:
            self.emit_float(node)
            return
        supported = "\n  ".join(SUPPORTED_OPS)
        raise UnsupportedOpError(
            f"cannot quantize {_op_description(node, self.modules)}{why}. "
            f"Supported ops:\n  {supported}\nPass QuantConfig(allow_float=True) to leave it in float."
        )

    # -- emission
    def run(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            if node in self.absorbed:
                continue
            kind = self.kind(node)
            handler = getattr(self, f"emit_{kind}", None) if kind else None
            if handler is None:
                self.unsupported(node)
            else:
                handler(node)
        gm = fx.GraphModule(self.new_modules, self.graph)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return gm

    def emit_placeholder(self, node: fx.Node) -> None:
        if any(n.op == "placeholder" for n in self.env):
            raise UnsupportedOpError("only models with a single tensor input are supported")
        x = self.graph.placeholder(node.name)
        q = QActivation(self.quantizer(self.config.act_bits, True), role="input")
        self.env[node] = self.call("input_quant", q, (x,), unsigned=False)

    def emit_output(self, node: fx.Node) -> None:
        self.graph.output(fx.map_arg(node.args[0], lambda n: self.env[n]))

    def emit_meta(self, node: fx.Node) -> None:
        self.env[node] = self.graph.node_copy(node, lambda n: self.env[n])

    def emit_float(self, node: fx.Node) -> None:
        """allow_float: copy the op, then requantize its output (a rescale) so the rest stays quantized."""
        if node.op == "call_module":
            self.new_modules[node.target] = self.modules[node.target]
        new = self.graph.node_copy(node, lambda n: self.env[n])
        if _is_tensor(node):
            q = QActivation(self.quantizer(self.config.act_bits, True), role="rescale")
            new = self.call(f"{node.name}_rescale", q, (new,), unsigned=False)
        self.env[node] = new

    def emit_conv(self, node: fx.Node) -> None:
        self.emit_compute(node, self.modules[node.target])

    emit_linear = emit_conv

    def emit_bn(self, node: fx.Node) -> None:
        """A batch norm with no conv/linear before it: a per-channel scale layer."""
        bn = self.modules[node.target]
        self.emit_compute(node, None, bn)

    def emit_compute(self, node: fx.Node, layer: nn.Module | None, bn: nn.Module | None = None) -> None:
        cfg = self.config
        end = node
        if layer is not None:
            user = _single_user(node)
            if user is not None and self.kind(user) == "bn":
                bn, end = self.modules[user.target], user
                self.absorbed.add(user)
        activation, end = self.fuse_activation(end)
        consumer = _single_user(end)
        if activation != "none":
            out_q = self.quantizer(cfg.relu_bits, False)
        elif consumer is not None and self.kind(consumer) == "leaky":
            out_q = self.quantizer(cfg.accum_bits, True)
        else:
            out_q = self.quantizer(cfg.act_bits, True)
        if layer is None:
            kind, weight, bias, conv_args = "scale", torch.ones_like(bn.running_var), None, None
            weight_bits = cfg.first_last_weight_bits
        else:
            kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
            weight, bias = layer.weight, layer.bias
            conv_args = None
            if kind == "conv":
                if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                    self.unsupported(node, f" (padding {layer.padding!r}, {layer.padding_mode!r}; use integer zeros)")
                    return
                conv_args = {
                    "stride": _pair(layer.stride),
                    "padding": _pair(layer.padding),
                    "dilation": _pair(layer.dilation),
                    "groups": int(layer.groups),
                }
            weight_bits = cfg.first_last_weight_bits if node in self.first_last else cfg.weight_bits
        quantizers = {
            "weight_q": self.quantizer(weight_bits, True),
            "acc_q": self.quantizer(cfg.accum_bits, True),
            "bias_q": self.quantizer(cfg.accum_bits, True),
            "out_q": out_q,
        }
        module = QCompute(
            kind, weight, bias, copy.deepcopy(bn), activation, quantizers, conv_args, bn_frozen=self.mode == "static"
        )
        new = self.call(node.target, module, (self.env[node.args[0]],), unsigned=not out_q.signed)
        chain = node
        while True:  # node -> [bn] -> [relu]: every absorbed node maps to the fused layer
            self.env[chain] = new
            if chain is end:
                break
            chain = _single_user(chain)

    def emit_relu(self, node: fx.Node) -> None:
        """A ReLU/ReLU6 with no producer to merge into: its own unsigned quantizer."""
        kind = self.kind(node)
        q = QActivation(self.quantizer(self.config.relu_bits, False), activation=kind)
        self.env[node] = self.call(self.name_of(node), q, (self.env[node.args[0]],), unsigned=True)

    emit_relu6 = emit_relu

    def emit_leaky(self, node: fx.Node) -> None:
        cfg = self.config
        if node.op == "call_module":
            slope = self.modules[node.target].negative_slope
        else:
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
        if not 0.0 <= float(slope) <= 1.0:
            self.unsupported(node, f" (negative_slope={slope} outside [0, 1])")
            return
        x, x_q = self.quantized_input(node.args[0], node, cfg.accum_bits, True, "x")
        prod_q = self.quantizer(cfg.accum_bits, True)
        self.share([x_q, prod_q])
        module = QLeakyReLU(
            float(slope), self.quantizer(cfg.accum_bits, True).freeze(), prod_q, self.quantizer(cfg.act_bits, True)
        )
        self.env[node] = self.call(self.name_of(node), module, (x,), unsigned=False)

    def emit_add(self, node: fx.Node) -> None:
        cfg = self.config
        inputs = list(node.args[:2])
        same_shape = all(_is_tensor(a) for a in inputs) and _shape(inputs[0]) == _shape(inputs[1])
        if len(node.args) != 2 or node.kwargs or not same_shape:
            self.unsupported(node, " (only the add of two tensors of the same shape is supported)")
            return
        args, group = zip(
            *(self.quantized_input(a, node, cfg.act_bits, True, f"in{i}") for i, a in enumerate(inputs)), strict=True
        )
        self.share(list(group))
        activation, end = self.fuse_activation(node)
        out_q = self.quantizer(cfg.relu_bits, False) if activation != "none" else self.quantizer(cfg.act_bits, True)
        new = self.call(self.name_of(node), QAdd(out_q, activation), tuple(args), unsigned=activation != "none")
        self.env[node] = self.env[end] = new

    def emit_concat(self, node: fx.Node) -> None:
        cfg = self.config
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        unsigned = all(self.unsigned.get(self.env[t], False) for t in tensors)
        bits = cfg.relu_bits if unsigned else cfg.act_bits
        args, group = zip(
            *(self.quantized_input(t, node, bits, not unsigned, f"in{i}") for i, t in enumerate(tensors)), strict=True
        )
        self.share(list(group))
        new = self.graph.call_function(torch.cat, (list(args), dim))
        self.unsigned[new] = unsigned
        self.env[node] = new

    def emit_maxpool(self, node: fx.Node) -> None:
        if node.op == "call_module":
            pool = self.modules[node.target]
            name = node.target
        else:
            a = node.normalized_arguments(self.gm, normalize_to_only_use_kwargs=True).kwargs
            pool = nn.MaxPool2d(
                a["kernel_size"],
                a.get("stride") or None,
                a.get("padding", 0),
                a.get("dilation", 1),
                ceil_mode=a.get("ceil_mode", False),
            )
            name = node.name
        if getattr(pool, "return_indices", False) or pool.ceil_mode:
            self.unsupported(node, " (return_indices / ceil_mode)")
            return
        src = self.env[node.args[0]]
        self.env[node] = self.call(name, copy.deepcopy(pool), (src,), unsigned=self.unsigned.get(src, False))

    def emit_avgpool(self, node: fx.Node) -> None:
        h, w = _shape(node.args[0])[2:]
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, nn.AvgPool2d) or node.target is F.avg_pool2d:
            if module is None:
                module = nn.AvgPool2d(
                    **{
                        k: v
                        for k, v in node.normalized_arguments(self.gm, normalize_to_only_use_kwargs=True).kwargs.items()
                        if k != "input"
                    }
                )
            kernel = _pair(module.kernel_size)
            stride = _pair(module.stride if module.stride is not None else module.kernel_size)
            padding = _pair(module.padding)
            if module.ceil_mode or module.divisor_override or (not module.count_include_pad and padding != (0, 0)):
                self.unsupported(node, " (ceil_mode, divisor_override or count_include_pad=False with padding)")
                return
        else:
            out = module.output_size if module is not None else node.kwargs.get("output_size", node.args[1])
            oh, ow = (out, out) if isinstance(out, int) else (out[0] or h, out[1] or w)
            if h % oh or w % ow:
                self.unsupported(node, f" (adaptive output {oh}x{ow} does not divide input {h}x{w})")
                return
            kernel = stride = (h // oh, w // ow)
            padding = (0, 0)
        self.env[node] = self.avgpool(node, kernel, stride, padding)

    def avgpool(
        self, node: fx.Node, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
    ) -> fx.Node:
        src = self.env[node.args[0]]
        unsigned = self.unsigned.get(src, False)
        module = QAvgPool(
            kernel,
            stride,
            padding,
            self.quantizer(self.config.avgpool_reciprocal_bits, False).freeze(),
            self.quantizer(self.config.act_bits, not unsigned, Rounding.FLOOR),
        )
        return self.call(self.name_of(node), module, (src,), unsigned=unsigned)

    def emit_mean(self, node: fx.Node) -> None:
        """Mean over H, W: a global avg-pool (then a reshape when keepdim is False)."""
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        shape = _shape(node.args[0])
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if len(shape) != 4 or sorted(d % 4 for d in dims) != [2, 3]:
            self.unsupported(node, " (only the mean over the two spatial dims of an NCHW tensor)")
            return
        pooled = self.avgpool(node, tuple(shape[2:]), tuple(shape[2:]), (0, 0))
        if not keepdim:
            pooled = self.reshape(pooled, _shape(node))
        self.env[node] = pooled

    def reshape(self, src: fx.Node, shape: tuple[int, ...]) -> fx.Node:
        new = self.graph.call_function(torch.reshape, (src, (-1, *shape[1:])))
        self.unsigned[new] = self.unsigned.get(src, False)
        return new

    def emit_reshape(self, node: fx.Node) -> None:
        self.env[node] = self.reshape(self.env[node.args[0]], _shape(node))


def _normalize(gm: fx.GraphModule) -> None:
    """Remove dropout/identity and collapse concat-of-concat on the same dim (docs/quantization.md)."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if _classify(node, modules) == "identity":
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):
        if _classify(node, modules) != "concat":
            continue
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        flat: list[fx.Node] = []
        for t in node.args[0]:
            inner_dim = t.kwargs.get("dim", t.args[1] if len(t.args) > 1 else 0) if isinstance(t, fx.Node) else None
            if _classify(t, modules) == "concat" and len(t.users) == 1 and inner_dim == dim:
                flat.extend(t.args[0])
            else:
                flat.append(t)
        node.args = (flat, dim)
        node.kwargs = {}
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _as_example(example_inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) != 1:
            raise ValueError("quantize supports models with one tensor input")
        example_inputs = example_inputs[0]
    if not isinstance(example_inputs, torch.Tensor):
        raise TypeError(f"example_inputs must be a tensor, got {type(example_inputs).__name__}")
    return example_inputs


def build_quantized_model(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    config: QuantConfig | None = None,
    mode: str = "static",
) -> QuantizedModel:
    """The rewritten graph with every quantizer inserted but not calibrated (log2_t = 0)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    config = config or QuantConfig()
    example = _as_example(example_inputs)
    float_model = copy.deepcopy(model).eval()
    gm = fx.symbolic_trace(float_model)
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    _normalize(gm)
    net = _Builder(gm, config, mode).run()
    qmodel = QuantizedModel(net, config, mode, tuple(example.shape))
    for _, role, q in qmodel.named_quantizers():
        if mode == "static" or role in CONSTANT_ROLES:
            q.freeze()
    return qmodel.eval()


def _batches(calib_data: Any, batch_size: int) -> list[torch.Tensor]:
    if hasattr(calib_data, "images"):
        calib_data = calib_data.images
    if isinstance(calib_data, torch.Tensor):
        return list(torch.split(calib_data, batch_size))
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calib_data]
    if not batches or not all(isinstance(b, torch.Tensor) for b in batches):
        raise ValueError("calib_data must be a tensor, a Dataset or an iterable of tensors / (x, y) pairs")
    return batches


@torch.no_grad()
def calibrate_model(qmodel: QuantizedModel, calib_data: Any) -> QuantizedModel:
    """Set every threshold, one shared-scale group at a time in topological order, upstream quantizers on.

    Weights: ``config.weight_method(mode)``; avg-pool reciprocal and LeakyReLU alpha: ``max`` (exact
    constants); everything else ``config.activation_calibration``. Members of a group calibrate on
    their joint data; a group is placed after its last member in execution order.
    """
    config = qmodel.config
    batches = _batches(calib_data, config.calibration_batch_size)
    rows = list(qmodel.named_quantizers())
    order: dict[int, int] = {}
    was_training = qmodel.training
    qmodel.eval()

    def record_order(module: nn.Module, _: Any) -> None:
        order.setdefault(id(module), len(order))

    hooks = [q.register_forward_pre_hook(record_order) for _, _, q in rows]
    for _, _, q in rows:
        q.enabled = False
    qmodel(batches[0][:1])
    for h in hooks:
        h.remove()
    groups: dict[int, list[tuple[str, TQTQuantizer]]] = {}
    for _, role, q in rows:
        groups.setdefault(id(q.log2_t), []).append((role, q))
    ordered = sorted(groups.values(), key=lambda g: max(order.get(id(q), math.inf) for _, q in g))
    set_bit_exact(qmodel, False)  # float32 passes: thresholds do not need exact sums
    for group in ordered:
        roles = {role for role, _ in group}
        samples: list[torch.Tensor] = []
        hooks = [q.register_forward_pre_hook(partial(_collect, samples)) for _, q in group]
        for batch in batches[:1] if roles <= set(PARAMETER_ROLES) else batches:
            qmodel(batch)
        for h in hooks:
            h.remove()
        if roles <= {"weight"}:
            method = config.weight_method(qmodel.mode)
        elif roles <= set(CONSTANT_ROLES):
            method = "max"
        else:
            method = config.activation_calibration
        leader = group[0][1]
        if not samples:
            raise ValueError("a quantizer saw no data during calibration: is it reachable from the input?")
        leader.set_log2_t(calibrate(torch.cat(samples), method, leader.bits, leader.signed, rounding=leader.rounding))
        for _, q in group:
            q.enabled = True
    set_bit_exact(qmodel, True)
    qmodel.train(was_training)
    return qmodel


def _collect(samples: list[torch.Tensor], _: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    samples.append(inputs[0].detach().reshape(-1).float())


def set_bit_exact(qmodel: nn.Module, on: bool) -> None:
    """Eval-mode multiply-accumulates in float64 (exact, the default) or float32 (faster)."""
    for module in qmodel.modules():
        if isinstance(module, QuantModule):
            module.bit_exact = on


def quantize(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    calib_data: Any,
    config: QuantConfig | None = None,
    mode: str = "static",
) -> QuantizedModel:
    """Fake-quantize a float CNN (docs/fixed-point.md, docs/quantization.md): trace, fold BN, insert and share quantizers,
    calibrate on ``calib_data`` (a tensor of inputs, a Dataset, or an iterable of batches).

    ``mode="static"``: BN folded with the moving statistics, thresholds calibrated and frozen.
    ``mode="retrain"``: BN folded with the training-time correction until ``freeze_bn()``, weights
    calibrated with ``3sd``, thresholds trainable (use ``edgetrain.tqt.retrain``). The input model is
    not modified. Raises :class:`UnsupportedOpError` on an op outside ``SUPPORTED_OPS``.
    """
    qmodel = build_quantized_model(model, example_inputs, config, mode)
    return calibrate_model(qmodel, calib_data)


__all__ = [
    "MODES",
    "SUPPORTED_OPS",
    "QuantConfig",
    "QuantizedModel",
    "QuantizerInfo",
    "UnsupportedOpError",
    "build_quantized_model",
    "calibrate_model",
    "quantize",
]
