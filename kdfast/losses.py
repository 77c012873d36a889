"""The functional API: ``distill_loss`` and its named forms."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .config import make_config
from .ops.backends import implementation, resolve_backend


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "kl",
    temperature: float = 1.0,
    student_temperature: Optional[float] = None,
    alpha: Optional[float] = None,
    beta: Optional[float] = None,
    skew: Optional[float] = None,
    weighting: Union[None, str, torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    scale: float = 1.0,
    reduction: str = "batchmean",
    normalizer: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Distillation loss ``hard_weight * reduce(CE) + soft_weight * scale * reduce(w * D(p || q))``.

    Args:
        student_logits, teacher_logits: ``(..., V)`` logits of the same shape,
            float32/bfloat16/float16/float64 (they may differ in dtype). All
            leading dims are flattened into N rows. Only the student gets a gradient.
        divergence: ``"kl"``, ``"reverse_kl"``, ``"jsd"`` (``beta``, default 0.5),
            ``"tvd"``, ``"renyi"`` (``alpha``, default 0.5), ``"ab"`` (``alpha``,
            ``beta``, default 0.5 each), ``"skew_kl"``, ``"skew_reverse_kl"``
            (``skew``, default 0.1). Each formula is the docstring of its
            function in :mod:`kdfast.reference` (``kl``, ``jsd``, ``renyi``, ...);
            ``renyi`` within 1e-4 of ``alpha = 1`` is computed as ``kl``
            (``RENYI_KL_WINDOW`` in ``kdfast/config.py`` says why).
        temperature: teacher temperature ``tau``; ``p = softmax(z_t / tau)``.
        student_temperature: ``tau_s`` (default ``tau``); ``q = softmax(z_s / tau_s)``.
        weighting: per-row weight of the divergence: None, ``"wttm"``
            (``U_{1/tau}(softmax(z_t))``), ``"entropy"`` (``1 - H(softmax(z_t)) / log V``)
            or a tensor of N weights (treated as a constant).
        labels, ignore_index: ``labels`` (N entries) add the hard-label
            cross-entropy (student at temperature 1) when ``hard_weight != 0``;
            rows whose label is ``ignore_index`` count in neither term.
        hard_weight, soft_weight, scale: the weights of the two terms.
        reduction: ``"batchmean"`` (sum over valid rows / number of valid rows,
            or / ``normalizer``), ``"sum"``, or ``"none"`` (a ``(N,)`` tensor,
            zero on ignored rows).
        normalizer: the denominator of ``"batchmean"`` (e.g. a global token
            count, so gradient accumulation matches one big batch).
        backend: ``"auto"`` (fused kernel for the tensors' device, else the
            reference; ``KDFAST_BACKEND`` overrides), ``"cpu"``, ``"triton"`` or
            ``"torch"``.

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or ``(N,)``
        for ``reduction="none"``. No valid row gives 0, never NaN. A valid row
        with a NaN or +inf logit in either model has a NaN loss and an all-NaN
        gradient (other rows are unaffected); ignored rows stay 0. README,
        "Numerical contract", states this on every backend.

    Raises:
        ValueError: bad parameters (a weighting tensor entry that is negative or
            not finite; a temperature, normalizer or coefficient outside
            float32's range), mismatched shapes/devices, labels out of range, a
            valid row whose teacher (or student) logits are all -inf.
        TypeError: unsupported dtypes; a bool or string given for a number; an
            ``ignore_index`` that is not an integer.
        RuntimeError: a double backward (``create_graph=True``) through a fused
            backend; use ``backend="torch"``.
    """
    cfg = make_config(
        student_logits,
        teacher_logits,
        divergence=divergence,
        temperature=temperature,
        student_temperature=student_temperature,
        alpha=alpha,
        beta=beta,
        skew=skew,
        weighting=weighting,
        labels=labels,
        ignore_index=ignore_index,
        hard_weight=hard_weight,
        soft_weight=soft_weight,
        scale=scale,
        reduction=reduction,
        normalizer=normalizer,
    )
    return implementation(resolve_backend(backend, student_logits.device))(student_logits, teacher_logits, cfg)


def kd_loss(student_logits, teacher_logits, temperature: float = 1.0, **options) -> torch.Tensor:
    """Hinton KD: ``T^2 * KL(softmax(t/T) || softmax(s/T))``.

    ``options`` are the other keyword arguments of :func:`distill_loss`
    (labels, hard_weight, reduction, backend, ...) except the divergence,
    temperatures and scale, which this form fixes.
    """
    _reject_fixed(options, "kd_loss", ("divergence", "student_temperature", "scale"))
    return distill_loss(student_logits, teacher_logits, divergence="kl", temperature=temperature,
                        scale=float(temperature) ** 2, **options)


def ttm_loss(student_logits, teacher_logits, temperature: float = 1.0, **options) -> torch.Tensor:
    """Transformed teacher matching: ``KL(softmax(t/T) || softmax(s))``, no ``T^2``."""
    _reject_fixed(options, "ttm_loss", ("divergence", "student_temperature", "scale"))
    return distill_loss(student_logits, teacher_logits, divergence="kl", temperature=temperature,
                        student_temperature=1.0, **options)


def wttm_loss(student_logits, teacher_logits, temperature: float = 1.0, **options) -> torch.Tensor:
    """Weighted TTM: ``U_{1/T}(softmax(t)) * KL(softmax(t/T) || softmax(s))``."""
    _reject_fixed(options, "wttm_loss", ("divergence", "student_temperature", "scale", "weighting"))
    return distill_loss(student_logits, teacher_logits, divergence="kl", temperature=temperature,
                        student_temperature=1.0, weighting="wttm", **options)


def _reject_fixed(options, fn, fixed):
    for name in fixed:
        if name in options:
            raise TypeError(f"{fn}() fixes {name}; use distill_loss() to choose it")
