"""The fused C++ DIST op ``torch.ops.kdfast.dist_forward`` seen from Python.

Like the divergence op it returns ``(loss, grad)`` with the student gradient
computed in the forward; here it gets its fake kernel and its autograd
formula (backward scales the saved gradient; no copy when the incoming
gradient is 1).
"""

from __future__ import annotations

import torch

from ._fused_op import _is_concrete

_OP = "kdfast::dist_forward"


@torch.library.register_fake(_OP)
def _dist_forward_fake(student, teacher, tau, beta, gamma, compute_grad):
    V = student.shape[-1]
    N = student.numel() // V
    f64 = student.dtype == torch.float64
    loss = student.new_empty((), dtype=torch.float64 if f64 else torch.float32)
    return loss, student.new_empty((N, V) if compute_grad else (0,))


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.student_shape = inputs[0].shape
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 6
    if grad.numel() == 0:
        raise RuntimeError("kdfast: the forward ran without computing the gradient (compute_grad=False)")
    scaled = grad if _is_concrete(grad_loss) and bool(grad_loss == 1) else grad * grad_loss
    return (scaled.view(ctx.student_shape),) + (None,) * 5


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


def dist_loss_cpu(student_logits, teacher_logits, temperature, beta, gamma):
    """The fused C++ DIST kernel; same contract as ``reference_correlation.dist_loss_reference``."""
    teacher = teacher_logits.detach()
    if (student_logits.dtype == torch.float64) != (teacher.dtype == torch.float64):
        student_logits, teacher = student_logits.double(), teacher.double()
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss, _ = torch.ops.kdfast.dist_forward(student_logits, teacher, temperature, beta, gamma, compute_grad)
    return loss
