"""Reference of Grouped KD (Zhao et al., "Grouped Knowledge Distillation for Deep Face Recognition", AAAI 2023).

The one source of truth for the formula; :func:`kdfast.grouped_kd.grouped_kd_loss`
documents what was followed from the paper and where a choice was made.

Per row, with ``p = softmax(z_t / T)`` and ``q = softmax(z_s / T)``:

* the **primary group** ``P``: the teacher's top classes whose cumulative
  probability at the *group temperature* ``T_g`` reaches ``primary_mass``,
  plus the row's label.  Exactly: with ``e_j = exp(z_t,j / T_g)``,
  ``F(v) = sum_{z_t,k >= v} e_k``, the threshold logit is
  ``z* = max { z_t,j : F(z_t,j) >= primary_mass * F(-inf) }`` and
  ``P = { j : z_t,j >= z* }`` (so classes tied at the threshold are all in or
  all out, whatever their order), then ``P += {label}``.  ``primary_mass >= 1``
  is special: ``P`` is every class whose teacher logit is finite (a class of
  teacher probability 0 is never needed to reach the whole mass), plus the
  label.  Classes with ``-inf`` teacher logits are otherwise never in ``P``
  unless they are the label.
* **Binary-KD**: the KL between the teacher's and the student's masses of the
  two groups, ``[P_t, 1 - P_t]`` and ``[Q_s, 1 - Q_s]`` (``P_t = sum_{j in P} p_j``,
  ``Q_s = sum_{j in P} q_j``);
* **Primary-KD**: the KL between the distributions inside ``P``,
  ``p_j / P_t`` and ``q_j / Q_s`` for ``j in P``;
* (**Secondary-KD**, the KL inside the other classes, is omitted: that is GKD.)

``loss_i = T^2 (binary_weight * Binary-KD + primary_weight * Primary-KD)``.

Every log-probability is a difference of log-sum-exps (``log Q_s =
LSE_{P}(x) - LSE(x)``, ``log(1 - Q_s) = LSE_{not P}(x) - LSE(x)``), so nothing
is ``log(0)`` and a group of probability ~1 loses nothing to cancellation; an
empty secondary group (``P`` = every class) gives Binary-KD = 0.  Rows whose
label is ``ignore_index`` contribute 0 (value and gradient) and count in no
denominator; a row with a NaN or ``+inf`` logit is NaN; an all ``-inf`` row is
a ValueError (docs/contract.md, section 7).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .distill import check_labels, check_rows_defined, kl, nan_or_posinf_rows, nan_rows_where


def primary_group(teacher_logits: torch.Tensor, labels: Optional[torch.Tensor], group_temperature: float,
                  primary_mass: float) -> torch.Tensor:
    """The ``(N, V)`` boolean mask of the primary group of each row (see the module docstring).

    ``teacher_logits``: ``(N, V)`` rows with at least one finite entry (NaN
    rows give an unspecified mask: their loss is NaN anyway).  ``labels``:
    ``(N,)`` valid class indices, or None (no class is forced in).
    """
    zt = teacher_logits.detach()
    finite = zt > -math.inf
    if primary_mass >= 1.0:
        group = finite
    else:
        sorted_z, _ = torch.sort(zt, dim=-1, descending=True)
        top = sorted_z[:, :1]
        top = torch.where(top > -math.inf, top, torch.zeros_like(top))
        # exp((z - max) / T_g) in the logits' accumulation dtype (0 for -inf logits), summed in float64
        mass = torch.exp((sorted_z - top) * (1.0 / group_temperature))
        cumulative = torch.cumsum(mass.double(), -1)
        need = primary_mass * cumulative[:, -1:]
        # the first position whose cumulative mass reaches the threshold; its logit is z*
        first = (cumulative < need).sum(-1, keepdim=True).clamp(max=zt.shape[-1] - 1)
        threshold = sorted_z.gather(-1, first)
        group = zt >= threshold
    if labels is not None:
        group = group | torch.nn.functional.one_hot(labels, zt.shape[-1]).bool()
    return group


def _safe_lse(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` of ``x`` over the entries where ``keep``; ``-inf`` (zero gradient) where none is finite."""
    masked = torch.where(keep, x, torch.full_like(x, -math.inf))
    dead = torch.isneginf(masked).all(-1)
    value = torch.logsumexp(torch.where(dead[:, None], torch.zeros_like(x), masked), -1)
    return torch.where(dead, torch.full_like(value, -math.inf), value)


