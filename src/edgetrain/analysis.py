"""Where a quantized network loses accuracy: per-quantizer error and per-layer recovery (docs/user-guide.md).

For a fake-quantized model (:class:`~edgetrain.graph.QuantizedModel`) and calibration images:

- per quantizer, on its input x over the calibration data (s = 2^exponent, the grid of
  docs/fixed-point.md; q = clip(round(x / s), n, p) s):

  - ``sqnr_db`` = 10 log10(sum x^2 / sum (q(x) - x)^2): the error of this quantizer alone;
  - ``cumulative_sqnr_db``: the same ratio between this quantizer's output in the fake-quantized
    network and the same tensor with every quantizer off (the float network after the graph rewrite,
    BN folded): the error accumulated up to here;
  - ``clipped``: the fraction of inputs with round(x / s) outside [n, p];
  - ``calibrated``: the method that set the threshold in use (``auto:<winner>`` when ``auto`` chose it;
    ``-`` when it was set by hand);
  - ``best``: the candidate threshold ``auto`` calibration picks on that input
    (:func:`~edgetrain.tqt.choose_threshold`: least squared error among kl_j, max, 3sd, percentile,
    mse) and its exponent, beside the exponent in use;

- per layer (every fake-quantized module: conv, linear, add, concat, pool ...), with labelled data:
  the top-1 accuracy with that layer's quantizers switched off (the layer in float, everything else
  quantized) minus the quantized accuracy: how much keeping it in float recovers.

:func:`analyze` returns an :class:`Analysis` (``table()``, ``plot(path)``); :func:`analysis_report`
gives the text table and a PNG path for a report.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetrain.data import Dataset
from edgetrain.fixedpoint import round_tensor
from edgetrain.graph import QuantizedModel
from edgetrain.graph.modules import QuantModule
from edgetrain.graph.quantize import set_bit_exact
from edgetrain.tqt import TQTQuantizer, choose_threshold
from edgetrain.tqt.calibration import sqnr_db
from edgetrain.training import evaluate

BEST_SAMPLE = 1 << 20  # inputs kept per quantizer for the ``best`` column (the first ones seen)


@dataclass
class QuantizerStats:
    """One quantizer's error on the calibration data (module docstring)."""

    name: str
    layer: str
    role: str
    format: str
    exponent: int
    sqnr_db: float
    cumulative_sqnr_db: float
    clipped: float
    calibration: str | None
    best_method: str
    best_exponent: int


@dataclass
class LayerRecovery:
    """Top-1 with one layer kept in float, and the gain over the fully quantized model (points)."""

    layer: str
    accuracy: float
    recovered_pt: float


