"""BN-statistics phase of TQT retraining: batch statistics from the float convolution (the default, TQT /
Graffitist / Jacob et al.) or from the layer's own quantized-weight convolution (``bn_statistics="quantized"``,
one convolution per layer instead of two, other numerics). Accuracy and wall time of the same retraining.

Per net: an FP32 net trained ``--float-epochs`` on Fashion-MNIST (``--float-samples`` images), quantized
(INT8, and INT4 weights with 8-bit first/last layers), then retrained for one epoch of
``--retrain-samples`` images entirely in the BN-statistics phase (``bn_stat_epochs=1``), once per source
from the same quantized start and seed; test top-1 on the full test split.

    .venv/bin/python bench/bench_bn_statistics.py
    .venv/bin/python bench/bench_bn_statistics.py --nets darknet-tiny --retrain-samples 5000

Writes bench/results/bn_statistics.json and bn_statistics.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from bench_zoo import float_start  # bench/ is the script's directory

from edgetrain.data import load_dataset
from edgetrain.graph import QuantConfig, quantize
from edgetrain.tqt import RetrainConfig, retrain
from edgetrain.training import evaluate

RESULTS = Path(__file__).resolve().parent / "results"
SOURCES = ("float", "quantized")


def run_net(name: str, data: dict, args: argparse.Namespace) -> dict:
    train = data["train"].subset(args.float_samples) if args.float_samples else data["train"]
    model, _ = float_start(name, train, data["val"], args.float_epochs, args.seed, cache=None)  # bench_zoo's recipe
    row: dict = {"fp32": evaluate(model, data["test"])}
    calib = data["train"].images[:256]
    subset = data["train"].subset(args.retrain_samples)
    for label, weight_bits in (("int8", 8), ("int4", 4)):
        start = quantize(model, calib[:1], calib, QuantConfig(weight_bits=weight_bits), mode="retrain")
        row[label] = {"start": evaluate(start, data["test"])}
        for source in SOURCES:
            qmodel = copy.deepcopy(start)
            config = RetrainConfig(
                epochs=1, batch_size=128, weight_lr=1e-4, bn_stat_epochs=1, bn_statistics=source, seed=args.seed
            )
            began = time.perf_counter()
            retrain(qmodel, subset, None, config, progress=False)
            row[label][source] = {"accuracy": evaluate(qmodel, data["test"]), "seconds": time.perf_counter() - began}
        print(name, label, json.dumps(row[label]), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["darknet-tiny", "mobilenetv2-tiny"])
    parser.add_argument("--float-epochs", type=int, default=1)
    parser.add_argument("--float-samples", type=int, default=0, help="FP32 training images (0: all)")
    parser.add_argument("--retrain-samples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = {split: load_dataset("fashion-mnist", split) for split in ("train", "val", "test")}
    load_before = os.getloadavg()[0]
    rows = {net: run_net(net, data, args) for net in args.nets}
    load_after = os.getloadavg()[0]
    defaults = {
        "nets": parser.get_default("nets"),
        "float_epochs": 1,
        "retrain_samples": 10000,
        "seed": 0,
        "threads": 1,
    }
    flags = "".join(
        f" --{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if v != defaults[k]
    )
    command = f"`.venv/bin/python bench/bench_bn_statistics.py{flags}`"
    payload = {
        "recorded_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_1min": {"before": load_before, "after": load_after},
        "rows": rows,
        "command": command,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bn_statistics.json").write_text(json.dumps(payload, indent=2))
    lines = [
        "## BN-statistics phase: batch statistics from the float or the quantized convolution",
        "",
        "| net | weights | FP32 | quantized start | retrained, float statistics (default) | "
        "retrained, quantized statistics | time quantized / float |",
        "|---|---|---|---|---|---|---|",
    ]
    for net, row in rows.items():
        for label in ("int8", "int4"):
            r = row[label]
            lines.append(
                f"| {net} | {label} | {100 * row['fp32']:.2f} | {100 * r['start']:.2f} | "
                f"{100 * r['float']['accuracy']:.2f} | "
                f"{100 * r['quantized']['accuracy']:.2f} | {r['quantized']['seconds'] / r['float']['seconds']:.2f}x |"
            )
    lines += [
        "",
        f"Command: {command}. Test top-1 (%) on the full Fashion-MNIST test split; one retraining epoch of "
        f"{args.retrain_samples} images (batch 128, weight lr 1e-4), all of it in the BN-statistics phase, from the "
        "same quantized start and seed for both sources; one seed, so differences of a few tenths are noise. "
        f"Wall time ratio on a shared 2-core machine, 1-min load {load_before:.1f} before / {load_after:.1f} after.",
        "",
    ]
    (RESULTS / "bn_statistics.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
