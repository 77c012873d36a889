"""``kdfast bench``: the kernel microbenchmark of :mod:`kdfast.bench`, from any install (a wheel included)."""

from __future__ import annotations

import argparse

from ..bench.cli import EXAMPLES, add_arguments


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time the fused losses against plain PyTorch, torch.compile and Liger-Kernel",
        description="Time forward, backward and forward+backward of kdfast's losses side by side with what users "
                    "would otherwise run (plain PyTorch, its torch.compile, Liger-Kernel), on the same inputs in "
                    "one process; report speed-ups, peak memory and the fraction of the memory roofline; write "
                    "JSON and plots.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)


def run(args, extra) -> int:
    from ..bench.cli import run_from_args

    run_from_args(args)
    return 0
