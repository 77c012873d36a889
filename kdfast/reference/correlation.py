"""Reference of the correlation losses: DIST and Pearson + Spearman matching (docs/contract.md).

Plain PyTorch, written for reading, float64-capable and differentiable; the
oracle of the fused kernels' tests.

* ``pearson``: torchdistill's ``pearson_correlation``, i.e.
  ``F.cosine_similarity(a', b', eps=1e-8)`` of the centred vectors
  ``a' = a - mean(a)``: ``<a', b'> / (max(|a'|, eps) max(|b'|, eps))``.  A
  constant vector gives 0 (not NaN).
* DIST (Huang et al., NeurIPS 2022, torchdistill ``DISTLoss``):
  ``tau^2 (beta (1 - mean_i pearson(y_s[i], y_t[i])) + gamma (1 - mean_j pearson(y_s[:, j], y_t[:, j])))``.
  With a batch of one row the per-class (column) vectors have one entry, so
  their centred versions are zero and their Pearson is 0: the intra-class term
  is the constant ``gamma tau^2`` with no gradient (exactly what torchdistill
  computes; there is no relation across a batch of one to match).
* Correlation matching (CMKD): per row, Pearson of the softmaxes and Spearman,
  i.e. Pearson between the teacher's exact (average-tie) ranks and the
  student's soft ranks ``1 + sum_k sigmoid((x_j - x_k) / rank_strength)`` of
  ``x = z_s / tau`` (pairwise sigmoid: O(V^2) per row, so V is capped).
"""

from __future__ import annotations

import math

import torch

from .distill import nan_or_posinf_rows, nan_rows_where

PEARSON_EPS = 1e-8
# Pairwise soft ranks cost V^2 per row; beyond this the reference refuses.
MAX_RANK_VOCAB = 4096


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = PEARSON_EPS) -> torch.Tensor:
    """Pearson correlation along the last dim, torchdistill's eps semantics (each norm clamped below by eps)."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1).clamp(min=eps) * b.norm(dim=-1).clamp(min=eps))


def _rows(x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(acc)


def _acc_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def dist_loss_reference(student_logits, teacher_logits, temperature=1.0, beta=1.0, gamma=1.0):
    """DIST: ``beta * inter + gamma * intra``, each scaled by ``tau^2``."""
    acc = _acc_dtype(student_logits, teacher_logits)
    zs, zt = _rows(student_logits, acc), _rows(teacher_logits.detach(), acc)
    y_s = torch.softmax(zs / temperature, -1)
    y_t = torch.softmax(zt / temperature, -1)
    inter = 1.0 - pearson(y_s, y_t).mean()
    intra = 1.0 - pearson(y_s.t(), y_t.t()).mean()
    loss = temperature**2 * (beta * inter + gamma * intra)
    # The columns couple every row: one NaN or +inf logit makes the loss and the whole gradient NaN.
    poisoned = (nan_or_posinf_rows(zt) | nan_or_posinf_rows(zs)).any()
    nan_if_poisoned = torch.where(poisoned, math.nan, 0.0).to(loss.dtype)
    return loss + torch.where(poisoned, zs, torch.zeros_like(zs)).sum() * nan_if_poisoned


def check_rank_vocab(V: int) -> None:
    """The soft ranks cost O(V^2) per row (on every backend): refuse LLM-sized vocabularies."""
    if V > MAX_RANK_VOCAB:
        raise ValueError(f"correlation_loss ranks all V = {V} classes pairwise (O(V^2) per row); it supports "
                         f"V <= {MAX_RANK_VOCAB}. For LLM vocabularies use dist_loss or distill_loss")


def exact_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last dim, ties sharing their average rank."""
    ordered = x.sort(-1).values
    below = torch.searchsorted(ordered, x.contiguous(), right=False)
    at_most = torch.searchsorted(ordered, x.contiguous(), right=True)
    return (below + at_most + 1).to(x.dtype) / 2


def soft_ranks(x: torch.Tensor, strength: float) -> torch.Tensor:
    """``1 + sum_{k != j} sigmoid((x_j - x_k) / strength)``; exact ranks as strength -> 0.

    Two masked classes (``-inf``) tie: their difference, NaN, counts as 0 (with no gradient).
    """
    diff = x[..., :, None] - x[..., None, :]
    pairwise = torch.sigmoid(torch.where(torch.isnan(diff), torch.zeros_like(diff), diff) / strength)
    return pairwise.sum(-1) + 0.5  # the k == j term is sigmoid(0) = 1/2


def correlation_terms(student_logits, teacher_logits, temperature, rank_strength):
    """Per-row ``(pearson, spearman)`` of student and teacher, shapes ``(N,)``."""
    V = student_logits.shape[-1]
    check_rank_vocab(V)
    acc = _acc_dtype(student_logits, teacher_logits)
    x_s = _rows(student_logits, acc) / temperature
    x_t = _rows(teacher_logits.detach(), acc) / temperature
    rho_p = pearson(torch.softmax(x_s, -1), torch.softmax(x_t, -1))
    # bounded memory: rows in chunks of at most 2^22 pairwise entries
    step = max(1, (1 << 22) // (V * V))
    rho_s = torch.cat([pearson(soft_ranks(x_s[i:i + step], rank_strength), exact_ranks(x_t[i:i + step]))
                       for i in range(0, x_s.shape[0], step)]) if x_s.shape[0] else x_s.new_zeros(0)
    return rho_p, rho_s


def correlation_loss_reference(student_logits, teacher_logits, temperature=1.0, pearson_weight=1.0,
                               spearman_weight=1.0, rank_strength=1.0, weights=None):
    """``mean_i [pearson_weight w_i (1 - rho_P_i) + spearman_weight (1 - w_i) (1 - rho_S_i)]``.

    ``weights`` (``(N,)``, in [0, 1], no gradient) decide per row how much it
    leans on Pearson (values) versus Spearman (ranks); None means both in full
    (``w_i (1 - ...)`` and ``(1 - w_i) (1 - ...)`` become ``1 (1 - ...)`` each).
    """
    rho_p, rho_s = correlation_terms(student_logits, teacher_logits, temperature, rank_strength)
    if weights is None:
        per_row = pearson_weight * (1.0 - rho_p) + spearman_weight * (1.0 - rho_s)
    else:
        w = weights.reshape(-1).to(rho_p.dtype)
        per_row = pearson_weight * w * (1.0 - rho_p) + spearman_weight * (1.0 - w) * (1.0 - rho_s)
    zs = _rows(student_logits, per_row.dtype)
    undefined = nan_or_posinf_rows(_rows(teacher_logits.detach(), per_row.dtype)) | nan_or_posinf_rows(zs)
    per_row = nan_rows_where(undefined, per_row, zs)
    return per_row.mean() if per_row.numel() else per_row.sum()
