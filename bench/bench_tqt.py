"""TQT on a small CNN (mnistnet) on Fashion-MNIST: FP32, INT8 static, INT8 retrained (weights +
thresholds), INT8 retrained with thresholds fixed, INT4-weight retrained; accuracy, epochs of the
best checkpoint, and the time of one QAT step against one float step (medians, same run).

    .venv/bin/python bench/bench_tqt.py            # full training split (55k), ~1 h on 2 busy cores
    .venv/bin/python bench/bench_tqt.py --quick    # 8k training images, a few minutes

Writes bench/results/tqt.json and bench/results/tqt.md (then run bench/render.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from edgetrain.data import load_dataset
from edgetrain.graph import QuantConfig, quantize
from edgetrain.models import create_model
from edgetrain.tqt import RetrainConfig, retrain
from edgetrain.training import evaluate, load_checkpoint, train_float

RESULTS = Path(__file__).resolve().parent / "results"


def step_time(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, repeats: int) -> list[float]:
    """Wall time of forward + backward + Adam step on one batch, ``repeats`` times."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-9)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[2:]  # drop warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8k training images, 1 float epoch")
    parser.add_argument("--float-epochs", type=int, default=None)
    parser.add_argument("--retrain-epochs", type=int, default=None)
    parser.add_argument("--weight-lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_tqt"))
    args = parser.parse_args()
    torch.manual_seed(0)
    train = load_dataset("fashion-mnist", "train")
    val = load_dataset("fashion-mnist", "val")
    test = load_dataset("fashion-mnist", "test")
    if args.quick:
        train, val = train.subset(8000), val.subset(1000)
    float_epochs = args.float_epochs or (1 if args.quick else 4)
    retrain_epochs = args.retrain_epochs or (1 if args.quick else 2)
    scale = "quick" if args.quick else "full"
    args.cache.mkdir(parents=True, exist_ok=True)

    model = create_model("mnistnet")
    cached = args.cache / f"float_{scale}_{float_epochs}ep.pt"
    rows: dict[str, dict] = {}
    if cached.exists():
        model.load_state_dict(load_checkpoint(cached))
        float_result = None
    else:
        checkpoint = args.cache / f"float_{scale}_{float_epochs}ep_ckpt.pt"
        float_result = train_float(model, train, val, epochs=float_epochs, checkpoint=checkpoint)
        torch.save(model.state_dict(), cached)
    rows["FP32"] = {"accuracy": evaluate(model, test), "epochs": float_result.best_epoch if float_result else None}
    print("FP32", rows["FP32"])

    calib = train.images[:512]
    static = quantize(model, calib[:1], calib, QuantConfig(), mode="static")
    rows["INT8 static"] = {"accuracy": evaluate(static, test), "epochs": 0}
    print("INT8 static", rows["INT8 static"])

    recipe = RetrainConfig(epochs=retrain_epochs, batch_size=args.batch_size, weight_lr=args.weight_lr, eval_every=200)
    finetuned = copy.deepcopy(model)
    result = retrain(finetuned, train, val, recipe)  # same schedule, no quantizers: Graffitist's "FP32 (retrain wt)"
    rows["FP32 fine-tuned (same schedule)"] = {
        "accuracy": evaluate(finetuned, test),
        "epochs": round(result.best_epoch, 2),
    }
    print("FP32 fine-tuned", rows["FP32 fine-tuned (same schedule)"])

    variants = {
        "INT8 retrained (wt, th)": (QuantConfig(), True),
        "INT8 retrained (wt, th fixed)": (QuantConfig(), False),
        "INT4-weight retrained (wt, th)": (QuantConfig(weight_bits=4), True),
    }
    for name, (qconfig, train_thresholds) in variants.items():
        qmodel = quantize(model, calib[:1], calib, qconfig, mode="retrain")
        recipe = RetrainConfig(
            epochs=retrain_epochs,
            batch_size=args.batch_size,
            weight_lr=args.weight_lr,
            train_thresholds=train_thresholds,
            eval_every=200,
        )
        result = retrain(qmodel, train, val, recipe)
        rows[name] = {
            "accuracy": evaluate(qmodel, test),
            "epochs": round(result.best_epoch, 2),
            "seconds": result.seconds,
        }
        print(name, rows[name])

    images, labels = train.images[: args.batch_size], train.labels[: args.batch_size]
    qat = quantize(model, calib[:1], calib, QuantConfig(), mode="retrain")
    qat_frozen = quantize(model, calib[:1], calib, QuantConfig(), mode="retrain")
    for module in qat_frozen.modules():
        if hasattr(module, "freeze_bn"):
            module.freeze_bn()
    float_model = copy.deepcopy(model)
    times: dict[str, list[float]] = {"float": [], "qat": [], "qat_bn_frozen": []}
    for _ in range(5):  # interleave to share the machine's noise
        times["float"] += step_time(float_model, images, labels, 6)
        times["qat"] += step_time(qat, images, labels, 6)
        times["qat_bn_frozen"] += step_time(qat_frozen, images, labels, 6)
    step_ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    float_ms, qat_ms, frozen_ms = step_ms["float"], step_ms["qat"], step_ms["qat_bn_frozen"]

    # the fair baseline: the float net trained with the same extra schedule (Graffitist's "FP32 (retrain wt)")
    fp32 = max(rows["FP32"]["accuracy"], rows["FP32 fine-tuned (same schedule)"]["accuracy"])
    payload = {
        "recorded_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "scale": scale,
        "model": "mnistnet",
        "dataset": "fashion-mnist",
        "train_images": len(train),
        "test_images": len(test),
        "float_epochs": float_epochs,
        "retrain": recipe.as_dict(),
        "rows": rows,
        "step_ms": {
            **step_ms,
            "ratio": qat_ms / float_ms,
            "ratio_bn_frozen": frozen_ms / float_ms,
            "batch": args.batch_size,
        },
        "targets": {
            "int8_gap_pt": 100 * (rows["INT8 retrained (wt, th)"]["accuracy"] - fp32),
            "int4_gap_pt": 100 * (rows["INT4-weight retrained (wt, th)"]["accuracy"] - fp32),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tqt.json").write_text(json.dumps(payload, indent=2))
    lines = [
        "## TQT quantization of a small CNN (mnistnet, Fashion-MNIST)",
        "",
        f"{len(train)} training images, full 10k test set; float {float_epochs} epoch(s); retraining "
        f"{retrain_epochs} epoch(s), batch {args.batch_size}, weight lr {args.weight_lr:g} (larger than "
        "Graffitist's 1e-6: a small dataset, see docs/fixed-point.md), threshold lr 1e-2, staircase decays.",
        "",
        "| configuration | test accuracy | vs best FP32 (pt) | epochs (best ckpt) |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        epochs = "" if row["epochs"] is None else row["epochs"]
        lines.append(f"| {name} | {row['accuracy']:.4f} | {100 * (row['accuracy'] - fp32):+.2f} | {epochs} |")
    lines += [
        "",
        f"Step time, batch {args.batch_size}, medians of 30 interleaved: float {float_ms:.1f} ms; QAT with the "
        f"training-time BN fold (first epoch) {qat_ms:.1f} ms = **{qat_ms / float_ms:.2f}x**; QAT with BN frozen "
        f"(later epochs) {frozen_ms:.1f} ms = **{frozen_ms / float_ms:.2f}x** (target <= 1.5x).",
        "",
        f"Command: `.venv/bin/python bench/bench_tqt.py{' --quick' if args.quick else ''}`. "
        "Gaps are against the better FP32 row (the fine-tuned one gets the same extra training). "
        f"Targets: INT8 retrained >= FP32 - 0.2 pt (measured {payload['targets']['int8_gap_pt']:+.2f}), "
        f"INT4-weight >= FP32 - 1 pt (measured {payload['targets']['int4_gap_pt']:+.2f}).",
        "",
    ]
    (RESULTS / "tqt.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
