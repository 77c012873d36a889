"""The losses as a user writes them in plain PyTorch: the baselines of the benchmarks.

kdfast's own reference (``kdfast.distill_loss(..., backend="torch")``) validates
its options, guards masked entries (``0 log 0``) and all ``-inf`` rows, and is
written to be an oracle; nobody writes that in a training loop.  What people do
write is a few lines of ``log_softmax`` / ``softmax`` / ``logsumexp`` and
``F.kl_div``, e.g. Hinton's KD::

    F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean") * T**2

That is what ``eager`` (and, compiled, ``compile``) means in the benchmarks.
Every form here computes the same value as kdfast's reference for the same
options (the tests check values and gradients in float64):

* the soft-max's are taken in float32 (``dtype=torch.float32``, float64 for
  float64 logits), the idiom of careful training code (e.g. DistiLLM's): a
  bf16 ``log_softmax`` would round the loss to 8 bits, and kdfast accumulates
  in float32;
* the divergences follow the usual open-source forms: JSD as TRL's
  ``generalized_jsd_loss`` (the mixture as a ``logsumexp`` of a stack, then two
  ``kl_div``), the skewed KLs as DistiLLM's (its mixture formed the same way,
  in log space rather than as ``log`` of a sum of probabilities, which float32
  can underflow), Renyi and alpha-beta from their definitions;
* the weightings: WTTM's ``U_{1/T}(softmax(t)) = sum softmax(t) ** (1/T)``
  and the entropy weight ``1 - H(softmax(t)) / log V``.

Rows are batch-meaned (``reduction="batchmean"``, no labels): the benchmarks'
setting.  DIST and correlation matching have no simpler form than kdfast's
references (``kdfast.reference.correlation`` already *is* torchdistill's DIST
and the CMKD formula), so :func:`plain_other_loss` returns those; DKD's plain
form is mdistiller's ``dkd_loss`` (masking the target with ``-1000``); Grouped
KD's is the authors' released ``gkd_loss`` written the same way, with each
row's primary group found by a sort and a cumulative sum
(:func:`grouped_kd_plain`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["plain_loss", "plain_other_loss", "plain_topk_loss", "plain_topk_bucket_rows", "dkd_mdistiller",
           "grouped_kd_plain", "DIVERGENCE_ROWS"]


def _kl_rows(log_target, log_input):
    """``sum exp(log_target) (log_target - log_input)`` per row, as ``F.kl_div`` computes it."""
    return F.kl_div(log_input, log_target, reduction="none", log_target=True).sum(-1)


def _log_mixture(log_a, log_b, weight_a):
    """``log(w a + (1 - w) b)``, as TRL's ``generalized_jsd_loss`` forms JSD's mixture (a logsumexp of a stack)."""
    log_w = math.log(weight_a) if weight_a > 0 else -math.inf
    log_1mw = math.log1p(-weight_a) if weight_a < 1 else -math.inf
    return torch.logsumexp(torch.stack([log_a + log_w, log_b + log_1mw]), dim=0)


def kl(log_p, log_q):
    """Forward KL ``KL(p || q)``: teacher ``p``, student ``q``."""
    return _kl_rows(log_p, log_q)


def reverse_kl(log_p, log_q):
    """``KL(q || p)``."""
    return _kl_rows(log_q, log_p)


def jsd(log_p, log_q, beta=0.5):
    """Generalised JSD: ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``."""
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * _kl_rows(log_p, log_m) + (1 - beta) * _kl_rows(log_q, log_m)


def tvd(log_p, log_q):
    """Total variation ``0.5 sum |p - q|``."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def hellinger(log_p, log_q):
    """Squared Hellinger distance ``sum (sqrt p - sqrt q)^2``."""
    return (log_p.exp().sqrt() - log_q.exp().sqrt()).square().sum(-1)


def renyi(log_p, log_q, alpha=0.5):
    """Renyi divergence ``log sum p^alpha q^(1 - alpha) / (alpha - 1)``."""
    return torch.logsumexp(alpha * log_p + (1 - alpha) * log_q, -1) / (alpha - 1)


