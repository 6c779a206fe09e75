"""What holding the pretrained net costs in writes under drift: an oracle refresh at a write budget.

    .venv/bin/python bench/bench_refresh_bound.py                       # paper net, analog drift, 100k
    .venv/bin/python bench/bench_refresh_bound.py --samples 20000 --multiples 1,all

Issue 11's paper-scale analog target asks a LowRank rule for the LRT paper's online accuracy (0.722)
with <= 1/3 of SR-SGD's total and <= 1/10 of its max writes per cell. This bench asks what an oracle
that no device has would hold within such budgets: no learning at all, but after every drift event it
re-writes, in each weight layer, the ``ceil(f n)`` cells farthest from their pretrained codes (largest
|code - code_0|, ties by index) back to their pretrained codes, skipping cells whose write count has
reached the endurance governor's line ``floor(M t / T)`` (M the max-writes bound, t the sample, T the
stream's length). ``f`` is sized so that the total writes equal a multiple of the bound:
f = multiple x (SR-SGD total / 3) / (cells x drift events); ``--multiples`` lists them, ``all``
re-writes every drifted cell at every event (no bound: the ceiling of refreshing).

Read it as a bound on refreshing, not on learning: a rule that only restores cells cannot beat the
oracle at the same budget, but a learning rule may find other good weights nearer the drifted ones.
SR-SGD's counts come from ``bench/results/writes-paper.json`` (the same drift and net recipe); the
writes are code changes (``edgetrain.nvm``). Writes ``bench/results/refresh-bound.json`` and ``.md``
and the plot ``docs/img/refresh_bound.png`` (the oracle's curves beside the paper-scale runs of
writes-paper.json); ``--render`` redraws the table and plot from the JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_lrt import SCALES, pretrained  # noqa: E402
from bench_writes import PAPER_ACCURACY, PAPER_SAMPLES, drifted  # noqa: E402

from edgetrain.adapt import OnlineTrainer, make_rule  # noqa: E402
from edgetrain.adapt.qnet import QNet  # noqa: E402
from edgetrain.adapt.scenarios import make_scenario  # noqa: E402
from edgetrain.atomic import write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PLOT = ROOT / "docs" / "img" / "refresh_bound.png"
BASELINE = "sgd-sr"  # the write bounds are fractions of this rule's counts (writes-paper.json)
CHECKPOINTS = 10  # accuracy recorded at every tenth of the stream


class OracleRefreshTrainer(OnlineTrainer):
    """Inference only, plus an oracle refresh after every drift event (module docstring): per layer the
    ``ceil(fraction n)`` cells farthest from their pretrained codes are re-written to them, each only
    while its write count is below ``floor(write_cap t / samples)`` (``write_cap`` None: no cap)."""

    def __init__(
        self, net: QNet, stream: Any, fraction: float, write_cap: int | None, samples: int, **kwargs: Any
    ) -> None:
        super().__init__(net, make_rule("inference"), stream, **kwargs)
        self.fraction, self.write_cap, self.samples = fraction, write_cap, samples
        self.pretrained_codes = {name: array.codes.copy() for name, array in self.arrays.items()}

    def _drift(self, step: int) -> None:
        super()._drift(step)
        spec = self.stream.drift
        if spec is None or step % spec.period:
            return
        line = None if self.write_cap is None else math.floor(self.write_cap * (step + 1) / self.samples)
        for layer in self.net.weight_layers:
            array, target = self.arrays[layer.name], self.pretrained_codes[layer.name]
            cells = refresh_cells(array.codes, target, array.write_counts, self.fraction, line)
            if cells.size:
                new = array.codes.copy()
                new.flat[cells] = target.flat[cells]
                array.write(new)
                layer.set_codes(array.codes, cells)


def refresh_cells(
    codes: np.ndarray, target: np.ndarray, write_counts: np.ndarray, fraction: float, line: int | None
) -> np.ndarray:
    """Flat indices of the at most ``ceil(fraction n)`` cells with the largest |codes - target| > 0
    whose write count is below ``line`` (None: any); ties at the cut as ``np.argpartition`` breaks them."""
    distance = np.abs(codes - target).ravel()
    if line is not None:
        distance = np.where(write_counts.ravel() < line, distance, 0)
    k = min(math.ceil(fraction * distance.size), int(np.count_nonzero(distance)))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    return np.argpartition(-distance, k - 1)[:k]


def bounds(drift: str) -> dict[str, float]:
    """The issue's write bounds for ``drift``: 1/10 of SR-SGD's max and 1/3 of its total writes per
    cell at 100k samples, from its seed-0 paper-scale run in writes-paper.json."""
    path = RESULTS / "writes-paper.json"
    if not path.exists():
        raise SystemExit(f"{path} missing: run `python bench/bench_writes.py --scale paper --points {BASELINE}` first")
    row = json.loads(path.read_text())["results"][drift][BASELINE]
    seed0 = row["per_seed"]["0"]
    if seed0["samples"] != PAPER_SAMPLES:
        raise SystemExit(f"{BASELINE} seed 0 under {drift} reached {seed0['samples']} samples, not {PAPER_SAMPLES}")
    return {"max_writes": seed0["max_writes"] / 10, "total_writes": seed0["total_writes"] / 3}


def run_point(net: QNet, drift: str, multiple: float | None, samples: int, limits: dict[str, float]) -> dict[str, Any]:
    """One oracle run: ``multiple`` x the total-writes bound (None: every drifted cell, no cap)."""
    stream = drifted(make_scenario(drift, "mnist", samples, seed=0), drift)
    cells = sum(layer.weight.numel() for layer in net.weight_layers)
    events = math.ceil(samples / stream.drift.period)
    scale = samples / PAPER_SAMPLES  # the bounds are for 100k samples; a shorter stream gets its share
    if multiple is None:
        fraction, cap = 1.0, None
    else:
        fraction = multiple * limits["total_writes"] * scale / (cells * events)
        cap = math.floor(limits["max_writes"] * scale)
    trainer = OracleRefreshTrainer(
        copy.deepcopy(net), stream, fraction, cap, samples, seed=0, test_samples=1000, log_every=max(samples // 200, 10)
    )
    curve = []
    for stop in range(samples // CHECKPOINTS, samples + 1, samples // CHECKPOINTS):
        log = trainer.run(stop)
        curve.append([stop, trainer.online_accuracy])
        print(
            f"{drift} oracle refresh {'all' if multiple is None else f'{multiple:g}x'} (f = {fraction:.5f}): "
            f"{stop} samples, online {trainer.online_accuracy:.3f}, max writes {trainer.max_writes}, "
            f"total {trainer.total_writes}, {log['timing']['samples_per_second']:.0f}/s",
            flush=True,
        )
    final = log["final"]
    return {
        "multiple": multiple,
        "fraction": fraction,
        "max_writes_cap": cap,
        "online_accuracy": final["online_accuracy"],
        "test_accuracy": final.get("test_accuracy"),
        "max_writes": final["max_writes"],
        "total_writes": final["total_writes"],
        "curve": curve,
    }


def markdown(data: dict[str, Any]) -> str:
    b, drift = data["bounds"], data["drift"]
    lines = [
        f"## Refreshing the pretrained net under {drift}: an oracle's accuracy at a write budget",
        "",
        f"{data['net']}; {data['samples']} samples of the {drift} stream (seed 0), no learning. After every "
        "drift event an oracle (which knows every cell's pretrained code: no device does) re-writes in each "
        "layer the f-fraction of cells farthest from their pretrained codes back to them, each cell at most "
        f"on the governor's line of {b['max_writes']:.0f} writes by 100k samples (issue 11's max bound: "
        f"1/10 of SR-SGD's {b['max_writes_sgd']:.0f}). f is sized for a multiple of issue 11's total bound "
        f"(1/3 of SR-SGD's {b['total_writes_sgd']:.3g} writes; scaled to the stream's length). A rule that "
        "only restores cells cannot beat this at the same budget; a learning rule may find other good "
        "weights, so this is evidence on the budget, not a bound on learning.",
        "",
        "| writes allowed (total) | f per event | online acc at 10% / 50% / end | max writes | total writes |"
        f" vs the paper's {data['paper_accuracy']} |",
        "|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        label = "every drifted cell, no cap" if row["multiple"] is None else f"{row['multiple']:g}x the bound"
        curve = dict((int(s), a) for s, a in row["curve"])
        steps = sorted(curve)
        marks = " / ".join(f"{curve[s]:.3f}" for s in (steps[0], steps[len(steps) // 2 - 1], steps[-1]))
        gap = row["online_accuracy"] - data["paper_accuracy"]
        lines.append(
            f"| {label} | {row['fraction']:.4%} | {marks} | {row['max_writes']} | {row['total_writes']:.3g} "
            f"| {gap:+.3f} |"
        )
    figure = "![oracle refresh against the learning rules](img/refresh_bound.png)"
    lines += ["", figure, "", "```bash", data["command"], "```", ""]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> Path:
    """Online accuracy against samples: the oracle at each budget, the paper-scale runs of the same
    drift in writes-paper.json (their max / total writes in the legend) and the paper's bar."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row in data["rows"]:
        steps, accuracy = zip(*row["curve"], strict=True)
        budget = "no bound" if row["multiple"] is None else f"{row['multiple']:g}x the total bound"
        label = f"oracle refresh, {budget} ({row['max_writes']} max / {row['total_writes']:.2g} total)"
        ax.plot(steps, accuracy, "--", marker="o", markersize=3, label=label)
    table = json.loads((RESULTS / "writes-paper.json").read_text())["results"].get(data["drift"], {})
    for point, row in table.items():
        history = row["history"]
        label = f"{point} ({row['max_writes']['mean']:.0f} max / {row['total_writes']['mean']:.2g} total)"
        ax.plot(history["step"], history["online_accuracy"], label=label)
    ax.axhline(data["paper_accuracy"], color="k", lw=0.8, ls=":", label=f"LRT paper at 100k ({data['paper_accuracy']})")
    ax.set(xlabel="samples", ylabel="online accuracy (EMA)", ylim=(0, 1), title=f"{data['drift']}, paper-width net")
    ax.legend(fontsize=6.5, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(data: dict[str, Any]) -> None:
    write_json_atomic(RESULTS / "refresh-bound.json", data)
    write_text_atomic(RESULTS / "refresh-bound.md", markdown(data))
    plot(data, PLOT)
    print(markdown(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drift", default="analog-drift", choices=tuple(PAPER_ACCURACY))
    parser.add_argument("--samples", type=int, default=PAPER_SAMPLES)
    parser.add_argument("--multiples", default="1,0.3,0.1", help="multiples of the total-writes bound; all: no bound")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render", action="store_true", help="only redraw the table and plot from the JSON")
    args = parser.parse_args()
    if args.render:
        write_outputs(json.loads((RESULTS / "refresh-bound.json").read_text()))
        return
    torch.set_num_threads(args.threads)
    limits = bounds(args.drift)
    net, meta = pretrained("paper", SCALES["paper"])
    rows = [
        run_point(net, args.drift, None if m == "all" else float(m), args.samples, limits)
        for m in args.multiples.split(",")
    ]
    validation = meta["info"]["val_accuracy"]
    data = {
        "recorded_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch threads {args.threads}",
        "command": shlex.join([".venv/bin/python", "bench/bench_refresh_bound.py", *sys.argv[1:]]),
        "net": f"LRT CNN {SCALES['paper'].spec}, bench_lrt's paper-scale net (validation {validation:.4f})",
        "drift": args.drift,
        "samples": args.samples,
        "paper_accuracy": PAPER_ACCURACY[args.drift],
        "bounds": {
            "max_writes": limits["max_writes"],
            "total_writes": limits["total_writes"],
            "max_writes_sgd": limits["max_writes"] * 10,
            "total_writes_sgd": limits["total_writes"] * 3,
        },
        "rows": rows,
    }
    write_outputs(data)


if __name__ == "__main__":
    main()
