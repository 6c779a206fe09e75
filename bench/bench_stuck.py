"""Accuracy versus the fraction of stuck-at NVM cells: LowRank against inference only.

    .venv/bin/python bench/bench_stuck.py --samples 3000 --seeds 0,1,2     # runs, then JSON, table, plot
    .venv/bin/python bench/bench_stuck.py --collect                         # only summarize the logs on disk

The LRT paper's CNN at bench_lrt's quick scale (narrow net pretrained quantized-in-the-loop on
elastic MNIST, cached under ``runs/lrt-bench/``) is deployed into the simulated NVM with a fraction
f of its weight cells stuck at a value drawn uniformly from the code range (``edgetrain.nvm``'s
``uniform`` stuck model: a stuck cell neither keeps its trained value nor accepts writes), f in
{0, 1, 5, 20} %, and then runs predict-then-learn on the control stream (the pretraining
distribution, no drift, so the stuck cells are the only fault). Per run: the test accuracy of the
faulty net before the stream, the online accuracy over the stream, the test accuracy at its end and
the writes (code changes). Inference only shows what the faults cost; LowRank shows how much on-device
learning around the stuck cells wins back. Each run's log goes to
``runs/stuck-bench/<rule>/f<percent>/seed<k>/log.json`` (a finished run is reused), the summary
(mean and spread over the seeds) to ``bench/results/stuck.json`` and ``stuck.md``, the plot to
``bench/results/stuck.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_lrt import SCALES, pretrained  # noqa: E402

from edgetrain.adapt import OnlineTrainer, make_rule  # noqa: E402
from edgetrain.adapt.scenarios import make_scenario  # noqa: E402
from edgetrain.atomic import write_json_atomic  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "runs" / "stuck-bench"
FRACTIONS = (0.0, 0.01, 0.05, 0.2)
RULES = ("inference", "lowrank")
STUCK_MODEL = "uniform"
SCENARIO = "control"


def run_dir(rule: str, fraction: float, seed: int) -> Path:
    return RUNS / rule / f"f{fraction * 100:g}" / f"seed{seed}"


def run_point(net: Any, rule: str, fraction: float, seed: int, samples: int, test_samples: int) -> dict[str, Any]:
    """One run (reused when its log already covers ``samples``); ``log["before_test_accuracy"]``: the
    faulty net's test accuracy before the first sample."""
    log_path = run_dir(rule, fraction, seed) / "log.json"
    if log_path.exists():
        log = json.loads(log_path.read_text())
        if log["final"]["samples"] == samples:
            return log
    stream = make_scenario(SCENARIO, "mnist", samples, seed=seed)
    trainer = OnlineTrainer(
        copy.deepcopy(net),
        make_rule(rule, {}),
        stream,
        seed=seed,
        test_samples=test_samples,
        stuck_fraction=fraction,
        stuck_model=STUCK_MODEL,
    )
    before = trainer.test_accuracy()
    log = trainer.run(samples)
    log["before_test_accuracy"] = before
    log_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(log_path, log)
    final = log["final"]
    print(
        f"{rule} stuck {fraction:.0%} seed {seed}: test before {before:.3f}, online {final['online_accuracy']:.3f}, "
        f"test after {final['test_accuracy']:.3f}, max writes {final['max_writes']}, "
        f"{log['timing']['samples_per_second']:.1f} samples/s",
        flush=True,
    )
    return log


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def collect(samples: int) -> dict[str, dict[str, Any]]:
    """Per rule and stuck fraction: mean +- std over the seeds on disk at ``samples`` samples."""
    results: dict[str, dict[str, Any]] = {}
    for rule in RULES:
        for fraction in FRACTIONS:
            logs = [json.loads(p.read_text()) for p in sorted(run_dir(rule, fraction, 0).parent.glob("seed*/log.json"))]
            logs = [log for log in logs if log["final"]["samples"] == samples]
            if not logs:
                continue
            finals = [log["final"] for log in logs]
            results.setdefault(rule, {})[f"{fraction:g}"] = {
                "stuck_fraction": fraction,
                "seeds": len(logs),
                "test_samples": logs[0]["config"]["test_samples"],
                "stuck_cells": logs[0]["config"]["nvm"]["stuck_cells"],
                "before_test_accuracy": spread([log["before_test_accuracy"] for log in logs]),
                "online_accuracy": spread([f["online_accuracy"] for f in finals]),
                "test_accuracy": spread([f["test_accuracy"] for f in finals]),
                "max_writes": spread([f["max_writes"] for f in finals]),
                "total_writes": spread([f["total_writes"] for f in finals]),
                "samples_per_second": statistics.median(log["timing"]["samples_per_second"] for log in logs),
            }
    return results


