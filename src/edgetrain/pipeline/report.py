"""The pipeline report: accuracy through the stages, the quantizers, threshold training, adaptation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from edgetrain.pipeline.config import PipelineConfig
from edgetrain.report import Report
from edgetrain.report.adaptation import frontier_of, plot_frontier, plot_scenario

SHIFT_KIND_NAMES = {
    "CD": "class clustering (each class arrives in runs)",
    "ST": "random scale, rotation and shift",
    "BG": "background contrast, offset and gradient",
    "WN": "white noise",
}
LINE_STYLES = ("-", "--", ":", "-.")


def _accuracy_rows(summary: dict[str, Any]) -> list[list[Any]]:
    quantize, export = summary["quantize"], summary["export"]
    rows = [
        ["float (FP32)", f"{summary['pretrain']['test_accuracy']:.4f}", ""],
        ["fake-quant, static calibration", f"{quantize['static_accuracy']:.4f}", ""],
    ]
    if quantize.get("retrained"):
        rows.append(
            [
                "fake-quant, TQT retrained",
                f"{quantize['retrained_accuracy']:.4f}",
                f"best after {quantize['retrain_best_epoch']:.2f} epochs",
            ]
        )
    rows.append(
        [
            "integer program",
            f"{export['integer_accuracy']:.4f}",
            f"{export['integer_mismatches']} mismatching outputs of {export['verified_samples']}",
        ]
    )
    if "onnx_agreement" in export:
        accuracy = f"{export['onnx_accuracy']:.4f}" if "onnx_accuracy" in export else ""
        rows.append(["ONNX (onnxruntime)", accuracy, f"top-1 identical on {export['onnx_agreement']:.2%}"])
    return rows


def _threshold_figure(history: dict[str, Any]) -> plt.Figure:
    """One line per quantizer: a distinct colour (tab20) and line style per line, the legend beside
    the axes with every line in it."""
    lines = history["values"]
    columns = max(1, math.ceil(len(lines) / 24))
    fig, ax = plt.subplots(figsize=(9 + 2.2 * columns, 4.5))
    colours = plt.get_cmap("tab20")
    for i, (name, values) in enumerate(lines.items()):
        ax.plot(
            history["steps"],
            values,
            linewidth=1.2,
            color=colours(i % 20),
            linestyle=LINE_STYLES[(i // 20) % len(LINE_STYLES)],
            label=name.removeprefix("net.").removesuffix(".log2_t"),
        )
    ax.set(xlabel="retraining step", ylabel="log2 t (threshold = 2^ceil)", title="Threshold evolution (TQT)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=columns, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def _describe_scenario(scenario: dict[str, Any]) -> str:
    parts = [
        f"{scenario.get('name')} on {scenario.get('dataset')} (elastic-deformed stream), "
        f"{scenario.get('samples')} samples"
    ]
    blocks = scenario.get("blocks") or []
    if len(blocks) > 1:
        parts.append("shift blocks " + ", ".join(f"{b['start']}: {'+'.join(b['kinds']) or 'none'}" for b in blocks))
        kinds = sorted({kind for b in blocks for kind in b["kinds"]}, key=list(SHIFT_KIND_NAMES).index)
        parts.append("where " + ", ".join(f"{kind} = {SHIFT_KIND_NAMES[kind]}" for kind in kinds))
    drift = scenario.get("drift")
    if drift:
        rate = f"bit-flip p = {drift['p']:.1e}" if drift["kind"] == "digital" else f"sigma = {drift['sigma']:.3g}"
        parts.append(f"{drift['kind']} drift every {drift['period']} samples ({rate})")
    return "; ".join(parts)


def _lifetime(samples: float) -> str:
    return "no writes" if samples is None or math.isinf(samples) else f"{samples:.3g} samples"


def write_report(summary: dict[str, Any], config: PipelineConfig, out: Path) -> tuple[Path, Path]:
    """``report.md`` + self-contained ``report.html`` (+ PNGs) in ``out/report``."""
    folder = out / "report"
    report = Report(f"edgetrain: {config.model.import_path or config.model.name} on {config.data.dataset}")
    report.paragraph(
        "The whole life of the network: float pretraining, TQT quantization (power-of-2 per-tensor scales, "
        "trained log2 thresholds), the exported integer program checked bit for bit, and on-device "
        "adaptation of the deployed weights in simulated NVM."
    )
    report.heading("Accuracy through the pipeline")
    images = summary.get("test_images")
    if images is not None:
        subset = " (a subset of the test split: [data] test_samples)" if config.data.test_samples else ""
        report.paragraph(f"Test accuracy on {images} test images{subset}.")
    report.table(["model", "test accuracy", "note"], _accuracy_rows(summary))

    quantize = summary["quantize"]
    report.heading("Quantizers")
    report.paragraph("Every tensor is int_b x 2^exponent; quantizers in one group share one threshold.")
    report.table(
        ["quantizer", "role", "format", "exponent", "log2 t", "shared group"],
        [
            [
                q["name"].removeprefix("net."),
                q["role"],
                f"{'int' if q['signed'] else 'uint'}{q['bits']}",
                q["exponent"],
                f"{q['log2_t']:.3f}",
                q["group"] or "",
            ]
            for q in quantize["quantizers"]
        ],
    )
    if quantize.get("threshold_history"):
        fig = _threshold_figure(quantize["threshold_history"])
        report.figure(fig, "log2 thresholds during TQT retraining (Adam, lr 1e-2, staircase decay)")
        plt.close(fig)

    if "adapt" in summary:
        adapt = summary["adapt"]
        scenario = adapt["scenario"]
        report.heading("On-device adaptation")
        report.paragraph(
            f"Scenario: {_describe_scenario(scenario)}. Each sample is predicted first, then learned "
            "from (batch size 1); weights change only through NVM writes."
        )
        logs = [json.loads((out / "adapt" / rule / "log.json").read_text()) for rule in adapt["rules"]]
        drift = scenario.get("drift") or {}
        title = str(scenario.get("name", "stream")) + (f" + {drift['kind']} drift" if drift.get("kind") else "")
        png = plot_scenario(logs, out / "adapt" / "adaptation.png", title)
        report.image(png, "Online accuracy and max writes per cell (code changes) vs samples, one line per update rule")
        frontier = plot_frontier(frontier_of(logs), out / "adapt" / "frontier.png", title)
        report.image(frontier, "Online accuracy against max and total writes (code changes); Pareto points filled")
        report.paragraph(
            "Writes count code changes: a cell whose stored code changes at an update event (a digital NVM "
            "with program-and-verify). Write density and the projected lifetime use the same count. The last "
            "but one column is the LRT paper's activity metric (every non-zero applied update a programming "
            "pulse, conv SGD updates applied pixel by pixel), shown only to compare with the paper. Energy is "
            "split: reads (one full read of every weight per sample, the same for every rule) dominate; "
            "writes are what the rules change."
        )
        report.table(
            [
                "rule",
                "online acc",
                f"test acc ({config.adapt.test_samples} imgs)",
                "max writes/cell",
                "total writes",
                "write density",
                "read energy (uJ)",
                "write energy (uJ)",
                "aux memory (kbit)",
                "projected NVM lifetime",
                "max pulses/cell (LRT paper's metric)",
                "samples/s",
            ],
            [
                [
                    rule,
                    f"{r['online_accuracy']:.3f}",
                    f"{r['test_accuracy']:.3f}",
                    r["max_writes"],
                    r["total_writes"],
                    f"{r['write_density']:.2e}",
                    f"{r['energy_pj']['read'] / 1e6:.1f}",
                    f"{r['energy_pj']['write'] / 1e6:.3f}",
                    f"{sum(r['aux_memory_bits'].values()) / 1e3:.1f}",
                    _lifetime(r["projected_lifetime_samples"]),
                    r["pulse_max_writes"],
                    f"{r['samples_per_second']:.0f}",
                ]
                for rule, r in adapt["rules"].items()
            ],
        )
    report.heading("Reproduce")
    report.code(summary["command"], "bash")
    report.code(config.to_toml(), "toml")
    return report.write(folder)
