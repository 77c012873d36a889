"""The Triton backend: kernels for CUDA GPUs, runnable on CPU tensors through ``TRITON_INTERPRET=1``.

Importing this package imports nothing heavy; ``kdfast.backends`` imports the
op (``op.py``) only where the backend can run.
"""

from __future__ import annotations

import importlib.util
import os


def interpreter_requested() -> bool:
    """``TRITON_INTERPRET`` is set to a true value (Triton then runs kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def unavailable_reason() -> str | None:
    """None when the triton backend can run here, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    import torch

    if not (torch.cuda.is_available() or interpreter_requested()):
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly)"
    return None
