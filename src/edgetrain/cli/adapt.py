"""``edgetrain adapt``: online adaptation of a model on a scenario stream; ``edgetrain report DIR``:
plots and a markdown table of the run logs under DIR (docs/adaptation.md)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

from edgetrain.cli import CLIError

CHECKPOINT_NAME = "checkpoint.safetensors"


def register(subparsers: argparse._SubParsersAction) -> None:
    from edgetrain.adapt.rules import RULES
    from edgetrain.adapt.scenarios import SCENARIOS, STREAM_DATASETS
    from edgetrain.nvm import FLIP_DRAWS, STUCK_MODELS

    p = subparsers.add_parser("adapt", help="adapt a model online (batch 1) on simulated NVM")
    p.add_argument("--model", required=True, help="model file (.safetensors from pretraining) or float state dict")
    p.add_argument("--arch", default="lrt-cnn", help="architecture of a float state dict (default lrt-cnn)")
    p.add_argument("--scenario", default="control", choices=SCENARIOS)
    p.add_argument("--dataset", default="mnist", choices=STREAM_DATASETS)
    p.add_argument("--rule", default="lowrank", choices=sorted(RULES))
    add_rule_flags(p)
    p.add_argument(
        "--flip-draw",
        default="bernoulli",
        choices=FLIP_DRAWS,
        help="digital drift: bit flips as the paper's text (bernoulli, p) or the authors' code (binomial2, ~2p)",
    )
    p.add_argument("--stuck-fraction", type=float, default=0.0, help="fraction of NVM cells stuck at a fixed code")
    p.add_argument(
        "--stuck-model",
        default="uniform",
        choices=STUCK_MODELS,
        help="stuck cells' code: uniform over the code range, or bounds (qmin or qmax)",
    )
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


def _rule_fields() -> dict[str, tuple[dataclasses.Field, Any, list[str]]]:
    """Every option field of every rule: name -> (field, its type, the rules that take it)."""
    from edgetrain.adapt.rules import RULE_OPTIONS

    out: dict[str, tuple[dataclasses.Field, Any, list[str]]] = {}
    for rule, cls in RULE_OPTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, (f, hints[f.name], []))[2].append(f"{rule}: {f.default}")
    return out


def add_rule_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per rule option (``--batch-fc`` for ``batch_fc``), generated from the options
    dataclasses; booleans get ``--x/--no-x``. Defaults are None: a flag not given keeps the rule's
    own default (listed in the help)."""
    for name, (f, hint, defaults) in _rule_fields().items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default {', '.join(defaults)})"
        kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if kinds[0] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(flag, type=kinds[0], default=None, choices=choices, help=help_text)
    parser.add_argument("--biased", dest="unbiased", action="store_false", default=None, help="same as --no-unbiased")


def rule_options(args: argparse.Namespace) -> Any:
    """The options object of ``args.rule`` from the flags given (validated by its dataclass); a flag
    that the rule does not take is a one-line error."""
    from edgetrain.adapt.rules import RULE_OPTIONS, parse_rule_options

    known = {f.name for f in dataclasses.fields(RULE_OPTIONS[args.rule])}
    given = {name: getattr(args, name) for name in _rule_fields() if getattr(args, name, None) is not None}
    foreign = sorted(set(given) - known)
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise CLIError(f"{flags} do(es) not apply to --rule {args.rule}; drop it or pick a rule that takes it")
    try:
        return parse_rule_options(args.rule, given)
    except ValueError as err:
        raise CLIError(str(err)) from None


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
    if stream.drift is not None:
        stream = dataclasses.replace(stream, drift=dataclasses.replace(stream.drift, flip_draw=args.flip_draw))
    trainer = OnlineTrainer(
        net,
        make_rule(args.rule, rule_options(args)),
        stream,
        seed=args.seed,
        test_samples=args.test_samples,
        stuck_fraction=args.stuck_fraction,
        stuck_model=args.stuck_model,
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
        f"max writes/cell {final['max_writes']} (code changes), total writes {final['total_writes']}, "
        f"{log['timing']['samples_per_second']:.1f} samples/s -> {out}"
    )
    return 0


def run_report(args: argparse.Namespace) -> int:
    from edgetrain.report.adaptation import render

    for path in render(args.dir, args.out):
        print(path)
    return 0
