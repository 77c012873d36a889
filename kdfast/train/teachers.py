"""Teacher signals: where the teacher logits (and per-sample weights) of a batch come from.

A :class:`TeacherSignal` turns a batch of inputs into a list of
:class:`TeacherTarget` (teacher logits, optional per-row weights, a scalar
scale); the :class:`~kdfast.train.Distiller` adds one distillation term per
target.  Signals with state (an EMA, a checkpoint index) save it through
``state_dict`` so that a resumed run continues exactly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..reference import entropy_weight


@dataclass
class TeacherTarget:
    """One distillation target: ``scale * loss(student, logits, weights=weights)``."""

    logits: torch.Tensor
    weights: Optional[torch.Tensor] = None
    scale: float = 1.0


class TeacherSignal:
    """Base class of the teacher strategies (every hook is a no-op here).

    ``depends_on_student``: ``targets`` reads the student's logits, so it is
    called once per student; otherwise once per batch and shared.
    """

    depends_on_student = False

    def attach(self, students: Sequence[nn.Module]) -> None:
        """Called once by the Distiller with the (unwrapped) students, before training."""

    def to(self, device: torch.device) -> "TeacherSignal":
        """Move the teacher model(s) to ``device``."""
        for model in self.models():
            model.to(device)
        return self

    def models(self) -> List[nn.Module]:
        """The teacher modules (moved to the device, never trained by the optimizer)."""
        return []

    def targets(self, inputs, student_logits: torch.Tensor) -> List[TeacherTarget]:
        """The distillation targets of a batch (computed without gradient)."""
        raise NotImplementedError

    def reference_logits(self, inputs) -> torch.Tensor:
        """The teacher's deterministic prediction, for the agreement metric."""
        raise NotImplementedError

    def on_epoch_start(self, epoch: int) -> None:
        """Called before every epoch (0-based)."""

    def after_optimizer_step(self, step: int, epoch: int) -> None:
        """Called after every optimizer step (``step`` counts steps done, from 1)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass


def _frozen_forward(model: nn.Module, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(inputs)


class FrozenTeacher(TeacherSignal):
    """A fixed, pre-trained teacher in eval mode: one target, no weights."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"the teacher must be an nn.Module, got {type(model).__name__}")
        self.model = model
        model.requires_grad_(False)

    def models(self) -> List[nn.Module]:
        return [self.model]

    def targets(self, inputs, student_logits):
        return [TeacherTarget(_frozen_forward(self.model, inputs))]

    def reference_logits(self, inputs):
        return _frozen_forward(self.model, inputs)


