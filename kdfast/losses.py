"""The functional API: ``distill_loss`` and its named forms."""

from __future__ import annotations

import torch

from .config import make_config, takes_loss_options
from .ops.backends import implementation, resolve_backend

# What Hinton KD and the TTM forms set themselves (wttm_loss also the weighting).
_TTM_FIXED = ("divergence", "student_temperature", "scale")
# The opt-in options (kdfast.config.OPT_IN_OPTIONS) that these losses take.
_OPT_IN = ("label_revision",)


@takes_loss_options(include=_OPT_IN)
def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, **options) -> torch.Tensor:
    """Distillation loss ``hard_weight * reduce(CE) + soft_weight * scale * reduce(w * D(p || q))``.

    Args:
        student_logits, teacher_logits: ``(..., V)`` logits of the same shape,
            float32/bfloat16/float16/float64 (they may differ in dtype). All
            leading dims are flattened into N rows. Only the student gets a gradient.
        options: the keyword options below ("Options").

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or ``(N,)``
        for ``reduction="none"``. No valid row gives 0, never NaN. A valid row
        with a NaN or +inf logit in either model has a NaN loss and an all-NaN
        gradient (other rows are unaffected); ignored rows stay 0. README,
        "Numerical contract", states this on every backend.

    Raises:
        ValueError: bad parameters (``label_revision`` outside (0, 1) or without labels; a weighting tensor entry that is negative or
            not finite; a temperature, normalizer or coefficient outside
            float32's range), mismatched shapes/devices, labels out of range, a
            valid row whose teacher (or student) logits are all -inf.
        TypeError: unsupported dtypes; a bool or string given for a number; an
            ``ignore_index`` that is not an integer; a keyword that is not an option.
        RuntimeError: a double backward (``create_graph=True``) through a fused
            backend; use ``backend="torch"``.
    """
    cfg = make_config(student_logits, teacher_logits, **options)
    return implementation(resolve_backend(cfg.backend, student_logits.device))(student_logits, teacher_logits, cfg)


@takes_loss_options(fixed=_TTM_FIXED, include=_OPT_IN)
def kd_loss(student_logits, teacher_logits, temperature: float = 1.0, **options) -> torch.Tensor:
    """Hinton KD: ``T^2 * KL(softmax(t/T) || softmax(s/T))``.

    ``options`` are those of :func:`distill_loss` but the divergence, the
    student's temperature and the scale, which this form fixes.
    """
    return distill_loss(student_logits, teacher_logits, divergence="kl", temperature=temperature,
                        scale=float(temperature) ** 2, **options)


@takes_loss_options(fixed=_TTM_FIXED, include=_OPT_IN)
def ttm_loss(student_logits, teacher_logits, temperature: float = 1.0, **options) -> torch.Tensor:
    """Transformed teacher matching: ``KL(softmax(t/T) || softmax(s))``, no ``T^2``."""
    return distill_loss(student_logits, teacher_logits, divergence="kl", temperature=temperature,
                        student_temperature=1.0, **options)


@takes_loss_options(fixed=_TTM_FIXED + ("weighting",), include=_OPT_IN)
def wttm_loss(student_logits, teacher_logits, temperature: float = 1.0, **options) -> torch.Tensor:
    """Weighted TTM: ``U_{1/T}(softmax(t)) * KL(softmax(t/T) || softmax(s))``."""
    return distill_loss(student_logits, teacher_logits, divergence="kl", temperature=temperature,
                        student_temperature=1.0, weighting="wttm", **options)
