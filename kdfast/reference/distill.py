"""The reference backend: every formula of docs/contract.md in plain PyTorch.

Written to be read and to be the oracle of the tests: one short function per
formula, log-space throughout, differentiable (float64 gradcheck), and no
cleverness.  It is also the fallback on devices without a fused kernel.

Masked vocabulary entries (-inf logits) are legal, so every ``p log p``-style
product goes through ``_plogratio``, which makes ``0 * log 0 == 0`` in the value
*and* keeps the gradient finite (the masked branch never sees an infinity).
"""

from __future__ import annotations

import math

import torch

from ..config import LossConfig
from ..registry import divergence_spec


def _masked(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, x, torch.zeros_like(x))


def _plogratio(keep: torch.Tensor, w: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Row sums of ``w * (log_a - log_b)`` over the entries where ``keep``."""
    return _masked(keep, w * (_masked(keep, log_a) - _masked(keep, log_b))).sum(-1)


def _log_mixture(logp: torch.Tensor, logq: torch.Tensor, w_p: float, w_q: float) -> torch.Tensor:
    """``log(w_p p + w_q q)`` through logaddexp; finite wherever p or q is positive.

    A weight of 0 leaves the other side alone (``log w + log x``): logaddexp's gradient at two ``-inf``
    operands is NaN, and with a zero weight every entry where that side's distribution is 0 would be one.
    """
    if w_q == 0:
        return logp + math.log(w_p)
    if w_p == 0:
        return logq + math.log(w_q)
    some = (logp > -math.inf) | (logq > -math.inf)
    lp, lq = logp + math.log(w_p), logq + math.log(w_q)
    return torch.logaddexp(_masked(some, lp), _masked(some, lq)).where(some, lp)


# ----------------------------------------------------------------- divergences
def kl(logp, logq):
    """``sum p (log p - log q)``"""
    p = logp.exp()
    return _plogratio(p > 0, p, logp, logq)


def reverse_kl(logp, logq):
    """``sum q (log q - log p)``"""
    return kl(logq, logp)


def jsd(logp, logq, beta):
    """``beta KL(p||m) + (1-beta) KL(q||m)``, ``m = beta p + (1-beta) q``"""
    logm = _log_mixture(logp, logq, beta, 1.0 - beta)
    p, q = logp.exp(), logq.exp()
    return beta * _plogratio(p > 0, p, logp, logm) + (1.0 - beta) * _plogratio(q > 0, q, logq, logm)


def tvd(logp, logq):
    """``0.5 sum |p - q|``"""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def renyi_log_terms(logp, logq, alpha):
    """The entries ``alpha log p + (1-alpha) log q`` of Renyi's logsumexp; ``-inf`` where p = 0 (they add nothing)."""
    return torch.where(logp > -math.inf, alpha * logp + (1.0 - alpha) * logq, torch.full_like(logp, -math.inf))


def renyi(logp, logq, alpha):
    """``logsumexp(alpha log p + (1-alpha) log q) / (alpha - 1)``; entries with p = 0 add nothing."""
    return torch.logsumexp(renyi_log_terms(logp, logq, alpha), dim=-1) / (alpha - 1.0)


def ab(logp, logq, alpha, beta):
    """``-1/(a b) sum [p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)]``"""
    s = alpha + beta
    inner = (alpha * logp + beta * logq).exp() - alpha / s * (s * logp).exp() - beta / s * (s * logq).exp()
    return -inner.sum(-1) / (alpha * beta)


def skew_kl(logp, logq, skew):
    """``KL(p || skew p + (1-skew) q)``"""
    logm = _log_mixture(logp, logq, skew, 1.0 - skew)
    p = logp.exp()
    return _plogratio(p > 0, p, logp, logm)


def skew_reverse_kl(logp, logq, skew):
    """``KL(q || (1-skew) p + skew q)``"""
    logm = _log_mixture(logp, logq, 1.0 - skew, skew)
    q = logq.exp()
    return _plogratio(q > 0, q, logq, logm)


def hellinger(logp, logq):
    """``sum (sqrt p - sqrt q)^2``, the squared Hellinger distance (an f-divergence; 0 <= H^2 <= 2)"""
    return ((0.5 * logp).exp() - (0.5 * logq).exp()).square().sum(-1)


# One formula per name of kdfast.registry's table (tests/test_registry.py checks the two agree).
FORMULAS = {
    "kl": kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
    "renyi": renyi,
    "ab": ab,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "hellinger": hellinger,
}


def divergence(name: str, logp, logq, alpha=None, beta=None, skew=None):
    """``D(p || q)`` per row for a (validated) divergence name, with the parameters its table entry names."""
    given = {"alpha": alpha, "beta": beta, "skew": skew}
    params = {p.name: given[p.name] for p in divergence_spec(name).params}
    return FORMULAS[name](logp, logq, **params)


# ----------------------------------------------------------------- weights
def wttm_weight_from_logsumexps(lse_tau, lse_1, temperature):
    """``U_{1/T}`` from ``logsumexp(z_t / T)`` and ``logsumexp(z_t)``: ``exp(lse_tau - lse_1 / T)``."""
    return torch.exp(lse_tau - lse_1 / temperature)


def wttm_weight(teacher_logits, temperature):
    """``U_{1/T}(softmax(z_t)) = exp(logsumexp(z_t / T) - logsumexp(z_t) / T)``"""
    return wttm_weight_from_logsumexps(torch.logsumexp(teacher_logits / temperature, -1),
                                       torch.logsumexp(teacher_logits, -1), temperature)


def entropy_weight_from_entropy(entropy, V: int):
    """``1 - H / log V``, and 1 when V = 1 (a single class is certain)."""
    return torch.ones_like(entropy) if V == 1 else 1.0 - entropy / math.log(V)


def entropy_weight(teacher_logits):
    """``1 - H(softmax(z_t)) / log V`` (1 when V = 1: a single class is certain)."""
    logp1 = torch.log_softmax(teacher_logits, -1)
    p1 = logp1.exp()
    entropy = -_plogratio(p1 > 0, p1, logp1, torch.zeros_like(logp1))
    return entropy_weight_from_entropy(entropy, teacher_logits.shape[-1])


def given_weight(teacher_logits, temperature, weights):
    """The caller's row weights (a constant: no gradient flows into them)."""
    return weights.detach().reshape(-1).to(teacher_logits.dtype)


# One formula per weighting of kdfast.registry's table, each of (teacher logits, temperature, given weights)
# (tests/test_registry.py checks the two agree).
WEIGHT_FORMULAS = {
    "none": lambda teacher_logits, temperature, weights: torch.ones_like(teacher_logits[..., 0]),
    "wttm": lambda teacher_logits, temperature, weights: wttm_weight(teacher_logits, temperature),
    "entropy": lambda teacher_logits, temperature, weights: entropy_weight(teacher_logits),
    "given": given_weight,
}


# ----------------------------------------------------------------- label revision
def revise_teacher_log_probs(logp: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                             valid: torch.Tensor, eta: float) -> torch.Tensor:
    """Label Revision (Lan et al., 2024): ``log p'``, ``p' = beta p + (1 - beta) y`` on the rows the teacher gets wrong.

    ``logp`` is the teacher's ``log softmax(z_t / tau)``; a row is *wrong* when its
    label logit is below the row's maximum (``z_t[label] < max z_t``: the label
    is not among the teacher's top classes; a tie at the top is right).  There
    ``beta = eta / (1 + p_max - p_label)`` (the paper's choice, which keeps
    ``beta < 1 / (1 + p_max - p_label)`` so that the label becomes the unique
    top class) and::

        log p'_j = log beta + log p_j            (j != label; -inf stays -inf)
        log p'_label = log(beta p_label + 1 - beta)

    Right rows and invalid rows (``valid`` False) keep ``logp`` exactly.
    The teacher is a constant, so nothing here needs a gradient.
    """
    safe = torch.where(valid, labels, 0)[:, None]
    z_label = teacher_logits.gather(-1, safe).squeeze(-1)
    wrong = valid & (z_label < teacher_logits.max(-1).values)
    p_label = logp.gather(-1, safe).squeeze(-1).exp()
    p_max = logp.max(-1).values.exp()
    beta = eta / (1.0 + p_max - p_label)
    log_beta = torch.where(wrong, beta.log(), torch.zeros_like(beta))
    revised = logp + log_beta[:, None]
    log_label = torch.where(wrong, torch.log(beta * p_label + (1.0 - beta)), logp.gather(-1, safe).squeeze(-1))
    is_label = torch.arange(logp.shape[-1], device=logp.device)[None, :] == safe
    return torch.where(is_label & wrong[:, None], log_label[:, None], torch.where(wrong[:, None], revised, logp))


def cross_entropy(student_logits, labels):
    """``-log softmax(z_s)[label]`` per row (labels already valid)."""
    return -torch.log_softmax(student_logits, -1).gather(-1, labels[:, None]).squeeze(-1)


# ----------------------------------------------------------------- the general loss
def accumulation_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def distill_loss_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, cfg: LossConfig):
    """``hard_weight * reduce(CE) + soft_weight * scale * reduce(w * D(p || q))``

    Rows are flattened to ``(N, V)`` and computed in float32 (float64 for float64
    inputs); the result has that dtype.  Ignored rows (label == ignore_index)
    contribute nothing and get a zero gradient.
    """
    V = student_logits.shape[-1]
    acc = accumulation_dtype(student_logits, teacher_logits)
    zs = student_logits.reshape(-1, V).to(acc)
    zt = teacher_logits.detach().reshape(-1, V).to(acc)
    N = zs.shape[0]

    if cfg.labels is not None:
        labels = cfg.labels.reshape(-1).long()
        valid = labels != cfg.ignore_index
        check_labels(labels, valid, V, cfg.ignore_index)
        # Ignored rows are replaced by zeros so that nothing in them (garbage,
        # all -inf rows) can reach the value or the gradient.
        zs = torch.where(valid[:, None], zs, torch.zeros_like(zs))
        zt = torch.where(valid[:, None], zt, torch.zeros_like(zt))
    else:
        labels = None
        valid = torch.ones(N, dtype=torch.bool, device=zs.device)
    check_rows_defined(zt, zs, valid)
    undefined = valid & (nan_or_posinf_rows(zt) | nan_or_posinf_rows(zs))

    logp = torch.log_softmax(zt / cfg.temperature, -1)
    if cfg.label_revision is not None:
        # make_config saw to the labels; the rows with a NaN/+inf teacher are NaN anyway.
        logp = revise_teacher_log_probs(logp, zt, labels, valid & ~undefined, cfg.label_revision)
    logq = torch.log_softmax(zs / cfg.student_temperature, -1)
    soft = divergence(cfg.divergence, logp, logq, cfg.alpha, cfg.beta, cfg.skew)
    if cfg.weighting is not None:
        soft = WEIGHT_FORMULAS[cfg.weighting_name](zt, cfg.temperature, cfg.weighting) * soft
    per_row = cfg.soft_weight * cfg.scale * soft
    if labels is not None and cfg.hard_weight != 0.0:
        per_row = per_row + cfg.hard_weight * cross_entropy(zs, torch.where(valid, labels, 0))
    return reduce_rows(nan_rows_where(undefined, per_row, zs), valid, cfg)


