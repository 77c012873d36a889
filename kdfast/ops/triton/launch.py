"""Launching the Triton row kernel: argument checks, autotuning, row errors, the reduction.

``distill_forward`` has the signature and the contract of the C++ op
``kdfast::distill_forward`` (csrc/distill_op.cpp): it returns the reduced loss
and the gradient with respect to the student logits, computed in the forward.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...config import check_logits
from ...registry import (DIVERGENCE_NAMES, KERNEL_PARAMS, WEIGHTING_NAMES, needs_grad_sum, weighting_spec)
from . import interpreter_compat, interpreter_requested, row_kernel

interpreter_compat.apply()


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return interpreter_requested()


# A small fixed list: tiles of 1k-8k entries with enough warps to keep each
# row's loads in flight.  The interpreter gets one small tile, so that the
# test shapes (V ~ 1000) span several tiles and a partial last tile.
_GPU_CONFIGS = [
    triton.Config({"BLOCK": block}, num_warps=warps)
    for block, warps in ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))
]
INTERPRETER_BLOCK = 512
_INTERPRETER_CONFIGS = [triton.Config({"BLOCK": INTERPRETER_BLOCK}, num_warps=4)]

# Keyed on V and the policy (the autotuner adds the tensors' dtypes to the key).
_distill_rows = triton.autotune(
    configs=_INTERPRETER_CONFIGS if interpreting() else _GPU_CONFIGS,
    key=["V", "DIV", "WEIGHTING", "HARD", "COMPUTE_GRAD", "REVISE"],
)(row_kernel.distill_rows_kernel)

_REDUCE_BLOCK = 1024


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``(N, V)`` view with unit stride along V (copied only when that is impossible)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def row_outputs(student: torch.Tensor, N: int, compute_grad: bool, f64: bool):
    """``(grad, row_loss, status)``: what a row kernel fills for ``N`` rows of ``student``.

    The ``(N, V)`` gradient in the student's dtype (an empty tensor without
    ``compute_grad``), the per-row losses in the accumulation dtype, zeroed
    (float64 when ``f64``), and the per-row status codes.
    """
    device = student.device
    grad = torch.empty((N, student.shape[-1]) if compute_grad else (0,), dtype=student.dtype, device=device)
    row_loss = torch.zeros(N, dtype=torch.float64 if f64 else torch.float32, device=device)
    return grad, row_loss, torch.zeros(N, dtype=torch.int32, device=device)


def reduced_loss(row_loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale * sum(row_loss)`` as a 0-d tensor, summed on the device in a fixed order (deterministic).

    ``scale`` is a one-element device tensor (no host synchronisation).
    """
    loss = torch.empty((), dtype=row_loss.dtype, device=row_loss.device)
    row_kernel.reduce_kernel[(1,)](row_loss, loss, scale, row_loss.shape[0], BLOCK=_REDUCE_BLOCK)
    return loss


def _inv_denominator(reduction: str, normalizer: Optional[float], labels: Optional[torch.Tensor], ignore_index: int,
                     n_rows: int, device) -> torch.Tensor:
    """``1 / denominator`` of the reduction as a float64 device scalar (no host sync)."""
    if reduction != "batchmean":
        return torch.ones(1, dtype=torch.float64, device=device)
    if normalizer is not None:
        return torch.full((1,), 1.0 / normalizer, dtype=torch.float64, device=device)
    if labels is None:
        return torch.full((1,), 1.0 / n_rows if n_rows else 0.0, dtype=torch.float64, device=device)
    valid = (labels != ignore_index).sum().to(torch.float64).reshape(1)
    # No valid row: the total is 0 and so is the loss, never 0/0.
    return torch.where(valid > 0, 1.0 / valid.clamp(min=1), torch.zeros_like(valid))


def _check_args(student, teacher, labels, weights, divergence, params, weighting, reduction) -> None:
    """The checks that keep a direct caller of the op from reading or writing out of bounds.

    The options themselves were validated in Python (``kdfast.config``) before the op."""
    check_logits(student, teacher)
    if student.device.type != "cuda" and not interpreting():
        raise ValueError(f"the triton backend takes CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                         f"got tensors on {student.device}")
    if not 0 <= divergence < len(DIVERGENCE_NAMES):
        raise ValueError(f"divergence must be an index of kdfast.registry.DIVERGENCE_NAMES, got {divergence}")
    if not 0 <= weighting < len(WEIGHTING_NAMES):
        raise ValueError(f"weighting must be an index of kdfast.registry.WEIGHTING_NAMES, got {weighting}")
    if len(params) != len(KERNEL_PARAMS):
        raise ValueError(f"params must have {len(KERNEL_PARAMS)} entries (kdfast.registry.KERNEL_PARAMS), "
                         f"got {len(params)}")
    if reduction not in ("batchmean", "sum", "none"):
        raise ValueError(f"reduction must be 'batchmean', 'sum' or 'none', got {reduction!r}")
    rows = student.numel() // student.shape[-1]
    if labels is not None and labels.numel() != rows:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the {rows} rows of logits shape "
                         f"{tuple(student.shape)}")
    if weighting_spec(WEIGHTING_NAMES[weighting]).given and (weights is None or weights.numel() != rows):
        raise ValueError(f"a weighting tensor must have one entry per row ({rows}), got "
                         f"{None if weights is None else tuple(weights.shape)}")


