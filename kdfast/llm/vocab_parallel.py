"""The distillation loss for vocabulary-parallel (tensor-parallel) LM heads.

When the LM heads are sharded by vocabulary, rank ``r`` of ``process_group``
holds the logits of the columns ``[start_r, start_r + V_r)`` of every token,
shards in rank order, possibly of unequal sizes.  ``vocab_parallel_distill_loss``
returns ``kdfast.distill_loss`` of the full (concatenated) logits, the same value
on every rank, and a gradient for the local student shard, without ever
gathering logits: only per-row quantities cross ranks.

Why every loss of docs/contract.md decomposes over shards: once the global softmax
normalisers (logsumexps) are known, ``log p`` and ``log q`` of a shard are local,
and every divergence except Renyi is a row sum of an elementwise function of
``(log p_v, log q_v)`` -- so the reference's own divergence applied to a shard is
that shard's share of the row sum.  Renyi is ``log`` of such a sum.  The
weightings need global row statistics of the teacher, and the cross-entropy the
label's logit, which lives on exactly one rank.

Communication per call, for ``N`` rows: one all-gather of 3 integers per rank
(the layout: row count, shard size, and whether the rank's arguments are valid),
then all-reduces of ``(N, k)`` tensors with ``k <= 4``: MAX of row maxima, SUM of
exponential sums, [Renyi: MAX and SUM of its own terms], SUM of the divergence's
partial sums (with the entropy and label-logit shares).  The backward all-reduces
the gradients of the SUMs once more.

Caller's contract (not checked, it would cost communicating them): ``labels``, a
weighting tensor and the options are the same on every rank.  The arithmetic is
PyTorch operations on the shard (the reference's formulas), not a fused kernel.

Gradient: built by composing differentiable pieces (autograd does the chain
rule) rather than a hand-written backward.  The one subtle point is that the
loss is *replicated*: every rank holds the same value and runs its own backward.
The backward of a SUM all-reduce is a SUM all-reduce of the gradients (each
rank's gradient of a replicated quantity is only that rank's share when it comes
from local shard terms), which counts the replicated part of the graph once per
rank; the loss therefore passes its gradient on divided by ``W``.  Together this
is exactly the gradient of ``mean over ranks of the loss``, i.e. of the loss.
All ranks must run the forward and the backward (it communicates) in the same
order, as for any tensor-parallel layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .. import reference
from ..config import LossConfig, make_config, takes_loss_options
from ..registry import divergence_spec

__all__ = ["vocab_parallel_distill_loss"]


# ----------------------------------------------------------------- collectives with gradients
class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` whose backward all-reduces the gradient (each rank holds a share of it)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad = grad_total.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _ReplicatedLoss(torch.autograd.Function):
    """Identity whose backward divides by the world size.

    The loss exists once per rank; with ``_SumOverRanks`` adding the gradients of
    all ranks, each rank's copy must enter the graph with weight ``1 / W`` for
    the replicated part of the computation to count once (see the module doc).
    """

    @staticmethod
    def forward(ctx, loss, world_size):
        ctx.world_size = world_size
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        return grad_loss / ctx.world_size, None


def _max_over_ranks(tensor: torch.Tensor, group) -> torch.Tensor:
    """Elementwise maximum over ranks (no gradient: it only shifts exponentials)."""
    result = tensor.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(result, op=dist.ReduceOp.MAX, group=group)
    return result


def _global_logsumexps(rows: List[torch.Tensor], group) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logsumexp over the full vocabulary of each ``(N, V_r)`` shard in ``rows``.

    Returns ``(lse, maxima)``, both ``(N, len(rows))``; ``maxima`` are the global
    row maxima (``-inf`` for a row that is ``-inf`` on every rank).  All terms
    share one MAX and one SUM all-reduce.  The shift by the global maximum is a
    constant to autograd (the logsumexp does not depend on it); a shard whose
    row is all ``-inf`` contributes ``exp(-inf) = 0`` with a zero gradient,
    unlike a local ``torch.logsumexp`` whose backward is NaN on such a row.
    """
    maxima = _max_over_ranks(torch.stack([x.detach().amax(-1) for x in rows], -1), group)
    # A row that is -inf on every rank would give -inf - -inf = NaN: shift it by 0
    # instead; its sum is 0 and its logsumexp -inf (callers reject such rows).
    shift = torch.where(torch.isfinite(maxima), maxima, torch.zeros_like(maxima))
    sums = torch.stack([(x - shift[:, i, None]).exp().sum(-1) for i, x in enumerate(rows)], -1)
    return shift + _SumOverRanks.apply(sums, group).log(), maxima


