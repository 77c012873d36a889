"""The Triton backend: kernels for CUDA GPUs, runnable on CPU tensors through ``TRITON_INTERPRET=1``.

Importing this package imports nothing heavy; ``kdfast.ops.backends`` imports the
op (``op.py``) only where the backend can run.
"""

from __future__ import annotations

import importlib.util
import os


def interpreter_requested() -> bool:
    """``TRITON_INTERPRET`` is set to a true value (Triton then runs kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# The oldest Triton the kernels are tested with (CI runs 3.6.0 and 3.8.0; 3.6.0 is the GPU machine's).
MIN_TRITON = (3, 6)


def _version_tuple(version: str) -> tuple:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def unavailable_reason() -> str | None:
    """None when the triton backend can run here, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    from importlib import metadata

    try:
        version = metadata.version("triton")
    except metadata.PackageNotFoundError:  # a source checkout on sys.path: trust it
        version = None
    if version is not None and _version_tuple(version) < MIN_TRITON:
        return f"triton {version} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest kdfast supports"
    import torch

    if not (torch.cuda.is_available() or interpreter_requested()):
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly)"
    return None
