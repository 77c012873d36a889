"""Reference of Decoupled KD (Zhao et al., CVPR 2022), numerically safe.

mdistiller's ``dkd_loss``: ``alpha * TCKD + beta * NCKD``, both times ``T^2``,
summed over rows and divided by the batch size, with

* TCKD = KL of the binary (target, non-target) distributions
  ``[p_t, 1 - p_t]`` and ``[q_t, 1 - q_t]``;
* NCKD = KL of the non-target distributions ``p_j / (1 - p_t)`` and
  ``q_j / (1 - q_t)``, ``j != t``.

mdistiller forms ``log(1 - q_t)`` as ``log`` of a sum of probabilities and
masks the target with ``-1000``; here every log-probability is a logsumexp
difference (``log(1 - q_t) = logsumexp_{j != t} x_j - logsumexp_j x_j``), so
nothing underflows to ``log(0)``, a target of probability 1 is exact and V = 2
(one non-target class: NCKD = 0) works.  Where the teacher puts no mass
outside the target, its non-target distribution is undefined and NCKD is 0.
Rows whose label is ``ignore_index`` count in neither the sum nor the count.
"""

from __future__ import annotations

import math

import torch

from .distill import kl, nan_or_posinf_rows, nan_rows_where


def _target_split(x: torch.Tensor, target: torch.Tensor):
    """``(log prob of the target, log non-target mass, log probs within the non-targets)`` of logits rows."""
    is_target = torch.nn.functional.one_hot(target, x.shape[-1]).bool()
    lse = torch.logsumexp(x, -1)
    x_other = x.masked_fill(is_target, -math.inf)
    lse_other = torch.logsumexp(x_other, -1)
    log_target = x.gather(-1, target[:, None]).squeeze(-1) - lse
    # an empty non-target part (-inf lse) has no distribution: -inf everywhere, not NaN
    finite = (lse_other > -math.inf)[:, None]
    log_within = torch.where(finite, x_other - torch.where(finite, lse_other[:, None], 0.0), -math.inf)
    return log_target, lse_other - lse, log_within


def dkd_per_row(student_logits, teacher_logits, target, temperature, alpha, beta):
    """``T^2 (alpha TCKD + beta NCKD)`` per row (labels already valid)."""
    t_target, t_other, t_within = _target_split(teacher_logits / temperature, target)
    s_target, s_other, s_within = _target_split(student_logits / temperature, target)
    tckd = kl(torch.stack([t_target, t_other], -1), torch.stack([s_target, s_other], -1))
    nckd = kl(t_within, s_within)
    return temperature**2 * (alpha * tckd + beta * nckd)


def dkd_loss_reference(student_logits, teacher_logits, labels, temperature=4.0, alpha=1.0, beta=8.0,
                       ignore_index=-100):
    """DKD, batchmean over the rows whose label is not ``ignore_index`` (0 when there is none)."""
    acc = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    V = student_logits.shape[-1]
    zs = student_logits.reshape(-1, V).to(acc)
    zt = teacher_logits.detach().reshape(-1, V).to(acc)
    labels = labels.reshape(-1).long()
    valid = labels != ignore_index
    # ignored rows are replaced by zeros: nothing in them reaches the value or the gradient
    zs = torch.where(valid[:, None], zs, torch.zeros_like(zs))
    zt = torch.where(valid[:, None], zt, torch.zeros_like(zt))
    per_row = dkd_per_row(zs, zt, torch.where(valid, labels, 0), temperature, alpha, beta)
    undefined = valid & (nan_or_posinf_rows(zt) | nan_or_posinf_rows(zs))
    per_row = torch.where(valid, nan_rows_where(undefined, per_row, zs), torch.zeros_like(per_row))
    return per_row.sum() / valid.sum().clamp(min=1)
