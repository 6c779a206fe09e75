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

Speed (``--speed``): samples/s of the online LowRank loop (``OnlineTrainer.run``, what ``edgetrain adapt``
runs) on the LRT paper's net (128 channels, 512 hidden) along both paths, the ``--model`` path (``QNet``,
autograd) and the ``--program`` path (``DeviceNet`` on the exported TQT INT8 program, stepped by the
autograd-free ``adapt.executor.DeviceStep``, the trainer's default), at 1 and 2 torch threads,
beside the authors' own NumPy/numba loop (github.com/agural/low-rank-training, MIT; their ``lr/`` package
as shipped, timed in the same process on the same images) and a residual and a depthwise zoo net on the
device. Every figure carries the 1-minute load average measured right after it::

    git --git-dir <mirror of agural/low-rank-training> archive HEAD lr | tar -x -C runs/low-rank-training
    python bench/bench_device.py --speed                # 2000 samples per loop (~10 min on 2 idle cores)

Writes ``bench/results/device.json`` and ``device.md`` (the speed section is kept beside the adaptation
results: each mode rewrites only its own part).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

import edgetrain as et
from edgetrain.adapt import DeviceNet, OnlineTrainer, make_rule
from edgetrain.adapt.device import INT8_MATMUL
from edgetrain.adapt.qnet import quantize_for_adaptation
from edgetrain.adapt.scenarios import make_scenario, pretraining_set
from edgetrain.atomic import write_json_atomic, write_text_atomic
from edgetrain.models import LRTNet
from edgetrain.training import evaluate, train_float

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SPEED_CACHE = ROOT / "runs" / "device-speed"
SPEED_ZOO = ["resnet-tiny", "mobilenetv2-tiny"]  # a residual and a depthwise net
AUTHORS_DRIFT = ("digital", 10.0)  # their Fig. 1 digital-drift setting (lr/experiments.py)
NETS = ["mnistnet", "resnet-tiny", "mobilenetv2-tiny", "darknet-tiny", "lrt-cnn"]
RULES = {"lowrank": {"lr": 0.003}, "sgd-sr": {"lr": 0.003}, "inference": {}}


def pretrained_program(
    name: str, samples: int, epochs: int, seed: int, model: torch.nn.Module | None = None, val_samples: int = 1000
) -> tuple[et.IntegerProgram, dict]:
    """Float pretraining on elastic digits, static INT8 TQT, export (``model``: this instance of ``name``)."""
    torch.manual_seed(seed)
    train = pretraining_set("mnist", samples=samples, seed=seed)
    val = pretraining_set("mnist", samples=val_samples, seed=seed, split="val")
    model = model if model is not None else et.create_model(name)
    t0 = time.perf_counter()
    train_float(model, train, val, epochs=epochs, lr=2e-3, batch_size=64, seed=seed, progress=False)
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


def speed_stream(samples: int):
    """The digital-drift stream at the authors' Binomial(2, p) strength (the adaptation runs' stream)."""
    stream = make_scenario("digital-drift", dataset="mnist", samples=samples, seed=0)
    return dataclasses.replace(stream, drift=dataclasses.replace(stream.drift, flip_draw="binomial2"))


def paper_net(pretrain: int) -> tuple[torch.nn.Module, et.IntegerProgram, dict]:
    """The LRT paper's net (128 channels, 512 hidden) pretrained in float on ``pretrain`` elastic digits
    and its static INT8 program; cached under runs/device-speed/ (the paper net trains for minutes)."""
    folder = SPEED_CACHE / f"lrt-cnn-{pretrain}"
    model = LRTNet(width=128, hidden=512)
    if (folder / "float.pt").exists() and (folder / "program").exists():
        model.load_state_dict(torch.load(folder / "float.pt", weights_only=True))
        info = json.loads((folder / "info.json").read_text())
        return model.eval(), et.IntegerProgram.load(folder / "program"), info
    program, info = pretrained_program("lrt-cnn", pretrain, 1, seed=0, model=model, val_samples=200)
    folder.mkdir(parents=True, exist_ok=True)
    program.save(folder / "program")
    torch.save(model.state_dict(), folder / "float.pt")
    write_json_atomic(folder / "info.json", info)
    return model.eval(), program, info


