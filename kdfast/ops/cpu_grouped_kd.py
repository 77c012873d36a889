"""The fused C++ Grouped KD op (``torch.ops.kdfast.grouped_kd_forward``, csrc/grouped_kd_op.cpp) seen from Python.

Like the other fused ops it returns ``(loss, grad)`` with the student gradient
computed in the forward; here it gets its fake kernel and the shared
saved-gradient autograd of ``ops.fused_op``.  Its arguments are those of the
Triton op ``kdfast::grouped_kd_forward_triton``.  The kernel
(csrc/kernels/grouped_kd_kernel.h) finds the primary group's threshold
without sorting the row: a vector sweep brackets it between fixed pivots,
the logits inside the bracket are copied out and narrowed further, and an
exact selection (a three-way quickselect summing masses) finishes.
"""

from __future__ import annotations

import torch

from .fused_op import fake_loss_and_grad, paired_logits, register_saved_grad_autograd, wants_grad

_N_INPUTS = 11
_REDUCTION_ARG = 9


@torch.library.register_fake("kdfast::grouped_kd_forward")
def _grouped_kd_forward_fake(student, teacher, labels, tau, primary_mass, primary_weight, binary_weight, group_tau,
                             ignore_index, reduction, compute_grad):
    return fake_loss_and_grad(student, teacher, reduction, compute_grad)


register_saved_grad_autograd("kdfast::grouped_kd_forward", _N_INPUTS,
                             per_row=lambda inputs: inputs[_REDUCTION_ARG] == "none")


def grouped_kd_loss_cpu(student_logits, teacher_logits, labels, temperature, primary_mass, primary_weight,
                        binary_weight, group_temperature, ignore_index, reduction):
    """The fused C++ Grouped KD kernel; same contract as ``reference.grouped_kd.grouped_kd_loss_reference``."""
    s, t = paired_logits(student_logits, teacher_logits)
    loss, _ = torch.ops.kdfast.grouped_kd_forward(s, t, labels, temperature, primary_mass, primary_weight,
                                                  binary_weight, group_temperature, ignore_index, reduction,
                                                  wants_grad(s))
    return loss
