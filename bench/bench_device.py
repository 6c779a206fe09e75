"""Device benchmark: every zoo net adapts on the device as its own exported integer program.

For each net: float pretraining on elastic-deformed MNIST digits (the LRT paper's offline set, disjoint
from the stream digits), static TQT INT8 quantization, export, then ``DeviceNet.from_program`` adapts
on a digital-drift stream (the authors' Binomial(2, p) flip draw) with LowRank, SR-SGD and inference
only, side by side on the same stream. Recorded per run: online accuracy, final test accuracy, max and
total writes (code changes), samples/s (one thread), and that the adapted program re-exported from the
device is bit-exact with it. For lrt-cnn (whose BNs follow pool/ReLU and cannot be folded) the device
runs with streaming BN and with the BNs frozen at their exported codes.

    python bench/bench_device.py                        # full: 5 nets, 3000 stream samples
    python bench/bench_device.py --nets resnet-tiny --samples 300 --pretrain 2000   # quick

Writes ``bench/results/device.json`` and ``device.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import edgetrain as et
from edgetrain.adapt import DeviceNet, OnlineTrainer, make_rule
from edgetrain.adapt.scenarios import make_scenario, pretraining_set
from edgetrain.atomic import write_json_atomic, write_text_atomic
from edgetrain.training import evaluate, train_float

RESULTS = Path(__file__).resolve().parent / "results"
NETS = ["mnistnet", "resnet-tiny", "mobilenetv2-tiny", "darknet-tiny", "lrt-cnn"]
RULES = {"lowrank": {"lr": 0.003}, "sgd-sr": {"lr": 0.003}, "inference": {}}


def pretrained_program(name: str, samples: int, epochs: int, seed: int) -> tuple[et.IntegerProgram, dict]:
    torch.manual_seed(seed)
    train = pretraining_set("mnist", samples=samples, seed=seed)
    val = pretraining_set("mnist", samples=1000, seed=seed, split="val")
    model = et.create_model(name)
    t0 = time.perf_counter()
    train_float(model, train, val, epochs=epochs, lr=2e-3, batch_size=64, seed=seed)
    model.eval()
    calib = train.images[:256]
    qmodel = et.quantize(model, calib[:1], calib, et.QuantConfig(weight_bits=8), mode="static")
    info = {
        "float_val_accuracy": evaluate(model, val),
        "int8_val_accuracy": evaluate(qmodel, val),
        "pretrain_seconds": time.perf_counter() - t0,
    }
    return et.to_integer(qmodel, meta={"model": name, "data": {"name": "mnist"}}), info


def adapt(program: et.IntegerProgram, rule: str, stream, samples: int, streaming_bn: bool) -> dict:
    device = DeviceNet.from_program(program, streaming_bn=streaming_bn)
    trainer = OnlineTrainer(device, make_rule(rule, RULES[rule]), stream, seed=0, test_samples=1000)
    log = trainer.run(samples)
    probe = stream.test_set[0][:200]
    with torch.no_grad():
        expected = device.eval()(probe).numpy()
    mismatches = int(np.any(device.to_program().run(probe) != expected, axis=1).sum())
    final = log["final"]
    return {
        "rule": rule,
        "streaming_bn": streaming_bn,
        "online_accuracy": final["online_accuracy"],
        "test_accuracy": final["test_accuracy"],
        "max_writes": final["max_writes"],
        "total_writes": final["total_writes"],
        "aux_memory_bits": sum(final["aux_memory_bits"].values()),
        "samples_per_second": log["timing"]["samples_per_second"],
        "samples_per_cpu_second": log["timing"]["samples_per_cpu_second"],
        "export_mismatches": mismatches,
    }


def render(result: dict) -> str:
    lines = [
        "## The exported program adapts on the device (every zoo net)",
        "",
        f"`{result['command']}`",
        "",
        f"Stream: {result['samples']} samples of digital drift (authors' Binomial(2, p) flips) on elastic MNIST, "
        f"seed 0; nets pretrained on {result['pretrain_samples']} elastic digits for {result['epochs']} epoch(s), "
        "static INT8; one torch thread. Writes are code changes. Load average (1 min) at start / end: "
        f"{result['load_average_start'][0]:.1f} / {result['load_average_end'][0]:.1f} on 2 cores (samples/s are "
        "only comparable within one run).",
        "",
        "| net | float / INT8 val | rule | streaming BN | online acc | test acc | max writes/cell | total writes "
        "| aux memory (bits) | samples/s | adapted program vs device |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for net in result["nets"]:
        info = net["pretrain"]
        for run in net["runs"]:
            lines.append(
                f"| {net['name']} | {info['float_val_accuracy']:.3f} / {info['int8_val_accuracy']:.3f} | {run['rule']} "
                f"| {'yes' if run['streaming_bn'] else 'no'} | {run['online_accuracy']:.3f} "
                f"| {run['test_accuracy']:.3f} "
                f"| {run['max_writes']} | {run['total_writes']} | {run['aux_memory_bits']} "
                f"| {run['samples_per_second']:.1f} | {run['export_mismatches']} mismatches |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=NETS)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--pretrain", type=int, default=10_000, help="elastic pretraining digits")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "device.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    stream = make_scenario("digital-drift", dataset="mnist", samples=args.samples, seed=0)
    stream = dataclasses.replace(stream, drift=dataclasses.replace(stream.drift, flip_draw="binomial2"))
    result = {"samples": args.samples, "pretrain_samples": args.pretrain, "epochs": args.epochs, "nets": []}
    result["load_average_start"] = list(os.getloadavg())
    result["command"] = "python bench/bench_device.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    for name in args.nets:
        program, info = pretrained_program(name, args.pretrain, args.epochs, seed=0)
        runs = [adapt(program, rule, stream, args.samples, streaming_bn=True) for rule in RULES]
        if any(op["op"] == "scale" for op in program.ops):
            runs.append(adapt(program, "lowrank", stream, args.samples, streaming_bn=False))
        result["nets"].append({"name": name, "pretrain": info, "runs": runs})
        result["load_average_end"] = list(os.getloadavg())
        result["recorded_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write_json_atomic(out, result)  # after every net: a stopped run keeps what it finished
        write_text_atomic(out.with_suffix(".md"), render(result))
    print(render(result))


if __name__ == "__main__":
    main()
