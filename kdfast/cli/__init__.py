"""The ``kdfast`` command line: ``kdfast distill`` (and its ``distill-*`` experiments), ``kdfast bench``,
``kdfast cache``, ``kdfast info``.

Installed as the console script ``kdfast`` (entry point ``kdfast.cli:main``);
``python -m kdfast`` is the same.  Each subcommand lives in its own module
and contributes ``add_parser(subparsers)`` and ``run(args, extra) -> exit code``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import bench, cache, distill, info
from ..experiments import longtail, regression_kd, teacher_signals

COMMANDS = {"distill": distill, "distill-regression": regression_kd, "distill-longtail": longtail,
            "distill-teachers": teacher_signals, "bench": bench, "cache": cache, "info": info}
# Errors that carry a message for the user (bad settings, existing output, missing files or packages);
# anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, ImportError)

EPILOG = """\
examples:
  kdfast distill                      # the default comparison on MNIST-5k (a few minutes on 2 cores)
  kdfast distill --seeds 0 --epochs 10 --methods ce kd dkd --out runs/quick
  kdfast distill --config my.yaml     # keys of the file = the flags of `kdfast distill`
  kdfast distill --resume             # continue a killed run in runs/distill-default/
  kdfast distill-regression           # distributional regression KD on a CO2 series (needs statsmodels)
  kdfast distill-longtail             # long-tailed KD (LTKD) vs KD on a long-tailed split of MNIST-5k
  kdfast distill-teachers             # Bayesian teachers and RL multi-teacher selection on MNIST-5k
  kdfast bench --quick                # the fused-kernel microbenchmark (source checkout)
  kdfast cache build --teacher models/teacher --data corpus.jsonl --seq-len 512 --k 64 --out cache/
                                      # a top-k teacher cache for offline distillation (resumable)
  kdfast info                         # versions, backends, SIMD level, threads, CUDA/Triton

`kdfast COMMAND --help` explains each command.  Set KDFAST_DEBUG=1 to see the
traceback of an error instead of its one-line message.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdfast",
        description="kdfast: fused knowledge-distillation losses for PyTorch, and a distillation experiment "
                    "to try them.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and not getattr(args, "forwards_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command].run(args, extra)
    except USER_ERRORS as err:
        if os.environ.get("KDFAST_DEBUG"):
            raise
        print(f"kdfast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdfast {args.command}: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    from .. import __version__

    return __version__
