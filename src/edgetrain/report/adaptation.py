"""Plots and tables of online-adaptation run logs (``edgetrain adapt`` / ``OnlineTrainer.log()``).

One figure per scenario: online accuracy vs samples and max writes per cell vs samples (log scale),
one line per update rule (LRT v1 Fig. 1 layout), and the accuracy-versus-writes frontier. Writes are
code changes (``edgetrain.nvm``'s ``code-change`` model); the LRT paper's activity count (the
``pulse`` model) appears only in a table column labelled as the paper's metric. The markdown table
lists the final metrics of every run (docs/adaptation.md). File names built from a log's scenario
name are confined to the output folder.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOG_NAME = "log.json"


def load_logs(root: str | Path) -> list[dict[str, Any]]:
    """Every ``log.json`` under ``root`` (sorted by path); a broken file is a clear error."""
    logs = []
    for path in sorted(Path(root).rglob(LOG_NAME)):
        try:
            log = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is not a readable run log: {err}") from err
        if not {"config", "history", "final"} <= set(log):
            raise ValueError(f"{path} is not an adaptation run log (needs config, history and final)")
        logs.append(log)
    if not logs:
        raise FileNotFoundError(f"no {LOG_NAME} run logs under {root}")
    return logs


def rule_label(rule: dict[str, Any]) -> str:
    """A short legend label: "lowrank r4 max-norm", "sgd", "bias-only", ..."""
    name = rule["rule"]
    if name == "lowrank":
        bias = "" if rule.get("unbiased", True) else " biased"
        return f"lowrank r{rule['rank']}{bias} {'max-norm' if rule['max_norm'] else 'no-norm'}"
    if name == "minibatch-sgd":
        return f"minibatch-sgd B{rule['batch']}"
    return name


def safe_file_name(text: str) -> str:
    """``text`` as one file name: letters, digits, ``.``, ``_`` and ``-`` only, no leading dot
    (a scenario name read from a log can never point outside the output folder)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).lstrip(".")
    return name or "stream"


def confined(folder: Path, name: str) -> Path:
    """``folder / safe_file_name(name)``, checked to resolve inside ``folder``."""
    target = (folder / safe_file_name(name)).resolve()
    if target.parent != folder.resolve():
        raise ValueError(f"refusing to write {target}: outside {folder}")
    return target


def scenario_name(log: dict[str, Any]) -> str:
    return str(log["config"]["stream"].get("name", "stream"))


