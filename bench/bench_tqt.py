"""TQT on a small CNN (mnistnet) on Fashion-MNIST: FP32, INT8 static, INT8 retrained (weights +
thresholds), INT8 retrained with thresholds fixed, INT4-weight retrained; accuracy, epochs of the
best checkpoint, and the time of one QAT step against one float step (medians, same run).

    .venv/bin/python bench/bench_tqt.py            # full training split (55k), ~1 h on 2 busy cores
    .venv/bin/python bench/bench_tqt.py --quick    # 8k training images, a few minutes
    .venv/bin/python bench/bench_tqt.py --low-bit mobilenetv2-tiny --recipes zoo mse-4ep

Writes bench/results/tqt.json and bench/results/tqt.md (then run bench/render.py). ``--low-bit NET``
instead retrains a zoo net with INT4 weights (first/last layer INT8, TQT section 5) under the named
recipes (LOW_BIT_RECIPES) from the zoo benchmark's FP32 start (with ``--finetuned-baseline``, beside the
FP32 net fine-tuned for the longest recipe's schedule) and writes bench/results/tqt_int4_<net>.json / .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import torch
from bench_qat_speed import step_times  # bench/ is the script's directory

from edgetrain.atomic import write_json_atomic, write_text_atomic
from edgetrain.data import Dataset, load_dataset
from edgetrain.graph import QuantConfig, quantize
from edgetrain.models import create_model
from edgetrain.tqt import RetrainConfig, retrain
from edgetrain.training import Trainer, TrainHook, evaluate, load_checkpoint, train_float

RESULTS = Path(__file__).resolve().parent / "results"


class LowBitRecipe(NamedTuple):
    """An INT4-weight retraining recipe (all: 8-bit first/last layer weights, 8-bit activations, batch 128)."""

    weight_calibration: str | None  # None: the retrain default (3sd)
    epochs: int
    threshold_lr: float = 1e-2
    bn_stat_epochs: int = 1  # epochs with batch statistics before BN is frozen (0: frozen from the start)
    weight_lr: float = 1e-4
    kd_label_weight: float | None = None  # a: a CE + (1 - a) T^2 KL from the FP32 start (None: labels only)
    kd_temperature: float = 2.0
    depthwise_bits: int | None = None  # depthwise convs' weight bits (None: 4 like the rest)


# "zoo" is bench_zoo.py's recipe; "bn0-*": BN frozen from the first step (the FP32 net's moving statistics).
LOW_BIT_RECIPES: dict[str, LowBitRecipe] = {
    "zoo": LowBitRecipe(None, 2),
    "mse-2ep": LowBitRecipe("mse", 2),
    "4ep": LowBitRecipe(None, 4),
    "mse-4ep": LowBitRecipe("mse", 4),
    "mse-4ep-th3e-2": LowBitRecipe("mse", 4, threshold_lr=3e-2),
    "bn0-4ep": LowBitRecipe(None, 4, bn_stat_epochs=0),
    "bn0-4ep-wlr1e-3": LowBitRecipe(None, 4, bn_stat_epochs=0, weight_lr=1e-3),
    "bn0-1ep-wlr1e-3": LowBitRecipe(None, 1, bn_stat_epochs=0, weight_lr=1e-3),
    "bn0-2ep-wlr1e-3": LowBitRecipe(None, 2, bn_stat_epochs=0, weight_lr=1e-3),
    "bn0-3ep-wlr1e-3": LowBitRecipe(None, 3, bn_stat_epochs=0, weight_lr=1e-3),
    "bn0-1ep-wlr1e-3-dw8": LowBitRecipe(None, 1, bn_stat_epochs=0, weight_lr=1e-3, depthwise_bits=8),
    "bn0-1ep-wlr1e-3-kd": LowBitRecipe(None, 1, bn_stat_epochs=0, weight_lr=1e-3, kd_label_weight=0.5),
}


class EpochTest(TrainHook):
    """Test top-1 at the start of every epoch after the first (recorded only; the kept checkpoint is the
    best on the validation split)."""

    def __init__(self, test: Dataset) -> None:
        self.test, self.accuracy = test, []

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if epoch:
            self.accuracy.append(round(evaluate(trainer.model, self.test), 4))


def weight_share_at_8_bits(qmodel: torch.nn.Module) -> float:
    """The fraction of the net's weights stored at 8 bits (first / last layer, depthwise convs when INT8)."""
    counts = {8: 0, 4: 0}
    for module in qmodel.modules():
        quantizer = getattr(module, "weight_q", None)
        if quantizer is not None and hasattr(module, "weight"):
            counts[quantizer.bits] += module.weight.numel()
    return round(counts[8] / sum(counts.values()), 4)


