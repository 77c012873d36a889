"""``nn.Module`` forms of the losses, for training loops that want modules."""

from __future__ import annotations

import torch
from torch import nn

from . import correlation_losses, losses
from .config import resolve_divergence


class DistillLoss(nn.Module):
    """``DistillLoss(**options)(student_logits, teacher_logits, labels=None)``.

    ``options`` are the keyword arguments of :func:`kdfast.distill_loss`; the
    divergence and its parameters are checked here, the rest at the first call.
    """

    _fn = staticmethod(losses.distill_loss)

    def __init__(self, **options):
        super().__init__()
        if "labels" in options:
            raise TypeError("labels are passed at call time: module(student_logits, teacher_logits, labels)")
        if "divergence" in options or type(self) is DistillLoss:
            resolve_divergence(options.get("divergence", "kl"), options.get("alpha"), options.get("beta"),
                               options.get("skew"))
        self.options = options

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels=None) -> torch.Tensor:
        return self._fn(student_logits, teacher_logits, labels=labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not isinstance(v, torch.Tensor))


class KDLoss(DistillLoss):
    """Hinton KD, :func:`kdfast.kd_loss`: ``KDLoss(temperature=4.0)``."""

    _fn = staticmethod(losses.kd_loss)


class TTMLoss(DistillLoss):
    """Transformed teacher matching, :func:`kdfast.ttm_loss`."""

    _fn = staticmethod(losses.ttm_loss)


class WTTMLoss(DistillLoss):
    """Weighted TTM, :func:`kdfast.wttm_loss`."""

    _fn = staticmethod(losses.wttm_loss)


class _OptionsModule(nn.Module):
    """A loss function with fixed keyword options, as a module (``extra_repr`` shows them)."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not isinstance(v, torch.Tensor))


class DISTLoss(_OptionsModule):
    """DIST, :func:`kdfast.dist_loss`: ``DISTLoss(temperature=4.0, beta=1.0, gamma=1.0)(student, teacher)``."""

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return correlation_losses.dist_loss(student_logits, teacher_logits, **self.options)


class CorrelationLoss(_OptionsModule):
    """Pearson + Spearman matching, :func:`kdfast.correlation_loss`."""

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return correlation_losses.correlation_loss(student_logits, teacher_logits, **self.options)


class DKDLoss(_OptionsModule):
    """Decoupled KD, :func:`kdfast.dkd_loss`: ``DKDLoss(temperature=4.0, alpha=1.0, beta=8.0)(s, t, labels)``."""

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return correlation_losses.dkd_loss(student_logits, teacher_logits, labels, **self.options)
