"""Which backend computes a loss.

``"torch"`` is the pure-PyTorch reference (always there), ``"cpu"`` the fused
C++ kernels (CPU tensors, when the extension is built), ``"triton"`` the fused
Triton kernels (CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``,
which is how the tests run them without a GPU).  ``backend="auto"`` picks the
fused kernel for the tensors' device; the environment variable
``KDFAST_BACKEND`` replaces ``"auto"``.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List

import torch

from . import _triton
from ._extension import cpu_extension_available
from ._options import LossConfig
from .reference import distill_loss_reference

BACKENDS = ("torch", "cpu", "triton")


def available_backends() -> List[str]:
    """The backends that work on this machine, e.g. ``["torch", "cpu"]`` or ``["torch", "cpu", "triton"]``."""
    return list(_IMPLS)


def _implementations() -> Dict[str, Callable[[torch.Tensor, torch.Tensor, LossConfig], torch.Tensor]]:
    impls = {"torch": distill_loss_reference}
    if cpu_extension_available():
        from ._cpu_op import distill_loss_cpu

        impls["cpu"] = distill_loss_cpu
    if _triton.unavailable_reason() is None:
        from ._triton.op import distill_loss_triton

        impls["triton"] = distill_loss_triton
    return impls


_IMPLS = _implementations()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run, or a ValueError/RuntimeError that says why none can."""
    if backend == "auto":
        backend = os.environ.get("KDFAST_BACKEND", "auto") or "auto"
    if backend == "auto":
        if device.type == "cpu" and "cpu" in _IMPLS:
            return "cpu"
        if device.type == "cuda" and "triton" in _IMPLS:
            return "triton"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend not in _IMPLS:
        why = _triton.unavailable_reason() if backend == "triton" else "the C++ extension is not built"
        raise RuntimeError(f"backend {backend!r} is not available here ({why}; available: {available_backends()})")
    check_device(backend, device)
    return backend


def check_device(backend: str, device: torch.device) -> None:
    """ValueError when a fused backend cannot take tensors on ``device``."""
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' takes CPU tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and _triton.interpreter_requested()):
        raise ValueError(f"backend 'triton' takes CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                         f"got tensors on {device}")


def implementation(backend: str):
    return _IMPLS[backend]
