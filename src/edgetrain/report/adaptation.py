"""Plots and tables of online-adaptation run logs (``edgetrain adapt`` / ``OnlineTrainer.log()``).

One figure per scenario: online accuracy vs samples and max writes per cell vs samples (log scale),
one line per update rule (LRT v1 Fig. 1 layout). The markdown table lists the final metrics of
every run (docs/adaptation.md).
"""

from __future__ import annotations

import json
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


def scenario_name(log: dict[str, Any]) -> str:
    return str(log["config"]["stream"].get("name", "stream"))


def plot_scenario(logs: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Online accuracy and max writes (+1, log scale) vs samples, one line per run."""
    fig, (acc_ax, writes_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for log in logs:
        history = log["history"]
        label = rule_label(log["config"]["rule"])
        acc_ax.plot(history["step"], history["online_accuracy"], label=label)
        writes_ax.plot(history["step"], [w + 1 for w in history["max_writes_paper"]], label=label)
    acc_ax.set(xlabel="samples", ylabel="online accuracy (EMA 0.999)", title=title, ylim=(0, 1))
    writes_ax.set(xlabel="samples", ylabel="max # writes per cell + 1", yscale="log", title=title)
    for ax in (acc_ax, writes_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8)
    fig.tight_layout()
    target = Path(path)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def markdown_table(logs: list[dict[str, Any]]) -> str:
    """One row per run: scenario, rule, samples, accuracies, writes, density, energy, memory, speed."""
    rows = [
        "| scenario | rule | samples | online acc | test acc | max writes | write density | energy (uJ) "
        "| aux memory (kbit) | samples/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for log in sorted(logs, key=lambda g: (scenario_name(g), rule_label(g["config"]["rule"]))):
        f = log["final"]
        test = "-" if f.get("test_accuracy") is None else f"{f['test_accuracy']:.3f}"
        rows.append(
            f"| {scenario_name(log)} | {rule_label(log['config']['rule'])} | {f['samples']} "
            f"| {f['online_accuracy']:.3f} | {test} | {f['max_writes_paper']} | {f['write_density']:.2e} "
            f"| {f['energy_pj']['total'] / 1e6:.1f} | {sum(f['aux_memory_bits'].values()) / 1e3:.1f} "
            f"| {log.get('timing', {}).get('samples_per_second', float('nan')):.1f} |"
        )
    return "\n".join(rows) + "\n"


def render(root: str | Path, out: str | Path | None = None) -> list[Path]:
    """Plots (one PNG per scenario) and ``report.md`` for every run log under ``root``."""
    logs = load_logs(root)
    target = Path(out) if out is not None else Path(root)
    target.mkdir(parents=True, exist_ok=True)
    by_scenario: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for log in logs:
        by_scenario[scenario_name(log)].append(log)
    files = [plot_scenario(group, target / f"adapt_{name}.png", name) for name, group in sorted(by_scenario.items())]
    lines = ["# Online adaptation runs", "", markdown_table(logs)]
    lines += [f"![{p.stem}]({p.name})" for p in files]
    report = target / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return [*files, report]