def _group_split(x: torch.Tensor, group: torch.Tensor):
    """``(log mass of the group, log mass of the rest, log probs within the group)`` of rows of ``x``."""
    lse = torch.logsumexp(x, -1)
    lse_in = _safe_lse(x, group)
    lse_out = _safe_lse(x, ~group)
    has_in = (lse_in > -math.inf)[:, None]
    within = torch.where(group & has_in, x - torch.where(has_in, lse_in[:, None], 0.0), -math.inf)
    return lse_in - lse, lse_out - lse, within


def grouped_kd_per_row(student_logits: torch.Tensor, teacher_logits: torch.Tensor, group: torch.Tensor,
                       temperature: float, primary_weight: float, binary_weight: float) -> torch.Tensor:
    """``T^2 (binary_weight Binary-KD + primary_weight Primary-KD)`` per row, for a given primary-group mask."""
    t_in, t_out, t_within = _group_split(teacher_logits / temperature, group)
    s_in, s_out, s_within = _group_split(student_logits / temperature, group)
    binary = kl(torch.stack([t_in, t_out], -1), torch.stack([s_in, s_out], -1))
    primary = kl(t_within, s_within)
    return temperature**2 * (binary_weight * binary + primary_weight * primary)


def grouped_kd_loss_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                              labels: Optional[torch.Tensor], temperature: float = 4.0, primary_mass: float = 0.93,
                              primary_weight: float = 4.0, binary_weight: float = 1.0, group_temperature: float = 1.0,
                              ignore_index: int = -100, reduction: str = "batchmean") -> torch.Tensor:
    """Grouped KD over ``(..., V)`` logits, computed in float32 (float64 for float64 inputs).

    ``reduction``: ``"batchmean"`` (sum over the valid rows / their number, 0
    when there is none), ``"sum"`` or ``"none"`` (``(N,)``, 0 on ignored rows).
    Arguments are assumed validated (``kdfast.grouped_kd.grouped_kd_loss``
    checks them); label range and all ``-inf`` rows are checked here (eager
    mode only), as the other references do.
    """
    acc = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    V = student_logits.shape[-1]
    zs = student_logits.reshape(-1, V).to(acc)
    zt = teacher_logits.detach().reshape(-1, V).to(acc)
    N = zs.shape[0]
    if labels is not None:
        flat = labels.reshape(-1).long()
        valid = flat != ignore_index
        check_labels(flat, valid, V, ignore_index)
        target = torch.where(valid, flat, 0)
    else:
        valid = torch.ones(N, dtype=torch.bool, device=zs.device)
        target = None
    # ignored rows are replaced by zeros: nothing in them reaches the value or the gradient
    zs = torch.where(valid[:, None], zs, torch.zeros_like(zs))
    zt = torch.where(valid[:, None], zt, torch.zeros_like(zt))
    check_rows_defined(zt, zs, valid)
    undefined = valid & (nan_or_posinf_rows(zt) | nan_or_posinf_rows(zs))
    # a NaN row's group is meaningless; it is computed on zeros so that nothing else meets the NaN
    zt_group = torch.where(undefined[:, None], torch.zeros_like(zt), zt)
    group = primary_group(zt_group, target, group_temperature, primary_mass)
    per_row = grouped_kd_per_row(zs, zt, group, temperature, primary_weight, binary_weight)
    per_row = nan_rows_where(undefined, per_row, zs)
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)
