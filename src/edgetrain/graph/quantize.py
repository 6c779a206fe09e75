"""The graph quantizer: trace a float CNN with torch.fx, apply the rules of docs/quantization.md, calibrate.

``quantize(model, example_inputs, calib_data, config, mode)`` does what Graffitist's
``fold_batch_norms`` + ``preprocess_layers`` + ``quantize`` transforms did to TF graphs (the TQT
paper, section 3 and appendix A):

1. trace (torch.fx, ``edgetrain.graph.ops``; custom modules are traced through, Conv2d/Linear/BN
   subclasses match by behaviour), drop dropout/identity, collapse concat of concat;
2. re-emit the graph with fake-quantized layers: conv/linear (+ folded BN, + merged ReLU/ReLU6),
   residual add and subtract, product of two tensors, concat, LeakyReLU, element-wise functions as
   exact lookup tables, avg-pool and mean, and the data-movement passthroughs (max-pool, reshape,
   zero pad, nearest upsampling, permute, slices);
3. share thresholds (accumulator + bias; add and concat inputs; LeakyReLU's two max inputs) by making
   the quantizers of a group hold one ``log2_t`` Parameter object, so they stay shared in training;
4. calibrate each group in topological order with the upstream quantizers on (static: weights ``max``;
   retrain: weights ``3sd``; everything else ``auto``: per quantizer the least-error threshold among
   kl_j, max, 3sd, percentile and mse, the winner recorded in the quantizer table).

A batch norm that does not follow a conv/linear (``lrt-cnn`` puts it after ReLU after max-pool) becomes
a per-channel scale layer (a 1x1 depthwise conv with weight gamma/sigma, bias beta - mu gamma/sigma);
its weights keep ``first_last_weight_bits`` in INT4 mode since a 4-bit per-tensor grid cannot hold a
per-channel scale.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from functools import partial
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from edgetrain.fixedpoint import FixedPointFormat, Rounding
from edgetrain.graph.modules import (
    Elementwise,
    QActivation,
    QAdd,
    QAvgPool,
    QCompute,
    QLeakyReLU,
    QLookup,
    QMean,
    QMul,
    QuantModule,
    apply_per_channel,
    upsample_nearest,
)
from edgetrain.graph.ops import (
    arguments,
    classify,
    constant_values,
    describe,
    is_tensor,
    pair,
    register_elementwise,
    shape,
    single_user,
    trace,
)
from edgetrain.tqt import CALIBRATION_METHODS, TQTQuantizer, calibrate, choose_threshold

MODES = ("static", "retrain")
SUPPORTED_OPS = (
    "Conv2d (incl. depthwise/grouped, subclasses, F.conv2d on parameters; zero padding incl. 'same')",
    "Linear (incl. subclasses, F.linear on parameters)",
    "BatchNorm1d/2d (incl. subclasses, F.batch_norm with running statistics)",
    "ReLU / relu, ReLU6 / relu6",
    "LeakyReLU / leaky_relu",
    "element-wise functions as lookup tables: sigmoid, hardsigmoid, SiLU, hardswish, tanh, GELU, ELU, "
    "SELU, CELU, softplus, mish, PReLU, hardtanh, clamp, abs, exp, tensor (+ - * /) constant, "
    "and any function registered with register_elementwise",
    "add / subtract of two tensors (+, -, torch.add, torch.sub; broadcasting)",
    "product of two tensors (*, torch.mul; broadcasting, e.g. squeeze-and-excitation gating)",
    "torch.cat",
    "ZeroPad2d / ConstantPad (value 0) / F.pad (constant 0)",
    "Upsample / UpsamplingNearest2d / F.interpolate (nearest, integer factors)",
    "MaxPool2d / max_pool2d (incl. ceil_mode)",
    "AvgPool2d / avg_pool2d",
    "AdaptiveAvgPool2d / adaptive_avg_pool2d (output size divides input)",
    "mean over any dims except the batch (keepdim or not)",
    "Flatten / flatten / view / reshape / squeeze / unsqueeze",
    "permute / transpose / chunk / split / slicing with step 1 / contiguous",
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
    depthwise_weight_bits: depthwise convs (groups = input channels > 1) take these weight bits (``None``:
        ``weight_bits``): a depthwise kernel is a few values per channel on one per-tensor grid, the layer
        INT4 hurts most (``--analyze`` shows it), and its weights are a small share of the net's.
    layer_weight_bits: weight bits by layer, ``{pattern: bits}``; a pattern is a module path as the
        quantizer table prints it (``blocks.0.block.3``) or an ``fnmatch`` pattern (``blocks.*.block.3``).
        It overrides every rule above; a pattern that matches no conv/linear layer is an error.
    weight_calibration: ``None`` picks ``max`` (static) or ``3sd`` (retrain).
    activation_calibration: every other quantizer (``auto``: the least quantization error among the
        candidate methods, per quantizer; ``kl_j`` falls back to ``max`` on int16 ones).
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
    depthwise_weight_bits: int | None = None
    layer_weight_bits: dict[str, int] = field(default_factory=dict)
    weight_calibration: str | None = None
    activation_calibration: str = "auto"
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
        for bits in [*self.layer_weight_bits.values(), self.depthwise_weight_bits or self.weight_bits]:
            FixedPointFormat(bits)
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
    calibration: str | None = None  # the method that set the initial threshold; "auto:<winner>" for auto


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
                calibration=q.calibration,
            )
            for name, role, q in rows
        ]

    def quantizer_table(self) -> str:
        """The quantizers as a fixed-width text table."""
        header = (
            f"{'quantizer':<40} {'role':<12} {'format':<7} {'log2_t':>8} {'exp':>4} {'round':<9} "
            f"{'calibration':<16} group"
        )
        lines = [header, "-" * len(header)]
        for q in self.quantizers():
            fmt = f"{'int' if q.signed else 'uint'}{q.bits}"
            lines.append(
                f"{q.name:<40} {q.role:<12} {fmt:<7} {q.log2_t:>8.3f} {q.exponent:>4} {q.rounding:<9} "
                f"{q.calibration or '':<16} {q.group or ''}"
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the graph pass


class _Builder:
    """Re-emits a normalised float graph as a fake-quantized one (one instance per ``quantize`` call)."""

    def __init__(self, gm: fx.GraphModule, config: QuantConfig, mode: str) -> None:
        self.gm = gm
        self.config = config
        self.mode = mode
        self.modules = dict(gm.named_modules())
        self.constants = constant_values(gm)
        self.graph = fx.Graph()
        self.new_modules: dict[str, nn.Module] = {}
        self.env: dict[fx.Node, fx.Node] = {}
        self.absorbed: set[fx.Node] = set()
        self.owner: dict[fx.Node, QuantModule] = {}  # new node -> the module whose out_q produced it
        self.unsigned: dict[fx.Node, bool] = {}  # new node -> its codes are unsigned
        self.grid: dict[fx.Node, TQTQuantizer] = {}  # new node -> the quantizer whose grid its values lie on
        self.layers: dict[fx.Node, nn.Module] = {}  # functional conv/linear/bn -> an equivalent module
        self.folded_padding: dict[fx.Node, tuple[int, int]] = {}  # conv -> zero padding folded into it
        self.splits: dict[fx.Node, tuple[int, list[tuple[int, int]]]] = {}  # chunk/split -> (dim, [(start, len)])
        weight_layers = [n for n in gm.graph.nodes if self.kind(n) in ("conv", "linear")]
        self.first_last = {weight_layers[0], weight_layers[-1]} if weight_layers else set()
        self.weight_layer_names = [self.name_of(n) for n in weight_layers]

    # -- helpers
    def kind(self, node: fx.Node) -> str | None:
        return classify(node, self.modules, self.constants)

    def quantizer(self, bits: int, signed: bool, rounding: Rounding | None = None) -> TQTQuantizer:
        return TQTQuantizer(bits, signed, rounding or self.config.rounding)

    def activation_quantizer(self, unsigned: bool) -> TQTQuantizer:
        """uint ``relu_bits`` for non-negative tensors, int ``act_bits`` otherwise."""
        cfg = self.config
        return self.quantizer(cfg.relu_bits, False) if unsigned else self.quantizer(cfg.act_bits, True)

    def name_of(self, node: fx.Node) -> str:
        """The module path for module calls (``layers.0.conv``) and for a functional conv/linear/BN
        (the module whose forward calls it, e.g. a Conv2d subclass), the node name otherwise."""
        if node.op == "call_module":
            return str(node.target)
        stack = node.meta.get("nn_module_stack") or {}
        if stack and self.kind(node) in ("conv", "linear", "bn"):
            return next(reversed(stack.values()))[0]
        return node.name

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
            self.grid[node] = module.out_q
        elif args and args[0] in self.grid:  # max-pool
            self.grid[node] = self.grid[args[0]]
        self.unsigned[node] = unsigned
        return node

    def function(self, target: Any, src: fx.Node, *args: Any) -> fx.Node:
        """A scale-preserving data-movement op on ``src`` (pad, permute, narrow, upsample, reshape)."""
        new = self.graph.call_function(target, (src, *args))
        self.unsigned[new] = self.unsigned.get(src, False)
        if src in self.grid:
            self.grid[new] = self.grid[src]
        return new

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
        user = single_user(node)
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
            f"cannot quantize {describe(node, self.modules)}{why}. "
            f"Supported ops:\n  {supported}\nPass QuantConfig(allow_float=True) to leave it in float "
            "(it then cannot be exported to the integer program), or register an element-wise function "
            "with edgetrain.graph.register_elementwise."
        )

    def constant(self, value: Any) -> Any:
        return self.constants[value] if isinstance(value, fx.Node) and value in self.constants else value

    def weight_bits_of(self, node: fx.Node, layer: nn.Module) -> int:
        """A conv/linear layer's weight bits: ``layer_weight_bits`` (first matching pattern), else the first and
        last layer's, else ``depthwise_weight_bits`` for a depthwise conv, else ``weight_bits``."""
        cfg, name = self.config, self.name_of(node)
        for pattern, bits in cfg.layer_weight_bits.items():
            if fnmatchcase(name, pattern):
                return bits
        if node in self.first_last:
            return cfg.first_last_weight_bits
        depthwise = isinstance(layer, nn.Conv2d) and layer.groups == layer.in_channels > 1
        if depthwise and cfg.depthwise_weight_bits:
            return cfg.depthwise_weight_bits
        return cfg.weight_bits

    def check_layer_patterns(self) -> None:
        """Every ``layer_weight_bits`` pattern names at least one conv/linear layer (a typo is not ignored)."""
        for pattern in self.config.layer_weight_bits:
            if not any(fnmatchcase(name, pattern) for name in self.weight_layer_names):
                raise ValueError(
                    f"layer_weight_bits pattern {pattern!r} matches no conv/linear layer of this model; "
                    f"its layers: {', '.join(self.weight_layer_names)}"
                )

    # -- emission
    def run(self) -> fx.GraphModule:
        self.check_layer_patterns()
        takes_constants = {"conv", "linear", "bn", "lookup", "add", "sub", "mul", "div", "param", "meta", "output"}
        for node in self.gm.graph.nodes:
            if node in self.absorbed:
                continue
            kind = self.kind(node)
            handler = getattr(self, f"emit_{kind}", None) if kind else None
            if handler is None:
                self.unsupported(node)
            elif kind not in takes_constants and any(n in self.constants for n in node.all_input_nodes):
                self.unsupported(node, " (an operand is a parameter or constant tensor)")
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

    def emit_param(self, node: fx.Node) -> None:
        """Parameters and what is computed from them alone: read by the layer that uses them."""

    def emit_meta(self, node: fx.Node) -> None:
        self.env[node] = self.graph.node_copy(node, lambda n: self.env[n] if n in self.env else self.constant(n))

    def emit_float(self, node: fx.Node) -> None:
        """allow_float: copy the op, then requantize its output (a rescale) so the rest stays quantized."""
        if node.op == "call_module":
            self.new_modules[node.target] = self.modules[node.target]
        new = self.graph.node_copy(node, lambda n: self.env[n] if n in self.env else self.constant(n))
        if is_tensor(node):
            q = QActivation(self.quantizer(self.config.act_bits, True), role="rescale")
            new = self.call(f"{node.name}_rescale", q, (new,), unsigned=False)
        self.env[node] = new

    # -- conv / linear / batch norm (modules, subclasses and functional calls on parameters)
    def layer_of(self, node: fx.Node) -> nn.Module | None:
        """The Conv2d / Linear / BatchNorm a node computes: the module itself, or one built from a
        functional call's constant arguments (None when a weight depends on the input)."""
        if node.op == "call_module":
            return self.modules[node.target]
        if node in self.layers:
            return self.layers[node]
        a = arguments(node, self.gm)
        params = {k: self.constant(v) for k, v in a.items() if k != "input"}
        if any(isinstance(v, fx.Node) for v in params.values()):
            return None
        weight, bias = params.get("weight"), params.get("bias")
        layer: nn.Module
        if node.target is F.conv2d:
            groups = int(params.get("groups", 1))
            layer = nn.Conv2d(
                weight.shape[1] * groups,
                weight.shape[0],
                tuple(weight.shape[2:]),
                params.get("stride", 1),
                params.get("padding", 0),
                params.get("dilation", 1),
                groups,
                bias=bias is not None,
            )
        elif node.target is F.linear:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            if params.get("training"):
                return None
            mean = params["running_mean"]
            layer = nn.BatchNorm2d(len(mean), float(params.get("eps", 1e-5)), affine=weight is not None)
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(params["running_var"])
        with torch.no_grad():
            if weight is not None:
                layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        self.layers[node] = layer.eval()
        return layer

    def emit_conv(self, node: fx.Node) -> None:
        layer = self.layer_of(node)
        if layer is None:
            self.unsupported(node, " (its weight is computed from the input; only parameters are supported)")
            return
        self.emit_compute(node, layer)

    emit_linear = emit_conv

    def emit_bn(self, node: fx.Node) -> None:
        """A batch norm with no conv/linear before it: a per-channel scale layer."""
        bn = self.layer_of(node)
        if bn is None:
            self.unsupported(node, " (batch statistics in eval mode, or statistics computed from the input)")
            return
        self.emit_compute(node, None, bn)

    def conv_padding(self, node: fx.Node, layer: nn.Conv2d, src: fx.Node) -> tuple[fx.Node, tuple[int, int]] | None:
        """(input, symmetric padding) of a conv: string padding made explicit (an asymmetric 'same'
        becomes a zero-pad op, as torch pads the extra row/column at the end), folded pads added."""
        if layer.padding_mode != "zeros":
            self.unsupported(node, f" (padding_mode {layer.padding_mode!r}; only zero padding is exact)")
            return None
        kernel, dilation = pair(layer.kernel_size), pair(layer.dilation)
        if layer.padding == "valid":
            padding = (0, 0)
        elif layer.padding == "same":
            total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
            padding = (total[0] // 2, total[1] // 2)
            extra = [t - 2 * p for t, p in zip(total, padding, strict=True)]
            if any(extra):
                src = self.function(F.pad, src, (0, extra[1], 0, extra[0]))
        else:
            padding = pair(layer.padding)
        folded = self.folded_padding.get(node, (0, 0))
        return src, (padding[0] + folded[0], padding[1] + folded[1])

    def emit_compute(self, node: fx.Node, layer: nn.Module | None, bn: nn.Module | None = None) -> None:
        cfg = self.config
        end = node
        src = self.env[node.args[0]]
        if layer is not None:
            user = single_user(node)
            if user is not None and self.kind(user) == "bn" and self.layer_of(user) is not None:
                bn, end = self.layer_of(user), user
                self.absorbed.add(user)
        activation, end = self.fuse_activation(end)
        consumer = single_user(end)
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
                padded = self.conv_padding(node, layer, src)
                if padded is None:
                    return
                src, padding = padded
                conv_args = {
                    "stride": pair(layer.stride),
                    "padding": padding,
                    "dilation": pair(layer.dilation),
                    "groups": int(layer.groups),
                }
            weight_bits = self.weight_bits_of(node, layer)
        quantizers = {
            "weight_q": self.quantizer(weight_bits, True),
            "acc_q": self.quantizer(cfg.accum_bits, True),
            "bias_q": self.quantizer(cfg.accum_bits, True),
            "out_q": out_q,
        }
        module = QCompute(
            kind, weight, bias, copy.deepcopy(bn), activation, quantizers, conv_args, bn_frozen=self.mode == "static"
        )
        if src in self.grid:
            module.input_grid = (self.grid[src],)
        new = self.call(self.name_of(node), module, (src,), unsigned=not out_q.signed)
        chain = node
        while True:  # node -> [bn] -> [relu]: every absorbed node maps to the fused layer
            self.env[chain] = new
            if chain is end:
                break
            chain = single_user(chain)

    # -- activations
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
            self.emit_lookup(node)  # any slope is exact as a lookup table
            return
        x, x_q = self.quantized_input(node.args[0], node, cfg.accum_bits, True, "x")
        prod_q = self.quantizer(cfg.accum_bits, True)
        self.share([x_q, prod_q])
        module = QLeakyReLU(
            float(slope), self.quantizer(cfg.accum_bits, True).freeze(), prod_q, self.quantizer(cfg.act_bits, True)
        )
        self.env[node] = self.call(self.name_of(node), module, (x,), unsigned=False)

    def elementwise(self, node: fx.Node) -> tuple[Elementwise, fx.Node, int] | str:
        """(f, its tensor input, channels) of an element-wise node, or why it is not one."""
        if node.op == "call_module":
            module = copy.deepcopy(self.modules[node.target])
            if hasattr(module, "inplace"):
                module.inplace = False
            src = node.args[0]
            state = list(module.parameters()) + list(module.buffers())
            channels = shape(src)[1] if any(t.numel() > 1 for t in state) and len(shape(src)) > 1 else 0
            return Elementwise(module), src, channels
        args = arguments(node, self.gm)
        args.pop("inplace", None)
        tensors = [k for k, v in args.items() if isinstance(v, fx.Node) and v not in self.constants]
        if len(tensors) != 1 or not is_tensor(args[tensors[0]]):
            return " (an element-wise op needs exactly one non-constant tensor operand)"
        slot_key = tensors[0]
        src = args.pop(slot_key)
        values = {k: self.constant(v) for k, v in args.items()}
        if any(isinstance(v, fx.Node) for v in values.values()):
            return " (an operand is computed at run time)"
        channels = 0
        ndim = len(shape(src))
        for v in values.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                dims = (1,) * (ndim - v.dim()) + tuple(v.shape)
                if v.dim() > ndim or ndim < 2 or any(d != 1 for i, d in enumerate(dims) if i != 1):
                    return f" (constant operand of shape {tuple(v.shape)} varies along more than the channel dim)"
                channels = shape(src)[1]
        target = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
        if slot_key.isdigit():  # positional (operator.* and methods): the tensor's index among the args
            positional = [values.pop(str(i)) for i in range(len(values) + 1) if str(i) in values]
            return Elementwise(target, tuple(positional), values, int(slot_key)), src, channels
        return Elementwise(target, (), values, slot_key), src, channels

    def emit_lookup(self, node: fx.Node) -> None:
        """An element-wise function as an exact table on the input's codes (``QLookup``)."""
        found = self.elementwise(node)
        if isinstance(found, str):
            self.unsupported(node, found)
            return
        fn, src, channels = found
        cfg = self.config
        unsigned_in = self.unsigned.get(self.env[src], False)
        bits = cfg.relu_bits if unsigned_in else cfg.act_bits
        x, q = self.env[src], self.grid.get(self.env[src])
        if q is None or q.bits != bits:  # the table needs the input's grid: read it or requantize onto one
            x, q = self.quantized_input(src, node, bits, not unsigned_in, "x")
        in_q = self.quantizer(bits, not unsigned_in, q.rounding)
        self.share([q, in_q])
        ndim = len(shape(src))
        with torch.no_grad():  # the output is unsigned when f is non-negative on a wide probe
            probe = apply_per_channel(
                fn.float64, torch.linspace(-256.0, 256.0, 4097, dtype=torch.float64), channels, ndim
            )
        unsigned = bool((probe >= 0).all())
        module = QLookup(fn, in_q, self.activation_quantizer(unsigned), channels, ndim)
        self.env[node] = self.call(self.name_of(node), module, (x,), unsigned=unsigned)

    # -- two-tensor arithmetic
    def binary_operands(self, node: fx.Node) -> list[fx.Node] | None:
        """The two tensor operands of an add/sub/mul, or None when one is a constant (a lookup then)."""
        operands = list(node.args[:2])
        extra = {k: v for k, v in node.kwargs.items() if k != "alpha" or v != 1}
        if len(node.args) == 2 and not extra and all(is_tensor(a) and a not in self.constants for a in operands):
            return operands
        return None

    def emit_add(self, node: fx.Node) -> None:
        cfg = self.config
        inputs = self.binary_operands(node)
        if inputs is None:
            self.emit_lookup(node)
            return
        args, group = zip(
            *(self.quantized_input(a, node, cfg.act_bits, True, f"in{i}") for i, a in enumerate(inputs)), strict=True
        )
        self.share(list(group))
        activation, end = self.fuse_activation(node)
        out_q = self.quantizer(cfg.relu_bits, False) if activation != "none" else self.quantizer(cfg.act_bits, True)
        module = QAdd(out_q, activation, subtract=self.kind(node) == "sub")
        new = self.call(self.name_of(node), module, tuple(args), unsigned=activation != "none")
        self.env[node] = self.env[end] = new

    emit_sub = emit_add

    def emit_mul(self, node: fx.Node) -> None:
        """Product of two tensors (SE gating): exponent k_a + k_b, one shift to the output (``QMul``)."""
        inputs = self.binary_operands(node)
        if inputs is None:
            self.emit_lookup(node)
            return
        a, b = (self.env[t] for t in inputs)
        unsigned = self.unsigned.get(a, False) and self.unsigned.get(b, False)
        module = QMul(self.activation_quantizer(unsigned))
        self.env[node] = self.call(self.name_of(node), module, (a, b), unsigned=unsigned)

    def emit_div(self, node: fx.Node) -> None:
        divisor = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        if isinstance(divisor, fx.Node) and divisor not in self.constants:
            self.unsupported(node, " (division by a tensor; only by constants, as a lookup table)")
            return
        self.emit_lookup(node)

    # -- data movement and pooling
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
        new = self.graph.call_function(torch.cat, (list(args), dim % len(shape(node))))
        self.unsigned[new] = unsigned
        self.grid[new] = group[0]
        self.env[node] = new

    def emit_pad(self, node: fx.Node) -> None:
        """Constant zero padding: folded into the following conv when symmetric over H, W, else a pad op."""
        if node.op == "call_module":
            module = self.modules[node.target]
            pads, mode, value = tuple(module.padding), "constant", module.value
        else:
            a = arguments(node, self.gm)
            pads, mode, value = tuple(a["pad"]), a.get("mode", "constant"), a.get("value")
        if mode != "constant" or value not in (None, 0, 0.0) or any(p < 0 for p in pads):
            self.unsupported(node, f" (mode {mode!r}, value {value}: only non-negative zero padding is exact)")
            return
        src = node.args[0]
        user = single_user(node)
        spatial = len(pads) == 4 and pads[0] == pads[1] and pads[2] == pads[3] and len(shape(src)) == 4
        if spatial and user is not None and self.kind(user) == "conv" and user.args[0] is node:
            layer = self.layer_of(user)
            if layer is not None and layer.padding_mode == "zeros":
                self.folded_padding[user] = (int(pads[2]), int(pads[0]))
                self.env[node] = self.env[src]
                return
        self.env[node] = self.function(F.pad, self.env[src], tuple(int(p) for p in pads))

    def emit_upsample(self, node: fx.Node) -> None:
        """Nearest upsampling by integer factors: each pixel repeated (checked against the float op)."""
        src = node.args[0]
        if node.op == "call_module":
            module = self.modules[node.target]
            mode = module.mode

            def reference(t: torch.Tensor) -> torch.Tensor:
                return module(t)
        else:
            a = arguments(node, self.gm)
            mode = a.get("mode", "nearest")
            options = {k: self.constant(v) for k, v in a.items() if k != "input"}

            def reference(t: torch.Tensor) -> torch.Tensor:
                return F.interpolate(t, **options)

        (h, w), (ho, wo) = shape(src)[2:], shape(node)[2:]
        factors = (ho // h, wo // w)
        probe = torch.arange(float(h * w)).reshape(1, 1, h, w)
        if (
            mode != "nearest"
            or ho % h
            or wo % w
            or not torch.equal(reference(probe), upsample_nearest(probe, *factors))
        ):
            self.unsupported(node, f" (mode {mode!r}; only nearest upsampling by integer factors)")
            return
        self.env[node] = self.function(upsample_nearest, self.env[src], *factors)

    def emit_transpose(self, node: fx.Node) -> None:
        src = node.args[0]
        ndim = len(shape(src))
        if node.target in ("transpose", torch.transpose):
            d0, d1 = (int(d) % ndim for d in node.args[1:3])
            perm = list(range(ndim))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        else:
            dims = node.args[1:] if node.op == "call_method" else (node.args[1],)
            dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
            perm = [int(d) % ndim for d in dims]
        self.env[node] = self.function(torch.permute, self.env[src], tuple(perm))

    def emit_split(self, node: fx.Node) -> None:
        """chunk / split: the pieces are read by ``getitem`` as slices along the dim."""
        a = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        dim = int(a) % len(shape(node.args[0]))
        starts, start = [], 0
        for meta in node.meta["tensor_meta"]:
            length = int(meta.shape[dim])
            starts.append((start, length))
            start += length
        self.splits[node] = (dim, starts)

    def emit_getitem(self, node: fx.Node) -> None:
        """A piece of a chunk/split, or basic slicing ``x[:, a:b]`` / ``x[:, i]`` of a tensor."""
        src, index = node.args
        if src in self.splits:
            dim, pieces = self.splits[src]
            start, length = pieces[index]
            self.env[node] = self.function(torch.narrow, self.env[src.args[0]], dim, start, length)
            return
        if not is_tensor(src):
            self.unsupported(node, " (indexing the output of an op that is not a chunk/split)")
            return
        index = index if isinstance(index, tuple) else (index,)
        out = self.env[src]
        for dim, item in enumerate(index):
            size = shape(src)[dim]
            if (
                isinstance(item, slice)
                and item.step in (None, 1)
                and not any(isinstance(v, fx.Node) for v in (item.start, item.stop))
            ):
                start, stop, _ = item.indices(size)
                if (start, stop) != (0, size):
                    out = self.function(torch.narrow, out, dim, start, max(stop - start, 0))
            elif isinstance(item, int):
                out = self.function(torch.narrow, out, dim, item % size, 1)
            else:
                self.unsupported(node, f" (index {item!r}: only slices with step 1 and integers)")
                return
        self.env[node] = out if not any(isinstance(i, int) for i in index) else self.reshape(out, shape(node))

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
        if getattr(pool, "return_indices", False):
            self.unsupported(node, " (return_indices)")
            return
        src = self.env[node.args[0]]
        self.env[node] = self.call(name, copy.deepcopy(pool), (src,), unsigned=self.unsigned.get(src, False))

    def emit_avgpool(self, node: fx.Node) -> None:
        h, w = shape(node.args[0])[2:]
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
            kernel = pair(module.kernel_size)
            stride = pair(module.stride if module.stride is not None else module.kernel_size)
            padding = pair(module.padding)
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
        """Mean over H, W of NCHW: a global avg-pool (then a reshape without keepdim); over other dims
        (never the batch): a sum times the reciprocal weight (``QMean``), floor-rounded as the avg-pool."""
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
        src_shape = shape(node.args[0])
        ndim = len(src_shape)
        dims = sorted({int(d) % ndim for d in ([dims] if isinstance(dims, int) else list(dims or range(ndim)))})
        if 0 in dims:
            self.unsupported(node, " (a mean over the batch dim)")
            return
        if ndim == 4 and dims == [2, 3]:
            pooled = self.avgpool(node, tuple(src_shape[2:]), tuple(src_shape[2:]), (0, 0))
            self.env[node] = pooled if keepdim else self.reshape(pooled, shape(node))
            return
        src = self.env[node.args[0]]
        unsigned = self.unsigned.get(src, False)
        module = QMean(
            tuple(dims),
            keepdim,
            math.prod(src_shape[d] for d in dims),
            self.quantizer(self.config.avgpool_reciprocal_bits, False).freeze(),
            self.quantizer(self.config.act_bits, not unsigned, Rounding.FLOOR),
        )
        self.env[node] = self.call(self.name_of(node), module, (src,), unsigned=unsigned)

    def reshape(self, src: fx.Node, to: tuple[int, ...]) -> fx.Node:
        return self.function(torch.reshape, src, (-1, *to[1:]))

    def emit_reshape(self, node: fx.Node) -> None:
        self.env[node] = self.reshape(self.env[node.args[0]], shape(node))


def _normalize(gm: fx.GraphModule) -> None:
    """Remove dropout/identity/contiguous and collapse concat-of-concat on the same dim (docs/quantization.md)."""
    modules = dict(gm.named_modules())
    constants: dict[fx.Node, Any] = {}
    for node in list(gm.graph.nodes):
        if classify(node, modules, constants) == "identity":
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):
        if classify(node, modules, constants) != "concat":
            continue
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        flat: list[fx.Node] = []
        for t in node.args[0]:
            inner_dim = t.kwargs.get("dim", t.args[1] if len(t.args) > 1 else 0) if isinstance(t, fx.Node) else None
            if classify(t, modules, constants) == "concat" and len(t.users) == 1 and inner_dim == dim:
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
    gm = trace(float_model, example)
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
    their joint data; a group is placed after its last member in execution order. Each quantizer's
    ``calibration`` names the method used (``auto:<winner>`` for ``auto``).
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
        data = torch.cat(samples)
        if method == "auto":
            choice = choose_threshold(data, leader.bits, leader.signed, rounding=leader.rounding)
            log2_t, used = choice.log2_t, f"auto:{choice.method}"
        else:
            log2_t, used = calibrate(data, method, leader.bits, leader.signed, rounding=leader.rounding), method
        leader.set_log2_t(log2_t)
        for _, q in group:
            q.enabled = True
            q.calibration = used
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
    """Fake-quantize a float CNN (docs/fixed-point.md, docs/quantization.md): trace, fold BN, insert and
    share quantizers, calibrate on ``calib_data`` (a tensor of inputs, a Dataset, or an iterable of batches).

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
    "register_elementwise",
]
