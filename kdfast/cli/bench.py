"""``kdfast bench``: run the kernel microbenchmark ``benchmarks/bench_losses.py`` of a source checkout.

The benchmark is not part of the installed package (it lives next to it, in
the repository), so it is run by its path, in a child process whose
``PYTHONPATH`` starts with the checkout: it measures this very kdfast.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

EPILOG = """\
examples:
  kdfast bench --quick                          # one small shape, KD (kl), a minute or so
  kdfast bench --classification --dtypes float32
  kdfast bench --shapes 4096x32000 --divergences kl jsd --runs 5
  kdfast bench --bench-help                     # every option of benchmarks/bench_losses.py

Every argument other than --bench-help goes to benchmarks/bench_losses.py unchanged.
Results go to benchmarks/results/<device>-<date>.json (or --out).
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="run the fused-kernel microbenchmark (benchmarks/bench_losses.py; source checkout)",
        description="Time forward+backward of the kdfast losses against the PyTorch reference (eager and "
                    "torch.compile) and report speed, memory and roofline: benchmarks/bench_losses.py of the "
                    "kdfast source checkout this package was imported from.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench-help", action="store_true", help="show the options of bench_losses.py and exit")
    parser.set_defaults(forwards_extra=True)


def find_benchmark(package_dir: Optional[Path] = None) -> Path:
    """The path of ``benchmarks/bench_losses.py`` next to the kdfast package; FileNotFoundError if absent."""
    package_dir = package_dir or Path(__file__).resolve().parent.parent
    script = package_dir.parent / "benchmarks" / "bench_losses.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"kdfast bench needs a source checkout: {script} does not exist (benchmarks/ is not installed with "
            f"the package). Clone the kdfast repository, install it with `pip install --no-build-isolation -e .` "
            f"and run `kdfast bench` (or `python benchmarks/bench_losses.py`) there.")
    return script


def benchmark_command(script: Path, arguments: List[str]) -> List[str]:
    return [sys.executable, str(script), *arguments]


def run(args, extra) -> int:
    script = find_benchmark()
    arguments = ["--help"] if args.bench_help else list(extra)
    env = dict(os.environ)
    checkout = str(script.parent.parent)
    env["PYTHONPATH"] = checkout + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.call(benchmark_command(script, arguments), env=env)
