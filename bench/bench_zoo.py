"""Zoo benchmark: every graph-rule net on Fashion-MNIST.

Per net: FP32 (float pretraining, cached in --cache and shared with bench_calibration.py), INT8 static
(the default ``auto`` calibration), INT8 retrained and INT4-weight retrained (TQT recipe, thresholds
trained), each with test top-1; for every quantized model the number of test images whose
integer-program outputs differ from the fake-quantized model's (must be 0) and the onnxruntime top-1
agreement. INT4: every recipe named by --int4-recipes (bench_tqt.LOW_BIT_RECIPES) is run, the one with
the best accuracy on the validation split (5k images held out from the training data, never the test
set) is kept, and the FP32 net fine-tuned with that recipe's schedule (same extra epochs, weight lr,
BN schedule) is reported beside it, so the INT4 gap shows both against the FP32 start (the target)
and against FP32 given the same extra training. Writes bench/results/bench_zoo.json and .md.

    .venv/bin/python bench/bench_zoo.py            # full: 10k test images, a few minutes per net
    .venv/bin/python bench/bench_zoo.py --quick    # smoke run on subsets
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_tqt import LOW_BIT_RECIPES, LowBitRecipe  # bench/ is the script's directory

from edgetrain.data import Dataset, load_dataset
from edgetrain.export import ort_session, to_integer, to_onnx
from edgetrain.graph import QuantConfig, QuantizedModel, quantize
from edgetrain.models import create_model
from edgetrain.tqt.retrain import RetrainConfig, retrain
from edgetrain.training import evaluate, load_checkpoint, train_float

ZOO = ("mobilenetv2-tiny", "resnet-tiny", "inception-tiny", "darknet-tiny", "mobilenetv3-tiny", "unet-tiny")
RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("int8_static", "int8_retrained", "int4_retrained")


def outputs(model: torch.nn.Module, images: torch.Tensor, batch: int = 500) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(images[i : i + batch]).numpy() for i in range(0, len(images), batch)])


def deployment_checks(qmodel: QuantizedModel, test: Dataset) -> dict[str, Any]:
    """Test top-1, integer-program mismatches and onnxruntime top-1 agreement on the whole test split."""
    reference = outputs(qmodel, test.images)
    start = time.perf_counter()
    integer = to_integer(qmodel).run(test.images)
    int_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = to_onnx(qmodel, Path(tmp) / "model.onnx", test.images[:2])
        session = ort_session(path)
        name = session.get_inputs()[0].name
        onnx_out = np.concatenate(
            [session.run(None, {name: test.images[i : i + 1000].numpy()})[0] for i in range(0, len(test), 1000)]
        )
    return {
        "accuracy": float((reference.argmax(1) == test.labels.numpy()).mean()),
        "integer_mismatches": int((integer != reference).any(axis=1).sum()),
        "integer_top1_accuracy": float((integer.argmax(1) == test.labels.numpy()).mean()),
        "integer_seconds": round(int_seconds, 2),
        "onnx_top1_agreement": float((onnx_out.argmax(1) == reference.argmax(1)).mean()),
        "onnx_top1_accuracy": float((onnx_out.argmax(1) == test.labels.numpy()).mean()),
    }


def float_start(
    name: str, train: Dataset, val: Dataset, epochs: int, seed: int, cache: Path | None
) -> tuple[torch.nn.Module, dict]:
    """The FP32 net: ``epochs`` float epochs (lr 1e-3, batch 128, ``seed``), loaded from ``cache`` (a folder;
    None: no cache) when a run with the same recipe and training-split size left it there
    (bench_calibration.py writes the same files; bench_bn_statistics.py trains its start here, uncached)."""
    torch.manual_seed(seed)
    model = create_model(name)
    cached = cache / f"{name}-{epochs}ep-{len(train)}.pt" if cache is not None else None
    info: dict[str, Any] = {"epochs": epochs, "cache": str(cached) if cached is not None else None}
    if cached is not None and cached.exists():
        model.load_state_dict(load_checkpoint(cached))
        return model, info | {"loaded": True}
    start = time.perf_counter()
    result = train_float(model, train, val, epochs=epochs, lr=1e-3, batch_size=128, seed=seed, progress=False)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cached)
    return model, info | {"best_epoch": result.best_epoch, "seconds": round(time.perf_counter() - start, 1)}


def retrain_config(spec: LowBitRecipe, args: argparse.Namespace) -> RetrainConfig:
    return RetrainConfig(
        epochs=spec.epochs,
        batch_size=args.batch_size,
        weight_lr=spec.weight_lr,
        threshold_lr=spec.threshold_lr,
        bn_stat_epochs=spec.bn_stat_epochs,
        seed=args.seed,
    )


def int4_rows(
    model: torch.nn.Module, data: dict[str, Dataset], calib: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    """Every --int4-recipes candidate; the one with the best validation top-1 is kept (test top-1 of the
    others recorded, never used to choose), then FP32 fine-tuned with the kept recipe's schedule."""
    candidates: dict[str, Any] = {}
    kept: tuple[float, str, QuantizedModel] | None = None
    for name in args.int4_recipes:
        spec = LOW_BIT_RECIPES[name]
        qconfig = QuantConfig(weight_bits=4, weight_calibration=spec.weight_calibration)
        qmodel = quantize(model, calib[:1], calib, qconfig, mode="retrain")
        result = retrain(qmodel, data["train"], data["val"], retrain_config(spec, args), progress=False)
        candidates[name] = {
            "val_accuracy": result.best_val_accuracy,
            "test_accuracy": evaluate(qmodel, data["test"]),
            "best_epoch": result.best_epoch,
            "seconds": round(result.seconds, 1),
            **spec._asdict(),
        }
        if kept is None or result.best_val_accuracy > kept[0]:
            kept = (result.best_val_accuracy, name, qmodel)
    assert kept is not None  # --int4-recipes has at least one name
    _, recipe, qmodel = kept
    spec = LOW_BIT_RECIPES[recipe]
    finetuned = copy.deepcopy(model)
    retrain(finetuned, data["train"], data["val"], retrain_config(spec, args), progress=False)
    return {
        "recipe": recipe,
        "chosen_on": "validation split",
        "epochs": spec.epochs,
        "train_images": len(data["train"]),
        "weight_lr": spec.weight_lr,
        "threshold_lr": spec.threshold_lr,
        "bn_stat_epochs": spec.bn_stat_epochs,
        "batch_size": args.batch_size,
        "candidates": candidates,
        "fp32_finetuned_accuracy": evaluate(finetuned, data["test"]),
        **deployment_checks(qmodel, data["test"]),
    }


