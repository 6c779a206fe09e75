"""``edgetrain demo`` and ``edgetrain run CONFIG``: the whole pipeline with a report."""

from __future__ import annotations

import argparse
import shlex
import sys

from edgetrain.data import DatasetNotFoundError
from edgetrain.pipeline.config import PipelineConfig, load_config
from edgetrain.pipeline.run import run_pipeline


def demo_config(out: str) -> PipelineConfig:
    """The built-in demo, sized for the 3-minute target on a quiet 2-core machine (bench/bench_demo.py
    measures it: bench/results/demo.md):
    mnistnet pretrained on 8000 Fashion-MNIST images (one epoch), static INT8 with KL-J activation
    thresholds (the TQT recipe's initialisation) on 256 images, TQT retraining on 2000 images, the
    integer program checked bit for bit on 2000 test images (every accuracy is on those 2000), and
    LowRank, SGD with stochastic rounding (the fair batch-1 baseline), bias-only and inference only
    on a 1200-sample distribution-shift stream (four 300-sample blocks: class clusters, affine
    jitter, background, white noise) with digital drift."""
    config = PipelineConfig()
    config.data.train_samples, config.data.test_samples = 8000, 2000
    config.pretrain.epochs, config.pretrain.batch_size, config.pretrain.lr = 1, 32, 1e-3
    config.quantize.calibration, config.quantize.calibration_samples = "kl_j", 256
    config.quantize.retrain_samples = 2000
    config.adapt.rules = ["lowrank", "sgd-sr", "bias-only", "inference"]
    config.adapt.samples, config.adapt.shift_block, config.adapt.test_samples = 1200, 300, 500
    config.output.dir = out
    return config


def fallback_to_digits(config: PipelineConfig) -> PipelineConfig:
    """Without Fashion-MNIST: scikit-learn's digits (shipped by a pip dependency), no adaptation stage."""
    config.data.dataset, config.data.train_samples, config.data.test_samples = "digits", 0, 0
    config.quantize.retrain_samples = 0
    config.adapt.rules = []
    return config


def run_demo(args: argparse.Namespace) -> int:
    config = demo_config(args.out)
    command = f"edgetrain demo --out {shlex.quote(args.out)}"
    try:
        return _run(config, command)
    except DatasetNotFoundError as err:
        print(
            f"{err}\n\nFashion-MNIST is missing: running the demo on scikit-learn's 8x8 digits instead "
            "(quantization and export only; the adaptation scenarios need MNIST-style 28x28 data).",
            file=sys.stderr,
        )
        return _run(fallback_to_digits(config), command)


def run_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.out:
        config.output.dir = args.out
    return _run(config, f"edgetrain run {shlex.quote(args.config)}")


def _run(config: PipelineConfig, command: str) -> int:
    """Run the pipeline (it checks the config against its data and model before any stage runs, and
    writes a report of what finished if it stops); exit status 1 if the program is not bit-exact."""
    summary = run_pipeline(config, command)
    export = summary["export"]
    print(
        f"\nbit-exact integer program: {export['integer_mismatches']} mismatches on {export['verified_samples']} "
        "test images"
    )
    print(f"report: {summary['report_html']}\n        {summary['report_md']}")
    return 0 if export["integer_mismatches"] == 0 else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="the main job on the default data: pretrain, quantize, export, adapt, report",
        description="Float pretraining of mnistnet on 8000 Fashion-MNIST images, TQT quantization (static, then "
        "retrain), the integer program checked bit for bit on 2000 test images (+ONNX), on-device adaptation "
        "with LowRank / SGD with stochastic rounding / bias-only / inference only on a 1200-sample distribution "
        "shift with digital drift, "
        "and an HTML report; bench/results/demo.md has its measured time. Stages are cached: rerunning is "
        "instant.",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.set_defaults(handler=run_demo)
    run = subparsers.add_parser("run", help="the pipeline from a TOML/YAML config (see docs/user-guide.md)")
    run.add_argument("config", help="path to the config file")
    run.add_argument("--out", default="", help="override [output] dir")
    run.set_defaults(handler=run_config)
