"""The fused C++ ops of DIST, DKD and correlation matching (``torch.ops.kdfast.dist_forward`` /
``dkd_forward`` / ``correlation_forward``) seen from Python.

Like the divergence op each returns ``(loss, grad)`` with the student
gradient computed in the forward; here they get their fake kernels and the
shared saved-gradient autograd formula of ``ops.fused_op``.
"""

from __future__ import annotations

import torch

from .fused_op import fake_scalar_loss_and_grad, paired_logits, register_saved_grad_autograd, wants_grad


@torch.library.register_fake("kdfast::dist_forward")
def _dist_forward_fake(student, teacher, tau, beta, gamma, compute_grad):
    return fake_scalar_loss_and_grad(student, compute_grad)


@torch.library.register_fake("kdfast::dkd_forward")
def _dkd_forward_fake(student, teacher, labels, tau, alpha, beta, ignore_index, compute_grad):
    return fake_scalar_loss_and_grad(student, compute_grad)


@torch.library.register_fake("kdfast::correlation_forward")
def _correlation_forward_fake(student, teacher, weights, tau, pearson_weight, spearman_weight, strength, compute_grad):
    return fake_scalar_loss_and_grad(student, compute_grad)


register_saved_grad_autograd("kdfast::dist_forward", 6)
register_saved_grad_autograd("kdfast::dkd_forward", 8)
register_saved_grad_autograd("kdfast::correlation_forward", 8)


def dist_loss_cpu(student_logits, teacher_logits, temperature, beta, gamma):
    """The fused C++ DIST kernel; same contract as ``reference_correlation.dist_loss_reference``."""
    s, t = paired_logits(student_logits, teacher_logits)
    loss, _ = torch.ops.kdfast.dist_forward(s, t, temperature, beta, gamma, wants_grad(s))
    return loss


def dkd_loss_cpu(student_logits, teacher_logits, labels, temperature, alpha, beta, ignore_index):
    """The fused C++ DKD kernel; same contract as ``reference.dkd.dkd_loss_reference``."""
    s, t = paired_logits(student_logits, teacher_logits)
    loss, _ = torch.ops.kdfast.dkd_forward(s, t, labels, temperature, alpha, beta, ignore_index, wants_grad(s))
    return loss


def correlation_loss_cpu(student_logits, teacher_logits, temperature, pearson_weight, spearman_weight, rank_strength,
                         weights):
    """The fused C++ correlation kernel; same contract as ``reference_correlation.correlation_loss_reference``."""
    s, t = paired_logits(student_logits, teacher_logits)
    loss, _ = torch.ops.kdfast.correlation_forward(s, t, weights, temperature, pearson_weight, spearman_weight,
                                                   rank_strength, wants_grad(s))
    return loss
