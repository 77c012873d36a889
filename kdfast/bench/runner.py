"""Running the cases: every method of a case timed side by side, forward, backward and both; memory; ratios.

The result is the payload of the JSON that ``kdfast bench`` writes (its
schema: :mod:`kdfast.bench.report`).  A method that fails (out of memory, an
error) gets a record with its ``error`` and the others still run; a method not
offered here (Liger-Kernel not installed, a backend this device lacks) gets a
record that says why it was ``skipped``.
"""

from __future__ import annotations

import datetime as _dt
import sys
from dataclasses import asdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from .compare import BENCHMARK_NAME, SCHEMA_VERSION
from .families import Case, Settings, prepare
from .keys import case_key, variant_of
from .machine import copy_bandwidth, machine_info, nominal_bandwidth, roofline_copy_numel, roofline_fraction
from .memory import case_id, peak_memory_of, peaks_in_subprocess
from .timing import summarise, sync, time_once

PHASES = ("forward", "backward", "forward_backward")
# A method whose warm-up call took less than this has an untimed call at the start of each of its turns.
# The methods before it in the rotation leave the caches, the TLB and the allocator in their own state: a
# slow baseline frees gigabytes of temporaries, and the fast method's next call then pays to fault its
# memory in again (its calls spread from 1x to 4x).  A training step calls its loss again and again, so
# its steady state is what to time.  Slower methods are not settled: their turns would take twice as long,
# and a fault-in is a small share of a long call.
SETTLE_BELOW_S = 1.0


def forward_backward(fn: Callable[[], torch.Tensor], wrt) -> Callable[[], tuple]:
    """One forward+backward; ``autograd.grad``, so that no method pays for accumulating into ``.grad``."""
    def step():
        return torch.autograd.grad(fn(), wrt)

    return step


def phase_step(phase: str, fn: Callable[[], torch.Tensor], wrt, device) -> Callable[[], float]:
    """A callable that runs one ``phase`` of a method and returns the seconds it took.

    ``forward`` runs the loss with gradients enabled, as in training (kdfast's
    fused kernels write the gradient there); ``backward`` times only
    ``autograd.grad`` of a loss computed, untimed, just before.
    """
    if phase == "forward":
        return lambda: time_once(fn, device)
    if phase == "backward":
        def backward():
            loss = fn()
            sync(device)
            return time_once(lambda: torch.autograd.grad(loss, wrt), device)

        return backward
    if phase == "forward_backward":
        step = forward_backward(fn, wrt)
        return lambda: time_once(step, device)
    raise ValueError(f"unknown phase {phase!r}; choose from {PHASES}")


def describe_failure(error: BaseException, device) -> str:
    """What a failed method's record says; out-of-memory frees the cache so the next method starts clean."""
    if isinstance(error, torch.OutOfMemoryError):
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        return "out of memory"
    return f"{type(error).__name__}: {str(error).strip()[:300]}"


def kind_of(method: str) -> str:
    return "kdfast" if method.startswith("kdfast") else "baseline"


