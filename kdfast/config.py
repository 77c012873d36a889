"""Validation of the loss options, shared by every backend.

One place checks the arguments of ``distill_loss`` and turns them into a
``LossConfig``; the backends receive only valid, canonical configurations.
Errors follow docs/contract.md: ``ValueError`` for bad values and shapes
(naming the parameter and its value, or both shapes), ``TypeError`` for dtypes.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .registry import DIVERGENCE_NAMES, RENYI_KL_WINDOW, divergence_spec  # noqa: F401 (re-exported)

DIVERGENCES = DIVERGENCE_NAMES
WEIGHTINGS = (None, "wttm", "entropy")
REDUCTIONS = ("batchmean", "sum", "none")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class LossConfig:
    """A validated, canonical set of options of ``distill_loss``."""

    divergence: str
    temperature: float
    student_temperature: float
    alpha: Optional[float]
    beta: Optional[float]
    skew: Optional[float]
    weighting: Union[None, str, torch.Tensor]
    labels: Optional[torch.Tensor]
    ignore_index: int
    hard_weight: float
    soft_weight: float
    scale: float
    reduction: str
    normalizer: Optional[float]

    @property
    def weighting_name(self) -> str:
        """'none', 'wttm', 'entropy' or 'given' (a tensor of weights)."""
        if self.weighting is None:
            return "none"
        return self.weighting if isinstance(self.weighting, str) else "given"


# The kernels take their per-call coefficients in float32 lanes.
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)


def _is_scalar_tensor(value) -> bool:
    """A one-element real, non-bool tensor (a scalar a user may pass for a number)."""
    return (isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool
            and not value.is_complex())


def _finite_float(name: str, value) -> float:
    """``value`` as a finite float; a bool, a string or a tensor of several values is a TypeError."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or _is_scalar_tensor(value)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return x


