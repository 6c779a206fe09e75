"""Deploy a TQT-quantized model onto the device model of :mod:`edgetrain.adapt`.

The device network (:class:`~edgetrain.adapt.QNet`) takes the TQT-calibrated formats layer by layer,
in the LRT paper's layout: the folded (BN-merged) weights are stored in [-1, 1) on the weight
quantizer's bit-width, times the power-of-2 multiplier ``wmult = 2^ceil(log2 t_w)`` (the TQT
threshold; the same integer codes as the exported program), so the paper's learning rates keep
their meaning; the bias and accumulator sit on the int16 accumulator grid, ReLU outputs on the
output quantizer's grid, the input on the input quantizer's grid.
Supported: sequential nets of conv / linear (+ folded BN) / ReLU / max-pool / flatten, the shape of
the LRT paper's net and of ``mnistnet``.
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn

from edgetrain.adapt import Grid, LayerFormats, QNet, quantize_for_adaptation
from edgetrain.graph import QuantizedModel
from edgetrain.graph.modules import QActivation, QCompute
from edgetrain.tqt import TQTQuantizer

FLATTENING = ("flatten", "reshape", "view")


def grid_of(quantizer: TQTQuantizer) -> Grid:
    """The fixed grid of a quantizer: its bits, sign and power-of-2 threshold ceil(log2_t)."""
    return Grid(quantizer.bits, quantizer.signed, int(math.ceil(float(quantizer.log2_t.detach()))))


def _unsupported(node: fx.Node, what: str) -> ValueError:
    return ValueError(
        f"cannot deploy node {node.name!r} ({what}) for on-device adaptation: the device model supports "
        "sequential conv/linear (+BN), ReLU, max-pool and flatten only"
    )


@torch.no_grad()
def qnet_from_quantized(qmodel: QuantizedModel, bn_batch: int = 10) -> QNet:
    """Build the device network that adapts, from an (eval-mode) TQT ``QuantizedModel``."""
    qmodel = qmodel.eval()
    modules = dict(qmodel.net.named_modules())
    layers: list[tuple[str, nn.Module]] = []
    formats: dict[str, LayerFormats] = {}
    input_grid: Grid | None = None
    for node in qmodel.net.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        target_name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if node.op in ("call_function", "call_method") and target_name in FLATTENING:
            layers.append(("", nn.Flatten()))  # the graph pass turns Flatten into a reshape to N x features
            continue
        if node.op != "call_module":
            raise _unsupported(node, f"{node.op} {getattr(node.target, '__name__', node.target)}")
        module = modules[node.target]
        if isinstance(module, QActivation) and module.role == "input" and input_grid is None:
            input_grid = grid_of(module.out_q)
        elif isinstance(module, QCompute) and module.kind != "scale" and module.activation in ("none", "relu"):
            weight, bias, _ = module.folded()
            if module.kind == "conv":
                out_channels, in_channels, kh, kw = weight.shape
                float_layer: nn.Module = nn.Conv2d(in_channels, out_channels, (kh, kw), **module.conv_args)
            else:
                float_layer = nn.Linear(weight.shape[1], weight.shape[0])
            float_layer.weight.copy_(weight)
            float_layer.bias.copy_(bias)
            name = str(node.target).replace(".", "_")
            layers.append((name, float_layer))
            if module.activation == "relu":
                layers.append((f"{name}_relu", nn.ReLU()))
            accumulator = grid_of(module.acc_q)
            weight_grid = grid_of(module.weight_q)
            formats[name] = LayerFormats(
                weight=Grid(weight_grid.bits, weight_grid.signed, 0),
                bias=accumulator,
                acc=accumulator,
                act=grid_of(module.out_q),
                wmult_log2=weight_grid.log2_t,
            )
        elif isinstance(module, nn.MaxPool2d):
            layers.append(("", module))
        elif isinstance(module, nn.Flatten | nn.Identity | nn.Dropout):
            layers.append(("", nn.Flatten()) if isinstance(module, nn.Flatten) else ("", nn.Identity()))
        else:
            raise _unsupported(node, type(module).__name__)
    if input_grid is None:
        raise ValueError("the quantized model has no input quantizer")
    sequential = nn.Sequential()
    for i, (name, layer) in enumerate(layers):
        sequential.add_module(name or f"op{i}", layer)
    return quantize_for_adaptation(sequential, formats, input_grid=input_grid, bn_batch=bn_batch)
