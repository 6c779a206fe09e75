"""Peers benchmark: our TQT QAT vs Brevitas fixed-point QAT vs torch.ao QAT.

One net (``mnistnet``), one float-pretrained starting point, the same data, batch order, epochs and
optimizer (Adam, weights lr 1e-4; learned scales/thresholds lr 1e-2 where a method has them). The four
models (float fine-tuning, ours, Brevitas, torch.ao) take their training steps in turn on the same
batch, so the step times see the same machine load. Reports test top-1 and the median step time.

- ours: ``edgetrain.quantize(mode="retrain")``: int8 per-tensor power-of-2 weights and activations,
  int16 accumulators, BN folded with the training-time correction.
- Brevitas 0.13: ``Int8WeightPerTensorFixedPoint`` weights, ``Int8ActPerTensorFixedPoint`` input,
  ``Uint8ActPerTensorFixedPoint`` after ReLU (power-of-2 scales), BN kept unfolded in float.
- torch.ao: ``prepare_qat_fx`` with the default x86 QAT qconfig (per-channel int8 weights, affine uint8
  activations with real-valued scales: a less constrained format), accuracy after ``convert_fx``.

    .venv/bin/python bench/bench_peers.py [--quick]
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
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgetrain.data import Dataset, epoch_batches, load_dataset, num_batches
from edgetrain.graph import quantize
from edgetrain.models import create_model
from edgetrain.training import adam, evaluate, train_float

RESULTS = Path(__file__).resolve().parent / "results"
WEIGHT_LR, SCALE_LR = 1e-4, 1e-2


def brevitas_mnistnet(float_model: nn.Sequential) -> nn.Module:
    """mnistnet with Brevitas power-of-2 fixed-point quantizers, initialised from the float weights."""
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFixedPoint, Int8WeightPerTensorFixedPoint, Uint8ActPerTensorFixedPoint

    f = float_model
    net = nn.Sequential(
        qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint),
        qnn.QuantConv2d(1, 32, 3, padding=1, bias=False, weight_quant=Int8WeightPerTensorFixedPoint),
        copy.deepcopy(f[1]),
        qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint),
        nn.MaxPool2d(2),
        qnn.QuantConv2d(32, 64, 3, padding=1, bias=False, weight_quant=Int8WeightPerTensorFixedPoint),
        copy.deepcopy(f[5]),
        qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint),
        nn.MaxPool2d(2),
        nn.Flatten(),
        qnn.QuantLinear(f[9].in_features, 128, bias=True, weight_quant=Int8WeightPerTensorFixedPoint),
        qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint),
        nn.Dropout(0.25),
        qnn.QuantLinear(128, f[12].out_features, bias=True, weight_quant=Int8WeightPerTensorFixedPoint),
    )
    for dst, src in ((1, 0), (5, 4), (10, 9), (13, 12)):
        net[dst].weight.data.copy_(f[src].weight.data)
        if f[src].bias is not None:
            net[dst].bias.data.copy_(f[src].bias.data)
    return net


def torch_ao_qat(float_model: nn.Module, example: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(copy.deepcopy(float_model).train(), get_default_qat_qconfig_mapping("x86"), (example,))


def grouped_adam(model: nn.Module, is_scale: Any) -> torch.optim.Optimizer:
    weights = [p for n, p in model.named_parameters() if not is_scale(n)]
    scales = [p for n, p in model.named_parameters() if is_scale(n)]
    groups = [{"params": weights, "lr": WEIGHT_LR}] + ([{"params": scales, "lr": SCALE_LR}] if scales else [])
    return adam(groups, betas=(0.9, 0.999), eps=1e-8)  # edgetrain's trainers' Adam, for every method alike


def run(args: argparse.Namespace, data: dict[str, Dataset]) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    float_model = create_model("mnistnet")
    train_float(
        float_model,
        data["train"],
        data["val"],
        epochs=args.float_epochs,
        batch_size=128,
        seed=args.seed,
        progress=False,
    )
    fp32 = evaluate(float_model, data["test"])
    example, calib = data["train"].images[:1], data["train"].images[: args.calib]
    models: dict[str, nn.Module] = {
        "float": copy.deepcopy(float_model),
        "edgetrain": quantize(float_model, example, calib, mode="retrain"),
        "brevitas": brevitas_mnistnet(float_model),
        "torch_ao": torch_ao_qat(float_model, example),
    }
    optimizers = {
        "float": grouped_adam(models["float"], lambda n: False),
        "edgetrain": grouped_adam(models["edgetrain"], lambda n: n.endswith("log2_t")),
        "brevitas": grouped_adam(models["brevitas"], lambda n: "scaling_impl" in n),
        "torch_ao": grouped_adam(models["torch_ao"], lambda n: False),
    }
    times: dict[str, list[float]] = {k: [] for k in models}
    bn_phase: list[float] = []
    for m in models.values():
        m.train()
    step = 0
    total = args.epochs * num_batches(len(data["train"]), args.batch_size)
    total = min(total, args.max_steps) if args.max_steps else total
    freeze_at = int(args.bn_stat_fraction * total)
    for epoch in range(args.epochs):
        for images, labels in epoch_batches(
            data["train"].images, data["train"].labels, args.batch_size, args.seed, epoch
        ):
            if step == freeze_at:  # the TQT recipe: batch statistics first, then frozen BN
                bn_phase = times.pop("edgetrain")
                times["edgetrain"] = []
                for m in models["edgetrain"].modules():
                    if hasattr(m, "freeze_bn"):
                        m.freeze_bn()
            for name, model in models.items():
                start = time.perf_counter()
                optimizers[name].zero_grad()
                F.cross_entropy(model(images), labels).backward()
                optimizers[name].step()
                times[name].append(time.perf_counter() - start)
            step += 1
            if step >= total:
                break
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao_int8 = convert_fx(copy.deepcopy(models["torch_ao"]).eval())
    accuracy = {name: evaluate(m, data["test"]) for name, m in models.items() if name != "torch_ao"}
    accuracy["torch_ao"] = evaluate(ao_int8, data["test"])
    step_ms = {name: 1000 * statistics.median(t[1:]) for name, t in times.items()}
    step_ms["edgetrain_bn_statistics_phase"] = 1000 * statistics.median(bn_phase[1:] or bn_phase)
    return {
        "net": "mnistnet",
        "fp32_pretrained": fp32,
        "float_epochs": args.float_epochs,
        "qat_epochs": args.epochs,
        "qat_steps": step,
        "batch_size": args.batch_size,
        "weight_lr": WEIGHT_LR,
        "scale_lr": SCALE_LR,
        "accuracy": accuracy,
        "step_ms": step_ms,
        "ratios": {
            "edgetrain_vs_float_step": step_ms["edgetrain"] / step_ms["float"],
            "edgetrain_vs_brevitas_step": step_ms["edgetrain"] / step_ms["brevitas"],
            "edgetrain_vs_torch_ao_step": step_ms["edgetrain"] / step_ms["torch_ao"],
        },
    }


def markdown(r: dict[str, Any], command: str, quick: bool) -> str:
    acc, ms = r["accuracy"], r["step_ms"]
    names = {
        "float": "float fine-tuning (FP32)",
        "edgetrain": "edgetrain TQT (int8 pow-2, BN fold)",
        "brevitas": "Brevitas fixed-point (int8 pow-2)",
        "torch_ao": "torch.ao QAT (x86 default)",
    }
    lines = [
        f"## QAT against peers: {r['net']} on Fashion-MNIST, batch {r['batch_size']}"
        + (" — quick run" if quick else ""),
        "",
        "| method | test top-1 | QAT step (ms, median) | step vs float |",
        "|---|---|---|---|",
    ]
    for k, label in names.items():
        lines.append(f"| {label} | {100 * acc[k]:.2f} | {ms[k]:.1f} | {ms[k] / ms['float']:.2f}x |")
    phase = ms["edgetrain_bn_statistics_phase"]
    lines.append(
        f"| edgetrain, steps before freeze_bn (two convs per layer) | | {phase:.1f} | {phase / ms['float']:.2f}x |"
    )
    best_peer = max(acc["brevitas"], acc["torch_ao"])
    gap = 100 * (acc["edgetrain"] - best_peer)
    ratio = r["ratios"]
    lines += [
        "",
        f"Command: `{command}`",
        "",
        f"Same pretrained FP32 start ({100 * r['fp32_pretrained']:.2f}%), {r['qat_steps']} steps of batch "
        f"{r['batch_size']}, Adam (weights {WEIGHT_LR:g}, scales {SCALE_LR:g}). Our accuracy is "
        f"{gap:+.2f} pt against the best peer; our QAT step is {ratio['edgetrain_vs_float_step']:.2f}x the "
        f"float step (target <= 1.3x at batch 64), {ratio['edgetrain_vs_brevitas_step']:.2f}x Brevitas' and "
        f"{ratio['edgetrain_vs_torch_ao_step']:.2f}x torch.ao's (targets <= 1x). torch.ao uses per-channel "
        "weights and real-valued scales, a looser format than power-of-2 per-tensor. The four models step "
        "in turn on the same batches, so the ratios are comparable even though absolute times depend on the "
        "machine's load; the steps with batch-norm statistics (before `freeze_bn()`) run a second float "
        "convolution per layer and cost more, as the last row shows.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--float-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1, help="QAT epochs")
    parser.add_argument(
        "--bn-stat-fraction",
        type=float,
        default=0.5,
        help="fraction of the QAT steps with BN batch statistics (ours), then frozen BN",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=0, help="stop QAT after this many steps (0: no limit)")
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench_peers")
    parser.add_argument("--render", action="store_true", help="rewrite the markdown from the saved JSON")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads((RESULTS / f"{args.out}.json").read_text())
        (RESULTS / f"{args.out}.md").write_text(markdown(result, result["command"], result["quick"]))
        return 0
    torch.set_num_threads(args.threads)
    data = {split: load_dataset("fashion-mnist", split) for split in ("train", "val", "test")}
    if args.quick:
        data = {"train": data["train"].subset(2000), "val": data["val"].subset(500), "test": data["test"].subset(1000)}
        args.float_epochs, args.calib = 1, 128
    result = run(args, data)
    command = ("python bench/bench_peers.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    result |= {
        "benchmark": "bench_peers",
        "quick": args.quick,
        "command": command,
        "threads": args.threads,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "test_images": len(data["test"]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{args.out}.md").write_text(markdown(result, command, args.quick))
    print((RESULTS / f"{args.out}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
