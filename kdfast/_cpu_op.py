"""The fused CPU op ``torch.ops.kdfast.distill_forward`` seen from Python.

The op itself is registered in C++ (csrc/distill_op.cpp, ``TORCH_LIBRARY``);
here it gets the two pieces torch.compile and autograd need:
  * a fake (meta) kernel, so that tracing knows the output shapes;
  * an autograd formula: the forward already wrote d(loss)/d(student_logits),
    so backward only scales it by the incoming gradient.
"""

from __future__ import annotations

import torch

from ._options import LossConfig

_OP = "kdfast::distill_forward"


@torch.library.register_fake(_OP)
def _distill_forward_fake(student, teacher, labels, weights, divergence, tau, tau_s, alpha, beta, skew,
                          weighting, ignore_index, hard_weight, soft_coef, reduction, normalizer, compute_grad):
    V = student.shape[-1]
    N = student.numel() // V
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = student.new_empty((N,) if reduction == "none" else (), dtype=acc)
    grad = student.new_empty((N, V) if compute_grad else (0,))
    return loss, grad


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.student_shape = inputs[0].shape
    ctx.per_row = inputs[14] == "none"
    ctx.mark_non_differentiable(grad)
    # Otherwise autograd materialises a zero (N, V) "gradient" for the grad output.
    ctx.set_materialize_grads(False)


def _is_concrete(t: torch.Tensor) -> bool:
    """True for a real tensor in eager mode (its value may be read), False while tracing."""
    if torch.compiler.is_compiling():
        return False
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return detect_fake_mode(t) is None and get_proxy_mode() is None and not torch._is_functional_tensor(t)


def _backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 17
    if grad.numel() == 0 and grad_loss.numel() != 0:
        raise RuntimeError("kdfast: the forward ran without computing the gradient (compute_grad=False)")
    if ctx.per_row:
        scaled = (grad.to(grad_loss.dtype) * grad_loss[:, None]).to(grad.dtype)
    elif _is_concrete(grad_loss) and bool(grad_loss == 1):
        scaled = grad  # the usual loss.backward(): no second (N, V) buffer
    else:
        scaled = grad * grad_loss
    return (scaled.view(ctx.student_shape),) + (None,) * 16


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


def distill_loss_cpu(student_logits: torch.Tensor, teacher_logits: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The fused C++ kernel; same contract as ``reference.distill_loss_reference``."""
    teacher = teacher_logits.detach()
    if (student_logits.dtype == torch.float64) != (teacher.dtype == torch.float64):
        # The float64 kernel is a scalar path for gradchecks; pair it with float64.
        student_logits, teacher = student_logits.double(), teacher.double()
    weights = cfg.weighting if isinstance(cfg.weighting, torch.Tensor) else None
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss, _ = torch.ops.kdfast.distill_forward(
        student_logits,
        teacher,
        cfg.labels,
        weights,
        cfg.divergence,
        cfg.temperature,
        cfg.student_temperature,
        cfg.alpha or 0.0,
        cfg.beta or 0.0,
        cfg.skew or 0.0,
        cfg.weighting_name,
        cfg.ignore_index,
        cfg.hard_weight,
        cfg.soft_weight * cfg.scale,
        cfg.reduction,
        cfg.normalizer,
        compute_grad,
    )
    return loss