def _raise_on_bad_rows(status: torch.Tensor, labels: Optional[torch.Tensor], V: int, ignore_index: int) -> None:
    """The errors of docs/contract.md for rows the kernel refused.  Reading the status syncs the device once."""
    bad = status != row_kernel.STATUS_OK.value
    if not bool(bad.any()):
        return
    i = int(bad.nonzero()[0, 0])
    code = int(status[i])
    if code == row_kernel.STATUS_LABEL_OUT_OF_RANGE.value:
        raise ValueError(f"label {int(labels[i])} at row {i} is outside [0, {V}) and is not ignore_index "
                         f"({ignore_index})")
    who = "teacher" if code == row_kernel.STATUS_TEACHER_ALL_NEG_INF.value else "student"
    raise ValueError(f"{who}_logits row {i} is all -inf: the {who} distribution is undefined")


def distill_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    divergence: int,
    params: List[float],
    weighting: int,
    tau: float,
    tau_s: float,
    ignore_index: int,
    hard_weight: float,
    soft_coef: float,
    reduction: str,
    normalizer: Optional[float],
    compute_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused loss and student gradient on the Triton kernel; see ``kdfast::distill_forward``."""
    return _distill_forward(student, teacher, labels, weights, divergence, params, weighting, tau, tau_s,
                            ignore_index, hard_weight, soft_coef, reduction, normalizer, compute_grad, None)


def distill_forward_revised(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    divergence: int,
    params: List[float],
    weighting: int,
    tau: float,
    tau_s: float,
    ignore_index: int,
    hard_weight: float,
    soft_coef: float,
    reduction: str,
    normalizer: Optional[float],
    compute_grad: bool,
    label_revision: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`distill_forward` with Label Revision of the teacher (``eta = label_revision`` in (0, 1); needs labels).

    A separate op so that the schema shared with the C++ op stays as it is."""
    if labels is None:
        raise ValueError("label_revision needs labels")
    if not 0.0 < label_revision < 1.0:
        raise ValueError(f"label_revision must be in (0, 1), got {label_revision}")
    return _distill_forward(student, teacher, labels, weights, divergence, params, weighting, tau, tau_s,
                            ignore_index, hard_weight, soft_coef, reduction, normalizer, compute_grad,
                            label_revision)


def _distill_forward(student, teacher, labels, weights, divergence, params, weighting, tau, tau_s, ignore_index,
                     hard_weight, soft_coef, reduction, normalizer, compute_grad, eta):
    _check_args(student, teacher, labels, weights, divergence, params, weighting, reduction)
    div_name, weighting_name = DIVERGENCE_NAMES[divergence], WEIGHTING_NAMES[weighting]
    V = student.shape[-1]
    s2, t2 = _as_rows(student), _as_rows(teacher)
    N = s2.shape[0]
    device = student.device
    f64 = student.dtype == torch.float64 or teacher.dtype == torch.float64
    grad, row_loss, status = row_outputs(student, N, compute_grad, f64)
    labels64 = labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None
    weighting_entry = weighting_spec(weighting_name)
    weights64 = weights.detach().reshape(-1).to(torch.float64).contiguous() if weighting_entry.given else None
    inv_denom = _inv_denominator(reduction, normalizer, labels64, ignore_index, N, device)
    values = dict(zip(KERNEL_PARAMS, params), inv_tau=1.0 / tau, inv_tau_s=1.0 / tau_s, hard_weight=hard_weight,
                  soft_coef=soft_coef, log_V=math.log(V) if V > 1 else 0.0, eta=eta or 0.0)
    params = torch.tensor([values[name] for name in row_kernel.PARAMS], dtype=torch.float64, device=device)

    hard = labels is not None and hard_weight != 0.0
    if N > 0:
        _distill_rows[(N,)](
            s2, t2, s2.stride(0), t2.stride(0), grad, labels64 if labels64 is not None else status,
            weights64 if weights64 is not None else params, params, inv_denom, row_loss, status, V, ignore_index,
            DIV=div_name, WEIGHTING=weighting_name, NEEDS_T1=weighting_entry.needs_teacher_t1,
            HAS_LABELS=labels is not None, HARD=hard, STUDENT_T1=hard and tau_s != 1.0,
            SUM_G=needs_grad_sum(div_name), COMPUTE_GRAD=compute_grad,
            ACC=tl.float64 if f64 else tl.float32, REVISE=eta is not None,
        )
        _raise_on_bad_rows(status, labels64, V, ignore_index)

    if reduction == "none":
        return row_loss, grad
    return reduced_loss(row_loss, inv_denom), grad