def pm(value: dict[str, float]) -> str:
    return f"{value['mean']:.3f} ± {value['std']:.3f}"


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Test accuracy after the stream, one line per rule, and before it (dashed, grey: the same faulty
    net for both rules) vs stuck fraction."""
    fig, ax = plt.subplots(figsize=(6, 4.2))

    def line(rows: dict[str, Any], key: str, style: str, color: str, label: str) -> None:
        points = sorted(rows.values(), key=lambda row: row["stuck_fraction"])
        x = [100 * row["stuck_fraction"] for row in points]
        mean, err = [row[key]["mean"] for row in points], [row[key]["std"] for row in points]
        ax.errorbar(x, mean, yerr=err, fmt=style, color=color, capsize=2, label=label)

    for index, (rule, rows) in enumerate(results.items()):
        line(rows, "test_accuracy", "-o", f"C{index}", f"{rule}, after the stream")
    if results:
        line(next(iter(results.values())), "before_test_accuracy", "--", "grey", "before the stream (both rules)")
    ax.set(xscale="symlog", xlabel="stuck cells (% of weight cells, symlog axis)", ylabel="test accuracy", title=title)
    ax.set_xticks([100 * f for f in FRACTIONS], [f"{100 * f:g}" for f in FRACTIONS])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(results: dict[str, dict[str, Any]]) -> str:
    """What the faults cost inference only, what LowRank wins back at the largest fraction run by both,
    and where LowRank loses to inference only."""
    shared = sorted(set(results.get("inference", {})) & set(results.get("lowrank", {})), key=float)
    if not shared:
        return "no fraction was run for both rules"
    test = {rule: {f: results[rule][f]["test_accuracy"]["mean"] for f in shared} for rule in RULES}
    worst = shared[-1]
    inference = results["inference"][worst]
    clean = results["inference"].get("0", inference)["test_accuracy"]["mean"]
    text = (
        f"with {float(worst):.0%} of the cells stuck, inference only scores {test['inference'][worst]:.3f} test "
        f"accuracy (fault-free: {clean:.3f}; {inference['before_test_accuracy']['mean']:.3f} before the stream: its "
        "streaming batch-norm statistics, which follow the input, recover part of the loss); LowRank, learning "
        f"on the device around the stuck cells, reaches {test['lowrank'][worst]:.3f} "
        f"({test['lowrank'][worst] - test['inference'][worst]:+.3f}) with at most "
        f"{results['lowrank'][worst]['max_writes']['mean']:.0f} writes per cell"
    )
    behind = [f for f in shared if test["lowrank"][f] < test["inference"][f]]
    if behind:
        gaps = ", ".join(f"{float(f):.0%} ({test['lowrank'][f] - test['inference'][f]:+.3f})" for f in behind)
        text += (
            f". With {gaps} of the cells stuck LowRank ends below inference only: on the stream the net was "
            "trained for, with few faults, learning adds more noise than it repairs"
        )
    return text


def markdown(data: dict[str, Any]) -> str:
    rows = [row for by_fraction in data["results"].values() for row in by_fraction.values()]
    seeds = "/".join(str(n) for n in sorted({row["seeds"] for row in rows})) or "0"
    test_samples = "/".join(str(n) for n in sorted({row["test_samples"] for row in rows})) or "no"
    lines = [
        "## Accuracy vs stuck-at cells",
        "",
        f"{data['net']} on the {SCENARIO} stream (elastic MNIST, no drift), {data['samples']} samples, "
        f"{seeds} seeds per point; a fraction of every layer's weight cells is stuck at a code drawn uniformly "
        f"from the code range ({STUCK_MODEL} model: not the trained value; a stuck cell takes no writes). Test "
        f"accuracy on {test_samples} test images, before and after the stream; mean ± std over the seeds; writes are "
        "code changes.",
        "",
        "| rule | stuck | stuck cells | test acc before | online acc | test acc after | max writes/cell "
        "| total writes | samples/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rule, rows in data["results"].items():
        for row in sorted(rows.values(), key=lambda r: r["stuck_fraction"]):
            lines.append(
                f"| {rule} | {row['stuck_fraction']:.0%} | {row['stuck_cells']} | {pm(row['before_test_accuracy'])} "
                f"| {pm(row['online_accuracy'])} | {pm(row['test_accuracy'])} | {row['max_writes']['mean']:.0f} "
                f"| {row['total_writes']['mean']:.0f} | {row['samples_per_second']:.0f} |"
            )
    lines += ["", "![accuracy vs stuck cells](../bench/results/stuck.png)", "", f"Verdict: {data['verdict']}.", ""]
    lines += [f"Command: `{command}`" for command in data["commands"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS))
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--collect", action="store_true", help="only summarize the run logs on disk")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    command = " ".join([".venv/bin/python bench/bench_stuck.py", *sys.argv[1:]])
    if not args.collect:
        net, _ = pretrained("quick", SCALES["quick"])
        for seed in seeds:
            for fraction in (float(f) for f in args.fractions.split(",")):
                for rule in args.rules.split(","):
                    run_point(net, rule, fraction, seed, args.samples, args.test_samples)
    path = RESULTS / "stuck.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    results = collect(args.samples)
    data = {
        "recorded_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch threads {args.threads}",
        "net": f"LRT CNN {SCALES['quick'].spec}",
        "samples": args.samples,
        "results": results,
        "verdict": verdict(results),
        "commands": [c for c in previous.get("commands", []) if c != command] + [command],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, RESULTS / "stuck.png", f"LRT CNN (quick), {args.samples} samples, control stream")
    write_json_atomic(path, data)
    (RESULTS / "stuck.md").write_text(markdown(data))
    print(f"wrote {path}, stuck.md and stuck.png", flush=True)


if __name__ == "__main__":
    main()