def nan_or_posinf_rows(z: torch.Tensor) -> torch.Tensor:
    """Rows of ``z`` with a NaN or a ``+inf`` entry: no distribution, so the contract makes them NaN."""
    return (torch.isnan(z) | torch.isposinf(z)).any(-1)


def nan_rows_where(undefined: torch.Tensor, per_row: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
    """``per_row`` with NaN on the ``undefined`` rows, whose gradient is then NaN in every entry of ``zs``.

    Masks inside the formulas (``0 log 0 = 0``) would otherwise turn a NaN into
    a 0 that hides it; NaN in, NaN out is what every backend does.
    """
    nan_on_undefined = torch.where(undefined, math.nan, 0.0).to(per_row.dtype)
    # where() before the sum: the other rows' entries never meet the NaN (0 * -inf would be NaN).
    return per_row + torch.where(undefined[:, None], zs, torch.zeros_like(zs)).sum(-1) * nan_on_undefined


def reduce_rows(per_row: torch.Tensor, valid: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The reduction of docs/contract.md (section 5): ``cfg.reduction`` / ``normalizer``.

    Ignored rows are 0 and count in no denominator.
    """
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    if cfg.reduction == "none":
        return per_row
    total = per_row.sum()
    if cfg.reduction == "sum":
        return total
    if cfg.normalizer is not None:
        return total / cfg.normalizer
    # No valid row: the total is 0 and so is the loss, never 0/0.
    return total / valid.sum().clamp(min=1)


def check_labels(labels, valid, V, ignore_index):
    if torch.compiler.is_compiling():
        return
    bad = valid & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"label {int(labels[i])} at row {i} is outside [0, {V}) and is not ignore_index ({ignore_index})"
        )


def check_rows_defined(zt, zs, valid):
    if torch.compiler.is_compiling():
        return
    for name, z in (("teacher_logits", zt), ("student_logits", zs)):
        dead = valid & torch.isneginf(z).all(-1)
        if bool(dead.any()):
            i = int(dead.nonzero()[0, 0])
            raise ValueError(f"{name} row {i} is all -inf: the {name.split('_')[0]} distribution is undefined")
