"""What a benchmark ran on: CPU model, SIMD levels, threads, GPU, versions, and the memory roofline.

Every result of ``kdfast bench`` carries this record, because a kernel's time
means nothing without the machine: the same build runs AVX-512 on one CPU and
AVX2 on the next, and a 2-core VM's memory bandwidth varies from run to run.
The copy bandwidth is therefore measured in the same run as the kernels.
"""

from __future__ import annotations

import os
import platform
import statistics

import torch

import kdfast

from .timing import time_runs

# Nominal HBM bandwidth (bytes/s) by device-name fragment, most specific first.
NOMINAL_HBM = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.04e12),
               ("A100", 1.56e12)]
# The copy that measures bandwidth: large enough to leave the caches (L3s reach hundreds of MiB on
# server parts), small enough to take well under a second.
COPY_BYTES_MIN = 256 * 2**20
COPY_BYTES_MAX = 1024 * 2**20


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def torch_cpu_capability() -> str | None:
    """The SIMD level of PyTorch's own CPU kernels ('AVX512', 'AVX2', ...), when this torch says."""
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return get() if get else None


def machine_info(device=None) -> dict:
    """The machine a benchmark runs on (CPU, threads, versions, SIMD levels, the GPU of ``device``, load)."""
    device = torch.device(device or "cpu")
    on_gpu = device.type == "cuda" and torch.cuda.is_available()
    return {
        "device": device.type,
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kdfast": kdfast.__version__,
        "kdfast_cpu_capability": kdfast.cpu_capability(),
        "torch_cpu_capability": torch_cpu_capability(),
        "gpu": torch.cuda.get_device_name(device) if on_gpu else None,
        "python": platform.python_version(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def describe_machine(info: dict) -> str:
    """One line of :func:`machine_info`."""
    return (f"{info['cpu']} | {info['logical_cpus']} logical CPUs | torch {info['torch']} with "
            f"{info['torch_threads']} threads | SIMD: kdfast {info['kdfast_cpu_capability']}, "
            f"torch {info.get('torch_cpu_capability')}"
            + (f" | GPU {info['gpu']}" if info.get("gpu") else "") + f" | load average {info['load_average_1m']}")


def nominal_bandwidth(device) -> float | None:
    """The GPU's nominal memory bandwidth in bytes/s when known (None on CPU or an unknown GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in NOMINAL_HBM if key in name), None)


def copy_bandwidth(numel: int, device, runs: int = 7) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write), float32, preallocated buffers.

    The roofline of a loss kernel: it must at least read its inputs and write
    its gradient once, and no loop moves memory faster than a plain copy.
    """
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = time_runs(lambda: dst.copy_(src), runs, 2, torch.device(device))
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def roofline_copy_numel(largest_case_bytes: int) -> int:
    """Float32 elements of the bandwidth copy: the largest case's size, clamped to leave the caches quickly."""
    return max(COPY_BYTES_MIN, min(COPY_BYTES_MAX, largest_case_bytes)) // 4


def roofline_fraction(moved: float | None, seconds: float | None, bandwidth: float | None) -> float | None:
    """The fraction of ``bandwidth`` (bytes/s) that moving ``moved`` bytes in ``seconds`` reaches."""
    if not moved or not seconds or not bandwidth:
        return None
    return moved / seconds / bandwidth