def low_bit(
    net: str, recipes: list[str], cache: Path, finetuned_baseline: bool, stem: str, threads: int, seed: int
) -> None:
    """INT4-weight retraining of a zoo net under several recipes, bench_zoo.py's FP32 start (seed 0,
    2 float epochs, batch 128, 512 calibration images); gaps against FP32 (and FP32 fine-tuned).
    ``seed``: the retraining's batch order (the FP32 start is the same for every seed)."""
    torch.manual_seed(0)
    train, val, test = (load_dataset("fashion-mnist", split) for split in ("train", "val", "test"))
    model = create_model(net)
    cached = cache / f"{net}_float_2ep.pt"
    if cached.exists():
        model.load_state_dict(load_checkpoint(cached))
    else:
        train_float(model, train, val, epochs=2, lr=1e-3, batch_size=128, seed=0, progress=False)
        torch.save(model.state_dict(), cached)
    rows: dict[str, dict] = {"FP32": {"accuracy": evaluate(model, test)}}
    if finetuned_baseline:
        longest = max((LOW_BIT_RECIPES[name] for name in recipes), key=lambda spec: spec.epochs)
        finetuned = copy.deepcopy(model)
        schedule = RetrainConfig(
            epochs=longest.epochs,
            batch_size=128,
            weight_lr=longest.weight_lr,
            bn_stat_epochs=longest.bn_stat_epochs,
            seed=seed,
        )
        retrain(finetuned, train, val, schedule, progress=False)
        rows[f"FP32 fine-tuned ({longest.epochs} ep)"] = {
            "accuracy": evaluate(finetuned, test),
            "epochs": longest.epochs,
            "bn_stat_epochs": longest.bn_stat_epochs,
            "weight_lr": longest.weight_lr,
        }
    print(rows, flush=True)
    calib = train.images[:512]
    for name in recipes:
        spec = LOW_BIT_RECIPES[name]
        qconfig = QuantConfig(
            weight_bits=4, weight_calibration=spec.weight_calibration, depthwise_weight_bits=spec.depthwise_bits
        )
        qmodel = quantize(model, calib[:1], calib, qconfig, mode="retrain")
        recipe = RetrainConfig(
            epochs=spec.epochs,
            batch_size=128,
            weight_lr=spec.weight_lr,
            threshold_lr=spec.threshold_lr,
            bn_stat_epochs=spec.bn_stat_epochs,
            distill="none" if spec.kd_label_weight is None else "logits",
            distill_temperature=spec.kd_temperature,
            distill_label_weight=spec.kd_label_weight or 0.0,
            seed=seed,
        )
        epoch_test = EpochTest(test)
        teacher = None if spec.kd_label_weight is None else model
        result = retrain(qmodel, train, val, recipe, progress=False, hooks=[epoch_test], teacher=teacher)
        rows[f"INT4 {name}"] = {
            "accuracy": evaluate(qmodel, test),
            "weight_calibration": qconfig.weight_method("retrain"),
            "depthwise_weight_bits": qconfig.depthwise_weight_bits or 4,
            "weights_at_8_bits": weight_share_at_8_bits(qmodel),
            "epochs": spec.epochs,
            "threshold_lr": spec.threshold_lr,
            "bn_stat_epochs": spec.bn_stat_epochs,
            "weight_lr": spec.weight_lr,
            "distill": recipe.distill,
            "distill_label_weight": recipe.distill_label_weight,
            "distill_temperature": recipe.distill_temperature,
            "best_epoch": result.best_epoch,
            "test_after_epoch": epoch_test.accuracy,  # after epochs 1 .. epochs-1
            "seconds": round(result.seconds, 1),
        }
        print(name, rows[f"INT4 {name}"], flush=True)
    fp32 = rows["FP32"]["accuracy"]
    payload = {
        "recorded_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "model": net,
        "dataset": "fashion-mnist",
        "retrain_seed": seed,
        "rows": rows,
        "gaps_vs_fp32_pt": {k: round(100 * (r["accuracy"] - fp32), 2) for k, r in rows.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / f"{stem}.json", payload, indent=2)
    lines = [
        f"## INT4-weight TQT retraining of {net} (Fashion-MNIST; recipes {', '.join(recipes)})",
        "",
        "| configuration | weight threshold init | epochs | BN-statistics epochs | weight lr | threshold lr "
        "| test top-1 | vs FP32 (pt) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, row in rows.items():
        fields = ("weight_calibration", "epochs", "bn_stat_epochs", "weight_lr", "threshold_lr")
        cells = [row.get(field, "") for field in fields]
        lines.append(
            f"| {key} | {' | '.join(str(c) for c in cells)} | {100 * row['accuracy']:.2f} | "
            f"{payload['gaps_vs_fp32_pt'][key]:+.2f} |"
        )
    lines += [
        "",
        f"Command: `.venv/bin/python bench/bench_tqt.py{f' --threads {threads}' if threads != 1 else ''} "
        f"--low-bit {net} --recipes {' '.join(recipes)}"
        f"{' --finetuned-baseline' if finetuned_baseline else ''}{f' --retrain-seed {seed}' if seed else ''} "
        f"--name {stem}`. "
        "Same FP32 start as bench_zoo.py (2 float epochs, seed 0); INT4 weights except the first and last "
        "layer (INT8), INT8 activations, per-tensor power-of-2 thresholds (TQT section 5), batch 128; the kept "
        "checkpoint is the best on the validation split (test top-1 after each epoch in the JSON). "
        "A fine-tuned FP32 row (--finetuned-baseline) gets the longest recipe's extra epochs, weight lr and "
        "BN schedule, so a gain from the extra training shows there too. Target: INT4 within 1 pt of FP32.",
        "",
    ]
    write_text_atomic(RESULTS / f"{stem}.md", "\n".join(lines))
    print("\n".join(lines))


def seed_summary(stems: list[str], name: str) -> None:
    """One table over ``--low-bit`` runs of the same net that differ in recipe and retraining seed: per recipe,
    INT4 test top-1 per seed and mean, the gap to the FP32 start, the FP32 net fine-tuned alike, the gap to it."""
    runs = [json.loads((RESULTS / f"{stem}.json").read_text()) for stem in stems]
    nets = {run["model"] for run in runs}
    if len(nets) != 1:
        raise SystemExit(f"--seed-summary takes runs of one net, got {sorted(nets)}")
    by_recipe: dict[str, list[tuple[int, float, float | None, float]]] = {}
    for run in runs:
        fp32 = run["rows"]["FP32"]["accuracy"]
        finetuned = next((r["accuracy"] for k, r in run["rows"].items() if k.startswith("FP32 fine-tuned")), None)
        for key, row in run["rows"].items():
            if key.startswith("INT4 "):
                by_recipe.setdefault(key[5:], []).append((run.get("retrain_seed", 0), row["accuracy"], finetuned, fp32))
    net = nets.pop()
    lines = [
        f"## INT4-weight retraining of {net} over retraining seeds",
        "",
        "| recipe | seeds | INT4 test top-1 per seed (mean) | vs FP32 start (mean) | FP32 fine-tuned alike (mean) "
        "| INT4 - fine-tuned (mean) | within 1 pt of FP32 start |",
        "|---|---|---|---|---|---|---|",
    ]

    def cells(values: list[float], signed: bool = False) -> str:
        text = " / ".join(f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}" for v in values)
        mean = sum(values) / len(values)
        return f"{text} ({100 * mean:+.2f})" if signed else f"{text} ({100 * mean:.2f})"

    for recipe, entries in by_recipe.items():
        entries.sort()
        seeds = [e[0] for e in entries]
        int4 = [e[1] for e in entries]
        start = [e[1] - e[3] for e in entries]
        tuned = [e[2] for e in entries if e[2] is not None]
        gaps = [e[1] - e[2] for e in entries if e[2] is not None]
        held = sum(v >= -0.01 for v in start)
        lines.append(
            f"| {recipe} | {', '.join(map(str, seeds))} | {cells(int4)} | {cells(start, True)} | "
            f"{cells(tuned) if tuned else '-'} | {cells(gaps, True) if gaps else '-'} | {held} of {len(entries)} |"
        )
    lines += [
        "",
        f"Command: `.venv/bin/python bench/bench_tqt.py --seed-summary {' '.join(stems)} --name {name}` over runs of "
        "`bench/bench_tqt.py --low-bit NET --recipes R --finetuned-baseline --retrain-seed S` (their own sections "
        "in the appendix). The seed sets the retraining's batch order; the FP32 start is the same 2-epoch net.",
        "",
    ]
    payload = {"recorded_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "model": net, "runs": stems}
    write_json_atomic(RESULTS / f"{name}.json", payload, indent=2)
    write_text_atomic(RESULTS / f"{name}.md", "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8k training images, 1 float epoch")
    parser.add_argument("--float-epochs", type=int, default=None)
    parser.add_argument("--retrain-seed", type=int, default=0, help="--low-bit: the retraining seed (batch order)")
    parser.add_argument("--retrain-epochs", type=int, default=None)
    parser.add_argument("--weight-lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_tqt"))
    parser.add_argument("--low-bit", metavar="NET", help="INT4 recipes on this zoo net instead (see the docstring)")
    parser.add_argument("--recipes", nargs="+", choices=list(LOW_BIT_RECIPES), default=["zoo", "mse-4ep"])
    parser.add_argument("--finetuned-baseline", action="store_true", help="also fine-tune FP32 (--low-bit)")
    parser.add_argument("--name", help="result stem for --low-bit (default tqt_int4_<net>)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed-summary", nargs="+", metavar="STEM", help="summarise --low-bit runs (result stems)")
    args = parser.parse_args()
    if args.seed_summary:
        seed_summary(args.seed_summary, args.name or "tqt_int4_seeds")
        return
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.low_bit:
        stem = args.name or f"tqt_int4_{args.low_bit}"
        low_bit(args.low_bit, args.recipes, args.cache, args.finetuned_baseline, stem, args.threads, args.retrain_seed)
        return
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
        times["float"] += step_times(float_model, images, labels, 8)[2:]  # first two: warm-up
        times["qat"] += step_times(qat, images, labels, 8)[2:]
        times["qat_bn_frozen"] += step_times(qat_frozen, images, labels, 8)[2:]
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
    write_json_atomic(RESULTS / "tqt.json", payload, indent=2)
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
        f"(later epochs) {frozen_ms:.1f} ms = **{frozen_ms / float_ms:.2f}x** (target <= 1.3x).",
        "",
        f"Command: `.venv/bin/python bench/bench_tqt.py{' --quick' if args.quick else ''}`. "
        "Gaps are against the better FP32 row (the fine-tuned one gets the same extra training). "
        f"Targets: INT8 retrained >= FP32 - 0.2 pt (measured {payload['targets']['int8_gap_pt']:+.2f}), "
        f"INT4-weight >= FP32 - 1 pt (measured {payload['targets']['int4_gap_pt']:+.2f}).",
        "",
    ]
    write_text_atomic(RESULTS / "tqt.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