def run_case(case: Case, settings: Settings, *, runs: int, warmup: int, phases: Sequence[str] = PHASES,
             bandwidth: Optional[float] = None, nominal: Optional[float] = None,
             memory: str = "off") -> List[dict]:
    """The records of every method of one case (see the module doc); ``memory`` ``"in-process"``/``"cuda"``
    measures each method's peak here, ``"subprocess"`` and ``"off"`` leave it to the caller (None)."""
    device = torch.device(settings.device)
    case = case.complete(settings)  # a top-k case's records name its tail and k
    prepared = prepare(case, settings)
    key = case.key()

    def record(name: str, **fields) -> dict:
        return dict(key, method=name, kind=kind_of(name), **fields)

    records: Dict[str, dict] = {name: record(name, skipped=why) for name, why in prepared.unavailable.items()}
    methods, first_value = {}, None
    for name, fn in prepared.methods.items():
        try:  # the value, and the first warm-up (compilation, caches)
            value = float(fn().detach())
            forward_backward(fn, prepared.wrt)()
        except Exception as error:  # noqa: BLE001 - one method's failure is a result, not the end of the run
            records[name] = record(name, error=describe_failure(error, device))
            continue
        first_value = value if first_value is None else first_value
        methods[name] = fn
        records[name] = record(name, phases={}, peak_extra_bytes=None, bytes_moved=prepared.bytes_moved,
                               roofline_fraction=None, nominal_roofline_fraction=None, value=value,
                               value_rel_diff=abs(value - first_value) / max(abs(first_value), 1e-30))
    for phase in phases:
        steps = {name: phase_step(phase, fn, prepared.wrt, device) for name, fn in methods.items()}
        for name, times in _time_side_by_side(steps, runs, warmup, device, records).items():
            records[name]["phases"][phase] = summarise(times)
    for name, fn in list(methods.items()):
        record = records[name]
        if "error" in record:
            continue
        both = record["phases"].get("forward_backward")
        if both:
            record["roofline_fraction"] = roofline_fraction(prepared.bytes_moved, both["median_s"], bandwidth)
            record["nominal_roofline_fraction"] = roofline_fraction(prepared.bytes_moved, both["median_s"], nominal)
        if memory in ("in-process", "cuda"):
            try:
                record["peak_extra_bytes"] = peak_memory_of(forward_backward(fn, prepared.wrt), device)
            except Exception as error:  # noqa: BLE001
                record["memory_error"] = describe_failure(error, device)
    order = list(prepared.methods) + list(prepared.unavailable)
    return [records[name] for name in order if name in records]


def _time_side_by_side(steps: Dict[str, Callable[[], float]], runs: int, warmup: int, device,
                       records: Dict[str, dict]) -> Dict[str, List[float]]:
    """``runs`` timings of each step taken in turns, after ``warmup`` each (one more for ``compile``).

    A step whose last warm-up call took under ``SETTLE_BELOW_S`` is called once more, untimed, at the start
    of each turn.  A step that raises is dropped and its record gets the error.
    """
    live = dict(steps)

    def attempt(name):
        try:
            return live[name]()
        except Exception as error:  # noqa: BLE001
            record = records[name]
            for field in ("phases", "peak_extra_bytes", "roofline_fraction", "nominal_roofline_fraction"):
                record.pop(field, None)
            record["error"] = describe_failure(error, device)
            del live[name]
            return None

    settled = set()
    for name in list(live):
        seconds = None
        for _ in range(warmup + (1 if name == "compile" else 0)):
            if name in live:
                seconds = attempt(name)
        if seconds is not None and seconds < SETTLE_BELOW_S:
            settled.add(name)
        if name in records:
            records[name]["settled"] = name in settled
    sync(device)
    times: Dict[str, List[float]] = {name: [] for name in live}
    for _ in range(runs):
        for name in list(live):
            if name in settled and attempt(name) is None:
                continue
            seconds = attempt(name)
            if seconds is not None:
                times[name].append(seconds)
    return {name: t for name, t in times.items() if name in live}


def ratios(records: Iterable[dict], phases: Sequence[str] = PHASES) -> List[dict]:
    """For each case, kdfast method and baseline: the baseline's median over kdfast's (> 1: kdfast faster).

    A row names its case as the records do (a top-k case: with its ``tail`` and ``topk``).
    """
    by_case: Dict[tuple, Dict[str, dict]] = {}
    for r in records:
        if "phases" in r:
            by_case.setdefault(case_key(r), {})[r["method"]] = r
    out = []
    for methods in by_case.values():
        for ours in (m for m in methods.values() if m["kind"] == "kdfast"):
            for theirs in (m for m in methods.values() if m["kind"] == "baseline"):
                row = {"loss": ours["loss"], "shape": ours["shape"], "dtype": ours["dtype"], **variant_of(ours),
                       "method": ours["method"], "baseline": theirs["method"]}
                for phase in phases:
                    a, b = ours["phases"].get(phase), theirs["phases"].get(phase)
                    row[phase] = b["median_s"] / a["median_s"] if a and b and a["median_s"] > 0 else None
                out.append(row)
    return out


