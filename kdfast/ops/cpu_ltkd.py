"""The fused C++ ops of long-tailed KD (``torch.ops.kdfast.ltkd_forward`` and
``ltkd_teacher_group_log_masses``, csrc/ltkd_op.cpp) seen from Python: their fake kernels, the saved-gradient
autograd of ``ltkd_forward`` and the backend's implementation of the ``"ltkd"`` family."""

from __future__ import annotations

import torch

from .fused_op import fake_distill_loss, register_saved_grad_autograd
from .ltkd_fused import fused_ltkd_loss

_N_INPUTS = 11
_REDUCTION_ARG = 9


@torch.library.register_fake("kdfast::ltkd_forward")
def _ltkd_forward_fake(student, teacher, groups, num_groups, log_prior, tau, inter_weight, intra_weight,
                       teacher_weighting, reduction, compute_grad):
    V = student.shape[-1]
    grad = student.new_empty((student.numel() // V, V) if compute_grad else (0,))
    return fake_distill_loss(student, teacher, reduction), grad


@torch.library.register_fake("kdfast::ltkd_teacher_group_log_masses")
def _ltkd_teacher_group_log_masses_fake(student, teacher, groups, num_groups, tau):
    V = student.shape[-1]
    return student.new_empty((student.numel() // V, num_groups), dtype=torch.float64)


register_saved_grad_autograd("kdfast::ltkd_forward", _N_INPUTS, per_row=lambda inputs: inputs[_REDUCTION_ARG] == "none")


def ltkd_loss_cpu(student_logits, teacher_logits, index, count, temperature, inter_weight, intra_weight, mode,
                  intra_weighting, reduction):
    """The fused C++ LTKD kernels; same contract as ``reference.longtail.ltkd_loss_reference``."""
    return fused_ltkd_loss(torch.ops.kdfast.ltkd_forward, torch.ops.kdfast.ltkd_teacher_group_log_masses,
                           student_logits, teacher_logits, index, count, temperature, inter_weight, intra_weight,
                           mode, intra_weighting, reduction)