# ----------------------------------------------------------------- the layout of the shards
@dataclass(frozen=True)
class _ShardLayout:
    """Where this rank's columns sit in the full vocabulary."""

    rank: int
    world_size: int
    start: int  # first global column of this shard
    vocab_size: int  # V_total, the sum of the shard sizes


def _shard_layout(local_rows: int, local_vocab: int, local_error: Optional[Exception], device, group) -> _ShardLayout:
    """Gather ``(error?, N, V_r)`` of every rank in one all-gather and check them.

    Every rank raises the same way when any rank's arguments are bad, instead of
    the good ranks waiting forever in the next collective.
    """
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group")
    mine = torch.tensor([int(local_error is not None), local_rows, local_vocab], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine, group=group)
    failed, rows, vocab = (list(col) for col in torch.stack(everyone).cpu().T.tolist())
    if local_error is not None:
        raise local_error
    if any(failed):
        bad = [r for r, f in enumerate(failed) if f]
        raise ValueError(f"vocab_parallel_distill_loss got bad arguments on rank(s) {bad} (see the error there)")
    if len(set(rows)) != 1:
        raise ValueError(f"every rank must hold the same rows, got row counts {rows} on ranks 0..{world_size - 1}")
    return _ShardLayout(rank=rank, world_size=world_size, start=sum(vocab[:rank]), vocab_size=sum(vocab))


# ----------------------------------------------------------------- per-row pieces
def _label_logits(student: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                  layout: _ShardLayout) -> torch.Tensor:
    """This shard's share of ``z_s[label]`` per row: the logit where the label is one of its columns, else 0.

    Summed over ranks this is the label logit (exactly one rank holds it).
    """
    local = labels - layout.start
    here = valid & (local >= 0) & (local < student.shape[-1])
    picked = student.gather(-1, torch.where(here, local, 0)[:, None]).squeeze(-1)
    return torch.where(here, picked, torch.zeros_like(picked))


