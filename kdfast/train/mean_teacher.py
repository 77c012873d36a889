"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017): the teacher is an EMA of the student's weights.

Choices (the paper leaves them open or its code differs from the text):

* Consistency loss: the Distiller's kdfast loss (e.g. ``"kd"`` or
  ``{"name": "distill"}``, i.e. KL(p_teacher || q_student)), not the MSE of
  softmaxes of the original code: one loss family for every method, and the
  fused kernel.  For semi-supervised data give unlabelled rows the label
  ``ignore_index`` and construct the Distiller with ``distill_unlabeled=True``
  so that they still get the consistency term.
* EMA decay: ``min(1 - 1/(t + 1), decay)`` at the ``t``-th update (0-based),
  the ramp-up of the reference code, so early teachers are plain averages.
  Parameters are averaged; buffers (BatchNorm statistics) are copied from the
  student, as in timm's ``ModelEmaV2`` with buffers.
* Consistency weight: ``consistency_weight * sigmoid_rampup(epoch, rampup_epochs)``
  with ``sigmoid_rampup(t, L) = exp(-5 (1 - t/L)^2)`` (Laine & Aila), per epoch.
* The EMA teacher runs in eval mode (deterministic targets).
"""

from __future__ import annotations

import copy
import math
from typing import Mapping, Optional

import torch
from torch import nn

from .objectives import check_weight
from .teachers import TeacherSignal, TeacherTarget, _frozen_forward


def ema_decay(update: int, decay: float) -> float:
    """The EMA decay of the ``update``-th update (0-based): ``min(1 - 1/(update + 1), decay)``."""
    return min(1.0 - 1.0 / (update + 1), decay)


def sigmoid_rampup(current: float, length: float) -> float:
    """``exp(-5 (1 - clip(current / length, 0, 1))^2)``; 1 when ``length == 0``."""
    if length <= 0:
        return 1.0
    t = min(max(current / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class MeanTeacher(TeacherSignal):
    """The EMA of the (first) student as a teacher; see the module docstring for the choices."""

    def __init__(self, decay: float = 0.999, consistency_weight: float = 1.0, rampup_epochs: int = 5):
        decay = float(decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got decay={decay}")
        if rampup_epochs < 0:
            raise ValueError(f"rampup_epochs must be >= 0, got rampup_epochs={rampup_epochs}")
        self.decay = decay
        self.consistency_weight = check_weight("consistency_weight", consistency_weight)
        self.rampup_epochs = rampup_epochs
        self.student: Optional[nn.Module] = None
        self.model: Optional[nn.Module] = None  # the EMA teacher
        self.epoch = 0

    def attach(self, students) -> None:
        self.student = students[0]
        self.model = copy.deepcopy(self.student).requires_grad_(False)

    def models(self):
        return [] if self.model is None else [self.model]

    def _require_attached(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("MeanTeacher is not attached to a student: pass it to a Distiller first")
        return self.model

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def current_weight(self) -> float:
        """The consistency weight of the current epoch (after the ramp-up)."""
        return self.consistency_weight * sigmoid_rampup(self.epoch, self.rampup_epochs)

    def targets(self, inputs, student_logits):
        return [TeacherTarget(_frozen_forward(self._require_attached(), inputs), scale=self.current_weight())]

    def reference_logits(self, inputs):
        return _frozen_forward(self._require_attached(), inputs)

    @torch.no_grad()
    def after_optimizer_step(self, step: int, epoch: int) -> None:
        ema = self._require_attached()
        alpha = ema_decay(step - 1, self.decay)
        for e, s in zip(ema.parameters(), self.student.parameters()):
            e.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
        for e, s in zip(ema.buffers(), self.student.buffers()):
            e.copy_(s)

    def state_dict(self) -> dict:
        return {"ema": self._require_attached().state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self._require_attached().load_state_dict(state["ema"])