def plot_scenario(logs: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Online accuracy and max writes per cell (code changes, +1, log scale) vs samples, one line per run."""
    fig, (acc_ax, writes_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for log in logs:
        history = log["history"]
        label = rule_label(log["config"]["rule"])
        acc_ax.plot(history["step"], history["online_accuracy"], label=label)
        writes_ax.plot(history["step"], [w + 1 for w in history["max_writes"]], label=label)
    acc_ax.set(xlabel="samples", ylabel="online accuracy (EMA 0.999)", title=title, ylim=(0, 1))
    writes_ax.set(xlabel="samples", ylabel="max writes per cell + 1 (code changes)", yscale="log", title=title)
    for ax in (acc_ax, writes_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8)
    fig.tight_layout()
    target = Path(path)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats: none has accuracy >= and writes <= with one of them strict."""
    return [
        p
        for p in points
        if not any(
            q["accuracy"] >= p["accuracy"]
            and q["writes"] <= p["writes"]
            and (q["accuracy"] > p["accuracy"] or q["writes"] < p["writes"])
            for q in points
        )
    ]


def plot_frontier(panels: dict[str, list[dict[str, Any]]], path: str | Path, title: str) -> Path:
    """Online accuracy vs writes (code changes, log x axis), one panel per axis name in ``panels``
    ("max_writes", "total_writes"); each point a dict with label, accuracy, writes and optional error
    bars accuracy_err, writes_err (one std over seeds). Pareto points are filled and joined, the others
    hollow. Points carry a number (the same label keeps its number in every panel) keyed below the
    panels, so labels of nearby points never overlap."""
    labels = list(dict.fromkeys(p["label"] for points in panels.values() for p in points))
    number = {label: i for i, label in enumerate(labels, 1)}
    columns = 2 * len(panels)
    key_rows = math.ceil(len(labels) / columns)
    height = 4.5 + 0.2 * key_rows
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), height), squeeze=False)
    for ax, (axis, points) in zip(axes[0], panels.items(), strict=True):
        front = pareto_front(points)
        for p in points:
            x = max(p["writes"], 0.5)  # a rule that never writes sits at the left edge
            on_front = p in front
            ax.errorbar(
                x,
                p["accuracy"],
                yerr=p.get("accuracy_err") or None,
                xerr=p.get("writes_err") or None,
                fmt="o",
                mfc=None if on_front else "none",
                color="C3" if on_front else "C0",
                capsize=2,
            )
            ax.annotate(
                str(number[p["label"]]), (x, p["accuracy"]), fontsize=7, xytext=(4, 3), textcoords="offset points"
            )
        line = sorted((max(p["writes"], 0.5), p["accuracy"]) for p in front)
        if line:
            ax.plot(*zip(*line, strict=True), color="C3", alpha=0.5, linewidth=1, label="Pareto front")
            ax.legend(fontsize=8, loc="lower right")
        label = "max writes per cell" if axis == "max_writes" else "total writes"
        ax.set(xscale="log", xlabel=f"{label} (code changes; 0 shown at 0.5)", ylabel="online accuracy", title=title)
        ax.grid(alpha=0.3, which="both")
    key_height = 0.2 * key_rows / height  # figure fraction the key takes at the bottom
    for i, label in enumerate(labels):
        row, column = divmod(i, columns)
        y = key_height - (row + 0.8) * 0.2 / height
        fig.text(0.01 + column / columns, y, f"{i + 1}  {label}", fontsize=7, family="monospace")
    fig.tight_layout(rect=(0, key_height + 0.01, 1, 1))
    target = Path(path)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def frontier_of(logs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Frontier panels (max and total writes) of a set of run logs, one point per run."""
    return {
        axis: [
            {
                "label": rule_label(log["config"]["rule"]),
                "accuracy": log["final"]["online_accuracy"],
                "writes": log["final"][axis],
            }
            for log in logs
        ]
        for axis in ("max_writes", "total_writes")
    }


TABLE_HEADER = (
    "| scenario | rule | samples | online acc | test acc | max writes/cell | total writes | write density "
    "| read energy (uJ) | write energy (uJ) | aux memory (kbit) | max pulses/cell (LRT paper's metric) | samples/s |"
)


def markdown_table(logs: list[dict[str, Any]]) -> str:
    """One row per run: accuracies, code-change writes, energy read and write apart, memory, the
    paper's pulse count, speed."""
    rows = [TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
    for log in sorted(logs, key=lambda g: (scenario_name(g), rule_label(g["config"]["rule"]))):
        f = log["final"]
        test = "-" if f.get("test_accuracy") is None else f"{f['test_accuracy']:.3f}"
        rows.append(
            f"| {scenario_name(log)} | {rule_label(log['config']['rule'])} | {f['samples']} "
            f"| {f['online_accuracy']:.3f} | {test} | {f['max_writes']} | {f['total_writes']} "
            f"| {f['write_density']:.2e} "
            f"| {f['energy_pj']['read'] / 1e6:.1f} | {f['energy_pj']['write'] / 1e6:.3f} "
            f"| {sum(f['aux_memory_bits'].values()) / 1e3:.1f} | {f['pulse_max_writes']} "
            f"| {log.get('timing', {}).get('samples_per_second', math.nan):.1f} |"
        )
    return "\n".join(rows) + "\n"


def render(root: str | Path, out: str | Path | None = None) -> list[Path]:
    """Plots (per scenario: curves and frontier) and ``report.md`` for every run log under ``root``;
    every file lands directly in the output folder, whatever the logs say."""
    logs = load_logs(root)
    target = Path(out) if out is not None else Path(root)
    target.mkdir(parents=True, exist_ok=True)
    by_scenario: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for log in logs:
        by_scenario[scenario_name(log)].append(log)
    files = []
    for name, group in sorted(by_scenario.items()):
        files.append(plot_scenario(group, confined(target, f"adapt_{name}.png"), name))
        files.append(plot_frontier(frontier_of(group), confined(target, f"frontier_{name}.png"), name))
    lines = ["# Online adaptation runs", "", markdown_table(logs)]
    lines += [f"![{p.stem}]({p.name})" for p in files]
    report = target / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return [*files, report]