@dataclass
class Analysis:
    quantizers: list[QuantizerStats]
    layers: list[LayerRecovery] = field(default_factory=list)
    quantized_accuracy: float | None = None
    float_accuracy: float | None = None  # every quantizer off

    def table(self) -> str:
        """Both tables as fixed-width text, worst SQNR first and largest recovery first."""
        header = (
            f"{'quantizer':<36} {'role':<11} {'format':<6} {'exp':>4} {'SQNR dB':>8} {'cumul dB':>8} "
            f"{'clipped':>8}  {'calibrated':<16} best (exp)"
        )
        lines = [header, "-" * len(header)]
        for q in sorted(self.quantizers, key=lambda q: q.sqnr_db):
            lines.append(
                f"{q.name:<36} {q.role:<11} {q.format:<6} {q.exponent:>4} {q.sqnr_db:>8.1f} "
                f"{q.cumulative_sqnr_db:>8.1f} {q.clipped:>8.2%}  {q.calibration or '-':<16} "
                f"{q.best_method} ({q.best_exponent})"
            )
        if self.layers:
            lines += [
                "",
                f"top-1: quantized {100 * self.quantized_accuracy:.2f}%, every quantizer off "
                f"{100 * self.float_accuracy:.2f}%",
                f"{'layer kept in float':<36} {'top-1':>7} {'recovered':>10}",
            ]
            for layer in sorted(self.layers, key=lambda r: -r.recovered_pt):
                lines.append(f"{layer.layer:<36} {100 * layer.accuracy:>6.2f}% {layer.recovered_pt:>+9.2f} pt")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """SQNR (own and cumulative) and clipped fraction per quantizer; recovery per layer. PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        panels = 3 if self.layers else 2
        names = [q.name for q in self.quantizers]
        width = max(8.0, 0.28 * len(names))
        fig, axes = plt.subplots(panels, 1, figsize=(width, 3.2 * panels), constrained_layout=True)
        x = np.arange(len(names))
        finite = [min(v, 99.0) for v in (q.sqnr_db for q in self.quantizers)]
        cumulative = [min(v, 99.0) for v in (q.cumulative_sqnr_db for q in self.quantizers)]
        axes[0].bar(x - 0.2, finite, 0.4, label="this quantizer")
        axes[0].bar(x + 0.2, cumulative, 0.4, label="fake-quant vs float (cumulative)")
        axes[0].set_ylabel("SQNR (dB)")
        axes[0].legend(fontsize=8)
        axes[1].bar(x, [100 * q.clipped for q in self.quantizers], color="tab:red")
        axes[1].set_ylabel("clipped (%)")
        for ax in axes[:2]:
            ax.set_xticks(x, names, rotation=90, fontsize=6)
        if self.layers:
            layers = sorted(self.layers, key=lambda r: -r.recovered_pt)
            axes[2].bar(np.arange(len(layers)), [r.recovered_pt for r in layers], color="tab:green")
            axes[2].set_xticks(np.arange(len(layers)), [r.layer for r in layers], rotation=90, fontsize=6)
            axes[2].set_ylabel("top-1 recovered (pt)")
            axes[2].set_title("each layer kept in float", fontsize=9)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _quantizers(qmodel: QuantizedModel) -> list[tuple[str, str, str, TQTQuantizer]]:
    """(name, layer, role, quantizer) in graph order."""
    rows = []
    for layer, module in qmodel.net.named_modules():
        if isinstance(module, QuantModule):
            for attr, role in module.quantizer_roles().items():
                rows.append((f"{layer}.{attr}", layer, role, getattr(module, attr)))
    return rows


@contextmanager
def _switched_off(quantizers: list[TQTQuantizer]) -> Iterator[None]:
    states = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q, state in zip(quantizers, states, strict=True):
            q.enabled = state


class _Accumulator:
    """Running sums of one quantizer: signal and error powers, clipped count, a sample for ``best``."""

    def __init__(self) -> None:
        self.signal = self.error = self.cumulative_signal = self.cumulative_error = 0.0
        self.clipped = self.count = 0
        self.sample: list[torch.Tensor] = []
        self.kept = 0

    def add(self, quantizer: TQTQuantizer, x: torch.Tensor, out: torch.Tensor, reference: torch.Tensor) -> None:
        x, out, reference = x.detach().double(), out.detach().double(), reference.double()
        fmt = quantizer.format
        codes = round_tensor(x / quantizer.scale, quantizer.rounding)
        self.signal += float((x * x).sum())
        self.error += float(((out - x) ** 2).sum())
        self.cumulative_signal += float((reference * reference).sum())
        self.cumulative_error += float(((out - reference) ** 2).sum())
        self.clipped += int(((codes < fmt.qmin) | (codes > fmt.qmax)).sum())
        self.count += x.numel()
        if self.kept < BEST_SAMPLE:
            flat = x.reshape(-1)[: BEST_SAMPLE - self.kept]
            self.sample.append(flat)
            self.kept += flat.numel()


@torch.no_grad()
def quantizer_stats(qmodel: QuantizedModel, images: torch.Tensor, batch_size: int = 256) -> list[QuantizerStats]:
    """Per quantizer SQNR (own, cumulative), clipped fraction and ``auto``'s pick (module docstring)."""
    rows = _quantizers(qmodel)
    quantizers = [q for _, _, _, q in rows]
    sums = {id(q): _Accumulator() for q in quantizers}
    was_training = qmodel.training
    qmodel.eval()
    set_bit_exact(qmodel, False)
    float_outputs: dict[int, torch.Tensor] = {}

    def record_float(module: nn.Module, _: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        float_outputs[id(module)] = out.detach()

    def record_quantized(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if id(module) in float_outputs:  # a quantizer called twice in one pass is scored on its first call
            sums[id(module)].add(module, inputs[0], out, float_outputs.pop(id(module)))

    try:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            hooks = [q.register_forward_hook(record_float) for q in quantizers]
            with _switched_off(quantizers):
                qmodel(batch)
            for h in hooks:
                h.remove()
            hooks = [q.register_forward_hook(record_quantized) for q in quantizers]
            qmodel(batch)
            for h in hooks:
                h.remove()
            float_outputs.clear()
    finally:
        set_bit_exact(qmodel, True)
        qmodel.train(was_training)
    stats = []
    for name, layer, role, q in rows:
        acc = sums[id(q)]
        if acc.count == 0:
            continue  # not called as a module (fused into another op): nothing to measure here
        choice = choose_threshold(torch.cat(acc.sample), q.bits, q.signed, rounding=q.rounding)
        stats.append(
            QuantizerStats(
                name=name,
                layer=layer,
                role=role,
                format=f"{'int' if q.signed else 'uint'}{q.bits}",
                exponent=q.exponent,
                sqnr_db=sqnr_db(acc.signal, acc.error),
                cumulative_sqnr_db=sqnr_db(acc.cumulative_signal, acc.cumulative_error),
                clipped=acc.clipped / acc.count,
                calibration=q.calibration,
                best_method=choice.method,
                best_exponent=q.format.exponent(choice.log2_t),
            )
        )
    return stats


@torch.no_grad()
def layer_recovery(qmodel: QuantizedModel, data: Dataset) -> tuple[list[LayerRecovery], float, float]:
    """(per layer: top-1 with that layer in float, gain in points), quantized top-1, all-float top-1."""
    rows = _quantizers(qmodel)
    by_layer: dict[str, list[TQTQuantizer]] = {}
    for _, layer, _, q in rows:
        by_layer.setdefault(layer, []).append(q)
    set_bit_exact(qmodel, False)
    try:
        quantized = evaluate(qmodel, data)
        with _switched_off([q for _, _, _, q in rows]):
            all_float = evaluate(qmodel, data)
        recovery = []
        for layer, quantizers in by_layer.items():
            with _switched_off(quantizers):
                accuracy = evaluate(qmodel, data)
            recovery.append(LayerRecovery(layer, accuracy, 100 * (accuracy - quantized)))
    finally:
        set_bit_exact(qmodel, True)
    return recovery, quantized, all_float


def analyze(qmodel: QuantizedModel, calib_images: torch.Tensor, data: Dataset | None = None) -> Analysis:
    """Quantizer statistics on ``calib_images``; with labelled ``data`` also the per-layer recovery."""
    analysis = Analysis(quantizer_stats(qmodel, calib_images))
    if data is not None:
        analysis.layers, analysis.quantized_accuracy, analysis.float_accuracy = layer_recovery(qmodel, data)
    return analysis


def analysis_report(
    qmodel: QuantizedModel, calib_images: torch.Tensor, data: Dataset | None, png: str | Path
) -> tuple[str, Path]:
    """The analysis as (text table, PNG path) for a report."""
    analysis = analyze(qmodel, calib_images, data)
    return analysis.table(), analysis.plot(png)


__all__ = [
    "Analysis",
    "LayerRecovery",
    "QuantizerStats",
    "analysis_report",
    "analyze",
    "layer_recovery",
    "quantizer_stats",
]
