"""The top-k loss's renormalised tail on the fused dense kernels.

With ``tail="renormalize"`` both distributions live on the teacher's support
``S``: the teacher ``softmax(log p1_S / tau)`` and the student
``softmax(z_s[S] / tau_s)`` (:mod:`kdfast.llm.topk`).  That is exactly
``distill_loss`` of the ``(N, k)`` rows ``z_s[S]`` against the teacher
"logits" ``log p1_S``, so the fused kernel of the device (C++ on CPU, Triton on
CUDA) computes it with every divergence, parameter, temperature, reduction and
normalizer, in ``O(N k)``.  What remains is the dense ``(N, V)`` gradient: the
kernel's ``(N, k)`` one scattered into zeros, written once, into a recycled
buffer on CPU (a fresh 500 MB tensor costs more in page faults than the whole
loss).  The traffic is the least the loss needs: ``k`` entries read per row,
the gradient written once.

The ``bucket`` tail needs the student's mass off ``S`` (a pass over every
logit) and spreads its gradient over them: it has no fused kernel yet and
runs in PyTorch (:func:`kdfast.llm.topk.topk_loss`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..config import LossConfig
from .extension import cpu_extension_available


def dense_zeros(N: int, V: int, like: torch.Tensor) -> torch.Tensor:
    """An ``(N, V)`` zero tensor of ``like``'s dtype and device; on CPU from the recycled gradient buffers."""
    if like.device.type == "cpu" and cpu_extension_available() and not torch.compiler.is_compiling():
        from .. import _C

        return _C.grad_buffer(N, V, like, True)  # zeroed with streaming stores: half a memset's traffic
    return torch.zeros(N, V, dtype=like.dtype, device=like.device)


class GatherSupport(torch.autograd.Function):
    """``rows.gather(-1, idx)`` whose backward writes the dense gradient into :func:`dense_zeros`."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.shape, ctx.like = rows.shape, rows.new_empty(0)
        return rows.gather(-1, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        dense = dense_zeros(ctx.shape[0], ctx.shape[1], ctx.like)
        values = grad.to(dense.dtype)
        if dense.element_size() == 2:
            # ATen's CPU scatter converts 16-bit floats through float32, whole tensor; as int16 it copies bits
            dense.view(torch.int16).scatter_(-1, idx, values.view(torch.int16))
        else:
            dense.scatter_(-1, idx, values)
        return dense, None


def gather_support(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The student's logits on the support, with the recycled-buffer gradient where autograd needs one."""
    if rows.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return GatherSupport.apply(rows, idx)
    return rows.gather(-1, idx)


def mask_label(ignore_index: int, k: int) -> Optional[int]:
    """A label in ``[0, k)`` that is not ``ignore_index`` (it only marks a row as counted), or None if none is."""
    return next((label for label in (0, 1) if label < k and label != ignore_index), None)


def renormalized_topk_loss(student_logits: torch.Tensor, topk_indices: torch.Tensor, topk_logprobs: torch.Tensor,
                           cfg: LossConfig, backend: str) -> Optional[torch.Tensor]:
    """``topk_distill_loss(..., tail="renormalize")`` on ``backend``'s fused dense kernel (checked inputs).

    Returns None where this path cannot mark the counted rows (``k = 1`` with
    ``ignore_index = 0``): the caller then runs the PyTorch form.
    """
    from ..llm.topk import (STUDENT_UNDEFINED_ON_SUPPORT, TEACHER_UNDEFINED, _check_defined, _valid_rows,
                            check_topk_values, neutral_ignored_rows)
    from ..losses import distill_loss

    V, k = student_logits.shape[-1], topk_indices.shape[-1]
    rows = student_logits.reshape(-1, V)
    idx = topk_indices.reshape(-1, k).long()
    teacher_dtype = torch.float64 if torch.float64 in (student_logits.dtype, topk_logprobs.dtype) else torch.float32
    lp = topk_logprobs.detach().reshape(-1, k).to(teacher_dtype)
    valid, labels = _valid_rows(cfg, rows.shape[0], V, rows.device)
    row_labels = None
    if labels is not None:
        marker = mask_label(cfg.ignore_index, k)
        if marker is None:
            return None
        idx, lp = neutral_ignored_rows(valid, idx, lp)  # as in the PyTorch form
        row_labels = torch.where(valid, marker, cfg.ignore_index)
    if not torch.compiler.is_compiling():
        check_topk_values(idx, lp, V, topk_logprobs.dtype)
        _check_defined(lp, TEACHER_UNDEFINED)
    on_support = gather_support(rows, idx)
    if labels is not None:
        on_support = torch.where(valid[:, None], on_support, torch.zeros_like(on_support))
    _check_defined(on_support, STUDENT_UNDEFINED_ON_SUPPORT)
    loss = distill_loss(on_support, lp, divergence=cfg.divergence, alpha=cfg.alpha, beta=cfg.beta, skew=cfg.skew,
                        temperature=cfg.temperature, student_temperature=cfg.student_temperature, scale=cfg.scale,
                        soft_weight=cfg.soft_weight, labels=row_labels, ignore_index=cfg.ignore_index,
                        reduction=cfg.reduction, normalizer=cfg.normalizer, backend=backend)
    if labels is not None and cfg.hard_weight != 0.0:
        acc = reference.accumulation_dtype(student_logits, topk_logprobs)
        # ignored rows may hold NaN: zeroed before, not after, or their NaN would reach the gradient
        full = torch.where(valid[:, None], rows.to(acc), torch.zeros((), dtype=acc, device=rows.device))
        ce = reference.cross_entropy(full, torch.where(valid, labels, 0))
        ce = torch.where(valid, ce, torch.zeros_like(ce))
        loss = loss + cfg.hard_weight * reference.reduce_rows(ce, valid, cfg)
    return loss
