"""What this process runs on: versions, backends, CPU, threads, CUDA and Triton (for ``kdfast info`` and results)."""

from __future__ import annotations

import os
import platform
from typing import Dict

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def triton_status() -> str:
    """``"available (version)"`` or why kdfast's Triton kernels cannot run."""
    from ..ops import triton as _triton

    reason = _triton.unavailable_reason()
    if reason is None:
        import triton

        return f"available (triton {triton.__version__})"
    return f"unavailable: {reason}"


def collect_info() -> Dict[str, object]:
    """Every field ``kdfast info`` prints, as plain values."""
    import kdfast

    cuda = torch.cuda.is_available()
    return {
        "kdfast": kdfast.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "backends_available": kdfast.available_backends(),
        "cpu_extension": kdfast.cpu_extension_available(),
        "cpu_capability": kdfast.cpu_capability(),
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if cuda else "not available",
        "triton": triton_status(),
    }


def results_environment() -> Dict[str, object]:
    """The part of :func:`collect_info` that an experiment's results record (versions, CPU, cores, threads).

    Never raises: the record is informative only, so a failure is recorded as ``{"error": ...}``.
    """
    try:
        info = collect_info()
        return {k: info[k] for k in ("kdfast", "torch", "python", "cpu", "cores", "torch_threads") if k in info}
    except Exception as err:  # noqa: BLE001 - see the docstring
        return {"error": repr(err)}
