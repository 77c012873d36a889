"""What every fused op (C++ ``kdfast::distill_forward``, Triton ``kdfast::distill_forward_triton``) shares.

The ops have one schema: ``(student, teacher, labels?, weights?, int divergence,
float[] params, int weighting, tau, tau_s, ignore_index, hard_weight,
soft_coef, reduction, normalizer?, compute_grad) -> (loss, grad)``, where
``grad`` is d(loss)/d(student) computed in the forward.  ``divergence`` and
``weighting`` are positions in the tables of :mod:`kdfast.registry` and
``params`` its :func:`~kdfast.registry.kernel_params` vector, so a new
divergence, weighting or parameter changes none of the ops' signatures.  Here they get the two
pieces torch.compile and autograd need:
  * a fake (meta) kernel, so that tracing knows the output shapes;
  * an autograd formula: backward only scales the saved gradient by the
    incoming one (and returns it as is when that is 1: no second (N, V) buffer);
and the adapter from a validated ``LossConfig`` to the op's arguments.
"""

from __future__ import annotations

import math

import torch

from ..config import LossConfig
from ..registry import divergence_index, kernel_params, weighting_index

_N_INPUTS = 15
_REDUCTION_ARG = 12


def fake_distill_loss(student: torch.Tensor, teacher: torch.Tensor, reduction: str) -> torch.Tensor:
    """The loss output of a fused distillation op: ``(N,)`` for ``reduction="none"``, else a scalar."""
    V = student.shape[-1]
    N = student.numel() // V
    f64 = student.dtype == torch.float64 or teacher.dtype == torch.float64
    return student.new_empty((N,) if reduction == "none" else (), dtype=torch.float64 if f64 else torch.float32)