def ab(log_p, log_q, alpha=0.5, beta=0.5):
    """Alpha-beta divergence ``-1/(a b) sum [p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)]``."""
    s = alpha + beta
    inner = (alpha * log_p + beta * log_q).exp() - alpha / s * (s * log_p).exp() - beta / s * (s * log_q).exp()
    return -inner.sum(-1) / (alpha * beta)


def skew_kl(log_p, log_q, skew=0.1):
    """DistiLLM's skew KL ``KL(p || skew p + (1 - skew) q)``."""
    return _kl_rows(log_p, _log_mixture(log_p, log_q, skew))


def skew_reverse_kl(log_p, log_q, skew=0.1):
    """DistiLLM's skew reverse KL ``KL(q || (1 - skew) p + skew q)``."""
    return _kl_rows(log_q, _log_mixture(log_p, log_q, 1 - skew))


# divergence name -> (per-row function of (log p, log q, **params), the parameter names it takes)
DIVERGENCE_ROWS = {
    "kl": (kl, ()),
    "reverse_kl": (reverse_kl, ()),
    "jsd": (jsd, ("beta",)),
    "tvd": (tvd, ()),
    "renyi": (renyi, ("alpha",)),
    "ab": (ab, ("alpha", "beta")),
    "skew_kl": (skew_kl, ("skew",)),
    "skew_reverse_kl": (skew_reverse_kl, ("skew",)),
    "hellinger": (hellinger, ()),
}


def wttm_weight(teacher_logits, temperature):
    """WTTM's ``U_{1/T}(softmax(t)) = sum softmax(t) ** (1/T)`` per row."""
    return teacher_logits.softmax(-1).pow(1 / temperature).sum(-1)


def entropy_weight(teacher_logits):
    """``1 - H(softmax(t)) / log V`` per row."""
    log_p1 = teacher_logits.log_softmax(-1)
    entropy = -(log_p1.exp() * log_p1).sum(-1)
    return 1 - entropy / math.log(teacher_logits.shape[-1])


def plain_loss(student_logits, teacher_logits, *, divergence="kl", temperature=1.0, student_temperature=None,
               scale=1.0, weighting=None, alpha=None, beta=None, skew=None):
    """``scale * mean over rows of w * D(softmax(t / T) || softmax(s / T_s))``: the options of ``distill_loss``.

    Takes the keyword arguments of ``kdfast.distill_loss`` that the benchmarks
    use (``weighting`` None, ``"wttm"`` or ``"entropy"``; a divergence's
    parameters default as kdfast's do) and returns the same batchmean value.
    """
    rows_of, names = DIVERGENCE_ROWS[divergence]
    given = {"alpha": alpha, "beta": beta, "skew": skew}
    params = {name: given[name] for name in names if given[name] is not None}
    acc = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    T_s = temperature if student_temperature is None else student_temperature
    log_p = F.log_softmax(teacher_logits / temperature, -1, dtype=acc)
    log_q = F.log_softmax(student_logits / T_s, -1, dtype=acc)
    rows = rows_of(log_p, log_q, **params)
    if weighting == "wttm":
        rows = wttm_weight(teacher_logits.to(acc), temperature) * rows
    elif weighting == "entropy":
        rows = entropy_weight(teacher_logits.to(acc)) * rows
    elif weighting is not None:
        raise ValueError(f"plain_loss takes weighting None, 'wttm' or 'entropy', got {weighting!r}")
    return rows.mean() * scale


def label_revision_plain(student_logits, teacher_logits, target, temperature=2.0, eta=0.9):
    """KD with Label Revision (Lan et al., 2024) as a PyTorch pre-pass: ``T^2 KL(p' || q)``, batchmean.

    ``p = softmax(t / T)``; on the rows whose teacher is wrong (label logit below
    the row's maximum) ``p' = beta p + (1 - beta) onehot``,
    ``beta = eta / (1 + p_max - p_label)``; then Hinton's KD on ``p'``.
    """
    acc = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    t = teacher_logits.to(acc)
    p = F.softmax(t / temperature, -1)
    onehot = F.one_hot(target, t.shape[-1]).to(acc)
    p_label = (p * onehot).sum(-1, keepdim=True)
    p_max = p.max(-1, keepdim=True).values
    wrong = (t * onehot).sum(-1, keepdim=True) < t.max(-1, keepdim=True).values
    beta = torch.where(wrong, eta / (1.0 + p_max - p_label), torch.ones_like(p_max))
    revised = beta * p + (1.0 - beta) * onehot
    log_q = F.log_softmax(student_logits.to(acc) / temperature, -1)
    return F.kl_div(log_q, revised, reduction="batchmean") * temperature**2


