"""``edgetrain adapt``: online adaptation on a scenario stream; ``edgetrain report DIR``: plots and a
markdown table of the run logs under DIR (docs/adaptation.md).

    edgetrain adapt --program runs/resnet/int8-program --scenario digital-drift --rule lowrank \
                    --samples 2000 --out runs/resnet/adapt

``--program`` adapts an exported integer program (``edgetrain export --format integer``): the device
is the program itself (``DeviceNet.from_program``), and the run folder receives ``log.json``,
``checkpoint.safetensors`` (``--resume``) and the adapted program in ``program/`` (score it with
``edgetrain eval --program DIR/program``). ``--model`` adapts the LRT paper's net in the paper's
formats (its benchmarks) from an adaptation model file or a float checkpoint. ``run.json`` records
every setting that determines the run; ``--resume`` refuses a run folder made with other settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

from edgetrain.cli import CLIError, positive_int
from edgetrain.pipeline.steps import CHECKPOINT_NAME

RUN_FILE = "run.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    from edgetrain.adapt.rules import RULES
    from edgetrain.adapt.scenarios import SCENARIOS, STREAM_DATASETS
    from edgetrain.nvm import FLIP_DRAWS, STUCK_MODELS

    p = subparsers.add_parser("adapt", help="adapt an exported integer program (or the paper's net) on simulated NVM")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--program", help="integer program folder from `edgetrain export --format integer`")
    source.add_argument(
        "--model", help="the paper's net: adaptation model file (.safetensors) or float checkpoint/state dict"
    )
    p.add_argument("--arch", default=None, help="architecture of a bare float state dict (default lrt-cnn)")
    p.add_argument("--scenario", default="control", choices=SCENARIOS)
    p.add_argument(
        "--dataset", default=None, choices=STREAM_DATASETS, help="stream data (default: the program's, else mnist)"
    )
    p.add_argument("--data-root", default=None, help="folder of a 'folder' dataset")
    p.add_argument(
        "--no-streaming-bn",
        dest="streaming_bn",
        action="store_false",
        help="--program: keep unfoldable BNs (scale ops) at their exported codes instead of streaming BN",
    )
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
    p.add_argument("--samples", type=positive_int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run folder: log.json and checkpoint.safetensors")
    p.add_argument("--checkpoint-every", type=positive_int, default=5000, help="samples between checkpoints")
    p.add_argument("--test-every", type=positive_int, default=10_000, help="samples between test-set scores")
    p.add_argument("--test-samples", type=positive_int, default=1000)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch intra-op threads (batch 1: a second one gains 0-13%% wall, see docs/device.md)",
    )
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


def _device(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Any]:
    """(network, its description, its data source) from --program or --model."""
    from edgetrain.adapt import DeviceNet
    from edgetrain.adapt.pretrain import load_for_adaptation
    from edgetrain.data import DataSource
    from edgetrain.export import IntegerProgram

    if args.program:
        program = IntegerProgram.load(args.program)
        data = program.meta.get("data")
        source = DataSource.from_dict(data) if data else DataSource(args.dataset or "mnist")
        if args.dataset and args.dataset != source.name:
            source = DataSource(args.dataset, args.data_root)
        net = DeviceNet.from_program(program, streaming_bn=args.streaming_bn)
        return net, {"program": str(args.program), "meta": program.meta}, source
    net, meta = load_for_adaptation(args.model, args.arch)
    return net, {"path": str(args.model), **meta}, DataSource(args.dataset or "mnist", args.data_root)


def source_digest(path: str) -> str:
    """SHA-256 of a model file, or of a program folder's manifest and weights."""
    import hashlib

    source = Path(path)
    files = sorted(f for f in source.iterdir() if f.is_file()) if source.is_dir() else [source]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()


def run_settings(args: argparse.Namespace, source: Any) -> dict[str, Any]:
    """Everything that determines the run's result (compared on --resume)."""
    origin = args.program or args.model
    return {
        "source": origin,
        "source_sha256": source_digest(origin),
        "data": source.as_dict(),
        "scenario": args.scenario,
        "samples": args.samples,
        "seed": args.seed,
        "rule": args.rule,
        "options": dataclasses.asdict(rule_options(args)),
        "flip_draw": args.flip_draw,
        "stuck_fraction": args.stuck_fraction,
        "stuck_model": args.stuck_model,
        "streaming_bn": args.streaming_bn,
        "test_samples": args.test_samples,
    }


def check_resume(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume a run folder whose recorded settings differ (one line naming them)."""
    import json

    recorded_path = out / RUN_FILE
    if not recorded_path.is_file():
        raise CLIError(f"--resume: {recorded_path} is missing, so the checkpoint's settings are unknown; start afresh")
    recorded = json.loads(recorded_path.read_text())
    differ = [key for key in sorted(set(recorded) | set(settings)) if recorded.get(key) != settings.get(key)]
    if differ:
        detail = ", ".join(f"{k}: {recorded.get(k)!r} -> {settings.get(k)!r}" for k in differ)
        raise CLIError(f"--resume: {out} was made with other settings ({detail}); use another --out")


def run_adapt(args: argparse.Namespace) -> int:
    import torch

    from edgetrain.adapt import OnlineTrainer, make_rule
    from edgetrain.adapt.scenarios import make_scenario
    from edgetrain.atomic import write_json_atomic
    from edgetrain.pipeline.steps import adapt_device

    out = Path(args.out)
    checkpoint = out / CHECKPOINT_NAME
    if args.resume and not checkpoint.is_file():
        raise CLIError(f"--resume: no checkpoint {checkpoint} to continue from")
    if not args.resume and checkpoint.exists():
        raise CLIError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    torch.set_num_threads(args.threads)
    net, model, source = _device(args)
    settings = run_settings(args, source)
    if args.resume:
        check_resume(out, settings)
    stream = make_scenario(args.scenario, dataset=source, samples=args.samples, seed=args.seed)
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
    if not args.resume:
        write_json_atomic(out / RUN_FILE, settings)
    log = adapt_device(
        trainer,
        out,
        args.samples,
        resume=args.resume,
        test_every=args.test_every,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
        model=model,
    )
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