def fake_loss_and_grad(student: torch.Tensor, teacher: torch.Tensor, reduction: str, compute_grad: bool):
    """Fake outputs of an op returning its loss (``(N,)`` for ``reduction="none"``, else a scalar) and the
    ``(N, V)`` student gradient (``(0,)`` without one)."""
    V = student.shape[-1]
    grad = student.new_empty((student.numel() // V, V) if compute_grad else (0,))
    return fake_distill_loss(student, teacher, reduction), grad


def fake_distill_forward(student, teacher, labels, weights, divergence, params, weighting, tau, tau_s, ignore_index,
                         hard_weight, soft_coef, reduction, normalizer, compute_grad):
    return fake_loss_and_grad(student, teacher, reduction, compute_grad)


def fake_scalar_loss_and_grad(student, compute_grad):
    """Fake outputs of an op returning a scalar loss and the (N, V) student gradient."""
    V = student.shape[-1]
    N = student.numel() // V
    loss = student.new_empty((), dtype=torch.float64 if student.dtype == torch.float64 else torch.float32)
    return loss, student.new_empty((N, V) if compute_grad else (0,))


def _is_concrete(t: torch.Tensor) -> bool:
    """True for a real tensor in eager mode (its value may be read), False while tracing."""
    if torch.compiler.is_compiling():
        return False
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return detect_fake_mode(t) is None and get_proxy_mode() is None and not torch._is_functional_tensor(t)


def may_hand_out_saved_gradient() -> bool:
    """Whether a backward may return a gradient saved by the forward itself (no copy).

    Only when autograd frees the graph after this backward (``retain_graph``
    off): then nothing can read the buffer again, so the caller may own it
    (keep it as ``.grad``, zero it, clip it in place).  With the graph retained
    another backward will read it, so each one gets its own copy: two results
    never share storage and a later backward never finds the buffer modified.
    """
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph()


def refuse_double_backward(name: str = "kdfast's fused kernels",
                           remedy: str = "Use backend='torch' (the differentiable reference) for such a loss.") -> None:
    """Raises when a backward runs with ``create_graph=True`` (a double backward).

    The fused kernels hand out a gradient computed in the forward, which is a
    constant to autograd: differentiating it again would silently drop the
    loss's second-order term, so it is an error instead.
    """
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"{name} do not support double backward (create_graph=True: Hessian-vector products, gradient "
            f"penalties): the gradient they compute in the forward is not differentiable. {remedy}")


def register_saved_grad_autograd(op, n_inputs: int, per_row=lambda inputs: False) -> None:
    """Autograd of an op returning ``(loss, grad)`` whose ``grad`` (of the first input) came from the forward.

    Backward scales the saved gradient by the incoming one: per row when
    ``per_row(inputs)`` (a ``(N,)`` loss), and not at all when the incoming
    gradient is exactly 1 (the usual ``loss.backward()``: no second (N, V)
    buffer) and no later backward can read the buffer (see
    :func:`may_hand_out_saved_gradient`).  A double backward is refused.
    """
    def setup_context(ctx, inputs, output):
        _, grad = output
        ctx.save_for_backward(grad)
        ctx.student_shape = inputs[0].shape
        ctx.per_row = per_row(inputs)
        ctx.mark_non_differentiable(grad)
        # Otherwise autograd materialises a zero (N, V) "gradient" for the grad output.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, _grad_of_grad):
        (grad,) = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * n_inputs
        refuse_double_backward()
        if grad.numel() == 0 and math.prod(ctx.student_shape) != 0:
            raise RuntimeError("kdfast: the forward ran without computing the gradient (compute_grad=False)")
        if ctx.per_row:
            scaled = (grad.to(grad_loss.dtype) * grad_loss[:, None]).to(grad.dtype)
        elif _is_concrete(grad_loss) and bool(grad_loss == 1):
            scaled = grad if may_hand_out_saved_gradient() else grad.clone()
        else:
            scaled = grad * grad_loss
        return (scaled.view(ctx.student_shape),) + (None,) * (n_inputs - 1)

    if isinstance(op, str):
        register_autograd_kernel(op, backward, setup_context)
    else:  # a torch.library.custom_op (the Triton ops): its own Autograd kernel takes the formula
        torch.library.register_autograd(op, backward, setup_context=setup_context)


_AUTOGRAD_LIBRARIES = {}


def register_autograd_kernel(qualname: str, backward, setup_context) -> None:
    """``torch.library.register_autograd(qualname, backward, setup_context=setup_context)``, less its per-call cost.

    Its kernel calls ``torch._library.utils.fill_defaults`` on every
    differentiable call, which reads ``schema.arguments`` once per argument,
    and each read converts the whole list anew: 46 us a call on a 15-argument
    schema, most of a small loss's overhead over ``F.kl_div``.  The ops here
    have no defaults to fill, so this kernel is the same autograd.Function
    without that step: below Autograd it redispatches the op, then hands
    ``setup_context`` the positional inputs.  The kernel sits on the op's
    Autograd key as register_autograd's would, so torch.compile traces
    through it alike.
    """
    op = torch._library.utils.lookup_op(qualname)
    if any(arg.kwarg_only or arg.default_value is not None for arg in op._schema.arguments):
        raise ValueError(f"{qualname}: the saved-gradient autograd kernel takes positional arguments without "
                         f"defaults, got {op._schema}")
    below_autograd = torch._C._after_autograd_keyset

    def redispatch(keyset, args):
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below_autograd, *args)

    class SavedGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            *inputs, keyset = args
            output = redispatch(keyset, inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return (*backward(ctx, *grads), None)  # none for the keyset

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return SavedGradient.apply(*args, keyset)
        return redispatch(keyset, args)

    namespace, name = qualname.split("::")
    if namespace not in _AUTOGRAD_LIBRARIES:
        _AUTOGRAD_LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    _AUTOGRAD_LIBRARIES[namespace].impl(name, kernel, "Autograd", with_keyset=True)


def register_fake_and_autograd(op) -> None:
    """Gives a fused distillation op (a name or an op object) its fake kernel and its autograd formula."""
    torch.library.register_fake(op, fake_distill_forward)
    register_saved_grad_autograd(op, _N_INPUTS, per_row=lambda inputs: inputs[_REDUCTION_ARG] == "none")


def register_revised_fake_and_autograd(op) -> None:
    """The same for the Label Revision form of a fused distillation op: its arguments end with one more
    scalar (``label_revision``) after ``compute_grad``."""
    torch.library.register_fake(op, lambda *args: fake_distill_forward(*args[:_N_INPUTS]))
    register_saved_grad_autograd(op, _N_INPUTS + 1, per_row=lambda inputs: inputs[_REDUCTION_ARG] == "none")


def call_revised_distill_op(op, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            cfg: LossConfig) -> torch.Tensor:
    """:func:`call_distill_op` for the Label Revision form of an op (``cfg.label_revision`` set)."""
    student_logits, teacher = paired_logits(student_logits, teacher_logits)
    loss, _ = op(student_logits, teacher, *loss_arguments(cfg), wants_grad(student_logits), cfg.label_revision)
    return loss


def paired_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """``(student, detached teacher)``; float64 paired with float64 (the kernels' float64 path is for gradchecks)."""
    teacher = teacher_logits.detach()
    if (student_logits.dtype == torch.float64) != (teacher.dtype == torch.float64):
        return student_logits.double(), teacher.double()
    return student_logits, teacher


def wants_grad(student_logits: torch.Tensor) -> bool:
    """Whether the op should write the student gradient in its forward."""
    return torch.is_grad_enabled() and student_logits.requires_grad


def loss_arguments(cfg: LossConfig) -> tuple:
    """The op arguments after the two logits tensors, up to ``normalizer``, from a validated configuration."""
    weights = cfg.weighting if isinstance(cfg.weighting, torch.Tensor) else None
    return (
        cfg.labels,
        weights,
        divergence_index(cfg.divergence),
        list(kernel_params(cfg.divergence, {"alpha": cfg.alpha, "beta": cfg.beta, "skew": cfg.skew})),
        weighting_index(cfg.weighting_name),
        cfg.temperature,
        cfg.student_temperature,
        cfg.ignore_index,
        cfg.hard_weight,
        cfg.soft_weight * cfg.scale,
        cfg.reduction,
        cfg.normalizer,
    )


def call_distill_op(op, student_logits: torch.Tensor, teacher_logits: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Runs a fused op on a validated configuration; same contract as ``reference.distill_loss_reference``."""
    student_logits, teacher = paired_logits(student_logits, teacher_logits)
    loss, _ = op(student_logits, teacher, *loss_arguments(cfg), wants_grad(student_logits))
    return loss
