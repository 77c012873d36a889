"""The fused C++ CPU op ``torch.ops.kdfast.distill_forward`` seen from Python.

The op itself is registered in C++ (csrc/distill_op.cpp, ``TORCH_LIBRARY``);
its fake kernel and autograd formula are the shared ones of ``ops.fused_op``.
"""

from __future__ import annotations

import torch

from ..config import LossConfig
from .fused_op import (call_distill_op, call_revised_distill_op, fake_distill_loss, loss_arguments,
                       register_fake_and_autograd, register_revised_fake_and_autograd)

register_fake_and_autograd("kdfast::distill_forward")
register_revised_fake_and_autograd("kdfast::distill_forward_revised")


@torch.library.register_fake("kdfast::distill_forward_inplace")
def _fake_distill_forward_inplace(student, teacher, labels, weights, divergence, params, weighting, tau, tau_s,
                                  ignore_index, hard_weight, soft_coef, reduction, normalizer):
    return fake_distill_loss(student, teacher, reduction)


def distill_loss_cpu(student_logits: torch.Tensor, teacher_logits: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The fused C++ kernel; same contract as ``reference.distill_loss_reference``."""
    if cfg.label_revision is not None:
        return call_revised_distill_op(torch.ops.kdfast.distill_forward_revised, student_logits, teacher_logits, cfg)
    return call_distill_op(torch.ops.kdfast.distill_forward, student_logits, teacher_logits, cfg)


def distill_loss_and_grad_cpu_(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                               cfg: LossConfig) -> torch.Tensor:
    """The loss of ``distill_loss_cpu``, not differentiable: its student gradient overwrites ``student_logits``.

    For a caller that is done with the logits once the loss is known (the
    fused linear loss's chunk loop): no ``(N, V)`` gradient buffer.  The
    gradient is that of the loss as returned (per row for ``reduction="none"``).
    ``student_logits`` must be a contiguous ``(N, V)`` tensor and
    ``teacher_logits`` of the same float64-ness (not converted here: a copy
    would defeat the point).
    """
    return torch.ops.kdfast.distill_forward_inplace(student_logits, teacher_logits.detach(), *loss_arguments(cfg))
