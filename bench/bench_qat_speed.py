"""QAT step time against the float step, same run, same batch (TQT retraining cost).

One training step = forward + backward + Adam step on one batch of Fashion-MNIST-sized images. Per net,
three models take their steps in turn (so each sees the same machine load): the float net (BatchNorm
with batch statistics), the TQT fake-quantized net in the BN-statistics phase of the recipe (the first
epoch: folded BN with the batch-statistics correction, a second float conv per layer) and with BN
frozen (every later step), and the BN-statistics phase with ``bn_statistics="quantized"`` (opt-in: the
statistics of the layer's own quantized-weight convolution, one convolution per layer). Reports medians
and the ratios QAT / float; the 1-min load average is recorded beside them, the machine being shared
(ratios, not absolute times, are the figure).

    .venv/bin/python bench/bench_qat_speed.py                      # mnistnet + 3 zoo nets, batch 64
    .venv/bin/python bench/bench_qat_speed.py --nets mnistnet --rounds 3 --repeats 1

Writes bench/results/qat_speed.json and qat_speed.md (then run bench/render.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from edgetrain.graph import QuantConfig, quantize
from edgetrain.models import create_model
from edgetrain.tqt import set_bn_statistics
from edgetrain.training import adam

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 1.3
VARIANTS = ("float", "qat_bn_statistics", "qat_bn_frozen", "qat_bn_statistics_quantized")


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}  # cpu: this thread's CPU time (load-robust)


def step_times(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, clock: str = "wall"
) -> list[float]:
    """Seconds of forward + backward + Adam step, ``steps`` times (lr tiny: the weights barely move); ``clock``
    "wall" (elapsed) or "cpu" (the calling thread's CPU time, which waiting for a busy core does not inflate)."""
    now = CLOCKS[clock]
    model.train()
    optimizer = adam([p for p in model.parameters() if p.requires_grad], lr=1e-9)  # the trainers' Adam
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for _ in range(steps):
        start = now()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()
        times.append(now() - start)
    return times


def models_for(net: str, images: torch.Tensor) -> dict[str, nn.Module]:
    """The float net and its two QAT phases, from the same (random, seeded) weights."""
    torch.manual_seed(0)
    float_model = create_model(net)
    with torch.no_grad():  # a few training-mode passes give BN realistic moving statistics
        float_model.train()
        for _ in range(3):
            float_model(images)
    qat = quantize(float_model, images[:1], images, QuantConfig(), mode="retrain")
    frozen = copy.deepcopy(qat)
    for module in frozen.modules():
        if hasattr(module, "freeze_bn"):
            module.freeze_bn()
    quantized_statistics = copy.deepcopy(qat)
    set_bn_statistics(quantized_statistics, "quantized")
    return {
        "float": copy.deepcopy(float_model),
        "qat_bn_statistics": qat,
        "qat_bn_frozen": frozen,
        "qat_bn_statistics_quantized": quantized_statistics,
    }


def measure(net: str, batch: int, rounds: int, steps: int, clock: str = "wall") -> dict:
    """Median step time per variant over ``rounds`` interleaved rounds of ``steps`` steps (warm-up dropped)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    models = models_for(net, images)
    for name in VARIANTS:
        step_times(models[name], images, labels, 2, clock)  # warm-up: allocator, kernels
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name in VARIANTS:
            times[name] += step_times(models[name], images, labels, steps, clock)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {
        "step_ms": ms,
        "ratio_bn_frozen": ms["qat_bn_frozen"] / ms["float"],
        "ratio_bn_statistics": ms["qat_bn_statistics"] / ms["float"],
        "ratio_bn_statistics_quantized": ms["qat_bn_statistics_quantized"] / ms["float"],
        "steps_per_variant": len(times["float"]),
    }


def repeated(net: str, args: argparse.Namespace) -> dict:
    """``measure`` ``args.repeats`` times in turn; the row keeps every repeat and reports the median ratios
    (the spread between repeats is the run-to-run noise of a shared machine)."""
    runs = [measure(net, args.batch_size, args.rounds, args.steps, args.clock) for _ in range(args.repeats)]
    row = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key.startswith("ratio_")}
    row["step_ms"] = {name: statistics.median(run["step_ms"][name] for run in runs) for name in VARIANTS}
    row["steps_per_variant"] = runs[0]["steps_per_variant"]
    row["repeats"] = runs
    return row


def ratio_cell(row: dict, key: str, bold: bool = False) -> str:
    """The median ratio, with the range over the repeats when there are several."""
    text = f"**{row[key]:.2f}x**" if bold else f"{row[key]:.2f}x"
    values = [run[key] for run in row.get("repeats", [])]
    return text + (f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["mnistnet", "resnet-tiny", "mobilenetv2-tiny", "darknet-tiny"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per net")
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--repeats", type=int, default=3, help="whole measurements per net (medians and range)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: thread CPU time (loaded machine)")
    parser.add_argument("--name", default="qat_speed", help="result file stem under bench/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = {}
    for net in args.nets:
        rows[net] = repeated(net, args)
        print(net, json.dumps({k: v for k, v in rows[net].items() if k != "repeats"}))
    load_after = os.getloadavg()[0]
    command = "`.venv/bin/python bench/bench_qat_speed.py" + (
        "" if args.nets == parser.get_default("nets") else " --nets " + " ".join(args.nets)
    )
    command += "".join(
        f" --{flag.replace('_', '-')} {getattr(args, flag)}"
        for flag in ("batch_size", "rounds", "steps", "repeats", "threads", "clock")
        if getattr(args, flag) != parser.get_default(flag)
    )
    command += "`"
    payload = {
        "recorded_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "threads": args.threads,
        "clock": args.clock,
        "batch": args.batch_size,
        "load_1min": {"before": load_before, "after": load_after},
        "target_ratio": TARGET_RATIO,
        "rows": rows,
        "command": command,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2))
    lines = [
        f"## QAT step time vs float (batch {args.batch_size}, {args.threads} thread)",
        "",
        "| net | float (ms) | QAT, BN frozen (ms) | ratio | QAT, BN statistics phase (ms) | ratio | "
        "same, quantized statistics (opt-in) (ms) | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for net, row in rows.items():
        ms = row["step_ms"]
        lines.append(
            f"| {net} | {ms['float']:.1f} | {ms['qat_bn_frozen']:.1f} | {ratio_cell(row, 'ratio_bn_frozen', True)} | "
            f"{ms['qat_bn_statistics']:.1f} | {ratio_cell(row, 'ratio_bn_statistics')} | "
            f"{ms['qat_bn_statistics_quantized']:.1f} | {ratio_cell(row, 'ratio_bn_statistics_quantized')} |"
        )
    lines += [
        "",
        f"Command: {command}. Medians of {rows[args.nets[0]]['steps_per_variant']} steps per variant "
        f"({'wall-clock' if args.clock == 'wall' else 'thread CPU'} time), the "
        f"variants stepping in turn on the same batch; the whole measurement repeated {args.repeats} time(s) "
        "per net: times and ratios are the medians over the repeats, (low-high) the range of the ratio; "
        "1-min load average "
        f"{load_before:.1f} before / {load_after:.1f} after on a shared 2-core machine, so absolute times "
        f"are not comparable across runs, the ratios are. Target: QAT step <= {TARGET_RATIO}x float. "
        "BN frozen is every step after the recipe's first epoch; the BN-statistics phase (first epoch) runs "
        "a second float convolution per layer for the batch statistics (TQT section 3; Jacob et al. 2018); "
        '`bn_statistics="quantized"` (opt-in, other numerics; docs/quantization.md) takes them from the layer\'s own '
        "quantized-weight convolution instead.",
        "",
    ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
