"""The top-k acceptance benchmark: ``kdfast bench`` at the issue's cases, results in ``benchmarks/results/``.

Two runs of the engine (:mod:`kdfast.bench`), each writing its own JSON and
plots (``kdfast-bench-topk-cpu-<date>-<time>.json``,
``kdfast-bench-fused_linear_topk-cpu-...``):

* ``topk``: ``topk_distill_loss`` at N = 4096, V = 128256, k = 64 and 256
  (a case per k), float32 and bfloat16 students, both tails (a case per
  tail), forward+backward; ``kdfast`` (the fused kernel: ``--backends cpu``)
  against ``kdfast[torch]`` (its PyTorch form, the implementation before the
  kernels), the plain PyTorch code (``eager``) and its ``torch.compile``
  (``--baselines eager`` leaves the compiled one out).  A tail without a fused
  kernel on this device has its ``kdfast`` method listed as not run, with the
  loss's own reason.
* ``fused_linear_topk``: ``fused_linear_topk_distill_loss`` at N = 4096,
  H = 576, V = 49152, k = 64, float32, both tails, against the materialised
  ``(N, V)`` logits and the PyTorch top-k loss (eager and compiled), with the
  peak extra memory of each method (a fresh process per method).

Options given here apply to both runs and win over these defaults; ``--part``
picks one run.  ``--compare OLD.json`` re-runs OLD's cases once, as
``kdfast bench`` does.

    python benchmarks/bench_topk.py                               # the acceptance runs (minutes)
    python benchmarks/bench_topk.py --part topk --baselines eager  # without torch.compile
    python benchmarks/bench_topk.py --shapes 64x1024 --runs 2 --out /tmp/check   # a quick check of the script
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's kdfast, even if another is installed
import torch  # noqa: E402

from kdfast.bench import cli  # noqa: E402
from kdfast.bench.families import fused_backend  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = ["--phases", "forward_backward", "--runs", "5"]
# The engine's options of each run; the command line's come after them, so they win.
PARTS = {
    "topk": ["--losses", "topk", "--shapes", "4096x128256", "--topk", "64,256", "--tail", "renormalize,bucket",
             "--dtypes", "float32", "bfloat16", "--memory", "off", *RUNS],
    "fused_linear_topk": ["--losses", "fused_linear_topk", "--shapes", "4096x49152", "--hidden", "576", "--topk", "64",
                          "--tail", "renormalize,bucket", "--dtypes", "float32", "--memory", "auto", *RUNS],
}


def make_parser() -> argparse.ArgumentParser:
    """``kdfast bench``'s options (results in ``benchmarks/results/``) and ``--part``."""
    parser = argparse.ArgumentParser(prog="bench_topk.py", description=__doc__, epilog=cli.EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_arguments(parser, default_out=str(RESULTS))
    parser.add_argument("--part", nargs="+", choices=tuple(PARTS), default=list(PARTS),
                        help="the runs to make (default both): " + "; ".join(
                            f"{part}: {' '.join(options)}" for part, options in PARTS.items()))
    return parser


def part_arguments(parser: argparse.ArgumentParser, part: str, argv: List[str]) -> argparse.Namespace:
    """The options of one run: its defaults, then the command line; kdfast's methods default to the
    device's fused kernel and the PyTorch form (``kdfast`` and ``kdfast[torch]``)."""
    args = parser.parse_args(PARTS[part] + argv)
    if args.backends is None:
        args.backends = [fused_backend(torch.device(args.device)), "torch"]
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """The runs of ``--part`` (or ``--compare``'s one), each printed and written; 2 on a bad option."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser()
    first = parser.parse_args(argv)  # --help, and the command line's own mistakes, before any run
    try:
        if first.compare:
            cli.run_from_args(first)
            return 0
        for part in first.part:
            cli.run_from_args(part_arguments(parser, part, argv), name=part)
    except (ValueError, FileNotFoundError) as error:
        print(f"bench_topk.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
