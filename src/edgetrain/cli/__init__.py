"""The ``edgetrain`` command line (argparse). Each subcommand lives in its own module of this
package and exposes ``register(subparsers)``; the module list below is the whole CLI."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from edgetrain.pipeline.stages import StageError

COMMAND_MODULES: tuple[str, ...] = ("edgetrain.cli.pipeline", "edgetrain.cli.adapt", "edgetrain.cli.quantize")


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetrain",
        description="Quantize networks with trained power-of-2 thresholds, export bit-exact integer "
        "programs and adapt them on simulated NVM with low-rank training.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (CLIError, StageError, FileNotFoundError, ValueError) as err:
        print(f"edgetrain {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, read-only folder: checkpoints are written atomically, nothing is lost
        where = f" ({err.filename})" if err.filename else ""
        print(
            f"edgetrain {args.command}: error: {err.strerror or err}{where}. Free disk space or choose a writable "
            "output folder, then run the same command again: finished stages and checkpoints are reused",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
