"""Peak extra memory of one forward+backward: resident-set counters on CPU, the allocator's peak on CUDA.

Linux keeps the high-water mark of resident memory (VmHWM) and lets a process
reset it (write 5 to /proc/self/clear_refs), so the peak of one call is
``VmHWM after - VmRSS before``.  This sees every allocation (PyTorch's, the
extension's own, inductor's), unlike allocator statistics.
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
from typing import Callable, Dict, List, Optional

from .keys import loss_label


def status_kb(field: str) -> int:
    """A field of ``/proc/self/status`` in kB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_free_heap() -> None:
    """Give the memory that glibc keeps after ``free`` back to the system (``malloc_trim``).

    Blocks below glibc's mmap threshold (up to 32 MiB) stay resident after they
    are freed and are reused by the next allocation without raising the
    resident size, which would hide them from a VmHWM peak; trimming first makes
    every byte the measured call allocates count.  A no-op off glibc.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_bytes(fn) -> int | None:
    """Peak resident memory added while ``fn()`` runs (None where not measurable)."""
    gc.collect()
    release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = status_kb("VmRSS")
    result = fn()
    peak = status_kb("VmHWM")
    del result
    return max(0, peak - before) * 1024


def peak_memory_of(step: Callable[[], object], device) -> Optional[int]:
    """Peak extra memory of one ``step()`` after a warm-up one (initialisation, compilation, caches).

    kdfast keeps its last gradient buffer for reuse; :func:`kdfast.empty_cache`
    before the measured call makes the allocation count, as in a cold call.
    On CUDA: ``max_memory_allocated`` minus the allocation before the step.
    """
    import torch

    import kdfast

    step()
    kdfast.empty_cache()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()  # the peak counts its outputs while they lived
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return peak_extra_bytes(step)


def peaks_in_subprocess(method: str, cases: List[dict], settings: dict, threads: int) -> Dict[str, Optional[int]]:
    """Peak extra memory of ``method`` on each case, measured in a fresh interpreter.

    A fresh process holds nothing of the other methods (their caches, compiled
    graphs, freed-but-resident heap), so its resident high-water mark is the
    method's own.  Returns case shape keys (``loss/shape/dtype``) -> bytes, None
    where the child failed (its error goes to stderr).
    """
    spec = json.dumps({"method": method, "cases": cases, "settings": settings, "threads": threads})
    proc = subprocess.run([sys.executable, "-m", "kdfast.bench.memory", spec], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        print(f"kdfast bench: measuring the memory of {method} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def case_id(case: dict) -> str:
    """``loss/shape/dtype`` (``topk[bucket,k=64]/...`` for a top-k case): the key of a case's peak."""
    return f"{loss_label(case)}/{case['shape']}/{case['dtype']}"


def _child(spec_json: str) -> None:
    """The fresh interpreter of :func:`peaks_in_subprocess`: one method over the cases, peaks as JSON."""
    import torch

    from .families import Case, Settings, prepare
    from .runner import forward_backward

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    settings = Settings.from_json(spec["settings"])
    peaks = {}
    for case in spec["cases"]:
        prepared = prepare(Case(case["loss"], case["N"], case["V"], case["dtype"], case.get("tail"), case.get("topk")),
                           settings)
        fn = prepared.methods[spec["method"]]
        try:
            peaks[case_id(case)] = peak_memory_of(forward_backward(fn, prepared.wrt), settings.device)
        except Exception as error:  # noqa: BLE001 - one case's failure is reported, the others still count
            print(f"{case_id(case)}: {type(error).__name__}: {error}", file=sys.stderr)
            peaks[case_id(case)] = None
        del prepared, fn
    print(json.dumps(peaks))


if __name__ == "__main__":
    _child(sys.argv[1])