def _cat_mask(probs, gt_mask, other_mask):
    """mdistiller's ``cat_mask``: each row's probability of the target and of the rest, ``(N, 2)``."""
    return torch.cat([(probs * gt_mask).sum(1, keepdim=True), (probs * other_mask).sum(1, keepdim=True)], 1)


def dkd_mdistiller(student_logits, teacher_logits, target, temperature=4.0, alpha=1.0, beta=8.0):
    """Decoupled KD as mdistiller writes it (``alpha TCKD + beta NCKD``, ``T^2``, batchmean); no ignored labels."""
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    s, t = student_logits.to(acc) / temperature, teacher_logits.to(acc) / temperature
    gt_mask = F.one_hot(target, s.shape[-1]).bool()
    other_mask = ~gt_mask
    log_pred_student = torch.log(_cat_mask(F.softmax(s, 1), gt_mask, other_mask))
    pred_teacher = _cat_mask(F.softmax(t, 1), gt_mask, other_mask)
    tckd = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(t - 1000.0 * gt_mask, 1)
    log_pred_student_part2 = F.log_softmax(s - 1000.0 * gt_mask, 1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def grouped_kd_plain(student_logits, teacher_logits, target, temperature=4.0, primary_mass=0.93, primary_weight=4.0,
                     binary_weight=1.0, group_temperature=1.0):
    """Grouped KD as its authors write it (github.com/WisonZ/GKD, ``gkd_loss``), batchmean, no ignored labels.

    The primary group of each row: sort the teacher's softmax at
    ``group_temperature``, take the classes whose cumulative probability
    reaches ``primary_mass`` (ties at the threshold included, as in
    ``kdfast.grouped_kd_loss``) and the target.  Then the released code's
    Binary-KD (``cat_mask`` of the group and the rest) and Primary-KD (the rest
    masked with ``-1000``), times ``T^2``, over the batch size.
    """
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    s, t = student_logits.to(acc), teacher_logits.to(acc)
    probs = F.softmax(t / group_temperature, 1)
    sorted_probs = probs.sort(1, descending=True).values
    cumulative = sorted_probs.cumsum(1)
    last = (cumulative < primary_mass * cumulative[:, -1:]).sum(1, keepdim=True).clamp(max=t.shape[1] - 1)
    hard_mask = (probs >= sorted_probs.gather(1, last)) | F.one_hot(target, t.shape[1]).bool()
    nhard_mask = ~hard_mask
    s, t = s / temperature, t / temperature
    log_pred_student = torch.log(_cat_mask(F.softmax(s, 1), hard_mask, nhard_mask))
    pred_teacher = _cat_mask(F.softmax(t, 1), hard_mask, nhard_mask)
    binary = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_hard = F.softmax(t - 1000.0 * nhard_mask, 1)
    log_pred_student_hard = F.log_softmax(s - 1000.0 * nhard_mask, 1)
    primary = F.kl_div(log_pred_student_hard, pred_teacher_hard, reduction="sum") * temperature**2 / target.shape[0]
    return binary_weight * binary + primary_weight * primary


def ltkd_plain(student_logits, teacher_logits, groups, temperature=4.0):
    """Long-tailed KD written in plain PyTorch, batchmean: group masses by ``index_add``, the batch-rebalanced
    inter-group KL and the within-group KLs weighted uniformly (``kdfast.ltkd_loss``'s defaults).

    Per group, the within-group log-probabilities are the log-softmax of the
    logits with the other groups masked to ``-inf`` (``0 log 0`` taken as 0).
    """
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    s, t = student_logits.to(acc) / temperature, teacher_logits.to(acc) / temperature
    log_p, log_q = F.log_softmax(t, 1), F.log_softmax(s, 1)
    G = int(groups.max()) + 1
    member = F.one_hot(groups, G).T.bool()  # (G, V)
    big_p = torch.zeros(s.shape[0], G, dtype=acc, device=s.device).index_add_(1, groups, log_p.exp())
    big_q = torch.zeros(s.shape[0], G, dtype=acc, device=s.device).index_add_(1, groups, log_q.exp())
    target = big_p / big_p.mean(0, keepdim=True)
    target = target / target.sum(1, keepdim=True)
    inter = F.kl_div(big_q.log(), target, reduction="batchmean")
    intra = 0.0
    for g in range(G):
        masked_t = t.masked_fill(~member[g], float("-inf"))
        masked_s = s.masked_fill(~member[g], float("-inf"))
        p_g = F.softmax(masked_t, 1)
        intra = intra + (p_g * (F.log_softmax(masked_t, 1) - F.log_softmax(masked_s, 1))).nan_to_num().sum(1).mean()
    return temperature**2 * (inter + intra)


def plain_topk_loss(student_logits, topk_indices, topk_logprobs, *, tail="renormalize", temperature=1.0, scale=1.0):
    """KL against a teacher's cached top-k log-probabilities, batchmean: ``topk_distill_loss``'s two tails.

    What offline-distillation code writes, with the same value as
    ``topk_distill_loss(..., tail=tail)``:

    * ``"renormalize"``: gather the student's logits at the teacher's top-k
      indices, ``log_softmax`` both rows over those ``k`` entries,
      ``F.kl_div``.  Gathering before the soft-max touches ``k`` entries, not
      ``V``: the cheap way to this value.
    * ``"bucket"``: :func:`plain_topk_bucket_rows`, then ``F.kl_div``.
    """
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    if tail == "bucket":
        log_q, log_p = plain_topk_bucket_rows(student_logits, topk_indices, topk_logprobs, temperature)
    elif tail == "renormalize":
        log_q = F.log_softmax(student_logits.gather(-1, topk_indices).to(acc) / temperature, -1)
        log_p = F.log_softmax(topk_logprobs.to(acc) / temperature, -1)
    else:
        raise ValueError(f"plain_topk_loss takes tail 'renormalize' or 'bucket', got {tail!r}")
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * scale


def plain_topk_bucket_rows(student_logits, topk_indices, topk_logprobs, temperature=1.0):
    """The student's and the teacher's ``k + 1`` log-probabilities of the bucket tail, as a user forms them.

    The student: ``log_softmax`` over the full vocabulary, its ``k`` entries
    gathered, and the rest of its mass as the ``k + 1``-th outcome, the
    ``logsumexp`` of the complement (the support masked with ``-inf``).  The
    teacher: its top-k log-probabilities and ``log1p(-sum p)`` (the sum clamped
    at 1 against rounding), tempered as ``k + 1`` outcomes, as kdfast does.  An
    empty teacher bucket (``k = V``) gives ``0 * -inf = NaN`` in ``F.kl_div``:
    like most such code, this one does not guard it.
    """
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    log_q_all = F.log_softmax(student_logits.to(acc) / temperature, -1)
    log_q_rest = torch.logsumexp(log_q_all.scatter(-1, topk_indices, -math.inf), -1, keepdim=True)
    log_q = torch.cat([log_q_all.gather(-1, topk_indices), log_q_rest], -1)
    top = topk_logprobs.to(acc)
    rest = torch.log1p(-top.exp().sum(-1, keepdim=True).clamp(max=1.0))
    log_p = F.log_softmax(torch.cat([top, rest], -1) / temperature, -1)
    return log_q, log_p


def plain_other_loss(loss: str):
    """The plain form of ``dist`` / ``correlation`` (kdfast's references: there is none simpler) or ``dkd``."""
    if loss == "dkd":
        return dkd_mdistiller
    from kdfast.reference.correlation import correlation_loss_reference, dist_loss_reference

    return {"dist": dist_loss_reference, "correlation": correlation_loss_reference}[loss]