def time_ours(net: torch.nn.Module, stream, warmup: int, samples: int, threads: int) -> dict:
    """samples/s of ``OnlineTrainer.run`` with default LowRank after ``warmup`` untimed samples."""
    torch.set_num_threads(threads)
    trainer = OnlineTrainer(net, make_rule("lowrank"), stream, seed=0, test_samples=10)
    trainer.run(warmup)
    seconds, cpu = trainer.seconds, trainer.cpu_seconds
    trainer.run(warmup + samples)
    seconds, cpu = trainer.seconds - seconds, trainer.cpu_seconds - cpu
    torch.set_num_threads(1)
    return {
        "threads": threads,
        "samples": samples,
        "samples_per_second": samples / seconds,
        "samples_per_cpu_second": samples / cpu,
        "online_accuracy": trainer.online_accuracy,
        "executor": "DeviceStep" if trainer.step_executor is not None else "autograd",
        "load_average": os.getloadavg()[0],
    }


def authors_module(reference: Path) -> types.SimpleNamespace:
    """The authors' ``lr`` package from a checkout, with the shims it needs on today's stack: a no-op
    ``profilehooks.profile``, a headless matplotlib, and NumPy's removed ``np.float``/``np.int`` aliases."""
    hooks = types.ModuleType("profilehooks")
    hooks.profile = lambda f=None, **_: f  # type: ignore[attr-defined]
    sys.modules.setdefault("profilehooks", hooks)
    import matplotlib

    matplotlib.use("Agg")
    np.float, np.int = float, int  # type: ignore[attr-defined]
    sys.path.insert(0, str(reference))
    return types.SimpleNamespace(
        configs=importlib.import_module("lr.experiments").configs, Net=importlib.import_module("lr.net").Net
    )


def time_authors(reference: Path, stream, warmup: int, samples: int) -> dict:
    """samples/s of the authors' online loop (their lr/main.py ``train`` per sample: drift every 10
    samples, forward, loss, backward, LowRank (SKS) update, update density and worst-case writes;
    without its printing and the every-100-samples diagnostics), config ``lrt-base`` (rank 4, conv
    batch 10, FC batch 100, max-norm, kappa 100, 16-bit factors) with digital drift, NumPy's BLAS at
    its default thread count. ``warmup`` covers numba's compilation (their kernel compiles at the
    first update of each layer)."""
    lr = authors_module(reference)
    np.random.seed(0)
    conf = copy.deepcopy(lr.configs["lrt-base"])
    conf.add_drift = AUTHORS_DRIFT
    net = lr.Net(conf, {"input_shape": (1, 28, 28, 1), "output_shape": (1, 10), "input_range": (0, 1)})
    images, labels = stream.batch(0, warmup + samples)
    pixels = images.permute(0, 2, 3, 1).numpy().astype("f4")  # their layout: N x H x W x C

    def step(i: int) -> bool:
        if i % 10 == 0:
            net.drift(conf.add_drift, 10)
        target = np.zeros((1, 10))
        target[0, int(labels[i])] = 1
        out = net(pixels[i : i + 1])
        net.loss_fn(out, target)
        net.backward()
        net.update(conf.lr)
        net.get_update_density()
        net.get_worst_case_updates()
        return int(np.argmax(out, 1)[0]) == int(labels[i])

    for i in range(warmup):
        step(i)
    t0, c0 = time.perf_counter(), time.process_time()
    correct = sum(step(i) for i in range(warmup, warmup + samples))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "samples": samples,
        "samples_per_second": samples / seconds,
        "samples_per_cpu_second": samples / cpu,
        "accuracy": correct / samples,
        "load_average": os.getloadavg()[0],
    }


