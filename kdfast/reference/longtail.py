"""Reference of long-tailed KD (LTKD; Kim, "Biased Teacher, Balanced Student", 2025).

The one source of truth for the formula; :mod:`kdfast.longtail` documents the
paper, what was followed and the public functions (which validate their
arguments and then call these).  Per row, with ``p = softmax(z_t / tau)``,
``q = softmax(z_s / tau)``, the group masses ``P_g``, ``Q_g`` and the
within-group distributions ``p_{.|g}``, ``q_{.|g}``::

    loss = tau^2 [ inter_weight KL(P~ || Q) + intra_weight sum_g w_g KL(p_{.|g} || q_{.|g}) ]

``P~_g ∝ P_g / prior_g`` (or ``P`` itself), ``w_g`` 1 ("uniform") or ``P_g``
("teacher") on the groups where the teacher has mass, 0 elsewhere.  Every
log-probability is a difference of log-sum-exps (docs/contract.md, section 7).
"""

from __future__ import annotations

import math
from typing import List, Optional, Union

import torch

from .distill import accumulation_dtype, check_rows_defined, kl, nan_or_posinf_rows, nan_rows_where

# How P~ is made: None (P~ = P), "batch" (the prior is the mean of P over the call's defined rows) or the log of a
# (G,) prior.
RebalanceMode = Union[None, str, torch.Tensor]


def safe_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last dim; ``-inf`` for an all ``-inf`` (or empty) slice, with a zero gradient there.

    ``torch.logsumexp`` returns ``-inf`` for such a slice too, but its
    backward is ``exp(-inf - (-inf))`` = NaN.
    """
    dead = torch.isneginf(x).all(-1)
    value = torch.logsumexp(torch.where(dead[..., None], torch.zeros_like(x), x), -1)
    return torch.where(dead, torch.full_like(value, -math.inf), value)


def group_members(index: torch.Tensor, count: int) -> List[torch.Tensor]:
    """The class indices of each group ``0 .. count-1`` (empty for an id without classes)."""
    return [(index == g).nonzero().flatten() for g in range(count)]


def group_log_probs(logp: torch.Tensor, members: List[torch.Tensor]) -> torch.Tensor:
    """``log P_g = logsumexp_{c in g} log p_c`` per row: ``(N, G)``."""
    return torch.stack([safe_logsumexp(logp.index_select(-1, m)) for m in members], -1)


def _conditional(logp: torch.Tensor, group_logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log p_c - log P_{g(c)}``, ``-inf`` where the group has no mass (there ``p_c`` has none either)."""
    per_class = group_logp.index_select(-1, index)
    return torch.where(torch.isneginf(per_class), torch.full_like(logp, -math.inf), logp - per_class)


def _kl_terms(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """The entries ``p (log p - log q)`` of a KL, 0 where ``p = 0`` (in the value and the gradient)."""
    p = logp.exp()
    keep = p > 0
    zero = torch.zeros_like(logp)
    return torch.where(keep, p * (torch.where(keep, logp, zero) - torch.where(keep, logq, zero)), zero)


def decompose(zs: torch.Tensor, zt: torch.Tensor, index: torch.Tensor, count: int, tau: float):
    """``(logp, logq, log P, log Q, intra)`` of ``(N, V)`` logits at temperature ``tau``."""
    members = group_members(index, count)
    logp = torch.log_softmax(zt / tau, -1)
    logq = torch.log_softmax(zs / tau, -1)
    group_p, group_q = group_log_probs(logp, members), group_log_probs(logq, members)
    terms = _kl_terms(_conditional(logp, group_p, index), _conditional(logq, group_q, index))
    # index_add, not a matmul with a one-hot matrix: a +inf entry must not meet the zeros of other groups.
    intra = torch.zeros(terms.shape[0], count, dtype=terms.dtype, device=terms.device).index_add(1, index, terms)
    return logp, logq, group_p, group_q, intra


def rebalanced(group_p: torch.Tensor, mode: RebalanceMode, undefined: torch.Tensor) -> torch.Tensor:
    """``log P~``: ``log P_g - log prior_g``, renormalised per row (``log P`` itself when ``mode`` is None)."""
    if mode is None:
        return group_p
    if isinstance(mode, str):  # the teacher's mean group distribution over the defined rows of the call
        # in log space (log of the mean of P_g): a tiny P_g does not underflow to a zero prior.
        rows = group_p[~undefined]
        log_prior = (torch.logsumexp(rows, 0) - math.log(rows.shape[0]) if rows.shape[0]
                     else group_p.new_zeros(group_p.shape[-1]))
    else:
        log_prior = mode
    shifted = torch.where(torch.isneginf(group_p), group_p, group_p - log_prior)
    return shifted - safe_logsumexp(shifted)[:, None]


def logit_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """``(zs, zt, undefined)``: ``(N, V)`` rows in the accumulation dtype (the teacher detached) and the rows with
    a NaN or ``+inf`` logit; an all ``-inf`` row is a ValueError."""
    V = student_logits.shape[-1]
    acc = accumulation_dtype(student_logits, teacher_logits)
    zs = student_logits.reshape(-1, V).to(acc)
    zt = teacher_logits.detach().reshape(-1, V).to(acc)
    check_rows_defined(zt, zs, torch.ones(zt.shape[0], dtype=torch.bool, device=zt.device))
    return zs, zt, nan_or_posinf_rows(zt) | nan_or_posinf_rows(zs)


def ltkd_loss_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, index: torch.Tensor,
                        count: int, tau: float, inter_weight: float, intra_weight: float, mode: RebalanceMode,
                        intra_weighting: str, reduction: str) -> torch.Tensor:
    """LTKD from validated arguments (``kdfast.longtail.ltkd_loss`` checks them): the backends' common signature.

    ``index``: ``(V,)`` int64 group ids in ``[0, count)``; ``mode``: None,
    ``"batch"`` or the log of a ``(G,)`` prior in the accumulation dtype;
    ``intra_weighting``: ``"uniform"`` or ``"teacher"``.
    """
    zs, zt, undefined = logit_rows(student_logits, teacher_logits)
    _, _, group_p, group_q, intra = decompose(zs, zt, index, count, tau)
    target = rebalanced(group_p, mode, undefined)
    per_row = torch.zeros(zs.shape[0], dtype=zs.dtype, device=zs.device)
    if inter_weight != 0.0:
        per_row = per_row + inter_weight * kl(target, group_q)
    if intra_weight != 0.0:
        has_mass = group_p > -math.inf
        weight = has_mass.to(zs.dtype) if intra_weighting == "uniform" else group_p.exp()
        weighted = torch.where(has_mass & (weight > 0), weight * intra, torch.zeros_like(intra))
        per_row = per_row + intra_weight * weighted.sum(-1)
    per_row = nan_rows_where(undefined, tau * tau * per_row, zs)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total if reduction == "sum" else total / max(zs.shape[0], 1)


def teacher_group_log_probs(teacher_logits: torch.Tensor, index: torch.Tensor, count: int,
                            tau: float, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``log P_g`` of the teacher's rows: ``(N, G)``, no gradient."""
    V = teacher_logits.shape[-1]
    zt = teacher_logits.detach().reshape(-1, V).to(dtype or accumulation_dtype(teacher_logits))
    return group_log_probs(torch.log_softmax(zt / tau, -1), group_members(index, count))
