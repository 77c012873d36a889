"""Timing: wall clock on CPU, CUDA events on a GPU; round-robin over methods; medians with their spread.

Methods of one case are timed round-robin (run 1 of every method, then run 2,
...), so that a machine that slows down mid-run (another tenant on a VM, a
thermal limit) slows every method alike and the ratios stay fair.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device) -> float:
    """Seconds of one ``fn()``: CUDA events on a GPU (the device's time, no host jitter), else the wall clock."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_runs(fn: Callable[[], object], runs: int, warmup: int, device) -> List[float]:
    """The seconds of ``runs`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    return [time_once(fn, device) for _ in range(runs)]


def time_round_robin(steps: Dict[str, Callable[[], float]], runs: int) -> Dict[str, List[float]]:
    """``runs`` timings of each step, taken in turns.  Each step returns its own measured seconds."""
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(runs):
        for name, step in steps.items():
            times[name].append(step())
    return times


def summarise(times: List[float]) -> dict:
    """Median, quartiles, minimum and the relative spread ``(q3 - q1) / median`` of some timings."""
    ordered = sorted(times)
    median = statistics.median(ordered)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = median
    return {"times_s": list(times), "median_s": median, "q1_s": q1, "q3_s": q3, "min_s": ordered[0],
            "spread": (q3 - q1) / median if median > 0 else 0.0}
