"""What the graph pass sees: tracing, op classification, constant folding and the element-wise registry.

``trace(model)`` runs torch.fx with a tracer that keeps torch.nn's leaf modules, and also keeps as
leaves the subclasses of Conv2d / Linear / BatchNorm that do not override ``forward`` (so they match by
behaviour, not by exact type); a subclass with its own ``forward`` is traced through and reaches the
pass as ``F.conv2d`` / ``F.linear`` / ``F.batch_norm`` on ``get_attr`` parameters. Stack traces are
recorded per op, so an unsupported op is reported with the line of the user's source.

``classify(node)`` names the rule of docs/quantization.md that handles a node. Element-wise functions
of one tensor (sigmoid, hard-swish, GELU, ..., ``x + 3``, ``torch.clamp``) become exact lookup
tables (``QLookup``); :func:`register_elementwise` adds a user's own function, method or module type.
"""

from __future__ import annotations

import functools
import linecache
import operator
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx import _symbolic_trace
from torch.fx.passes.shape_prop import TensorMetadata

BATCHNORM = nn.modules.batchnorm._BatchNorm

# element-wise functions of one tensor: exact lookup tables on 8-bit codes (docs/quantization.md)
ELEMENTWISE_FUNCTIONS: set[Any] = {
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.hardsigmoid,
    F.silu,
    F.hardswish,
    F.gelu,
    F.elu,
    F.selu,
    F.celu,
    F.softplus,
    F.mish,
    F.hardtanh,
    F.prelu,
    F.logsigmoid,
    torch.clamp,
    torch.clip,
    torch.abs,
    torch.neg,
    torch.exp,
    torch.erf,
    torch.square,
}
ELEMENTWISE_METHODS: set[str] = {
    "sigmoid",
    "tanh",
    "clamp",
    "clip",
    "clamp_min",
    "clamp_max",
    "abs",
    "neg",
    "exp",
    "erf",
    "square",
}
ELEMENTWISE_MODULES: list[type[nn.Module]] = [
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardsigmoid,
    nn.SiLU,
    nn.Hardswish,
    nn.GELU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.Mish,
    nn.Hardtanh,
    nn.PReLU,
    nn.LogSigmoid,
]


def register_elementwise(target: Any) -> Any:
    """Quantize ``target`` as an exact lookup table (docs/quantization.md): a function of one tensor
    (other arguments constant), a ``torch.Tensor`` method name, or an ``nn.Module`` subclass whose
    forward is element-wise (per channel at most). Its float derivative trains through it.

    Use it as a decorator on a function: the returned wrapper is what the tracer records as one op
    (a plain Python function would otherwise be traced through, op by op).
    """
    if isinstance(target, str):
        ELEMENTWISE_METHODS.add(target)
        return target
    if isinstance(target, type) and issubclass(target, nn.Module):
        if target not in ELEMENTWISE_MODULES:
            ELEMENTWISE_MODULES.append(target)
        return target
    if not callable(target):
        raise TypeError(f"register_elementwise takes a function, a method name or a module type, got {target!r}")

    @functools.wraps(target)
    def traced(*args: Any, **kwargs: Any) -> Any:
        proxy = next((a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)), None)
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", traced, args, kwargs)
        return target(*args, **kwargs)

    ELEMENTWISE_FUNCTIONS.update((target, traced))
    return traced


