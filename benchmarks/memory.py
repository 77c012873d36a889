"""Peak extra host memory of a callable, from the kernel's resident-set counters.

Linux keeps the high-water mark of resident memory (VmHWM) and lets a process
reset it (write 5 to /proc/self/clear_refs), so the peak of one call is
``VmHWM after - VmRSS before``.  This sees every allocation (PyTorch's, the
extension's own, inductor's), unlike allocator statistics.
"""

from __future__ import annotations

import gc


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn) -> int | None:
    """Peak resident memory added while ``fn()`` runs (None where not measurable)."""
    gc.collect()
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
