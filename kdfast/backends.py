"""Which backend computes a loss.

``"torch"`` is the pure-PyTorch reference (always there), ``"cpu"`` the fused
C++ kernels (CPU tensors, when the extension is built).  ``backend="auto"``
picks the fused kernel for the tensors' device; the environment variable
``KDFAST_BACKEND`` replaces ``"auto"``.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List

import torch

from ._extension import cpu_extension_available
from ._options import LossConfig
from .reference import distill_loss_reference

BACKENDS = ("torch", "cpu")


def available_backends() -> List[str]:
    """The backends that work on this machine, e.g. ``["torch", "cpu"]``."""
    names = ["torch"]
    if cpu_extension_available():
        names.append("cpu")
    return names


def _implementations() -> Dict[str, Callable[[torch.Tensor, torch.Tensor, LossConfig], torch.Tensor]]:
    impls = {"torch": distill_loss_reference}
    if cpu_extension_available():
        from ._cpu_op import distill_loss_cpu

        impls["cpu"] = distill_loss_cpu
    return impls


_IMPLS = _implementations()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run, or a ValueError/RuntimeError that says why none can."""
    if backend == "auto":
        backend = os.environ.get("KDFAST_BACKEND", "auto") or "auto"
    if backend == "auto":
        if device.type == "cpu" and "cpu" in _IMPLS:
            return "cpu"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend not in _IMPLS:
        raise RuntimeError(f"backend {backend!r} is not available here (available: {available_backends()})")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' takes CPU tensors, got tensors on {device}")
    return backend


def implementation(backend: str):
    return _IMPLS[backend]
