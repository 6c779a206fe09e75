"""``edgetrain fleet [CONFIG]``: a fleet of simulated devices adapting together on Flower (docs/fleet.md).

A TOML config names every field of ``edgetrain.fleet.FleetConfig``; the flags override it (or, with
no config, describe a quick run). Writes DIR/fleet.json and the report (PNG plots, fleet.md).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgetrain.cli import CLIError, non_negative_int, positive_float, positive_int

FLAG_FIELDS = (  # flags whose dest is the FleetConfig field of the same name
    "devices",
    "rounds",
    "samples_per_round",
    "rank",
    "merge_rank",
    "engine",
    "seed",
    "model",
    "test_samples",
    "drift",
    "split",
    "round_timeout",
    "fleet_lr",
    "gate_samples",
    "bn_refresh",
    "write_fraction",
    "test_classes",
    "gate_agree",
    "gate_fresh",
    "gate_head",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from edgetrain.fleet.config import ABLATIONS, ENGINES, SPLITS, STRATEGIES, TEST_CLASSES

    p = subparsers.add_parser("fleet", help="federated low-rank adaptation of a fleet of devices (Flower)")
    p.add_argument("config", nargs="?", default=None, help="TOML fleet config (flags override its fields)")
    p.add_argument("--devices", type=positive_int, help="number of simulated devices")
    p.add_argument("--rounds", type=positive_int, help="federated rounds")
    p.add_argument("--samples-per-round", type=positive_int, help="samples each device learns per round (R)")
    p.add_argument(
        "--strategy",
        action="append",
        choices=(*STRATEGIES, *ABLATIONS, "all"),
        help="strategy to run (repeatable; default: all four side by side; local-round: an ablation)",
    )
    p.add_argument("--rank", type=positive_int, help="rank r of the factors")
    p.add_argument(
        "--merge-rank",
        type=positive_int,
        help="rank of the federated low-rank broadcast (default: r; >= devices x r: the exact mean of the reports)",
    )
    p.add_argument("--engine", choices=ENGINES, help="Flower engine (default simulation)")
    p.add_argument("--split", choices=SPLITS, help="non-IID split: class subsets or all classes")
    p.add_argument("--drift", choices=("digital", "analog", "none"), help="per-device NVM drift")
    p.add_argument("--model", help="device model: a .safetensors model file or an exported program folder")
    p.add_argument("--test-samples", type=positive_int, help="held-out samples per device")
    p.add_argument("--round-timeout", type=positive_float, help="seconds the server waits for a round's replies")
    p.add_argument(
        "--fleet-lr", type=positive_float, help="server step size eta of the federated low-rank broadcast (1.0)"
    )
    p.add_argument(
        "--gate-samples",
        type=non_negative_int,
        help="a device writes a broadcast only if it predicts its last N samples at least as well (32; 0: off)",
    )
    p.add_argument(
        "--bn-refresh",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay the gate's buffer for the batch-norm statistics of each option and of the written weights "
        "(default: on with the gate)",
    )
    p.add_argument(
        "--write-fraction",
        type=positive_float,
        help="sparse fleet update events: per layer at most ceil(f n m) changed cells, the largest steps (1: off)",
    )
    p.add_argument(
        "--test-classes",
        choices=TEST_CLASSES,
        help="held-out set per device: its stream's classes (device) or all ten (all)",
    )
    p.add_argument(
        "--gate-agree",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="gate candidate: own update plus the broadcast where their steps agree in sign (default off)",
    )
    p.add_argument(
        "--gate-fresh",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="round updates: close the report gate-samples samples early and gate on those fresh samples (default off)",
    )
    p.add_argument(
        "--gate-head",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="gate candidate: the broadcast with the device's own update on the classifier (default off)",
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--out", required=True, help="run folder: fleet.json, report, device states")
    p.set_defaults(handler=run_fleet_command)


def config_from_args(args: argparse.Namespace) -> Any:
    """The fleet config of a command line: the CONFIG file (or defaults) with the flags applied."""
    from edgetrain.fleet.config import STRATEGIES, FleetConfig

    overrides = {name: getattr(args, name) for name in FLAG_FIELDS if getattr(args, name) is not None}
    if args.strategy:
        overrides["strategies"] = STRATEGIES if "all" in args.strategy else tuple(dict.fromkeys(args.strategy))
    try:
        config = FleetConfig.load(args.config) if args.config else FleetConfig()
        return replace(config, **overrides)
    except (ValueError, TypeError) as err:  # a bad key or value in the config or the flags
        raise CLIError(str(err)) from err


def run_fleet_command(args: argparse.Namespace) -> int:
    from edgetrain.fleet import run_fleet, write_report

    if args.config and not Path(args.config).is_file():
        raise CLIError(f"fleet config {args.config} does not exist")
    config = config_from_args(args)
    result = run_fleet(config, args.out)
    report = write_report(result, args.out)
    for name, figures in result["strategies"].items():
        print(
            f"{name:>18}: test accuracy {figures['test_accuracy']:.4f} (worst device "
            f"{figures['min_device_test_accuracy']:.4f}), uplink {figures['uplink_bytes']} B, downlink "
            f"{figures['downlink_bytes']} B, max writes {figures['max_writes']}"
        )
    print(f"-> {Path(args.out) / 'fleet.json'}, {report}")
    return 0