def run_speed(args: argparse.Namespace) -> dict:
    """The speed benchmark (module docstring): every loop on the same stream, in one process."""
    warmup = args.warmup
    stream = speed_stream(max(warmup + args.samples, 120 + args.authors_samples))
    model, program, info = paper_net(args.pretrain)
    result: dict = {
        "command": "python bench/bench_device.py " + " ".join(sys.argv[1:]),
        "pretrain": {"samples": args.pretrain, **info},
        "warmup": warmup,
        "load_average_start": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "int8_matmul": INT8_MATMUL,
        "paper_net": {},
        "zoo": {},
    }
    reference = Path(args.reference)
    if (reference / "lr" / "net.py").exists():
        result["authors"] = time_authors(reference, stream, 120, args.authors_samples)
        print(f"authors' loop: {result['authors']['samples_per_second']:.1f} samples/s", flush=True)
    else:
        result["authors"] = None
        print(f"no authors' checkout at {reference} (see the module docstring): their loop is not timed")
    paths = ["model", "program"] + (["program-float"] if INT8_MATMUL else [])  # the int8 products' ablation
    for threads in args.threads:
        for path in paths:
            net = quantize_for_adaptation(copy.deepcopy(model)) if path == "model" else DeviceNet.from_program(program)
            if path == "program-float":
                for layer in net.weight_layers:
                    layer.int8_products = False
            run = time_ours(net, stream, warmup, args.samples, threads)
            result["paper_net"][f"{path}-{threads}"] = {"path": path, **run}
            print(f"--{path}, {threads} thread(s): {run['samples_per_second']:.1f} samples/s", flush=True)
    for name in args.speed_zoo:
        zoo_program, zoo_info = pretrained_program(name, args.pretrain, 1, seed=0, val_samples=200)
        run = time_ours(DeviceNet.from_program(zoo_program), stream, warmup, args.samples, 1)
        result["zoo"][name] = {"int8_val_accuracy": zoo_info["int8_val_accuracy"], **run}
        print(f"{name} --program: {run['samples_per_second']:.1f} samples/s", flush=True)
    result["load_average_end"] = list(os.getloadavg())
    result["recorded_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return result


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


PATH_LABELS = {
    "model": "edgetrain `--model`",
    "program": "edgetrain `--program`",
    "program-float": "edgetrain `--program`, float products only",
}


SPEED_TARGET = (111.0, 5.0)  # samples/s (100k samples in <= 15 min) and the ratio to the authors' loop


def speed_verdict(speed: dict) -> str:
    """This run against the target: the paper net's `--program` loop at one thread (the default)."""
    run, authors = speed["paper_net"].get("program-1"), speed["authors"]
    if run is None or authors is None:
        return "Verdict: not computed (this run has no one-thread `--program` row or no authors' loop)."
    rate, ratio = run["samples_per_second"], run["samples_per_second"] / authors["samples_per_second"]
    met = rate >= SPEED_TARGET[0] and ratio >= SPEED_TARGET[1]
    return (
        f"Verdict on this host ({speed.get('cpu', 'unknown CPU')}): `--program` at one thread {rate:.1f} samples/s "
        f"({'>=' if rate >= SPEED_TARGET[0] else '<'} {SPEED_TARGET[0]:.0f}), {ratio:.1f}x the authors' loop "
        f"({'>=' if ratio >= SPEED_TARGET[1] else '<'} {SPEED_TARGET[1]:.0f}x): target {'met' if met else 'NOT met'}. "
        "The ratio depends on the CPU: an AVX2 host without VNNI / AMX runs the float products (the "
        "float-products rows here)."
    )


def render_speed(speed: dict) -> str:
    authors = speed["authors"]
    lines = [
        "## Speed of the online loop (batch 1, LowRank)",
        "",
        f"`{speed['command']}`",
        "",
        "The LRT paper's net (4 conv + 2 FC, 128 channels, 512 hidden) pretrained in float on "
        f"{speed['pretrain']['samples']} elastic digits (INT8 val {speed['pretrain']['int8_val_accuracy']:.3f}); "
        "digital-drift stream (authors' strength); default LowRank (rank 4, conv batch 10, FC batch 100, "
        f"max-norm); `OnlineTrainer.run`, the loop `edgetrain adapt` runs, timed after {speed['warmup']} "
        "untimed samples. `--model` = the paper-format QNet of the float net (autograd); `--program` = DeviceNet "
        "on its exported TQT INT8 program (bit-exact with the integer program), stepped without autograd by "
        "`DeviceStep` (the trainer's default; identical trajectories). The authors' loop is their own "
        "`lr/` NumPy/numba code as shipped (config lrt-base, digital drift 10, their own initialisation), "
        f"on the same images in the same process. {speed['cpus']} CPUs ({speed.get('cpu', 'unknown')}; int8 "
        f"products: {'yes, AVX512-VNNI / AMX' if speed.get('int8_matmul') else 'no (float32 products)'}, "
        'docs/device.md "Speed"); the 1-minute load average is '
        "given beside every figure: a figure taken at load > 1.5 on 2 cores is from a shared, loaded "
        "machine and says little about a quiet one.",
        "",
        "| loop | threads | samples timed | samples/s (wall) | samples per CPU second | CPU ms per sample "
        "| 100k samples (wall) | vs authors (wall) | vs authors (CPU) | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    if authors is not None:
        rows.append(("authors' NumPy/numba loop (paper net)", "BLAS default", authors, True))
    for run in speed["paper_net"].values():
        rows.append((f"{PATH_LABELS[run['path']]} (paper net)", str(run["threads"]), run, True))
    for name, run in speed["zoo"].items():
        rows.append((f"edgetrain `--program` {name}", str(run["threads"]), run, False))
    for label, threads, run, paper in rows:
        ratios = [
            f"{run[key] / authors[key]:.1f}x" if authors and paper else "n/a"
            for key in ("samples_per_second", "samples_per_cpu_second")
        ]
        minutes = 100_000 / run["samples_per_second"] / 60
        lines.append(
            f"| {label} | {threads} | {run['samples']} | {run['samples_per_second']:.1f} "
            f"| {run['samples_per_cpu_second']:.1f} | {1000 / run['samples_per_cpu_second']:.1f} | {minutes:.1f} min "
            f"| {ratios[0]} | {ratios[1]} | {run['load_average']:.1f} |"
        )
    lines += ["", speed_verdict(speed)]
    lines += [
        "",
        "Target (paper net, default threads = 1, quiet 2-core machine): >= 5x the authors' loop and >= 111 "
        "samples/s (100k samples in <= 15 min). Samples per CPU second count every thread's CPU time "
        "(spinning BLAS / OpenMP threads included); under contention the authors' multi-threaded BLAS "
        "and any 2-thread run slow down far more than a 1-thread loop, so ratios from a loaded machine "
        "overstate ours.",
    ]
    return "\n".join(lines) + "\n"


def write_results(out: Path, result: dict) -> None:
    """device.json / device.md holding the adaptation results and the speed section, whichever exist."""
    write_json_atomic(out, result)
    parts = [render(result)] if result.get("nets") else []
    if result.get("speed"):
        parts.append(render_speed(result["speed"]))
    write_text_atomic(out.with_suffix(".md"), "\n".join(parts))


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
    parser.add_argument("--samples", type=int, default=None, help="stream samples (default 3000; --speed: 2000)")
    parser.add_argument("--pretrain", type=int, default=None, help="pretraining digits (default 10000; --speed: 2000)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "device.json"))
    parser.add_argument("--speed", action="store_true", help="the speed benchmark (module docstring)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="--speed: torch threads to time")
    parser.add_argument("--warmup", type=int, default=100, help="--speed: untimed samples before timing")
    parser.add_argument("--authors-samples", type=int, default=500, help="--speed: samples of the authors' loop")
    parser.add_argument("--speed-zoo", nargs="*", default=SPEED_ZOO, help="--speed: zoo nets timed on the device")
    parser.add_argument(
        "--reference", default=str(ROOT / "runs" / "low-rank-training"), help="--speed: the authors' checkout"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    if args.speed:
        args.samples = args.samples or 2000
        args.pretrain = args.pretrain or 2000
        write_results(out, {**previous, "speed": run_speed(args)})
        print(render_speed(json.loads(out.read_text())["speed"]))
        return
    args.samples = args.samples or 3000
    args.pretrain = args.pretrain or 10_000
    stream = speed_stream(args.samples)
    result = {"samples": args.samples, "pretrain_samples": args.pretrain, "epochs": args.epochs, "nets": []}
    if previous.get("speed"):
        result["speed"] = previous["speed"]
    result["load_average_start"] = list(os.getloadavg())
    result["command"] = "python bench/bench_device.py " + " ".join(sys.argv[1:])
    for name in args.nets:
        program, info = pretrained_program(name, args.pretrain, args.epochs, seed=0)
        runs = [adapt(program, rule, stream, args.samples, streaming_bn=True) for rule in RULES]
        if any(op["op"] == "scale" for op in program.ops):
            runs.append(adapt(program, "lowrank", stream, args.samples, streaming_bn=False))
        result["nets"].append({"name": name, "pretrain": info, "runs": runs})
        result["load_average_end"] = list(os.getloadavg())
        result["recorded_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write_results(out, result)  # after every net: a stopped run keeps what it finished
    print(render(result))


if __name__ == "__main__":
    main()
