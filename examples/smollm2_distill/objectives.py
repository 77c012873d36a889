"""The training objectives compared: cross-entropy alone, and cross-entropy plus KD from a dense or a top-k teacher.

Every objective maps ``(student, input_ids, rows)`` to a scalar loss, where
``rows`` are the indices of the batch's sequences in the training set (to look
up the teacher's precomputed outputs).  The KD objectives are

    loss = CE(student) + kd_weight * temperature^2 * D(teacher_T || student_T)

both averaged over the ``B * (T - 1)`` predicted tokens, from kdfast's fused
linear losses (the student's ``(N, V)`` logits are never materialised).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lm_heads import final_hidden_states, lm_head_weight
from .teacher_targets import TopKTargets

METHODS = ("ce", "fused_kd", "topk_kd")
METHOD_TITLES = {
    "ce": "CE only",
    "fused_kd": "CE + KD (fused linear, dense teacher)",
    "topk_kd": "CE + KD (top-k cached teacher)",
}


@dataclass(frozen=True)
class DistillationSettings:
    """The KD settings shared by both KD objectives and the loss benchmark."""

    kd_weight: float = 1.0
    temperature: float = 1.0
    divergence: str = "kl"
    topk: int = 64
    tail: str = "bucket"

    def loss_options(self) -> dict:
        """Keyword arguments of kdfast's losses: the hard term at weight 1, the soft one at ``kd_weight * T^2``."""
        return dict(divergence=self.divergence, temperature=self.temperature, scale=self.temperature ** 2,
                    hard_weight=1.0, soft_weight=self.kd_weight)


class CrossEntropyObjective:
    """Next-token cross-entropy alone (transformers' own causal-LM loss: mean over predicted tokens)."""

    name = "ce"

    def __call__(self, student: torch.nn.Module, input_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return student(input_ids=input_ids, labels=input_ids).loss


class FusedLinearKDObjective:
    """CE + KD against the full teacher distribution, through ``kdfast.llm.fused_linear.fused_linear_distill_loss``."""

    name = "fused_kd"

    def __init__(self, teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, settings: DistillationSettings):
        self.teacher_hidden, self.teacher_weight, self.settings = teacher_hidden, teacher_weight, settings

    def __call__(self, student: torch.nn.Module, input_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        from kdfast.llm.fused_linear import fused_linear_distill_loss

        return fused_linear_distill_loss(
            final_hidden_states(student, input_ids), lm_head_weight(student),
            self.teacher_hidden[rows], self.teacher_weight, input_ids,
            shift=True, **self.settings.loss_options())


class TopKKDObjective:
    """CE + KD against the teacher's cached top-k, through ``kdfast.llm.fused_linear.fused_linear_topk_distill_loss``."""

    name = "topk_kd"

    def __init__(self, targets: TopKTargets, settings: DistillationSettings):
        self.targets, self.settings = targets, settings

    def __call__(self, student: torch.nn.Module, input_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        from kdfast.llm.fused_linear import fused_linear_topk_distill_loss

        bucket = self.settings.tail == "bucket"
        return fused_linear_topk_distill_loss(
            final_hidden_states(student, input_ids), lm_head_weight(student),
            self.targets.indices[rows], self.targets.logprobs[rows], input_ids,
            tail_logprobs=self.targets.tail_logprobs[rows] if bucket else None,
            shift=True, tail=self.settings.tail, **self.settings.loss_options())
