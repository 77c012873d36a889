"""Peak extra host memory of a callable, from the kernel's resident-set counters.

Linux keeps the high-water mark of resident memory (VmHWM) and lets a process
reset it (write 5 to /proc/self/clear_refs), so the peak of one call is
``VmHWM after - VmRSS before``.  This sees every allocation (PyTorch's, the
extension's own, inductor's), unlike allocator statistics.
"""

from __future__ import annotations

import ctypes
import gc


def _status_kb(field: str) -> int:
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
    before = _status_kb("VmRSS")
    result = fn()
    peak = _status_kb("VmHWM")
    del result
    return max(0, peak - before) * 1024