FUNCTION_KINDS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    F.leaky_relu: "leaky",
    operator.add: "add",
    torch.add: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    operator.mul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    torch.div: "div",
    torch.cat: "concat",
    torch.concat: "concat",
    F.max_pool2d: "maxpool",
    F.avg_pool2d: "avgpool",
    F.adaptive_avg_pool2d: "avgpool",
    torch.flatten: "reshape",
    torch.reshape: "reshape",
    torch.squeeze: "reshape",
    torch.unsqueeze: "reshape",
    F.dropout: "identity",
    torch.mean: "mean",
    F.pad: "pad",
    F.interpolate: "upsample",
    torch.permute: "transpose",
    torch.transpose: "transpose",
    torch.chunk: "split",
    torch.split: "split",
    operator.getitem: "getitem",
    F.conv2d: "conv",
    F.linear: "linear",
    F.batch_norm: "bn",
}
METHOD_KINDS = {
    "relu": "relu",
    "flatten": "reshape",
    "view": "reshape",
    "reshape": "reshape",
    "squeeze": "reshape",
    "unsqueeze": "reshape",
    "mean": "mean",
    "add": "add",
    "sub": "sub",
    "mul": "mul",
    "div": "div",
    "permute": "transpose",
    "transpose": "transpose",
    "chunk": "split",
    "split": "split",
    "contiguous": "identity",
}
MODULE_KINDS: tuple[tuple[type[nn.Module], str], ...] = (  # checked in order with isinstance
    (nn.Conv2d, "conv"),
    (nn.Linear, "linear"),
    (BATCHNORM, "bn"),
    (nn.ReLU, "relu"),
    (nn.ReLU6, "relu6"),  # before Hardtanh, its base class
    (nn.LeakyReLU, "leaky"),
    (nn.MaxPool2d, "maxpool"),
    (nn.AvgPool2d, "avgpool"),
    (nn.AdaptiveAvgPool2d, "avgpool"),
    (nn.Flatten, "reshape"),
    (nn.modules.dropout._DropoutNd, "identity"),
    (nn.Identity, "identity"),
    (nn.modules.padding._ConstantPadNd, "pad"),
    (nn.Upsample, "upsample"),
)
BASE_FORWARDS = {nn.Conv2d: ("forward", "_conv_forward"), nn.Linear: ("forward",), BATCHNORM: ("forward",)}


@contextmanager
def _untraced_modules() -> Iterator[None]:
    """Module calls and attribute reads as outside tracing (fx patches both while it traces)."""
    patched = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = _symbolic_trace._orig_module_call, _symbolic_trace._orig_module_getattr
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched


class Tracer(fx.Tracer):
    """torch.fx tracer: torch.nn leaves, plus Conv2d/Linear/BatchNorm subclasses that keep the base
    forward and registered element-wise module types; records the user's source line of every op.

    It also runs the example input through every op as it traces, so control flow on shapes in a
    forward (``assert x.dim() == 4``, ``if x.shape[1] != 3: raise ...``) takes the branch the example takes.
    """

    def __init__(self, example: torch.Tensor) -> None:
        super().__init__()
        self.example = example.detach().clone()  # in-place ops in the forward must not touch the caller's tensor
        self.values: dict[fx.Node, Any] = {}

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **options: Any) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **options)
        node = proxy.node
        node.meta["source"] = _caller()
        with torch.no_grad(), _untraced_modules():
            if kind == "placeholder":
                self.values[node] = self.example
            elif all(self.value(n) is not None for n in node.all_input_nodes):
                try:  # best effort: only control flow on a value that could not be computed fails
                    self.values[node] = self.evaluate(node)
                except Exception:  # noqa: BLE001 - any op may refuse; fx's own error comes at to_bool
                    pass
        return proxy

    def evaluate(self, node: fx.Node) -> Any:
        a, k = fx.map_arg((node.args, node.kwargs), self.value)
        if node.op == "get_attr":
            return self.value(node)
        if node.op == "call_function":
            return node.target(*a, **k)
        if node.op == "call_method":
            return getattr(a[0], node.target)(*a[1:], **k)
        return self.root.get_submodule(node.target)(*a, **k)

    def value(self, node: fx.Node) -> Any:
        """The example's value at ``node`` (buffers and constants enter the graph as ``get_attr`` nodes)."""
        if node not in self.values and node.op == "get_attr":
            self.values[node] = functools.reduce(getattr, node.target.split("."), self.root)
        return self.values.get(node)

    def to_bool(self, obj: fx.Proxy) -> bool:
        if obj.node not in self.values:
            return super().to_bool(obj)
        return bool(self.values[obj.node])

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        for base, methods in BASE_FORWARDS.items():
            if isinstance(m, base) and all(getattr(type(m), f) is getattr(base, f) for f in methods):
                return True
        if isinstance(m, tuple(ELEMENTWISE_MODULES)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """The fx graph of ``model`` (eval mode), traced with ``example`` as its input (see :class:`Tracer`)."""
    tracer = Tracer(example)
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


# ----------------------------------------------------------------------------------------------
# node helpers


def is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("tensor_meta"), TensorMetadata)


