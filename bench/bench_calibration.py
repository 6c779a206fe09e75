"""Static INT8 calibration of the zoo: Graffitist's kl_j, max, and auto (per quantizer, the candidate
threshold with the least quantization error) with 256 and 1024 calibration images.

Per net: FP32 (float pretraining, the recipe and seed of bench_zoo.py), then static INT8 (weights
``max``, every other quantizer by the method) calibrated on the first N training images, test top-1
on Fashion-MNIST and the gap to FP32; for ``auto`` also how often each candidate won. Target: every
net within 2 pt of FP32 with 256 and with 1024 images. Writes bench/results/bench_calibration.json
and .md; FP32 weights are cached in --cache so a rerun only calibrates.

    .venv/bin/python bench/bench_calibration.py                 # full: 10k test images
    .venv/bin/python bench/bench_calibration.py --quick         # smoke run on subsets
    .venv/bin/python bench/bench_calibration.py --merge A.json B.log   # one table from partial runs
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from edgetrain.analysis import quantizer_stats
from edgetrain.data import load_dataset
from edgetrain.graph import QuantConfig, quantize
from edgetrain.models import create_model
from edgetrain.training import evaluate, load_checkpoint, train_float

ZOO = ("mobilenetv2-tiny", "resnet-tiny", "inception-tiny", "darknet-tiny")
METHODS = ("kl_j", "auto")
SIZES = (256, 1024)
TARGET_PT = 2.0
RESULTS = Path(__file__).resolve().parent / "results"


def float_model(name: str, train: Any, val: Any, args: argparse.Namespace) -> tuple[torch.nn.Module, float]:
    """The FP32 net (trained as bench_zoo.py trains it, or loaded from the cache) and its training seconds."""
    torch.manual_seed(args.seed)
    model = create_model(name)
    cached = Path(args.cache) / f"{name}-{args.float_epochs}ep-{len(train)}.pt"
    if cached.exists():
        model.load_state_dict(load_checkpoint(cached))
        return model.eval(), 0.0
    start = time.perf_counter()
    train_float(model, train, val, epochs=args.float_epochs, lr=1e-3, batch_size=128, seed=args.seed, progress=False)
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cached)
    return model.eval(), time.perf_counter() - start


def run_net(name: str, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    model, seconds = float_model(name, data["train"], data["val"], args)
    fp32 = evaluate(model, data["test"])
    row: dict[str, Any] = {"model": name, "fp32": fp32, "float_seconds": round(seconds, 1), "static": {}}
    images = data["train"].images
    for size in args.sizes:
        calib = images[:size]
        for method in args.methods:
            start = time.perf_counter()
            qmodel = quantize(model, calib[:1], calib, QuantConfig(activation_calibration=method), mode="static")
            entry: dict[str, Any] = {
                "calibration_seconds": round(time.perf_counter() - start, 1),
                "accuracy": evaluate(qmodel, data["test"]),
            }
            entry["gap_pt"] = round(100 * (entry["accuracy"] - fp32), 2)
            if method == "auto":
                stats = quantizer_stats(qmodel, calib[:256])
                entry["auto_choices"] = dict(Counter(s.best_method for s in stats if s.role != "weight"))
            row["static"][f"{method}@{size}"] = entry
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    columns = [f"{m}@{s}" for s in args.sizes for m in args.methods]
    lines = [
        "## Static INT8 calibration (Fashion-MNIST)" + (" — quick run" if args.quick else ""),
        "",
        "| net | FP32 | " + " | ".join(f"{m} ({s} images)" for s in args.sizes for m in args.methods) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for r in rows:
        cells = [f"{100 * r['static'][c]['accuracy']:.2f} ({r['static'][c]['gap_pt']:+.2f})" for c in columns]
        lines.append(f"| {r['model']} | {100 * r['fp32']:.2f} | " + " | ".join(cells) + " |")
    misses = [
        f"{r['model']} {c} {r['static'][c]['gap_pt']:+.2f} pt"
        for r in rows
        for c in columns
        if c.startswith("auto@") and r["static"][c]["gap_pt"] < -TARGET_PT
    ]
    choices = Counter()
    for r in rows:
        for c in columns:
            choices.update(r["static"][c].get("auto_choices", {}))
    verdict = f"Target (static INT8 within {TARGET_PT:g} pt of FP32 with 256 and with 1024 images, default `auto`) " + (
        "met on every net." if not misses else "missed: " + "; ".join(misses) + "."
    )
    lines += [
        "",
        f"Command: `{command}`",
        "",
        "Cells: test top-1 % (gap to FP32 in points). Weights are calibrated with `max` in every column; the "
        "column's method sets every other threshold. `auto` scores kl_j, max, 3sd, percentile and mse on each "
        "quantizer's own calibration data by squared quantization error and keeps the least; what won (over "
        "all nets and both sizes, activation, bias and accumulator quantizers, on their first 256 images): "
        f"{dict(choices.most_common())}. " + verdict,
        "",
    ]
    return "\n".join(lines)


def rows_of(path: Path) -> list[dict[str, Any]]:
    """The per-net rows of a result JSON, or the row lines a run printed (its log)."""
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)["results"]
    return [json.loads(line) for line in text.splitlines() if line.startswith('{"model"')]


def write(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, test_images: int) -> None:
    result = {
        "benchmark": "bench_calibration",
        "dataset": "fashion-mnist",
        "test_images": test_images,
        "quick": args.quick,
        "threads": args.threads,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "command": command,
        "results": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{args.out}.md").write_text(markdown(rows, args, command))
    print((RESULTS / f"{args.out}.md").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(ZOO))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--float-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="runs/bench_calibration", help="FP32 weights are kept here")
    parser.add_argument("--quick", action="store_true", help="2k training / 1k test images, 1 epoch")
    parser.add_argument("--out", default="bench_calibration")
    parser.add_argument("--merge", nargs="+", help="result JSONs or run logs to combine (later ones win)")
    args = parser.parse_args(argv)
    if args.merge:
        rows = list({row["model"]: row for path in args.merge for row in rows_of(Path(path))}.values())
        sources = [
            json.loads(Path(path).read_text())["command"] if path.endswith(".json") else f"(rows printed in {path})"
            for path in args.merge
        ]
        command = " ; ".join([*sources, "python bench/bench_calibration.py --merge " + " ".join(args.merge)])
        write(rows, args, command, 10_000)
        return 0
    torch.set_num_threads(args.threads)
    data = {split: load_dataset("fashion-mnist", split) for split in ("train", "val", "test")}
    if args.quick:
        args.float_epochs = 1
        data = {"train": data["train"].subset(2000), "val": data["val"].subset(500), "test": data["test"].subset(1000)}
    command = "python bench/bench_calibration.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = [run_net(name, data, args) for name in args.models]
    write(rows, args, command.strip(), len(data["test"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
