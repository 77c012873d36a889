"""Stochastic self-distillation (Aslam et al., 2025): distil from a teacher with dropout active.

Per batch the teacher runs ``passes`` stochastic forward passes (dropout on,
everything else, e.g. BatchNorm, in eval mode).  Each pass is scored per sample
by its agreement with the student (``similarity="kl"``: ``-KL(p_k || q)``,
kdfast's own KL; ``"cosine"``: cosine of the probability vectors); passes
scoring below the per-sample ``drop_quantile`` of the scores are dropped, and
the rest are weighted by a softmax of their scores over passes
(``weight_temperature``).  The student distils from the weighted mixture of the
passes' probabilities, given to the loss as logits ``log(mixture)``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import distill_loss
from .teachers import TeacherSignal, TeacherTarget, _frozen_forward, log_mixture

SIMILARITIES = ("kl", "cosine")


def pass_similarity(pass_logits: List[torch.Tensor], student_logits: torch.Tensor, similarity: str) -> torch.Tensor:
    """Agreement of every pass with the student, shape ``(N, K)`` (higher: closer)."""
    V = student_logits.shape[-1]
    s = student_logits.detach().reshape(-1, V)
    if similarity == "kl":
        scores = [-distill_loss(s, z.reshape(-1, V), reduction="none") for z in pass_logits]
    elif similarity == "cosine":
        q = torch.softmax(s.float(), -1)
        scores = [F.cosine_similarity(torch.softmax(z.reshape(-1, V).float(), -1), q, dim=-1) for z in pass_logits]
    else:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    return torch.stack(scores, dim=-1).float()


def pass_weights(scores: torch.Tensor, drop_quantile: float, temperature: float) -> torch.Tensor:
    """Softmax over passes of ``scores / temperature``, passes below the per-row ``drop_quantile`` removed.

    The best pass of a row is never dropped (the quantile is at most the maximum).
    """
    threshold = torch.quantile(scores, drop_quantile, dim=-1, keepdim=True)
    masked = torch.where(scores >= threshold, scores / temperature, torch.full_like(scores, float("-inf")))
    return torch.softmax(masked, dim=-1)


def enable_dropout_only(model: nn.Module) -> int:
    """Put ``model`` in eval mode except its dropout layers; return how many dropout layers there are."""
    model.eval()
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    for m in dropouts:
        m.train()
    return len(dropouts)


@contextlib.contextmanager
def dropout_only(model: nn.Module) -> Iterator[int]:
    """Within the block, ``model`` runs with only its dropout layers active (BatchNorm and the rest in eval
    mode); on leaving it, every module's train/eval flag is what it was, so a teacher signal never leaves
    its teacher's dropout on for whoever runs the teacher next.  Yields the number of dropout layers."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield enable_dropout_only(model)
    finally:
        for m, training in modes:
            m.training = training


class StochasticTeacher(TeacherSignal):
    """A teacher sampled ``passes`` times with dropout; see the module docstring."""

    depends_on_student = True

    def __init__(self, model: nn.Module, passes: int = 4, similarity: str = "kl", drop_quantile: float = 0.25,
                 weight_temperature: float = 1.0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"the teacher must be an nn.Module, got {type(model).__name__}")
        if not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
            raise ValueError("StochasticTeacher needs a teacher with dropout layers (its passes would all be equal)")
        if not isinstance(passes, int) or passes < 2:
            raise ValueError(f"passes must be an int >= 2, got passes={passes!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if not 0.0 <= drop_quantile < 1.0:
            raise ValueError(f"drop_quantile must be in [0, 1), got drop_quantile={drop_quantile}")
        if not weight_temperature > 0:
            raise ValueError(f"weight_temperature must be > 0, got weight_temperature={weight_temperature}")
        self.model = model.requires_grad_(False)
        self.passes = passes
        self.similarity = similarity
        self.drop_quantile = float(drop_quantile)
        self.weight_temperature = float(weight_temperature)

    def models(self):
        return [self.model]

    @torch.no_grad()
    def targets(self, inputs, student_logits):
        with dropout_only(self.model):
            pass_logits = [self.model(inputs) for _ in range(self.passes)]
        scores = pass_similarity(pass_logits, student_logits, self.similarity)
        weights = pass_weights(scores, self.drop_quantile, self.weight_temperature)
        return [TeacherTarget(log_mixture(pass_logits, weights))]

    def reference_logits(self, inputs):
        return _frozen_forward(self.model, inputs)