def _holds_tensor(meta: Any) -> bool:
    if isinstance(meta, TensorMetadata):
        return True
    if isinstance(meta, (tuple, list)):
        return any(_holds_tensor(m) for m in meta)
    if isinstance(meta, dict):
        return any(_holds_tensor(m) for m in meta.values())
    return False


def shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def constant_values(gm: fx.GraphModule) -> dict[fx.Node, Any]:
    """Nodes computed from parameters and buffers only (``get_attr`` and what follows from them alone,
    e.g. a standardized weight), evaluated once: the pass treats them as constants."""
    modules = dict(gm.named_modules())
    values: dict[fx.Node, Any] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                values[node] = functools.reduce(getattr, node.target.split("."), gm)
                continue
            inputs = node.all_input_nodes
            if node.op not in ("call_function", "call_method", "call_module") or not inputs:
                continue
            if not all(n in values for n in inputs):
                continue
            args, kwargs = fx.map_arg((node.args, node.kwargs), lambda n: values[n])
            if node.op == "call_function":
                values[node] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                values[node] = modules[node.target](*args, **kwargs)
    return values


def classify(node: fx.Node, modules: dict[str, nn.Module], constants: dict[fx.Node, Any]) -> str | None:
    """The rule that handles ``node``: 'param' for constants, 'meta' for non-tensor helpers
    (``x.size(0)``), 'lookup' for element-wise functions, None if unsupported."""
    if node.op in ("placeholder", "output"):
        return node.op
    if node in constants:
        return "param"
    if node.op == "call_module":
        module = modules[node.target]
        for cls, kind in MODULE_KINDS:
            if isinstance(module, cls):
                return kind
        return "lookup" if isinstance(module, tuple(ELEMENTWISE_MODULES)) else None
    if not _holds_tensor(node.meta.get("tensor_meta")):
        return "meta"
    if node.op == "call_function":
        kind = FUNCTION_KINDS.get(node.target)
        return kind or ("lookup" if node.target in ELEMENTWISE_FUNCTIONS else None)
    if node.op == "call_method":
        kind = METHOD_KINDS.get(node.target)
        return kind or ("lookup" if node.target in ELEMENTWISE_METHODS else None)
    return None


def _caller() -> str:
    """``file:line: code`` of the innermost frame outside torch and this file: the user's line that
    made the op being traced."""
    frame = sys._getframe(1)
    while frame is not None and ("/torch/" in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return ""
    code = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f"{frame.f_code.co_filename}:{frame.f_lineno}: {code}"


def source_line(node: fx.Node) -> str:
    """Where the user's source created ``node`` (empty when unknown)."""
    return node.meta.get("source", "")


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The op, the module path in the user's model and, when known, the source line."""
    if node.op == "call_module":
        text = f"{type(modules[node.target]).__name__} module '{node.target}'"
    else:
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        stack = node.meta.get("nn_module_stack") or {}
        owner = next(reversed(stack.values()))[0] if stack else "<top level>"
        text = f"{node.op} '{target}' (node '{node.name}' in module '{owner}')"
    where = source_line(node)
    return f"{text} at {where}" if where else text


def single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


SIGNATURES: dict[Any, tuple[str, ...]] = {  # torch's overloads make fx's normalization ambiguous for these
    F.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.linear: ("input", "weight", "bias"),
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
}


def arguments(node: fx.Node, gm: fx.GraphModule) -> dict[str, Any]:
    """The call's arguments by name (torch's signature), or positional as ``{"0": ..}`` when unknown."""
    if node.target in SIGNATURES:
        return dict(zip(SIGNATURES[node.target], node.args, strict=False)) | dict(node.kwargs)
    try:
        normalized = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    except (RuntimeError, ValueError, TypeError):
        normalized = None
    if normalized is not None:
        return dict(normalized.kwargs)
    return {str(i): a for i, a in enumerate(node.args)} | dict(node.kwargs)