def memory_mode(requested: str, device) -> str:
    """``auto``: a fresh subprocess per method on CPU, the allocator's peak on CUDA."""
    if requested != "auto":
        return requested
    return "cuda" if torch.device(device).type == "cuda" else "subprocess"


def run(cases: Sequence[Case], settings: Settings, *, runs: int = 7, warmup: int = 1,
        phases: Sequence[str] = PHASES, memory: str = "auto", threads: Optional[int] = None,
        progress: bool = True) -> dict:
    """Benchmark ``cases``; the payload of the JSON (machine, settings, records, ratios)."""
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU; this machine has none")
    if threads:
        torch.set_num_threads(threads)
    memory = memory_mode(memory, device)
    info = machine_info(device)
    largest = max((c.N * c.V * 4 for c in cases), default=0)
    bandwidth = copy_bandwidth(roofline_copy_numel(largest), device)
    nominal = nominal_bandwidth(device)
    info["copy_bandwidth_GBps"] = bandwidth / 1e9
    info["nominal_bandwidth_GBps"] = nominal / 1e9 if nominal else None

    records: List[dict] = []
    bar = ProgressBar(len(cases), enabled=progress)
    for case in cases:
        bar.describe(f"{case.loss} {case.shape} {case.dtype}")
        records += run_case(case, settings, runs=runs, warmup=warmup, phases=phases, bandwidth=bandwidth,
                            nominal=nominal, memory=memory)
        bar.advance()
    bar.close()
    if memory == "subprocess":
        measure_in_subprocesses(records, settings, torch.get_num_threads(), progress)
    return {
        "benchmark": BENCHMARK_NAME, "schema": SCHEMA_VERSION,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": info,
        "settings": dict(asdict(settings), baselines=list(settings.baselines), backends=list(settings.backends),
                         topk=list(settings.topk), tails=list(settings.tails),
                         losses=_unique(c.loss for c in cases), shapes=_unique(c.shape for c in cases),
                         dtypes=_unique(c.dtype for c in cases), runs=runs, warmup=warmup, phases=list(phases),
                         settle_below_s=SETTLE_BELOW_S, memory=memory, threads=torch.get_num_threads()),
        "records": records,
        "ratios": ratios(records, phases),
        "compare": None,
    }


def measure_in_subprocesses(records: List[dict], settings: Settings, threads: int, progress: bool) -> None:
    """Fills ``peak_extra_bytes`` of every measured record, one fresh interpreter per method."""
    by_method: Dict[str, List[dict]] = {}
    for r in records:
        if "phases" in r:
            by_method.setdefault(r["method"], []).append(r)
    bar = ProgressBar(len(by_method), enabled=progress)
    for method, mine in by_method.items():
        bar.describe(f"memory of {method}")
        cases = [dict({k: r[k] for k in ("loss", "shape", "N", "V", "dtype")}, **variant_of(r)) for r in mine]
        peaks = peaks_in_subprocess(method, cases, asdict(settings), threads)
        for r in mine:
            r["peak_extra_bytes"] = peaks.get(case_id(r))
        bar.advance()
    bar.close()


def _unique(items) -> list:
    return list(dict.fromkeys(items))


class ProgressBar:
    """tqdm when it is installed, else one line per step on stderr; nothing when disabled."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, dynamic_ncols=True, leave=False, file=sys.stderr)

    def describe(self, label: str) -> None:
        if self._bar is not None:
            self._bar.set_description(label)
        elif self.enabled:
            print(f"[{self.done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
