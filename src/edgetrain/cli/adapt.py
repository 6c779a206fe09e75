"""``edgetrain adapt``: online adaptation of a model on a scenario stream; ``edgetrain report DIR``:
plots and a markdown table of the run logs under DIR (docs/adaptation.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgetrain.cli import CLIError

CHECKPOINT_NAME = "checkpoint.safetensors"


def register(subparsers: argparse._SubParsersAction) -> None:
    from edgetrain.adapt.rules import RULES
    from edgetrain.adapt.scenarios import SCENARIOS, STREAM_DATASETS

    p = subparsers.add_parser("adapt", help="adapt a model online (batch 1) on simulated NVM")
    p.add_argument("--model", required=True, help="model file (.safetensors from pretraining) or float state dict")
    p.add_argument("--arch", default="lrt-cnn", help="architecture of a float state dict (default lrt-cnn)")
    p.add_argument("--scenario", default="control", choices=SCENARIOS)
    p.add_argument("--dataset", default="mnist", choices=STREAM_DATASETS)
    p.add_argument("--rule", default="lowrank", choices=sorted(RULES))
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-fc", type=int, default=100, help="low-rank FC update period B (samples)")
    p.add_argument("--batch-conv", type=int, default=10, help="low-rank conv update period B (samples)")
    p.add_argument("--batch", type=int, default=10, help="minibatch-sgd batch")
    p.add_argument("--no-max-norm", action="store_true", help="low-rank / bias-only without max-norm")
    p.add_argument("--biased", action="store_true", help="low-rank with the biased (top-r) accumulator")
    p.add_argument("--kappa-th", type=float, default=100.0)
    p.add_argument("--rho-min", type=float, default=0.01)
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run folder: log.json and checkpoint.safetensors")
    p.add_argument("--checkpoint-every", type=int, default=5000, help="samples between checkpoints")
    p.add_argument("--test-every", type=int, default=10_000, help="samples between test-set scores")
    p.add_argument("--test-samples", type=int, default=1000)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (batch 1: 1 is fastest)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run_adapt)

    r = subparsers.add_parser("report", help="plots and a markdown table of adaptation run logs")
    r.add_argument("dir", help="folder searched (recursively) for log.json files")
    r.add_argument("--out", default=None, help="where to write (default: DIR)")
    r.set_defaults(handler=run_report)


def rule_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword options of ``make_rule(args.rule, ...)`` taken from the command line."""
    if args.rule == "lowrank":
        return {
            "rank": args.rank,
            "lr": args.lr,
            "batch_fc": args.batch_fc,
            "batch_conv": args.batch_conv,
            "max_norm": not args.no_max_norm,
            "unbiased": not args.biased,
            "kappa_th": args.kappa_th,
            "rho_min": args.rho_min,
        }
    if args.rule == "bias-only":
        return {"lr": args.lr, "max_norm": not args.no_max_norm}
    if args.rule == "minibatch-sgd":
        return {"lr": args.lr, "batch": args.batch}
    if args.rule == "sgd":
        return {"lr": args.lr}
    return {}


def run_adapt(args: argparse.Namespace) -> int:
    import torch

    from edgetrain.adapt import OnlineTrainer, make_rule
    from edgetrain.adapt.pretrain import load_for_adaptation
    from edgetrain.adapt.scenarios import make_scenario
    from edgetrain.atomic import write_json_atomic

    out = Path(args.out)
    checkpoint = out / CHECKPOINT_NAME
    if args.resume and not checkpoint.is_file():
        raise CLIError(f"--resume: no checkpoint {checkpoint} to continue from")
    if not args.resume and checkpoint.exists():
        raise CLIError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    torch.set_num_threads(args.threads)
    net, meta = load_for_adaptation(args.model, args.arch)
    stream = make_scenario(args.scenario, dataset=args.dataset, samples=args.samples, seed=args.seed)
    trainer = OnlineTrainer(
        net, make_rule(args.rule, **rule_options(args)), stream, seed=args.seed, test_samples=args.test_samples
    )
    if args.resume:
        trainer.resume(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    log = trainer.run(
        args.samples,
        test_every=args.test_every,
        checkpoint_every=args.checkpoint_every,
        checkpoint=checkpoint,
        progress=not args.no_progress,
    )
    log["config"]["model"] = {"path": str(args.model), **meta}
    write_json_atomic(out / "log.json", log)
    trainer.save(checkpoint)
    final = log["final"]
    print(
        f"online accuracy {final['online_accuracy']:.4f}, test accuracy {final['test_accuracy']:.4f}, "
        f"max writes {final['max_writes_paper']}, {log['timing']['samples_per_second']:.1f} samples/s -> {out}"
    )
    return 0


def run_report(args: argparse.Namespace) -> int:
    from edgetrain.report.adaptation import render

    for path in render(args.dir, args.out):
        print(path)
    return 0
