"""The ``edgetrain`` command line (argparse). Each subcommand lives in its own module of this
package and exposes ``register(subparsers)``; the module list below is the whole CLI.

Errors are one line on stderr, ``edgetrain COMMAND: error: ...``, with exit status 2 for usage
errors (bad flags, a bad config file, a path that does not exist) and 1 for failures (corrupt files,
a stage that cannot run, a full disk). ``edgetrain --debug COMMAND ...`` shows the traceback
instead. Ctrl-C ends with one line saying how to resume (exit status 130).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import math
import sys
from collections.abc import Callable, Sequence

from edgetrain.pipeline.config import ConfigError

COMMAND_MODULES: tuple[str, ...] = (
    "edgetrain.cli.pipeline",
    "edgetrain.cli.adapt",
    "edgetrain.cli.quantize",
    "edgetrain.cli.fleet",
)
USAGE_EXIT, FAILURE_EXIT, INTERRUPT_EXIT = 2, 1, 130
RESUME_HINTS = {
    "demo": "run the same command again to resume: finished stages are reused, the interrupted one continues",
    "run": "run the same command again to resume: finished stages are reused, the interrupted one continues",
    "train": "run the same command again to resume from its .resume checkpoint",
    "quantize": "run the same command again to resume retraining from its .resume checkpoint",
    "adapt": "run the same command with --resume to continue from the last checkpoint",
}


class CLIError(Exception):
    """A user-facing usage error: printed as one line, exit status 2."""


def _number(kind: type, minimum: float, inclusive: bool) -> Callable[[str], int | float]:
    relation = ">=" if inclusive else ">"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or not (value >= minimum if inclusive else value > minimum):
            raise argparse.ArgumentTypeError(f"must be {relation} {minimum:g}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {relation} {minimum:g}"
    return parse


positive_int = _number(int, 0, inclusive=False)  # argparse type: an int > 0 (threads, samples, epochs)
non_negative_int = _number(int, 0, inclusive=True)  # argparse type: an int >= 0
positive_float = _number(float, 0.0, inclusive=False)  # argparse type: a finite float > 0 (learning rates)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetrain",
        description="Quantize networks with trained power-of-2 thresholds, export bit-exact integer "
        "programs and adapt them on simulated NVM with low-rank training.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def describe_os_error(err: OSError) -> str:
    """One line for a file-system failure, with the fix that fits its cause."""
    where = f" ({err.filename})" if err.filename else ""
    reason = f"{err.strerror or err}{where}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{reason}. Free disk space, then run the same command again: finished stages and checkpoints are reused"
    if err.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"{reason}: a file stands where a folder is needed (or the reverse); choose another output path"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{reason}: choose a writable output folder"
    return reason


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).strip().splitlines())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = f"edgetrain {args.command}: error:"
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        hint = RESUME_HINTS.get(args.command, "nothing was saved; run the same command again")
        print(f"\nedgetrain {args.command}: interrupted; {hint}", file=sys.stderr)
        return INTERRUPT_EXIT
    except Exception as err:
        if args.debug:
            raise
        if isinstance(err, CLIError | ConfigError | FileNotFoundError):  # a flag, a config or a path is wrong
            print(f"{prefix} {_one_line(err)}", file=sys.stderr)
            return USAGE_EXIT
        if isinstance(err, OSError):
            message = describe_os_error(err)
        elif isinstance(err, ValueError | RuntimeError) and str(err).strip():
            message = _one_line(err)
        else:  # an unexpected error: name its type, the traceback is one flag away
            message = (
                f"{type(err).__name__}: {_one_line(err)} (edgetrain --debug {args.command} ... shows the traceback)"
            )
        print(f"{prefix} {message}", file=sys.stderr)
        return FAILURE_EXIT


if __name__ == "__main__":
    sys.exit(main())
