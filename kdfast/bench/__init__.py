"""Kernel microbenchmarks of kdfast's losses: ``kdfast bench`` (and ``python -m kdfast.bench``).

Every loss family (each divergence and weighting of ``distill_loss``, DIST,
DKD, correlation, top-k, fused linear, fused linear top-k) is timed side by
side with what users would otherwise run, on the same inputs in one process:
the plain PyTorch code (:mod:`kdfast.bench.baselines`), its ``torch.compile``,
Liger-Kernel where it has the loss and is installed.  Forward, backward and
forward+backward are timed separately (wall-clock medians with their spread on
CPU, CUDA events on a GPU); peak extra memory per method (a fresh subprocess
per method on CPU, ``max_memory_allocated`` on CUDA); the copy bandwidth
measured in the same run and each kernel's fraction of it.

Modules, one job each: :mod:`.families` (cases, inputs, methods),
:mod:`.baselines` (the plain forms), :mod:`.keys` (how a record names its
case), :mod:`.timing`, :mod:`.memory`, :mod:`.machine` (machine record,
roofline), :mod:`.runner` (running the cases, ratios), :mod:`.report` (table,
files, the JSON schema), :mod:`.plots`, :mod:`.compare` (ratios against an
earlier result), :mod:`.cli` (options).
"""

from .families import BASELINES, LOSSES, Case, Settings
from .runner import run

__all__ = ["BASELINES", "LOSSES", "Case", "Settings", "run"]
