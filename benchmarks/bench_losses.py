"""The kernel microbenchmark from a source checkout: ``kdfast bench`` with its results in ``benchmarks/results/``.

The engine is the installed package's (:mod:`kdfast.bench`: every loss
family, plain PyTorch / ``torch.compile`` / Liger-Kernel baselines side by
side, forward / backward / both, memory, roofline, plots, ``--compare``); this
script only changes the default output folder to the repository's
``benchmarks/results/`` (``kdfast bench`` writes to the current directory).

    python benchmarks/bench_losses.py --quick
    python benchmarks/bench_losses.py --losses kl jsd --shapes 4096x32000 --dtypes float32 bfloat16
    python benchmarks/bench_losses.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's kdfast, even if another is installed
from kdfast.bench.cli import main  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    sys.exit(main(default_out=str(RESULTS)))