def _integer(name: str, value) -> int:
    """``value`` as an int; a float (even 1.0), a bool or a string is a TypeError (no silent truncation)."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or
                                       (_is_scalar_tensor(value) and not value.is_floating_point())):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _in_float32_range(name: str, x: float, positive: bool = False) -> float:
    """Refuses a value the float32 kernels cannot hold (its magnitude past 3.4e38, or a positive one below 1.2e-38)."""
    if abs(x) > _FLOAT32_MAX or (positive and x < _FLOAT32_TINY):
        bound = f"in [{_FLOAT32_TINY:.3g}, {_FLOAT32_MAX:.3g}]" if positive else f"at most {_FLOAT32_MAX:.3g} in magnitude"
        raise ValueError(f"{name}={x!r} is outside float32's range: it must be {bound}")
    return x


def float32_coefficient(name: str, value) -> float:
    """A finite real that the float32 kernels can hold (a weight or a scale of a loss term)."""
    return _in_float32_range(name, _finite_float(name, value))


def positive_float32(name: str, value) -> float:
    """A finite real > 0 that the float32 kernels can hold (a temperature, a normaliser)."""
    x = _finite_float(name, value)
    if x <= 0:
        raise ValueError(f"{name} must be > 0, got {name}={value}")
    return _in_float32_range(name, x, positive=True)


def resolve_divergence(divergence: str, alpha=None, beta=None, skew=None):
    """Check a divergence and its parameters against the registry; return ``(name, alpha, beta, skew)``.

    Defaults and valid ranges are the table's (``kdfast.registry``): ``jsd``
    beta=0.5 (Liger-Kernel's), ``renyi`` alpha=0.5, ``ab`` alpha=beta=0.5,
    ``skew_*`` skew=0.1 (DistiLLM's).  The boundary cases of docs/contract.md
    (section 2) are renamed: ``jsd`` beta=0 is ``kl`` and beta=1 is
    ``reverse_kl``; ``renyi`` with ``|alpha - 1| < RENYI_KL_WINDOW`` is ``kl``
    (see there why not only alpha = 1).  Giving a parameter that the
    divergence does not use is an error (it is almost always a mistake).
    """
    spec = divergence_spec(divergence)
    params = spec.defaults()
    for name, value in (("alpha", alpha), ("beta", beta), ("skew", skew)):
        if value is None:
            continue
        if name not in params:
            raise ValueError(f"divergence {divergence!r} takes no parameter {name} (got {name}={value!r})")
        params[name] = _finite_float(name, value)
    for param in spec.params:
        param.check(divergence, params[param.name])
    renamed = spec.rename(params)
    if renamed is not None:
        return renamed, None, None, None
    return divergence, params.get("alpha"), params.get("beta"), params.get("skew")


def check_logits(student_logits, teacher_logits) -> None:
    """Types, dtypes, shapes and devices of the two logits tensors."""
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in LOGIT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits shape {tuple(student_logits.shape)} does not match "
            f"teacher_logits shape {tuple(teacher_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits is on {student_logits.device} but teacher_logits is on {teacher_logits.device}"
        )
    if student_logits.dim() == 0 or student_logits.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty last (vocabulary) dimension, got shape {tuple(student_logits.shape)}")


def _check_row_tensor(name: str, t, student_logits: torch.Tensor) -> None:
    rows = student_logits.numel() // student_logits.shape[-1]
    if t.numel() != rows:
        raise ValueError(
            f"{name} shape {tuple(t.shape)} does not match the {rows} rows of logits shape "
            f"{tuple(student_logits.shape)}"
        )
    if t.device != student_logits.device:
        raise ValueError(f"{name} is on {t.device} but the logits are on {student_logits.device}")


def make_config(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "kl",
    temperature: float = 1.0,
    student_temperature: Optional[float] = None,
    alpha: Optional[float] = None,
    beta: Optional[float] = None,
    skew: Optional[float] = None,
    weighting=None,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    scale: float = 1.0,
    reduction: str = "batchmean",
    normalizer=None,
) -> LossConfig:
    """Validate the arguments of ``distill_loss`` against the logits."""
    check_logits(student_logits, teacher_logits)
    name, alpha, beta, skew = resolve_divergence(divergence, alpha, beta, skew)
    tau = positive_float32("temperature", temperature)
    tau_s = tau if student_temperature is None else positive_float32("student_temperature", student_temperature)

    if isinstance(weighting, torch.Tensor):
        if not weighting.is_floating_point():
            raise TypeError(f"a weighting tensor must be floating point, got {weighting.dtype}")
        _check_row_tensor("weighting", weighting, student_logits)
        weighting = weighting.detach()
        _check_row_weights(weighting)
    elif weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be None, 'wttm', 'entropy' or a tensor of row weights, got {weighting!r}")

    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        _check_row_tensor("labels", labels, student_logits)
    hard_weight = float32_coefficient("hard_weight", hard_weight)
    if hard_weight != 0.0 and labels is None:
        raise ValueError(f"hard_weight={hard_weight} needs labels for the cross-entropy term")

    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if normalizer is not None:
        if reduction != "batchmean":
            raise ValueError(f"normalizer is only used with reduction='batchmean', got reduction={reduction!r}")
        normalizer = positive_float32("normalizer", normalizer)
    soft_weight = float32_coefficient("soft_weight", soft_weight)
    scale = float32_coefficient("scale", scale)
    _in_float32_range("soft_weight * scale", soft_weight * scale)
    if normalizer is not None:
        _in_float32_range("soft_weight * scale / normalizer", soft_weight * scale / normalizer)
        _in_float32_range("hard_weight / normalizer", hard_weight / normalizer)
    return LossConfig(
        divergence=name,
        temperature=tau,
        student_temperature=tau_s,
        alpha=alpha,
        beta=beta,
        skew=skew,
        weighting=weighting,
        labels=labels,
        ignore_index=_integer("ignore_index", ignore_index),
        hard_weight=hard_weight,
        soft_weight=soft_weight,
        scale=scale,
        reduction=reduction,
        normalizer=normalizer,
    )


def _check_row_weights(weights: torch.Tensor) -> None:
    """Row weights scale a divergence: a negative or non-finite one is a mistake (read only in eager mode)."""
    if torch.compiler.is_compiling() or weights.numel() == 0:
        return
    bad = ~torch.isfinite(weights) | (weights < 0)
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0, 0])
        raise ValueError(f"weighting tensor entries must be finite and >= 0, got {float(weights.reshape(-1)[i])} "
                         f"at row {i}")