# ----------------------------------------------------------------- the loss
@takes_loss_options(exclude=("backend",))
def vocab_parallel_distill_loss(student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor, *,
                                process_group=None, **options) -> torch.Tensor:
    """``kdfast.distill_loss`` of vocabulary-sharded logits, computed without gathering them.

    Args:
        student_logits_shard, teacher_logits_shard: ``(..., V_r)``, this rank's
            contiguous slice of the vocabulary for every token; rank ``r`` of
            ``process_group`` holds the columns after those of ranks ``0..r-1``.
            Shards may differ in size between ranks, but every rank holds the
            same rows.
        process_group: the ranks sharing the vocabulary (``None``: the default
            group; world size 1 is plain ``distill_loss``).
        options: the options below, exactly as in :func:`kdfast.distill_loss`
            (no backend); ``labels`` are ``N`` *global* vocabulary indices (or
            ``ignore_index``), identical on every rank, as are a weighting
            tensor and the options.

    Returns:
        ``distill_loss`` of the full logits (float32, float64 for float64
        inputs), identical on every rank: a scalar, or ``(N,)`` for
        ``reduction="none"``.  Its gradient reaches the local student shard;
        the backward communicates, so every rank must run it (e.g. each calls
        ``torch.autograd.grad(loss, student_logits_shard)``).

    Raises:
        ValueError: on every rank when the options, shapes or labels of any rank
            are bad (mismatched shard shapes, different row counts across ranks,
            a label outside ``[0, V_total)``, a valid row that is ``-inf``
            over the whole vocabulary), as ``distill_loss`` would.
        TypeError: unsupported dtypes, as ``distill_loss``.
        RuntimeError: ``torch.distributed`` is not initialised.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_distill_loss needs torch.distributed: call "
                           "torch.distributed.init_process_group first (a world of size 1 is fine)")
    local_error, cfg = None, None
    try:
        cfg = make_config(student_logits_shard, teacher_logits_shard, **options)
    except (TypeError, ValueError) as exc:
        local_error = exc
    return _loss_over_ranks(student_logits_shard, teacher_logits_shard, cfg, process_group, local_error)


def vocab_parallel_loss(student_logits_shard: torch.Tensor, teacher_logits_shard: torch.Tensor, cfg: LossConfig,
                        process_group=None) -> torch.Tensor:
    """:func:`vocab_parallel_distill_loss` of options already checked on this rank (the fused linear loss's chunks)."""
    return _loss_over_ranks(student_logits_shard, teacher_logits_shard, cfg, process_group, None)


def _loss_over_ranks(student_logits_shard, teacher_logits_shard, cfg: Optional[LossConfig], group,
                     local_error: Optional[Exception]) -> torch.Tensor:
    """The replicated loss, once every rank knows every rank's layout and whether its arguments are valid."""
    shard = student_logits_shard if isinstance(student_logits_shard, torch.Tensor) else None
    local_vocab = shard.shape[-1] if shard is not None and shard.dim() > 0 else 0
    local_rows = shard.numel() // local_vocab if local_vocab else 0
    layout = _shard_layout(local_rows, local_vocab, local_error,
                           shard.device if shard is not None else torch.device("cpu"), group)
    loss = _sharded_loss(student_logits_shard, teacher_logits_shard, cfg, layout, group)
    return _ReplicatedLoss.apply(loss, layout.world_size)


def _sharded_loss(student_shard: torch.Tensor, teacher_shard: torch.Tensor, cfg: LossConfig,
                  layout: _ShardLayout, group) -> torch.Tensor:
    """This rank's copy of the loss (the same on every rank), given valid arguments."""
    zs, zt, labels, valid = _rows(student_shard, teacher_shard, cfg, layout)
    hard = labels is not None and cfg.hard_weight != 0.0
    tau, tau_s = cfg.temperature, cfg.student_temperature
    # The rows whose softmax normalisers this configuration needs, keyed by
    # (model, temperature): keys coincide when temperatures do (the student at
    # temperature 1 of the cross-entropy is q's when tau_s == 1): computed once.
    scaled = {("teacher", tau): zt / tau, ("student", tau_s): zs / tau_s}
    if cfg.weighting in ("wttm", "entropy"):
        scaled[("teacher", 1.0)] = zt
    if hard:
        scaled[("student", 1.0)] = zs
    normaliser = _normalisers(scaled, valid, cfg, group)
    logp = scaled[("teacher", tau)] - normaliser[("teacher", tau)][:, None]
    logq = scaled[("student", tau_s)] - normaliser[("student", tau_s)][:, None]

    # Row sums that span the shards: this shard's share of each, then one all-reduce.
    shares, soft = {}, None
    if not divergence_spec(cfg.divergence).separable:  # renyi: the log of a sum
        # Its own round of all-reduces (MAX, SUM): the terms need the normalisers first.
        soft = _global_logsumexps([reference.renyi_log_terms(logp, logq, cfg.alpha)], group)[0][:, 0] / (cfg.alpha - 1.0)
    else:
        shares["divergence"] = reference.divergence(cfg.divergence, logp, logq, cfg.alpha, cfg.beta, cfg.skew)
    if cfg.weighting == "entropy":
        logp1 = zt - normaliser[("teacher", 1.0)][:, None]
        # -H(p1) = sum p1 log p1 = KL(p1 || 1): the reference's masked p log p (0 log 0 = 0).
        shares["neg_entropy"] = reference.kl(logp1, torch.zeros_like(logp1))
    if hard:
        shares["label_logit"] = _label_logits(zs, labels, valid, layout)
    # NaN in, NaN out (docs/contract.md): a NaN or +inf logit on any rank's shard makes the row NaN
    # on every rank; the count rides in the same all-reduce as the row sums.
    shares["undefined"] = (reference.nan_or_posinf_rows(zt) | reference.nan_or_posinf_rows(zs)).to(zs.dtype)
    totals = _sum_rows_over_ranks(shares, group)

    if soft is None:
        soft = totals["divergence"]
    per_row = cfg.soft_weight * cfg.scale * _row_weights(cfg, normaliser, totals, layout, soft.dtype) * soft
    if hard:
        # Cross-entropy of the student at temperature 1: logsumexp(z_s) - z_s[label].
        per_row = per_row + cfg.hard_weight * (normaliser[("student", 1.0)] - totals["label_logit"])
    per_row = reference.nan_rows_where(valid & (totals["undefined"] > 0), per_row, zs)
    return reference.reduce_rows(per_row, valid, cfg)


def _rows(student_shard: torch.Tensor, teacher_shard: torch.Tensor, cfg: LossConfig, layout: _ShardLayout):
    """``(z_s, z_t, labels, valid)``: ``(N, V_r)`` rows in the accumulation dtype, labels and the valid-row mask."""
    V_r = student_shard.shape[-1]
    acc = reference.accumulation_dtype(student_shard, teacher_shard)
    zs = student_shard.reshape(-1, V_r).to(acc)
    zt = teacher_shard.detach().reshape(-1, V_r).to(acc)
    if cfg.labels is None:
        return zs, zt, None, torch.ones(zs.shape[0], dtype=torch.bool, device=zs.device)
    labels = cfg.labels.reshape(-1).long()
    valid = labels != cfg.ignore_index
    reference.check_labels(labels, valid, layout.vocab_size, cfg.ignore_index)
    # As in the reference: ignored rows become zeros so that nothing in them
    # (garbage, all -inf rows) can reach the value or the gradient.
    zs = torch.where(valid[:, None], zs, torch.zeros_like(zs))
    zt = torch.where(valid[:, None], zt, torch.zeros_like(zt))
    return zs, zt, labels, valid


def _normalisers(scaled: Dict[Tuple[str, float], torch.Tensor], valid: torch.Tensor, cfg: LossConfig,
                 group) -> Dict[Tuple[str, float], torch.Tensor]:
    """The global logsumexp of each row block of ``scaled``, under the same key.

    Rejects, as the reference does, valid rows of p or q that are ``-inf`` over
    the whole vocabulary.
    """
    keys = list(scaled)
    lse, maxima = _global_logsumexps([scaled[k] for k in keys], group)
    # A row is -inf over the whole vocabulary where its global maximum is: the reference's check of those.
    teacher, student = (keys.index(key) for key in (("teacher", cfg.temperature), ("student", cfg.student_temperature)))
    reference.check_rows_defined(maxima[:, teacher, None], maxima[:, student, None], valid)
    return {k: lse[:, i] for i, k in enumerate(keys)}


def _sum_rows_over_ranks(shares: Dict[str, torch.Tensor], group) -> Dict[str, torch.Tensor]:
    """Each named ``(N,)`` share summed over the ranks, all in one all-reduce."""
    if not shares:
        return {}
    totals = _SumOverRanks.apply(torch.stack(list(shares.values()), -1), group)
    return dict(zip(shares, totals.unbind(-1)))


def _row_weights(cfg: LossConfig, normaliser, totals, layout: _ShardLayout, dtype) -> Union[float, torch.Tensor]:
    """The per-row weight ``w_i`` of the divergence (no gradient: it depends on the teacher only)."""
    if cfg.weighting == "wttm":
        tau = cfg.temperature
        return reference.wttm_weight_from_logsumexps(normaliser[("teacher", tau)], normaliser[("teacher", 1.0)], tau)
    if cfg.weighting == "entropy":
        return reference.entropy_weight_from_entropy(-totals["neg_entropy"], layout.vocab_size)
    if isinstance(cfg.weighting, torch.Tensor):
        return cfg.weighting.reshape(-1).to(dtype)
    return 1.0