def confidence_weights(teacher_logits: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Per-sample teacher weights ``softmax over teachers of (-H(softmax(z_k)) / temperature)``, shape ``(N, K)``.

    Uses kdfast's ``entropy_weight = 1 - H / log V``: it is affine in ``-H``
    with the same ``log V`` for every teacher, and a softmax ignores the shift.
    """
    if temperature <= 0 or not math.isfinite(temperature):
        raise ValueError(f"confidence temperature must be a finite number > 0, got {temperature}")
    V = teacher_logits[0].shape[-1]
    confidence = torch.stack([entropy_weight(z.float().reshape(-1, V)) for z in teacher_logits], dim=-1)
    return torch.softmax(confidence * (math.log(V) / temperature), dim=-1)


class MultiTeacher(TeacherSignal):
    """Several frozen teachers; each sample trusts the confident ones more.

    One target per teacher, weighted per sample by :func:`confidence_weights`
    (the weights of a sample sum to 1 over the teachers), i.e. ``sum_k w_ik
    D(p_ik || q_i)`` as in confidence-aware multi-teacher KD.  The loss must
    accept per-row weights (a row-wise kdfast loss without its own weighting).
    ``reference_logits`` is the log of the confidence-weighted mixture of the
    teachers' probabilities.
    """

    def __init__(self, models: Sequence[nn.Module], confidence_temperature: float = 1.0):
        models = list(models)
        if len(models) < 2:
            raise ValueError(f"MultiTeacher needs at least 2 teachers, got {len(models)}")
        self.teachers = [FrozenTeacher(m) for m in models]
        self.confidence_temperature = float(confidence_temperature)
        confidence_weights([torch.zeros(1, 2)] * 2, self.confidence_temperature)  # validate now

    def models(self):
        return [t.model for t in self.teachers]

    def _logits_and_weights(self, inputs):
        logits = [t.reference_logits(inputs) for t in self.teachers]
        return logits, confidence_weights(logits, self.confidence_temperature)

    def targets(self, inputs, student_logits):
        logits, weights = self._logits_and_weights(inputs)
        return [TeacherTarget(z, weights[:, k]) for k, z in enumerate(logits)]

    def reference_logits(self, inputs):
        logits, weights = self._logits_and_weights(inputs)
        return log_mixture(logits, weights)


def log_mixture(logits: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``log sum_k w_ik softmax(z_k)_i``: logits whose softmax is the weighted mixture (``weights`` ``(N, K)``)."""
    shape, V = logits[0].shape, logits[0].shape[-1]
    logp = torch.stack([torch.log_softmax(z.float().reshape(-1, V), -1) for z in logits], dim=0)  # (K, N, V)
    return torch.logsumexp(logp + weights.t().log()[:, :, None], dim=0).reshape(shape)


CheckpointSource = Union[str, os.PathLike, Mapping[str, torch.Tensor]]


class TeacherSchedule(TeacherSignal):
    """Online distillation from a schedule of teacher checkpoints (early to late).

    ``checkpoints``: state_dicts of ``model`` or paths to them (loaded with
    ``torch.load(weights_only=True)``), ordered from early to late.
    ``schedule``: which checkpoint each epoch (0-based) distils from: a mapping
    ``{first_epoch: checkpoint_index}`` (a step function: epoch ``e`` uses the
    entry of the largest key ``<= e``; it must have key 0), a callable
    ``epoch -> index``, or None for ``min(epoch, len(checkpoints) - 1)`` (one
    checkpoint per epoch, then the last).
    """

    def __init__(self, model: nn.Module, checkpoints: Sequence[CheckpointSource],
                 schedule: Union[None, Mapping[int, int], Callable[[int], int]] = None):
        self.teacher = FrozenTeacher(model)
        self.checkpoints = list(checkpoints)
        if not self.checkpoints:
            raise ValueError("TeacherSchedule needs at least one checkpoint")
        if isinstance(schedule, Mapping):
            if 0 not in schedule:
                raise ValueError(f"a schedule mapping must say which checkpoint epoch 0 uses, got keys {sorted(schedule)}")
            for index in schedule.values():
                self._check_index(index)
        self.schedule = schedule
        self.current: Optional[int] = None

    def _check_index(self, index) -> int:
        if not isinstance(index, int) or not 0 <= index < len(self.checkpoints):
            raise ValueError(f"checkpoint index {index!r} is outside [0, {len(self.checkpoints)})")
        return index

    def index_for_epoch(self, epoch: int) -> int:
        """The checkpoint index epoch ``epoch`` (0-based) distils from."""
        if self.schedule is None:
            return min(epoch, len(self.checkpoints) - 1)
        if callable(self.schedule):
            return self._check_index(self.schedule(epoch))
        return self.schedule[max(k for k in self.schedule if k <= epoch)]

    def models(self):
        return [self.teacher.model]

    def on_epoch_start(self, epoch: int) -> None:
        index = self.index_for_epoch(epoch)
        if index != self.current:
            source = self.checkpoints[index]
            if not isinstance(source, Mapping):
                source = torch.load(source, map_location="cpu", weights_only=True)
            self.teacher.model.load_state_dict(source)
            self.current = index

    def targets(self, inputs, student_logits):
        return self.teacher.targets(inputs, student_logits)

    def reference_logits(self, inputs):
        return self.teacher.reference_logits(inputs)


class WarmupTeacher(TeacherSignal):
    """Another signal whose distillation term is ramped up linearly over the first ``warmup_epochs`` epochs.

    Epoch ``e`` (0-based) scales every target by ``min((e + 1) / warmup_epochs,
    1)``: DKD's warm-up (Zhao et al., CVPR 2022; mdistiller multiplies the DKD
    term by ``min(epoch / warmup, 1)`` with 1-based epochs).  Everything else
    (targets, agreement, state) is the wrapped signal's.
    """

    def __init__(self, signal: TeacherSignal, warmup_epochs: int):
        if not isinstance(signal, TeacherSignal):
            raise TypeError(f"WarmupTeacher wraps a TeacherSignal, got {type(signal).__name__}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an int >= 0, got warmup_epochs={warmup_epochs!r}")
        self.signal = signal
        self.warmup_epochs = warmup_epochs
        self.depends_on_student = signal.depends_on_student
        self.epoch = 0

    def factor(self) -> float:
        """The scale of the current epoch's targets."""
        if self.warmup_epochs == 0:
            return 1.0
        return min((self.epoch + 1) / self.warmup_epochs, 1.0)

    def attach(self, students) -> None:
        self.signal.attach(students)

    def models(self):
        return self.signal.models()

    def to(self, device):
        self.signal.to(device)
        return self

    def targets(self, inputs, student_logits):
        f = self.factor()
        return [TeacherTarget(t.logits, t.weights, t.scale * f) for t in self.signal.targets(inputs, student_logits)]

    def reference_logits(self, inputs):
        return self.signal.reference_logits(inputs)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        self.signal.on_epoch_start(epoch)

    def after_optimizer_step(self, step: int, epoch: int) -> None:
        self.signal.after_optimizer_step(step, epoch)

    def state_dict(self) -> dict:
        return self.signal.state_dict()

    def load_state_dict(self, state) -> None:
        self.signal.load_state_dict(state)
