"""What the fused LTKD paths (C++ ``kdfast::ltkd_forward``, Triton ``kdfast::ltkd_forward_triton``) share.

Both backends take LTKD in one or two row passes over the logits:

* rebalancing by the batch (``mode == "batch"``) needs the teacher's mean
  group distribution before any row's loss, so a first, teacher-only pass
  writes every row's group log-masses ``log P_g`` ((N, G), NaN on rows with a
  NaN or ``+inf`` logit in either input), :func:`batch_log_prior` averages
  them over the defined rows, and the main pass takes that ``(G,)`` log prior;
* a given prior is passed as is, no rebalancing passes none (one pass).

The main pass returns the loss and the student gradient written in the
forward, as the other fused ops.  A backend's two ops are given to
:func:`fused_ltkd_loss`, which is the backend's implementation of the family
``"ltkd"`` (signature of ``reference.longtail.ltkd_loss_reference``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..reference.longtail import ltkd_loss_reference
from .fused_op import paired_logits, wants_grad

# The kernels keep each row's group statistics in fixed-size arrays (C++: kLtkdMaxGroups in
# csrc/kernels/ltkd_api.h; Triton: one register vector of the next power of two).  More groups: the reference.
MAX_FUSED_GROUPS = 16


def batch_log_prior(teacher_log_mass: torch.Tensor) -> torch.Tensor:
    """``log mean_i P_{i,g}`` over the rows without NaN: ``(G,)`` float64, zeros when no row is defined.

    In log space (a tiny ``P_g`` does not underflow to a zero prior) and with
    masks instead of a selection of rows, so that it traces without a graph
    break under torch.compile.
    """
    defined = ~torch.isnan(teacher_log_mass).any(-1)
    count = defined.sum()
    masked = torch.where(defined[:, None], teacher_log_mass, torch.full_like(teacher_log_mass, -math.inf))
    log_mean = torch.logsumexp(masked, 0) - torch.log(count.to(teacher_log_mass.dtype))
    return torch.where(count > 0, log_mean, torch.zeros_like(log_mean))


def fused_ltkd_loss(forward: Callable, teacher_group_log_masses: Callable, student_logits: torch.Tensor,
                    teacher_logits: torch.Tensor, index: torch.Tensor, count: int, tau: float, inter_weight: float,
                    intra_weight: float, mode, intra_weighting: str, reduction: str) -> torch.Tensor:
    """LTKD on a backend's fused ops; same contract as ``reference.longtail.ltkd_loss_reference``.

    ``forward(student, teacher, groups, num_groups, log_prior, tau, inter_weight, intra_weight,
    teacher_weighting, reduction, compute_grad) -> (loss, grad)``;
    ``teacher_group_log_masses(student, teacher, groups, num_groups, tau) -> (N, G)``.
    More than :data:`MAX_FUSED_GROUPS` groups: the reference.
    """
    if count > MAX_FUSED_GROUPS:
        return ltkd_loss_reference(student_logits, teacher_logits, index, count, tau, inter_weight, intra_weight,
                                   mode, intra_weighting, reduction)
    s, t = paired_logits(student_logits, teacher_logits)
    if isinstance(mode, str):
        log_prior = batch_log_prior(teacher_group_log_masses(s.detach(), t, index, count, tau))
    elif mode is None:
        log_prior = None
    else:
        log_prior = mode.to(torch.float64)
    loss, _ = forward(s, t, index, count, log_prior, tau, inter_weight, intra_weight, intra_weighting == "teacher",
                      reduction, wants_grad(s))
    return loss
