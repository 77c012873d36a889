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

from . import triton as _triton
from .extension import cpu_extension_available
from ..reference import distill_loss_reference
from ..reference.correlation import correlation_loss_reference, dist_loss_reference
from ..reference.dkd import dkd_loss_reference
from ..reference.grouped_kd import grouped_kd_loss_reference
from ..reference.longtail import ltkd_loss_reference

BACKENDS = ("torch", "cpu", "triton")
# The loss families and their references; each family's fused implementations share its reference's signature.
FAMILIES = {"distill": distill_loss_reference, "dist": dist_loss_reference, "dkd": dkd_loss_reference,
            "correlation": correlation_loss_reference, "grouped_kd": grouped_kd_loss_reference,
            "ltkd": ltkd_loss_reference}
# Fused backends that have no kernel for a family at all (not merely unavailable on this machine): asking
# for one is a NotImplementedError, and "auto" passes over it (none at present).
NOT_WRITTEN: Dict[str, tuple] = {}


def available_backends(family: str = "distill") -> List[str]:
    """The backends that work on this machine for a loss family, e.g. ``["torch", "cpu"]``."""
    return list(_IMPLS[family])


def _implementations() -> Dict[str, Dict[str, Callable]]:
    """family -> backend -> implementation, found once at import (no module probing on the call path)."""
    impls = {family: {"torch": reference} for family, reference in FAMILIES.items()}
    if cpu_extension_available():
        from . import cpu_correlation
        from .cpu import distill_loss_cpu
        from .cpu_grouped_kd import grouped_kd_loss_cpu
        from .cpu_ltkd import ltkd_loss_cpu

        for family, impl in (("distill", distill_loss_cpu), ("dist", cpu_correlation.dist_loss_cpu),
                             ("dkd", cpu_correlation.dkd_loss_cpu),
                             ("correlation", cpu_correlation.correlation_loss_cpu),
                             ("grouped_kd", grouped_kd_loss_cpu), ("ltkd", ltkd_loss_cpu)):
            impls[family]["cpu"] = impl
    if _triton.unavailable_reason() is None:
        from .triton import correlation, dist, dkd, grouped_kd, ltkd
        from .triton.op import distill_loss_triton

        for family, impl in (("distill", distill_loss_triton), ("dist", dist.dist_loss_triton),
                             ("dkd", dkd.dkd_loss_triton), ("correlation", correlation.correlation_loss_triton),
                             ("grouped_kd", grouped_kd.grouped_kd_loss_triton), ("ltkd", ltkd.ltkd_loss_triton)):
            impls[family]["triton"] = impl
    return impls


_IMPLS = _implementations()


def resolve_backend(backend: str, device: torch.device, family: str = "distill") -> str:
    """The backend that will run a loss of ``family``, or a ValueError/RuntimeError that says why none can.

    ``"auto"`` (or ``KDFAST_BACKEND``) is the fused kernel of the tensors' device when it exists, else the reference.
    """
    impls = _IMPLS[family]
    if backend == "auto":
        backend = os.environ.get("KDFAST_BACKEND", "auto") or "auto"
    if backend == "auto":
        fused = {"cpu": "cpu", "cuda": "triton"}.get(device.type)
        return fused if fused in impls else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend in NOT_WRITTEN.get(family, ()):
        written = [b for b in BACKENDS if b not in NOT_WRITTEN[family]]
        raise NotImplementedError(f"the {family} loss has no {backend!r} kernel yet; its backends are {written} "
                                  f"(available here: {available_backends(family)})")
    if backend not in impls:
        why = _triton.unavailable_reason() if backend == "triton" else "the C++ extension is not built"
        raise RuntimeError(f"backend {backend!r} is not available here ({why}; available: "
                           f"{available_backends(family)})")
    check_device(backend, device)
    return backend


def check_device(backend: str, device: torch.device) -> None:
    """ValueError when a fused backend cannot take tensors on ``device``."""
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' takes CPU tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and _triton.interpreter_requested()):
        raise ValueError(f"backend 'triton' takes CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                         f"got tensors on {device}")


def implementation(backend: str, family: str = "distill") -> Callable:
    """The function of a resolved backend for a loss family."""
    return _IMPLS[family][backend]


def pick(family: str, backend: str, device: torch.device) -> Callable:
    """The implementation that runs a loss of ``family`` for ``backend=`` ("auto", "torch", "cpu", "triton")."""
    return implementation(resolve_backend(backend, device, family), family)
