"""``nn.Module`` forms of the losses, for training loops that want modules."""

from __future__ import annotations

import inspect
from typing import Callable, Dict

import torch
from torch import nn

from . import correlation_losses, losses
from .config import check_call_options


class OptionsModule(nn.Module):
    """A loss function with fixed keyword options, as a module (``extra_repr`` shows them).

    Every module checks its options here, when it is built, in the same way:
    an argument of ``forward`` (it comes with each batch) is a TypeError
    (``call_time_error``); the names, and the values of the loss options, as
    the function would check them (:func:`kdfast.config.check_call_options`);
    the function's own options by ``option_checks`` (name -> check).
    """

    loss_fn: Callable
    call_time_error = "{name} is passed at call time, not to {module}()"
    option_checks: Dict[str, Callable] = {}

    def __init__(self, **options):
        super().__init__()
        call_time = inspect.signature(self.forward).parameters
        for name in options:
            if name in call_time:
                raise TypeError(self.call_time_error.format(name=name, module=type(self).__name__))
        check_call_options(self.loss_fn, options)
        for name, check in self.option_checks.items():
            if name in options:
                check(options[name])
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not isinstance(v, torch.Tensor))


class DistillLoss(OptionsModule):
    """``DistillLoss(**options)(student_logits, teacher_logits, labels=None)``: :func:`kdfast.distill_loss`."""

    loss_fn = staticmethod(losses.distill_loss)
    call_time_error = "{name} are passed at call time: module(student_logits, teacher_logits, labels)"

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels=None) -> torch.Tensor:
        return self.loss_fn(student_logits, teacher_logits, labels=labels, **self.options)


class KDLoss(DistillLoss):
    """Hinton KD, :func:`kdfast.kd_loss`: ``KDLoss(temperature=4.0)``."""

    loss_fn = staticmethod(losses.kd_loss)


class TTMLoss(DistillLoss):
    """Transformed teacher matching, :func:`kdfast.ttm_loss`."""

    loss_fn = staticmethod(losses.ttm_loss)


class WTTMLoss(DistillLoss):
    """Weighted TTM, :func:`kdfast.wttm_loss`."""

    loss_fn = staticmethod(losses.wttm_loss)


class DISTLoss(OptionsModule):
    """DIST, :func:`kdfast.dist_loss`: ``DISTLoss(temperature=4.0, beta=1.0, gamma=1.0)(student, teacher)``."""

    loss_fn = staticmethod(correlation_losses.dist_loss)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(student_logits, teacher_logits, **self.options)


class CorrelationLoss(OptionsModule):
    """Pearson + Spearman matching, :func:`kdfast.correlation_loss`."""

    loss_fn = staticmethod(correlation_losses.correlation_loss)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(student_logits, teacher_logits, **self.options)


class DKDLoss(OptionsModule):
    """Decoupled KD, :func:`kdfast.dkd_loss`: ``DKDLoss(temperature=4.0, alpha=1.0, beta=8.0)(s, t, labels)``."""

    loss_fn = staticmethod(correlation_losses.dkd_loss)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(student_logits, teacher_logits, labels, **self.options)
