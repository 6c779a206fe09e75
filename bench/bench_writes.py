"""The accuracy-versus-endurance frontier: update rules and their write-cutting knobs under drift.

    .venv/bin/python bench/bench_writes.py --samples 4000 --seeds 0            # one seed per point
    .venv/bin/python bench/bench_writes.py --samples 4000 --seeds 0,1,2 --points sgd-sr,lowrank
    .venv/bin/python bench/bench_writes.py --mechanism --samples 1000 --points lowrank,sgd-sr  # every event
    .venv/bin/python bench/bench_writes.py --collect                           # JSON, table, plots from the logs
    .venv/bin/python bench/bench_writes.py --samples 2000 --points lowrank-gov-f5-ef   # an exploration screen
    .venv/bin/python bench/bench_writes.py --scale paper --drifts analog-drift --points sgd-sr  # 100k, resumable
    .venv/bin/python bench/bench_writes.py --scale paper --collect   # paper-scale JSON and table, partial runs too
    .venv/bin/python bench/bench_writes.py --layer-drift --drifts digital-drift --seeds 0  # where drift hurts

The LRT paper's CNN at bench_lrt's quick scale (narrow net pretrained quantized-in-the-loop on elastic
MNIST), predict-then-learn on the analog-drift and digital-drift streams; digital drift at the
authors' strength (``flip_draw="binomial2"``, docs/adaptation.md). Every point is one rule with its
options; writes are code changes (``edgetrain.nvm``, the ``code-change`` model), the ``pulse``
count is kept beside it. Each run's log goes to ``runs/writes-bench/<drift>/<point>/seed<k>/``
(a finished run is reused), the summary to ``bench/results/writes.json`` and ``writes.md`` (mean and
spread over the seeds run), the frontier plots to ``docs/img/writes_<drift>.png``. ``--mechanism``
records what every update event writes (cells changed, |dW_q| and |x| in LSBs; :func:`mechanism`).
Runs of another length than the quick scale's 4000 samples are exploration screens: their logs go to
``seed<k>-n<samples>/``, their summary to ``writes-n<samples>.json`` only, shown below the quick-scale
table in ``writes.md``. ``--scale paper``: the paper's full-width net (bench_lrt's paper scale, pretrained
on first use) on 100k-sample streams, checkpointed every ``PAPER_CHECKPOINT`` samples and resumed from
the checkpoint when restarted (logs under ``runs/writes-bench/paper/``); its summary goes to
``writes-paper.json``, runs stopped early included with the sample count they reached (``--net``: adapt
that model file instead). ``--layer-drift``: inference-only runs with the drift acting on one layer group
alone (``DRIFTED_LAYERS``), to see which layers' damage learning has to repair (``writes-layers.json``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_lrt import SCALES, pretrained  # noqa: E402

from edgetrain.adapt import OnlineTrainer, make_rule  # noqa: E402
from edgetrain.adapt.pretrain import load_for_adaptation  # noqa: E402
from edgetrain.adapt.scenarios import make_scenario  # noqa: E402
from edgetrain.atomic import write_json_atomic  # noqa: E402
from edgetrain.report.adaptation import pareto_front, plot_frontier  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "runs" / "writes-bench"
IMAGES = ROOT / "docs" / "img"
MECHANISMS = RUNS / "mechanism"  # one JSON per point: every update event of a recorded run
# --layer-drift: inference-only runs with the drift on these layers alone (which layers' damage costs accuracy)
DRIFTED_LAYERS = {
    "none": (),
    "all": ("conv1", "conv2", "conv3", "conv4", "fc1", "fc2"),
    "conv1": ("conv1",),
    "conv2-4": ("conv2", "conv3", "conv4"),
    "fc1": ("fc1",),
    "fc2": ("fc2",),
}
CONFIRMING_SEEDS = 3  # the target counts as met only on the mean of this many seeds
QUICK_SAMPLES = 4000  # the quick scale of the frontier table; other lengths are exploration runs
PAPER_SAMPLES = 100_000  # the paper scale (the LRT paper's Fig. 1 streams)
DRIFTS = {"analog-drift": {}, "digital-drift": {"flip_draw": "binomial2"}}
# budget floor(E t / T) = 0.01 writes per cell after t samples: 40 at 4000, 1000 at the paper's 100k
GOVERNOR = {"endurance": 1e6, "lifetime_samples": 1e8}
# the paper-scale LowRank point, sized for the write bounds before any paper-scale run (see POINTS)
PAPER_GOVERNOR = {
    "endurance": 4e5,
    "lifetime_samples": 1e8,
    "write_fraction": 0.004,
    "rho_min": 0.001,
    "lr": 0.02,
    "bias_lr": 0.01,
}
# the stop-24 budgets sized to SR-SGD's seed-0 paper-scale counts (POINTS f1.2): the governor at a tenth of its
# max (analog 8730 -> 850, digital 5996 -> 550), events of 1.2% of a layer's cells, 4-bit token counters
PAPER_F12 = {**PAPER_GOVERNOR, "write_fraction": 0.012, "governor_burst": 15}
PAPER_F12_ANALOG = {**PAPER_F12, "endurance": 8.5e5}
PAPER_F12_DIGITAL = {**PAPER_F12, "endurance": 5.5e5}
PAPER_CHECKPOINT = 5000  # samples between checkpoints (and partial logs) of a paper-scale run
PAPER_ACCURACY = {"analog-drift": 0.722, "digital-drift": 0.850}  # the LRT paper's Fig. 1 at 100k samples
# point name -> (rule, options); the knobs of issue 11 beside the fair baselines
POINTS: dict[str, tuple[str, dict[str, Any]]] = {
    "inference": ("inference", {}),
    "bias-only": ("bias-only", {}),
    "sgd": ("sgd", {}),
    "sgd-sr": ("sgd-sr", {}),
    "sgd-sr-lr0.003": ("sgd-sr", {"lr": 0.003}),
    "minibatch-sgd-B10": ("minibatch-sgd", {"batch": 10}),
    "lowrank": ("lowrank", {}),
    "lowrank-sr": ("lowrank", {"rounding": "stochastic"}),
    "lowrank-th1-ef": ("lowrank", {"write_threshold": 1.0, "error_feedback": True}),
    "lowrank-th2-ef": ("lowrank", {"write_threshold": 2.0, "error_feedback": True}),
    "lowrank-th3-ef": ("lowrank", {"write_threshold": 3.0, "error_feedback": True}),
    "lowrank-Bconv50": ("lowrank", {"batch_conv": 50}),
    "lowrank-gov": ("lowrank", GOVERNOR),
    "lowrank-gov-th1-ef": (
        "lowrank",
        {"endurance": 1e6, "lifetime_samples": 1e8, "write_threshold": 1.0, "error_feedback": True},
    ),
    # smaller steps: stochastic rounding makes a sub-LSB update write ~|x| cells on average, and the
    # longer periods B cut the events (writes ~ lr / sqrt(B) at a fixed step direction)
    "lowrank-sr-lr0.001": ("lowrank", {"rounding": "stochastic", "lr": 0.001}),
    "lowrank-sr-lr0.001-B50-400": (
        "lowrank",
        {"rounding": "stochastic", "lr": 0.001, "batch_conv": 50, "batch_fc": 400},
    ),
    "lowrank-sr-lr0.002-B50-400": (
        "lowrank",
        {"rounding": "stochastic", "lr": 0.002, "batch_conv": 50, "batch_fc": 400},
    ),
    # sparse events: each event writes only the largest-|x| f of a layer's cells; with the governor
    # (max writes) the total is capped near f x cells x events whatever the update's size. With error
    # feedback the unwritten rest is fed back (better at 2000 samples, worse at 4000: a stale backlog)
    "lowrank-gov-f5-ef": ("lowrank", {**GOVERNOR, "write_fraction": 0.05, "error_feedback": True}),
    "lowrank-gov-f5-ef-lr0.02": ("lowrank", {**GOVERNOR, "write_fraction": 0.05, "error_feedback": True, "lr": 0.02}),
    "lowrank-gov-f7-ef": ("lowrank", {**GOVERNOR, "write_fraction": 0.07, "error_feedback": True}),
    "lowrank-gov-f10-ef": ("lowrank", {**GOVERNOR, "write_fraction": 0.1, "error_feedback": True}),
    "lowrank-gov-f7": ("lowrank", {**GOVERNOR, "write_fraction": 0.07}),
    "lowrank-gov-f10": ("lowrank", {**GOVERNOR, "write_fraction": 0.1}),
    # larger weight steps on the few cells written (lr), the bias/BN steps at the default rate (bias_lr)
    "lowrank-gov-f3-lr0.02-blr0.01": ("lowrank", {**GOVERNOR, "write_fraction": 0.03, "lr": 0.02, "bias_lr": 0.01}),
    "lowrank-gov-f5-lr0.02-blr0.01": ("lowrank", {**GOVERNOR, "write_fraction": 0.05, "lr": 0.02, "bias_lr": 0.01}),
    "lowrank-gov-f7-lr0.02-blr0.01": ("lowrank", {**GOVERNOR, "write_fraction": 0.07, "lr": 0.02, "bias_lr": 0.01}),
    "lowrank-gov-f7-lr0.02-blr0.005": ("lowrank", {**GOVERNOR, "write_fraction": 0.07, "lr": 0.02, "bias_lr": 0.005}),
    "lowrank-gov-f7-blr0.02": ("lowrank", {**GOVERNOR, "write_fraction": 0.07, "bias_lr": 0.02}),
    # digital-drift screens (session 18): step size, bias/BN rate, FC period, rank around f5-lr0.02-blr0.01
    "lowrank-gov-f5-lr0.03-blr0.01": ("lowrank", {**GOVERNOR, "write_fraction": 0.05, "lr": 0.03, "bias_lr": 0.01}),
    "lowrank-gov-f5-lr0.02-blr0.02": ("lowrank", {**GOVERNOR, "write_fraction": 0.05, "lr": 0.02, "bias_lr": 0.02}),
    "lowrank-gov-f5-lr0.02-blr0.01-Bfc50": (
        "lowrank",
        {**GOVERNOR, "write_fraction": 0.05, "lr": 0.02, "bias_lr": 0.01, "batch_fc": 50},
    ),
    "lowrank-gov-f5-lr0.02-blr0.01-r8": (
        "lowrank",
        {**GOVERNOR, "write_fraction": 0.05, "lr": 0.02, "bias_lr": 0.01, "rank": 8},
    ),
    # FC layers get more of the write budget: SR-SGD writes ~12 per fc1 cell in 4000 samples, f5 ~2
    "lowrank-gov-f5-ffc10-lr0.02-blr0.01": (
        "lowrank",
        {**GOVERNOR, "write_fraction": 0.05, "write_fraction_fc": 0.1, "lr": 0.02, "bias_lr": 0.01},
    ),
    "lowrank-gov-f3-ffc10-lr0.02-blr0.01": (
        "lowrank",
        {**GOVERNOR, "write_fraction": 0.03, "write_fraction_fc": 0.1, "lr": 0.02, "bias_lr": 0.01},
    ),
    # conv-side knobs: under digital drift conv2-4 hold most of the damage (--layer-drift, BENCHMARKS.md)
    "lowrank-gov-f5-lr0.02-blr0.01-biased": (
        "lowrank",
        {**GOVERNOR, "write_fraction": 0.05, "lr": 0.02, "bias_lr": 0.01, "unbiased": False},
    ),
    "lowrank-gov-f2.5-ffc5-lr0.02-blr0.01-Bconv5": (  # twice the conv events, half the cells each
        "lowrank",
        {**GOVERNOR, "write_fraction": 0.025, "write_fraction_fc": 0.05, "lr": 0.02, "bias_lr": 0.01, "batch_conv": 5},
    ),
    "lowrank-gov-f2.5-ffc5-lr0.02-blr0.01-Bconv5-burst15": (  # the same with 4-bit token counters (governor_burst)
        "lowrank",
        {
            **GOVERNOR,
            "write_fraction": 0.025,
            "write_fraction_fc": 0.05,
            "lr": 0.02,
            "bias_lr": 0.01,
            "batch_conv": 5,
            "governor_burst": 15,
        },
    ),
    "lowrank-gov-f1.5-ffc5-lr0.02-blr0.01-Bconv3": (  # ~3x the conv events, ~a third of the cells each
        "lowrank",
        {**GOVERNOR, "write_fraction": 0.015, "write_fraction_fc": 0.05, "lr": 0.02, "bias_lr": 0.01, "batch_conv": 3},
    ),
    # paper width: SR-SGD's per-sample steps are further below an LSB, so it writes far less per cell than at
    # quick width; the write bounds then need much sparser events and a tighter governor (0.004 writes per
    # cell and sample: 20 by 5000 samples); rho_min must stay below the fraction
    "lowrank-gov0.004-f0.4-lr0.02-blr0.01": ("lowrank", PAPER_GOVERNOR),
    # the same with the governor's 4-bit token counters (governor_burst = 15) instead of 19-bit lifetime
    # counters: ~6 instead of 29 Mbit of auxiliary memory at paper width
    "lowrank-gov0.004-f0.4-lr0.02-blr0.01-burst15": ("lowrank", {**PAPER_GOVERNOR, "governor_burst": 15}),
    # sized after the paper-scale analog SR-SGD run (seed 0: 8730 max, 2.75e8 total writes): the governor at a
    # tenth of its max (0.0085 x 100k = 850) and events of 1.2% of a layer's cells (about 6.6e7 in all, under a
    # third of its total): the analog budget the target allows, tuned to the baseline's write counts
    "lowrank-gov0.0085-f1.2-lr0.02-blr0.01-burst15": ("lowrank", PAPER_F12_ANALOG),
    # the same at rank 16 (stop 26): an i.i.d. drift of every cell is full rank, and a rank-4 estimate sees
    # only the four strongest directions of the gradient it causes; an oracle that re-writes the most
    # drifted cells holds the pretrained accuracy within these bounds (bench_refresh_bound.py)
    "lowrank-gov0.0085-f1.2-lr0.02-blr0.01-burst15-r16": ("lowrank", {**PAPER_F12_ANALOG, "rank": 16}),
    # the same for digital drift (seed 0's SR-SGD: 5996 max, 2.27e8 total): 550 max, about 6.6e7 in all
    "lowrank-gov0.0055-f1.2-lr0.02-blr0.01-burst15": ("lowrank", PAPER_F12_DIGITAL),
    # sized after the paper-scale digital runs' first 5000 samples (seed 0): SR-SGD wrote ~0.02 per cell and
    # sample at its most-written cell and 2.4M cells in all; f0.4 wrote 1.0M (its fraction binds every conv
    # event) with its max at the governor's 20: a tenth of SR-SGD's max and a third of its total need about half
    "lowrank-gov0.0015-f0.2-lr0.02-blr0.01": (
        "lowrank",
        {
            "endurance": 1.5e5,
            "lifetime_samples": 1e8,
            "write_fraction": 0.002,
            "rho_min": 0.0005,
            "lr": 0.02,
            "bias_lr": 0.01,
        },
    ),
    # the f1.2 analog point with its rank written out: the rank-16 point's control on the same net (stop 26;
    # the f1.2 row above ran on a net pretrained on another host)
    "lowrank-gov0.0085-f1.2-lr0.02-blr0.01-burst15-r4": ("lowrank", {**PAPER_F12_ANALOG, "rank": 4}),
    # the digital budget at rank 16 (stop 26, after the analog rank-16 run's first 20k samples)
    "lowrank-gov0.0055-f1.2-lr0.02-blr0.01-burst15-r16": ("lowrank", {**PAPER_F12_DIGITAL, "rank": 16}),
    # gradient-proportional steps: no max-norm, so the step follows the gradient sum (lr sqrt(B) G / lsb)
    "lowrank-nomax-sr": ("lowrank", {"max_norm": False, "rounding": "stochastic"}),
}


def run_point(
    net: Any, drift: str, point: str, seed: int, samples: int, test_samples: int, scale: str = "quick"
) -> dict[str, Any]:
    """One run (reused when its log already covers ``samples``). Paper scale: checkpointed every
    ``PAPER_CHECKPOINT`` samples (its log rewritten each time) and resumed from the checkpoint."""
    out = run_dir(scale, drift, point) / run_folder(seed, samples, scale)
    log_path = out / "log.json"
    if log_path.exists():
        log = json.loads(log_path.read_text())
        if log["final"]["samples"] == samples:
            return log
    rule_name, options = POINTS[point]
    stream = drifted(make_scenario(drift, "mnist", samples, seed=seed), drift)
    trainer = OnlineTrainer(
        copy.deepcopy(net), make_rule(rule_name, options), stream, seed=seed, test_samples=test_samples
    )
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.safetensors"
    every = PAPER_CHECKPOINT if scale == "paper" else samples
    if scale == "paper" and checkpoint.exists():
        trainer.resume(checkpoint)
    while trainer.step_count < samples:
        log = trainer.run(min(samples, (trainer.step_count // every + 1) * every))
        log["config"]["point"] = point
        write_json_atomic(log_path, log)
        if scale == "paper":
            trainer.save(checkpoint)
        final = log["final"]
        print(
            f"{drift} {point} seed {seed}: {final['samples']} samples, online {final['online_accuracy']:.3f}, "
            f"max writes {final['max_writes']}, total writes {final['total_writes']}, "
            f"{log['timing']['samples_per_second']:.1f} samples/s",
            flush=True,
        )
    return json.loads(log_path.read_text())


def run_dir(scale: str, drift: str, point: str) -> Path:
    """``runs/writes-bench/<drift>/<point>`` (quick scale) or ``runs/writes-bench/paper/<drift>/<point>``."""
    return (RUNS if scale == "quick" else RUNS / scale) / drift / point


def run_folder(seed: int | str, samples: int, scale: str = "quick") -> str:
    """``seed<k>`` at the quick scale (``QUICK_SAMPLES``) and at paper scale, ``seed<k>-n<samples>`` for
    exploration runs."""
    return f"seed{seed}" if samples == QUICK_SAMPLES or scale == "paper" else f"seed{seed}-n{samples}"


def results_stem(samples: int) -> str:
    """``writes`` at the quick scale; ``writes-n<samples>`` for an exploration scale (own JSON and table)."""
    return "writes" if samples == QUICK_SAMPLES else f"writes-n{samples}"


STEP_EDGES = (1, 2, 3, 5, 9)  # |dW_q| bins in LSBs: 0, 1, 2, 3-4, 5-8, >8
STEP_LABELS = ("0", "1", "2", "3-4", "5-8", ">8")


def mechanism(net: Any, point: str, samples: int) -> dict[str, Any]:
    """Why an update event writes what it writes: one digital-drift run (seed 0) of ``point`` with
    every update event recorded per layer: the fraction of cells that change, the histogram of
    |dW_q| over the cells (LSBs), and for LowRank the quantiles of |x|, the update in LSBs before
    rounding (median, 90%, 99%, max) and the fraction with |x| >= 0.5 (what round-to-nearest writes)."""
    rule_name, options = POINTS[point]
    rule = make_rule(rule_name, options)
    layers: dict[str, dict[str, Any]] = {}

    def record(name: str) -> dict[str, Any]:
        return layers.setdefault(name, {"events": 0, "changed": 0.0, "steps": np.zeros(len(STEP_LABELS)), "x": []})

    write, step_codes = rule.write, getattr(rule, "step_codes", None)

    def recording_write(layer: Any, codes: Any, pulses: Any = None) -> int:
        r, size = record(layer.name), codes.size
        r["events"] += 1
        r["changed"] += float((codes != 0).sum()) / size
        r["steps"] += np.bincount(np.digitize(abs(codes).ravel(), STEP_EDGES), minlength=len(STEP_LABELS))
        return write(layer, codes, pulses)

    def recording_step_codes(layer: Any, x: Any, samples_seen: int) -> Any:
        magnitude = abs(x)
        quantiles = [float(q) for q in np.quantile(magnitude, (0.5, 0.9, 0.99))]
        record(layer.name)["x"].append([*quantiles, float(magnitude.max()), float((magnitude >= 0.5).mean())])
        return step_codes(layer, x, samples_seen)

    rule.write = recording_write
    if step_codes is not None:
        rule.step_codes = recording_step_codes
    stream = drifted(make_scenario("digital-drift", "mnist", samples, seed=0), "digital-drift")
    log = OnlineTrainer(copy.deepcopy(net), rule, stream, seed=0, test_samples=100).run(samples)
    out: dict[str, Any] = {"samples": samples, "online_accuracy": log["final"]["online_accuracy"], "layers": {}}
    for name, r in layers.items():
        cells = sum(r["steps"])
        entry = {
            "events": r["events"],
            "changed_per_event": r["changed"] / max(r["events"], 1),
            "step_histogram": {
                label: float(n) / max(cells, 1) for label, n in zip(STEP_LABELS, r["steps"], strict=True)
            },
        }
        if r["x"]:
            x = np.asarray(r["x"]).mean(0)
            entry["x_lsb"] = dict(zip(("median", "p90", "p99", "max", "at_least_half"), map(float, x), strict=True))
        out["layers"][name] = entry
    return out


def drifted(stream: Any, drift: str) -> Any:
    """The stream with the drift options of ``DRIFTS[drift]`` (the authors' flip draw)."""
    if stream.drift is not None and DRIFTS[drift]:
        stream = dataclasses.replace(stream, drift=dataclasses.replace(stream.drift, **DRIFTS[drift]))
    return stream


def layer_drift(net: Any, drift: str, seeds: list[int], samples: int) -> dict[str, Any]:
    """Inference-only online accuracy with ``drift`` on each group of ``DRIFTED_LAYERS`` alone, per seed:
    where the damage that learning must repair lies."""
    out: dict[str, Any] = {}
    for group, names in DRIFTED_LAYERS.items():
        accuracies = []
        for seed in seeds:
            stream = drifted(make_scenario(drift, "mnist", samples, seed=seed), drift)
            trainer = OnlineTrainer(
                copy.deepcopy(net), make_rule("inference"), stream, seed=seed, test_samples=100, drift_layers=names
            )
            accuracies.append(trainer.run(samples)["final"]["online_accuracy"])
            print(f"{drift}, drift on {group}, seed {seed}: online {accuracies[-1]:.3f}", flush=True)
        out[group] = {"layers": list(names), "online_accuracy": accuracies}
    return out


def layer_drift_markdown(data: dict[str, Any]) -> list[str]:
    """The --layer-drift table: inference-only online accuracy per drifted layer group and seed."""
    lines = [
        f"### Where {data['drift']} does its damage (inference only, drift on some layers alone)",
        "",
        f"{data['samples']} samples, seeds {data['seeds']}; online accuracy with no learning at all, the drift "
        "acting only on the layers named (the others keep their codes).",
        "",
        "| drifted layers | online acc per seed | mean |",
        "|---|---|---|",
    ]
    for group, r in data["groups"].items():
        values = r["online_accuracy"]
        lines.append(f"| {group} | {' / '.join(f'{v:.3f}' for v in values)} | {statistics.mean(values):.3f} |")
    return [*lines, "", "```bash", data["command"], "```", ""]


def written_per_event(final: dict[str, Any]) -> float:
    """Fraction of a layer's cells that change at an update event: total writes / sum(events x cells)."""
    slots = sum(layer["update_events"] * layer["shape"][0] * layer["shape"][1] for layer in final["layers"].values())
    return final["total_writes"] / slots if slots else 0.0


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


FIGURES = ("online_accuracy", "max_writes", "total_writes", "pulse_max_writes", "written_per_event")


def seed_figures(log: dict[str, Any]) -> dict[str, float]:
    """One run's figures as the summary keeps them per seed."""
    final = log["final"]
    return {
        **{key: final[key] for key in FIGURES[:-1]},
        "written_per_event": written_per_event(final),
        "aux_memory_bits": sum(final["aux_memory_bits"].values()),
        "samples": final["samples"],
        "samples_per_second": log["timing"]["samples_per_second"],
    }


def recorded_seeds(row: dict[str, Any]) -> dict[str, dict[str, float]] | None:
    """A summary row's per-seed figures; a one-seed row written before they were kept is seed 0 (the
    default ``--seeds``); None for an older row of several seeds (it cannot be merged seed by seed)."""
    if "per_seed" in row:
        return row["per_seed"]
    if row["seeds"] != 1:
        return None
    figures = {key: row[key]["mean"] for key in FIGURES}
    return {
        "0": {
            **figures,
            "aux_memory_bits": row["aux_memory_bits"],
            "samples": row["samples"],
            "samples_per_second": row["samples_per_second"],
        }
    }


def collect(samples: int, scale: str = "quick", previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Mean +- std over the seeds of every (drift, point) run at ``samples`` samples; at paper scale also
    runs stopped early (``samples`` then says how far each got). A seed whose log is on disk is read from
    it; the seeds of ``previous`` (the summary written before) that are not on disk are kept, so a
    summary grows seed by seed across machines and sessions; a previous row that cannot be merged seed by
    seed is kept whole unless the disk has at least as many seeds of it."""
    results: dict[str, Any] = {}
    for drift in DRIFTS:
        for point in POINTS:
            logs = {}
            folders = run_dir(scale, drift, point).glob(f"{run_folder('*', samples, scale)}/log.json")
            for path in sorted(folders):
                log = json.loads(path.read_text())
                if log["final"]["samples"] == samples or scale == "paper":
                    logs[path.parent.name.removeprefix("seed").split("-")[0]] = log
            old = (previous or {}).get(drift, {}).get(point)
            per_seed = {seed: seed_figures(log) for seed, log in logs.items()}
            kept = recorded_seeds(old) if old else None
            if old and kept is None and len(per_seed) < old["seeds"]:
                results.setdefault(drift, {})[point] = old
                continue
            per_seed = {**(kept or {}), **per_seed}
            if not per_seed:
                continue
            runs = [per_seed[seed] for seed in sorted(per_seed, key=int)]
            row = {
                "rule": POINTS[point][0],
                "options": POINTS[point][1],
                "seeds": len(runs),
                "samples": min(run["samples"] for run in runs),
                **{key: spread([run[key] for run in runs]) for key in FIGURES},
                "aux_memory_bits": runs[0]["aux_memory_bits"],
                "samples_per_second": statistics.median(run["samples_per_second"] for run in runs),
                "per_seed": {seed: per_seed[seed] for seed in sorted(per_seed, key=int)},
            }
            results.setdefault(drift, {})[point] = row
            if scale == "paper":  # the lowest seed's curve, to compare runs that stopped at different lengths
                first = min(per_seed, key=int)
                history = logs[first]["history"] if first in logs else old["history"]
                row["history"] = {key: history[key] for key in HISTORY}
                row["history_seed"] = first
    return results


HISTORY = ("step", "online_accuracy", "max_writes", "total_writes")


def at_step(row: dict[str, Any], step: int) -> dict[str, float]:
    """A paper-scale run's figures after ``step`` samples (its last history point at or before it)."""
    history = row["history"]
    i = max(j for j, k in enumerate(history["step"]) if k <= step)
    return {key: history[key][i] for key in HISTORY}


def frontier_points(rows: dict[str, Any], axis: str) -> list[dict[str, Any]]:
    return [
        {
            "label": point,
            "accuracy": r["online_accuracy"]["mean"],
            "accuracy_err": r["online_accuracy"]["std"],
            "writes": r[axis]["mean"],
            "writes_err": r[axis]["std"],
        }
        for point, r in rows.items()
    ]


def drift_table(rows: dict[str, Any], show_samples: bool = False) -> list[str]:
    """One drift's points, fewest max writes first; * marks the Pareto points; ``show_samples``: the
    seeds column says the samples each run reached (paper scale, one seed)."""
    front = {p["label"] for p in pareto_front(frontier_points(rows, "max_writes"))}
    lines = [
        f"| point | {'samples' if show_samples else 'seeds'} | online acc | max writes/cell | total writes "
        "| cells written per event | aux memory (kbit) | max pulses/cell (LRT paper's metric) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for point, r in sorted(rows.items(), key=lambda kv: kv[1]["max_writes"]["mean"]):
        acc, mx, tot = r["online_accuracy"], r["max_writes"], r["total_writes"]
        lines.append(
            f"| {point}{' *' if point in front else ''} | {r['samples'] if show_samples else r['seeds']} "
            f"| {acc['mean']:.3f} ± {acc['std']:.3f} "
            f"| {mx['mean']:.0f} ± {mx['std']:.0f} | {tot['mean']:.3g} | {r['written_per_event']['mean']:.1%} "
            f"| {r['aux_memory_bits'] / 1e3:.1f} "
            f"| {r['pulse_max_writes']['mean']:.0f} |"
        )
    return lines


def markdown(data: dict[str, Any], explorations: list[dict[str, Any]]) -> str:
    """The quick-scale fragment: per drift its table and plot, the verdict, the commands, the
    mechanism table, then the exploration screens (shorter runs, ``writes-n<samples>.json``)."""
    lines = [
        "## Write accounting: accuracy against endurance (`bench/bench_writes.py`)",
        "",
        f"{data['net']} at {data['samples']} samples per run, seeds as listed (mean ± std over seeds). "
        "Writes are code changes (a stored code that changes at an update event; `edgetrain.nvm`'s "
        "`code-change` model). The last column is the LRT paper's activity metric (the `pulse` model: every "
        "non-zero applied update is a pulse, conv SGD updates applied pixel by pixel), kept for comparison "
        "with the paper only. Digital drift at the authors' strength (Binomial(2, p) flips, ~2p per bit and "
        "event). * marks the Pareto points (no other point has higher accuracy with fewer max writes). "
        "'Cells written per event' = total writes / (update events x cells): a LowRank event writes a dense "
        "rank-r product rounded to the LSB grid, so most cells whose update reaches half an LSB change.",
        "",
    ]
    for drift, rows in data["results"].items():
        lines += [f"### {drift}", "", *drift_table(rows), "", f"![{drift}](img/writes_{drift}.png)", ""]
    lines += [data["verdict"], "", "```bash", *data["commands"], "```", ""]
    if data.get("mechanism"):
        lines += mechanism_markdown(data["mechanism"])
    for screen in explorations:
        lines += [
            f"### Exploration screens at {screen['samples']} samples",
            "",
            "Shorter runs (seeds as listed), the first screens of the sparse-event knobs. Online accuracy "
            "is higher than at 4000 samples (less drift has accumulated), so compare within this table only; "
            "these screens ranked error feedback above no feedback, the 4000-sample runs the other way, so "
            "every decision was taken at 4000 samples. The verdict here is the same test at this length.",
            "",
        ]
        for drift, rows in screen["results"].items():
            lines += [f"#### {drift}", "", *drift_table(rows), ""]
        lines += [screen["verdict"], "", "```bash", *screen["commands"], "```", ""]
    return "\n".join(lines)


def mechanism_markdown(mechanisms: dict[str, Any]) -> list[str]:
    """Per point and layer: events, cells changed per event, |dW_q| histogram, |x| quantiles."""
    lines = [
        "### What an update event writes (digital drift, seed 0, every event recorded)",
        "",
        "x = the update in LSBs before rounding (LowRank: lr sqrt(mult) L R^T / lsb, max-normed, so its "
        "peak is pinned near lr sqrt(B) / lsb whatever the gradient's size); dW_q = what is written.",
        "",
        "| point | samples | layer | events | cells changed per event | share of cells with abs(dW_q) = "
        + " / ".join(STEP_LABELS)
        + " LSB | abs(x) median / p90 / p99 / max (LSB) | abs(x) >= 0.5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for point, m in mechanisms.items():
        for name, r in m["layers"].items():
            hist = " / ".join(f"{v:.3f}" for v in r["step_histogram"].values())
            x = r.get("x_lsb")
            xq = "-" if x is None else f"{x['median']:.2f} / {x['p90']:.2f} / {x['p99']:.2f} / {x['max']:.2f}"
            half = "-" if x is None else f"{x['at_least_half']:.1%}"
            lines.append(
                f"| {point} | {m['samples']} | {name} | {r['events']} | {r['changed_per_event']:.1%} | {hist} "
                f"| {xq} | {half} |"
            )
    lines += ["", "```bash", *dict.fromkeys(m["command"] for m in mechanisms.values()), "```", ""]
    return lines


def verdict(results: dict[str, Any]) -> str:
    """The issue's honest target, checked at this scale: a LowRank point with mean online accuracy >=
    SR-SGD's, mean max writes <= 1/10 and mean total writes <= 1/3 of SR-SGD's, over at least
    ``CONFIRMING_SEEDS`` seeds (a point passing on fewer is named as unconfirmed). Lists every LowRank
    point that meets either the accuracy or both write ratios, with mean +- std over its seeds."""
    sentences = []
    for drift, rows in results.items():
        base = rows.get("sgd-sr")
        if base is None:
            continue
        acc0 = base["online_accuracy"]
        graded = {}
        for point, r in rows.items():
            if r["rule"] != "lowrank":
                continue
            ratios = (
                base["max_writes"]["mean"] / max(r["max_writes"]["mean"], 1),
                base["total_writes"]["mean"] / max(r["total_writes"]["mean"], 1),
            )
            accurate = r["online_accuracy"]["mean"] >= acc0["mean"]
            frugal = ratios[0] >= 10 and ratios[1] >= 3
            if accurate or frugal:
                graded[point] = (accurate, frugal, *ratios)
        passing = [p for p, (accurate, frugal, _, _) in graded.items() if accurate and frugal]
        met = [p for p in passing if rows[p]["seeds"] >= CONFIRMING_SEEDS]
        unconfirmed = [p for p in passing if p not in met]
        text = (
            f"{drift} (SR-SGD {acc0['mean']:.3f} ± {acc0['std']:.3f} over {base['seeds']} seeds, max writes "
            f"{base['max_writes']['mean']:.0f}, total {base['total_writes']['mean']:.3g}): the target (a LowRank "
            f"point as accurate with <= 1/10 its max writes and <= 1/3 its total writes, {CONFIRMING_SEEDS} seeds) "
            "is " + (f"MET by {', '.join(met)}." if met else "NOT met at this scale.")
        )
        if unconfirmed:
            text += f" Passing on fewer seeds (not confirmed): {', '.join(unconfirmed)}."
        if graded:
            listed = "; ".join(
                f"{p} {rows[p]['online_accuracy']['mean']:.3f} ± {rows[p]['online_accuracy']['std']:.3f} "
                f"({rows[p]['seeds']} seeds; {'as accurate' if accurate else 'less accurate'}), "
                f"{mx:.1f}x fewer max writes, {tot:.1f}x fewer total writes"
                for p, (accurate, _, mx, tot) in sorted(graded.items(), key=lambda kv: -kv[1][2])
            )
            text += f" LowRank points as accurate or inside both write bounds (SR-SGD / LowRank writes): {listed}."
        sentences.append(text)
    return " ".join(sentences)


def complete_seeds(base: dict[str, Any], row: dict[str, Any]) -> list[str]:
    """The seeds both rows ran to ``PAPER_SAMPLES``."""
    done = [
        {seed for seed, run in r.get("per_seed", {}).items() if run["samples"] == PAPER_SAMPLES} for r in (base, row)
    ]
    return sorted(done[0] & done[1], key=int)


def seed_means(row: dict[str, Any], seeds: list[str]) -> dict[str, float]:
    """A row's online accuracy and writes averaged over ``seeds``."""
    return {key: statistics.mean(row["per_seed"][seed][key] for seed in seeds) for key in HISTORY[1:]}


def paper_verdict(results: dict[str, Any]) -> str:
    """The issue's paper-scale target per drift: a LowRank point whose online accuracy is >= SR-SGD's
    and >= the LRT paper's (``PAPER_ACCURACY``), with max writes <= 1/10 and total writes <= 1/3 of
    SR-SGD's. Where both ran ``PAPER_SAMPLES`` with the same seeds, the figures are the means over those
    seeds (the verdict is on the mean, each seed's accuracy quoted). Otherwise both runs are compared at the
    same number of samples (the shorter run's length, the longer one read from the lowest seed's history)
    when that seed is the same for both (rows of different seeds are not compared); short of
    ``PAPER_SAMPLES`` the comparison is named partial and gives no verdict (drift keeps acting, and the
    paper's figure is at 100k)."""
    sentences = []
    for drift, rows in results.items():
        base = rows.get("sgd-sr")
        if base is None:
            continue
        paper = PAPER_ACCURACY[drift]
        for point, r in rows.items():
            if r["rule"] != "lowrank":
                continue
            seeds = complete_seeds(base, r)
            if seeds:
                step, b, x = PAPER_SAMPLES, seed_means(base, seeds), seed_means(r, seeds)
                accuracies = ", ".join(f"{r['per_seed'][k]['online_accuracy']:.3f}" for k in seeds)
                over = f" over seed(s) {', '.join(seeds)} (LowRank {accuracies}; means below)"
            elif base.get("history_seed", "0") != r.get("history_seed", "0"):
                sentences.append(
                    f"{drift}, {point} (seed {r['history_seed']}) vs SR-SGD (seed {base['history_seed']}): "
                    "no seed run by both, no comparison."
                )
                continue
            else:
                step = min(base["samples"], r["samples"])
                b, x, over = at_step(base, step), at_step(r, step), ""
            max_ratio = b["max_writes"] / max(x["max_writes"], 1)
            total_ratio = b["total_writes"] / max(x["total_writes"], 1)
            checks = {
                f"accuracy >= SR-SGD's ({x['online_accuracy']:.3f} vs {b['online_accuracy']:.3f})": (
                    x["online_accuracy"] >= b["online_accuracy"]
                ),
                f">= the paper's {paper} at 100k": x["online_accuracy"] >= paper,
                f"max writes <= 1/10 ({x['max_writes']:.0f} vs {b['max_writes']:.0f}: {max_ratio:.1f}x fewer)": (
                    max_ratio >= 10
                ),
                f"total writes <= 1/3 ({x['total_writes']:.3g} vs {b['total_writes']:.3g}: {total_ratio:.1f}x fewer)": (
                    total_ratio >= 3
                ),
            }
            parts = "; ".join(f"{name}: {'yes' if ok else 'no'}" for name, ok in checks.items())
            if step == PAPER_SAMPLES:
                status = "target MET" if all(checks.values()) else "target NOT met"
            else:
                status = f"PARTIAL ({step} of {PAPER_SAMPLES} samples): no verdict"
            sentences.append(f"{drift}, {point} vs SR-SGD after {step} samples{over}: {parts}; {status}.")
    return " ".join(sentences)


def write_markdown() -> None:
    """``writes.md``: the quick-scale fragment (``writes.json``), the paper-scale section
    (``writes-paper.json``) and the exploration screens (``writes-n<samples>.json``)."""
    quick = json.loads((RESULTS / "writes.json").read_text())
    screens = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("writes-n*.json"))]
    text = markdown(quick, screens)
    layers_path = RESULTS / "writes-layers.json"
    if layers_path.exists():
        text += "\n" + "\n".join(layer_drift_markdown(json.loads(layers_path.read_text())))
    paper_path = RESULTS / "writes-paper.json"
    if paper_path.exists():
        text += "\n" + paper_markdown(json.loads(paper_path.read_text()))
    (RESULTS / "writes.md").write_text(text)


def paper_markdown(data: dict[str, Any]) -> str:
    """The paper-scale section: per drift one table (samples reached per run), the verdict, commands."""
    lines = [
        f"### Paper scale: {data['net']}, target {PAPER_SAMPLES} samples, one seed",
        "",
        "The issue's target scale. Same columns as above, one seed; the samples column says how far each "
        "run got (a run stopped early is reported at that length, clearly partial), and the verdict compares "
        "two runs at the shorter one's length. `lowrank-gov0.004-f0.4-lr0.02-blr0.01` was sized for the write "
        "bounds at this width before these runs (0.004 writes per cell and sample, 0.4% of a layer's cells per "
        "event); `lowrank-gov0.0015-f0.2-lr0.02-blr0.01` was sized after the first 5000 samples of this stream's "
        "SR-SGD and f0.4 runs (same seed): it is tuned to the baseline's write rate, and labelled so. "
        "`lowrank-gov0.004-f0.4-lr0.02-blr0.01-burst15` is the f0.4 point with 4-bit governor counters "
        "(`governor_burst = 15`), run after the others to measure the counters' cost at this width; the two "
        "track each other within +-0.03 at every checkpoint, so their gap at 100k is run-to-run spread. The "
        "verdicts are on the means over the seeds both rules ran to 100k, and otherwise compare the curves "
        "of the lowest seed of each row (`history_seed`). Seed 1 of burst15 and SR-SGD (run in session 21 on "
        "another machine, whose logs are not in this table): 0.820 against 0.625, so over two seeds the "
        "paper's 0.850 is not met at rank 4. The `-r16` points (stop 26) are the f1.2 points at rank 16, "
        "chosen after an oracle refresh showed the write budget suffices (bench_refresh_bound.py); `-r4` is "
        "the analog f1.2 point rerun as their control on the same net.",
        "",
        *([data["net_note"], ""] if data.get("net_note") else []),
    ]
    for drift, rows in data["results"].items():
        lines += [f"#### {drift}", "", *drift_table(rows, show_samples=True), ""]
    lines += [data["verdict"], "", "```bash", *data["commands"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=("quick", "paper"), default="quick")
    parser.add_argument("--samples", type=int, default=None, help=f"default {QUICK_SAMPLES}; paper {PAPER_SAMPLES}")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--points", default=",".join(POINTS))
    parser.add_argument("--drifts", default=",".join(DRIFTS))
    parser.add_argument("--test-samples", type=int, default=None, help="default: the scale's (500 / 1000)")
    parser.add_argument("--collect", action="store_true", help="only summarize the run logs on disk")
    parser.add_argument(
        "--mechanism",
        action="store_true",
        help="record every update event of --points (digital drift, seed 0); --collect then adds them",
    )
    parser.add_argument(
        "--layer-drift",
        action="store_true",
        help="inference-only runs with the drift of --drifts on single layer groups (writes-layers.json)",
    )
    parser.add_argument(
        "--net",
        default=None,
        help="paper scale: a model file of the paper-width net to adapt (default: bench_lrt's paper-scale "
        "pretrained net, trained on first use)",
    )
    parser.add_argument("--net-note", default="", help="paper scale: a sentence on where --net comes from")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = shlex.join([".venv/bin/python", "bench/bench_writes.py", *sys.argv[1:]])
    scale = SCALES[args.scale]
    samples = args.samples or (PAPER_SAMPLES if args.scale == "paper" else QUICK_SAMPLES)
    if args.mechanism:
        net, _ = pretrained("quick", SCALES["quick"])
        MECHANISMS.mkdir(parents=True, exist_ok=True)
        for point in args.points.split(","):
            target = MECHANISMS / f"{point}.json"
            if not target.exists():
                write_json_atomic(target, {**mechanism(net, point, samples), "command": command})
        return
    net_note = f"LRT CNN {scale.spec}, pretrained as bench_lrt's {args.scale} scale"
    if args.net:
        net_note = f"LRT CNN {scale.spec}, from {args.net}"
    if args.layer_drift:
        net, _ = pretrained("quick", SCALES["quick"])
        drift, seeds = args.drifts.split(",")[0], [int(k) for k in args.seeds.split(",")]
        groups = layer_drift(net, drift, seeds, samples)
        data = {"drift": drift, "seeds": seeds, "samples": samples, "groups": groups, "command": command}
        write_json_atomic(RESULTS / "writes-layers.json", data)
        write_markdown()
        return
    if not args.collect:
        net, meta = load_for_adaptation(args.net) if args.net else pretrained(args.scale, scale)
        width = (net.weight_layers[0].shape2d[0], net.weight_layers[-2].shape2d[0])  # conv1 out, fc1 out
        if width != (scale.spec["width"], scale.spec["hidden"]):
            raise SystemExit(f"{args.net} has width/hidden {width}, not the {args.scale} scale's {scale.spec}")
        for seed in (int(s) for s in args.seeds.split(",")):
            for drift in args.drifts.split(","):
                for point in args.points.split(","):
                    run_point(net, drift, point, seed, samples, args.test_samples or scale.test_samples, args.scale)
    path = RESULTS / ("writes-paper.json" if args.scale == "paper" else f"{results_stem(samples)}.json")
    previous = json.loads(path.read_text()) if path.exists() else {}
    commands = [c for c in previous.get("commands", []) if c != command] + [command]
    quick = args.scale == "quick" and samples == QUICK_SAMPLES
    mechanisms = {}
    if quick:  # the recorded events of earlier runs are kept beside those on disk
        on_disk = {p.stem: json.loads(p.read_text()) for p in sorted(MECHANISMS.glob("*.json"))}
        mechanisms = {**previous.get("mechanism", {}), **on_disk}
    results = collect(samples, args.scale, previous.get("results"))
    data = {
        "recorded_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch threads {args.threads}",
        "net": previous.get("net", net_note) if args.collect else net_note,
        "samples": samples,
        "results": results,
        "verdict": paper_verdict(results) if args.scale == "paper" else verdict(results),
        "commands": commands,
        "mechanism": mechanisms,
        "net_note": args.net_note or previous.get("net_note", ""),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    if quick:
        IMAGES.mkdir(parents=True, exist_ok=True)
        for drift, rows in results.items():
            plot_frontier(
                {axis: frontier_points(rows, axis) for axis in ("max_writes", "total_writes")},
                IMAGES / f"writes_{drift}.png",
                f"{drift}, {samples} samples",
            )
    if args.scale == "paper" or quick:
        write_markdown()
    print(data["verdict"], f"\nwrote {path}", flush=True)


if __name__ == "__main__":
    main()