def int8_retrained_row(
    model: torch.nn.Module, data: dict[str, Dataset], calib: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    qmodel = quantize(model, calib[:1], calib, QuantConfig(), mode="retrain")
    config = RetrainConfig(
        epochs=args.retrain_epochs, batch_size=args.batch_size, weight_lr=args.weight_lr, seed=args.seed
    )
    train = data["train"].subset(args.retrain_samples) if args.retrain_samples else data["train"]
    result = retrain(qmodel, train, data["val"], config, progress=False)
    return {
        "epochs": round(args.retrain_epochs * len(train) / len(data["train"]), 3),
        "train_images": len(train),
        "best_epoch": result.best_epoch,
        "seconds": round(result.seconds, 1),
        "weight_lr": args.weight_lr,
        "threshold_lr": config.threshold_lr,
        "batch_size": args.batch_size,
        **deployment_checks(qmodel, data["test"]),
    }


def run_net(name: str, data: dict[str, Dataset], args: argparse.Namespace) -> dict[str, Any]:
    cache = None if args.quick else Path(args.cache)
    model, fp32_info = float_start(name, data["train"], data["val"], args.float_epochs, args.seed, cache)
    row: dict[str, Any] = {"model": name, "fp32": {"accuracy": evaluate(model, data["test"]), **fp32_info}}
    example, calib = data["train"].images[:1], data["train"].images[: args.calib]
    start = time.perf_counter()
    static = quantize(model, example, calib, QuantConfig(), mode="static")
    row["int8_static"] = {
        "calibration": QuantConfig().activation_calibration,
        "calibration_images": len(calib),
        "calibration_seconds": round(time.perf_counter() - start, 1),
        **deployment_checks(static, data["test"]),
    }
    if not args.skip_int8_retrain:
        row["int8_retrained"] = int8_retrained_row(model, data, calib, args)
    row["int4_retrained"] = int4_rows(model, data, calib, args)
    row["gaps_pt"] = {k: round(100 * (row[k]["accuracy"] - row["fp32"]["accuracy"]), 2) for k in COLUMNS if k in row}
    row["gaps_pt"]["int4_vs_fp32_finetuned"] = round(
        100 * (row["int4_retrained"]["accuracy"] - row["int4_retrained"]["fp32_finetuned_accuracy"]), 2
    )
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict[str, Any]], command: str, quick: bool, note: str = "") -> str:
    lines = [
        "## Graph quantizer zoo (Fashion-MNIST)" + (" — quick run" if quick else ""),
        "",
        "| net | FP32 | INT8 static | INT8 retrained | INT4-weight retrained (recipe) | INT4 vs FP32 start / vs FP32 "
        "fine-tuned alike (pt) | integer mismatches (static/int8/int4) | onnxruntime top-1 agreement "
        "(static/int8/int4) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:  # rows of an earlier format (merged): static by kl_j, INT4 by the zoo recipe, no fine-tuned baseline
        int4 = r["int4_retrained"]
        int8 = r.get("int8_retrained")
        static = r["int8_static"]
        finetuned_gap = r["gaps_pt"].get("int4_vs_fp32_finetuned")
        lines.append(
            f"| {r['model']} | {100 * r['fp32']['accuracy']:.2f} | {100 * static['accuracy']:.2f}"
            + ("" if "calibration" in static else " (kl_j)")
            + " | "
            + (f"{100 * int8['accuracy']:.2f} ({int8['epochs']:.2f} ep" if int8 else "not run")
            + (", earlier run" if int8 and "earlier_run" in int8 else "")
            + (") | " if int8 else " | ")
            + f"{100 * int4['accuracy']:.2f} ({int4.get('recipe', 'zoo, not chosen on val')}, {int4['epochs']} ep) | "
            f"{r['gaps_pt']['int4_retrained']:+.2f} / "
            + ("not measured" if finetuned_gap is None else f"{finetuned_gap:+.2f}")
            + " | "
            f"{' / '.join(str(r[k]['integer_mismatches']) if k in r else '-' for k in COLUMNS)} | "
            f"{' / '.join('%.2f%%' % (100 * r[k]['onnx_top1_agreement']) if k in r else '-' for k in COLUMNS)} |"
        )
    limits = {"int8_static": -2.0, "int8_retrained": -0.2, "int4_retrained": -1.0, "int4_vs_fp32_finetuned": -1.0}
    misses = {
        key: [f"{r['model']} {r['gaps_pt'][key]:+.2f} pt" for r in rows if r["gaps_pt"].get(key, 0.0) < limit]
        for key, limit in limits.items()
    }
    not_run = {
        "int8_retrained": [r["model"] for r in rows if "int8_retrained" not in r],
        "int4_vs_fp32_finetuned": [r["model"] for r in rows if "int4_vs_fp32_finetuned" not in r["gaps_pt"]],
    }
    labels = {
        "int8_static": "INT8 static >= FP32 - 2 pt",
        "int8_retrained": "INT8 retrained >= FP32 - 0.2 pt",
        "int4_retrained": "INT4 >= FP32 start - 1 pt (the target)",
        "int4_vs_fp32_finetuned": "INT4 >= FP32 fine-tuned with the same recipe - 1 pt",
    }
    verdicts = [
        f"{labels[key]}: "
        + ("met on every net" if not missed else "NOT met: " + "; ".join(missed))
        + (f" (not measured on {', '.join(not_run[key])})" if not_run.get(key) else "")
        for key, missed in misses.items()
    ]
    candidates = "; ".join(
        f"{r['model']}: "
        + ", ".join(
            f"{name} val {100 * c['val_accuracy']:.2f} / test {100 * c['test_accuracy']:.2f}"
            for name, c in r["int4_retrained"]["candidates"].items()
        )
        for r in rows
        if "candidates" in r["int4_retrained"]
    )
    lines += [
        "",
        f"Command: `{command}`",
        "",
        "Verdicts: " + ". ".join(verdicts) + ".",
        "",
        "INT8 static: the default `auto` calibration (`kl_j` where marked: rows of an earlier run) on the first "
        "512 training images (bench_calibration.py has 256 and 1024). INT8-retrained cells marked 'earlier run' "
        "come from that run, gap taken against its own FP32 start (same recipe and seed, trained separately). "
        "Retraining starts from the FP32 weights (TQT recipe: Adam, thresholds lr 1e-2 halved every 1000*24/B "
        "steps, weight lr larger than Graffitist's 1e-6, recorded in the JSON), so the retrained columns include "
        "extra training epochs the FP32 column did not get; for INT4 the FP32 net fine-tuned with the kept "
        "recipe's schedule is the second baseline. INT4 (weights 4-bit, first and last layer 8-bit): the "
        "recipe kept is the candidate with the best top-1 on the validation split (5k images held out from "
        f"the training data), never chosen on the test set; candidates (val / test top-1 %): {candidates}.",
        "",
    ] + ([note, ""] if note else [])
    return "\n".join(lines)


def merge(paths: list[str], out: str) -> int:
    """One result file (and markdown fragment) from the rows of several runs."""
    parts = [json.loads(Path(p).read_text()) for p in paths if Path(p).exists()]
    merged: dict[str, dict[str, Any]] = {}
    source: dict[str, str] = {}  # model -> the command of the run its row came from
    for part in parts:  # later parts win; a column a later run skipped keeps the earlier run's value, marked
        for row in part["results"]:
            earlier = merged.get(row["model"])
            if earlier is not None and "int8_retrained" not in row and "int8_retrained" in earlier:
                row = row | {"int8_retrained": earlier["int8_retrained"] | {"earlier_run": source[row["model"]]}}
                row["gaps_pt"] = row["gaps_pt"] | {"int8_retrained": earlier["gaps_pt"]["int8_retrained"]}
            merged[row["model"]], source[row["model"]] = row, part["command"]
    rows = list(merged.values())
    command = " ; ".join(part["command"] for part in parts)
    missing = sorted(set(ZOO) - {row["model"] for row in rows})
    note = (
        f"Run as {len(parts)} partial runs (one thread each, the machine being shared), "
        "then combined with `--merge`."
        + (f" Not finished in time: {', '.join(missing)}." if missing else "")
        + " Retraining schedules (training images seen, epochs): "
        + "; ".join(
            f"{row['model']} {row['int8_retrained']['train_images']} ({row['int8_retrained']['epochs']:.2f} ep)"
            for row in rows
            if "int8_retrained" in row
        )
        + "."
    )
    result = parts[0] | {
        "command": command,
        "results": rows,
        "complete": not missing,
        "missing": missing,
        "merged_from": paths,
    }
    (RESULTS / f"{out}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{out}.md").write_text(markdown(rows, command, result["quick"], note))
    print((RESULTS / f"{out}.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(ZOO))
    parser.add_argument("--float-epochs", type=int, default=2)
    parser.add_argument("--retrain-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--weight-lr", type=float, default=1e-4)
    parser.add_argument("--calib", type=int, default=512, help="calibration images")
    parser.add_argument(
        "--retrain-samples",
        type=int,
        default=0,
        help="retrain on the first N training images (0: all); epochs are reported as fractions",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="combine the JSON results of several partial runs into --out (no training)",
    )
    parser.add_argument(
        "--int4-recipes",
        nargs="+",
        choices=list(LOW_BIT_RECIPES),
        default=["bn0-1ep-wlr1e-3"],
        help="INT4 candidates (bench_tqt.LOW_BIT_RECIPES); the best on the validation split is kept",
    )
    parser.add_argument("--skip-int8-retrain", action="store_true", help="no INT8 retrained column (time)")
    parser.add_argument("--cache", default="runs/bench_calibration", help="FP32 weights are kept here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="subsets and one epoch each (smoke run)")
    parser.add_argument("--out", default="bench_zoo")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    torch.set_num_threads(args.threads)
    data = {split: load_dataset("fashion-mnist", split) for split in ("train", "val", "test")}
    if args.quick:
        data = {"train": data["train"].subset(3000), "val": data["val"].subset(500), "test": data["test"].subset(1000)}
        args.float_epochs, args.retrain_epochs, args.calib = 1, 1, 128
    command = ("python bench/bench_zoo.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    rows: list[dict[str, Any]] = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.models:  # results are rewritten after every net, so a partial run keeps its rows
        rows.append(run_net(name, data, args))
        result = {
            "benchmark": "bench_zoo",
            "dataset": "fashion-mnist",
            "test_images": len(data["test"]),
            "quick": args.quick,
            "threads": args.threads,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "command": command,
            "complete": len(rows) == len(args.models),
            "results": rows,
        }
        (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1))
        (RESULTS / f"{args.out}.md").write_text(markdown(rows, command, args.quick))
    print((RESULTS / f"{args.out}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
