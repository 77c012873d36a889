"""Distillation from a sparse teacher: only its top-k log-probabilities per row are known.

This is offline distillation from a cache (see :mod:`kdfast.llm.cache`): the
teacher ran once, and for every row kept the indices ``S`` of its ``k`` most
likely vocabulary entries and their log-probabilities ``log p1_j`` (teacher at
temperature 1, normalised over the *full* vocabulary).  Two ways to turn that
into a pair of distributions over one common support (docs/contract.md, section 12):

``tail="renormalize"``
    Both models restricted to ``S`` and renormalised there: the teacher
    ``p_j = softmax(log p1_S / tau)_j`` and the student
    ``q_j = softmax(z_s[S] / tau_s)_j``, ``j`` in ``S``.  These are the two
    *conditional* distributions given "the token is in S", so every divergence
    of docs/contract.md is a proper divergence between them (zero iff they agree on S).
    The alternative, the full-vocabulary student against a teacher that is zero
    off ``S``, is not: reverse KL is infinite whenever the student puts any
    mass off ``S`` (always, for finite logits), and forward KL silently adds
    ``-log q(S)``, a term that pushes the student onto the teacher's top-k
    rather than matching the teacher's shape.  That term is what
    ``tail="bucket"`` keeps, explicitly.  The student's logits off ``S`` get no
    gradient in this mode.

``tail="bucket"``
    ``k + 1`` outcomes: the ``k`` entries of ``S`` and one bucket "anything
    else".  The student's bucket holds its exact remaining mass
    ``logsumexp(z_s[not S] / tau_s) - logsumexp(z_s / tau_s)`` (a logsumexp of
    the complement, not ``log(1 - sum)``, so a confident student's tiny tail
    keeps its precision); the teacher's holds ``tail_logprobs`` when given (a
    cache stores this remainder in float32), else ``1 - sum_S p1_j``, computed
    as ``log1mexp(logsumexp(log p1_S))``, exactly empty (``-inf``, never NaN)
    when the top-k already holds all the mass (and always when ``k = V``).
    Both are the full distributions seen through the same coarsening, so for
    the f-divergences ``D`` here is a lower bound of the dense ``D`` (data
    processing inequality), equal to it when the teacher's tail is empty and
    ``D`` is ``kl``.  Every student logit gets a gradient.  With an empty
    teacher bucket and a student that has mass off ``S``, ``reverse_kl`` is
    ``+inf``, exactly as the dense loss is for such a teacher.

Temperature.  The student is exact: ``z_s / tau_s``.  The teacher's rows are
log-probabilities, so its temperature is ``log_softmax(row / tau)`` over the
``k`` (or ``k + 1``) entries: exact for ``"renormalize"`` (tempering commutes
with restriction to ``S``), and for ``"bucket"`` the bucket is tempered as one
outcome because the teacher's mass inside it is unknown (exact at ``tau = 1``;
for ``tau > 1`` a lower bound of the tempered teacher's tail).  Tempering
raises the bucket's mass ``r`` to ``r^(1/tau)``, rounding error included: a
remainder computed from float16 log-probs carries ~1e-3 of error, which is why
``tail_logprobs`` exists.

The divergence values come from :func:`kdfast.reference.divergence` on these
log-probability rows, so every divergence of docs/contract.md is available; masking
(``labels``/``ignore_index``), the hard-label cross-entropy (full student
logits, temperature 1) and the reductions are those of
:func:`kdfast.distill_loss`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import reference
from ..config import LossConfig, check_same_device, check_tensor, make_config, takes_loss_options
from ..modules import OptionsModule

TAILS = ("renormalize", "bucket")
INDEX_DTYPES = (torch.int32, torch.int64)
LOGPROB_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tail(tail) -> None:
    """ValueError unless ``tail`` is one of :data:`TAILS`."""
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")


@takes_loss_options(exclude=("weighting",))
def topk_distill_loss(
    student_logits: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    tail: str = "renormalize",
    tail_logprobs: Optional[torch.Tensor] = None,
    **options,
) -> torch.Tensor:
    """Distillation loss against a teacher known only on its top-k entries per row.

    ``hard_weight * reduce(CE) + soft_weight * scale * reduce(D(p || q))`` where
    ``p`` and ``q`` are the teacher and student over the top-k support (see the
    module docstring for the two ``tail`` modes and why they are built so).

    Args:
        student_logits: ``(..., V)`` float32/bfloat16/float16/float64 logits;
            the only input that gets a gradient.
        topk_indices: ``(..., k)`` int32/int64, the teacher's top-k vocabulary
            entries per row, distinct within a row, in ``[0, V)``; ``1 <= k <= V``.
        topk_logprobs: ``(..., k)`` float16/bfloat16/float32/float64 teacher
            log-probabilities at temperature 1 over the full vocabulary
            (``log_softmax`` then top-k): each ``<= 0`` or ``-inf``, total mass
            ``<= 1`` up to the rounding of their dtype.
        tail: ``"renormalize"`` or ``"bucket"``.
        tail_logprobs: ``(...)`` (one per row), ``tail="bucket"`` only: the
            teacher's log-mass outside its top-k, when it is known more
            precisely than ``log(1 - sum exp(topk_logprobs))`` (a cache stores
            it in float32: see :mod:`kdfast.llm.cache`).  Worth it with float16
            log-probs, whose rounding (~1e-3 of mass) would otherwise be the
            bucket of a confident teacher, raised to the power ``1/tau``.
        options: the options below, as in :func:`kdfast.distill_loss` (no
            weighting); ``temperature`` applies to the log-prob rows; ignored
            rows may hold anything (their indices and log-probs are not
            checked).  ``backend``: ``"torch"`` is the PyTorch form below (the
            oracle); ``"cpu"`` (``"auto"`` on CPU) the fused C++ top-k kernel,
            both tails, the gradient written in the forward
            (:mod:`kdfast.ops.topk`); ``"triton"`` (``"auto"`` on CUDA) runs
            ``tail="renormalize"`` on the dense Triton kernel over the ``k``
            support entries, and ``tail="bucket"`` on the Triton op
            ``kdfast::triton_topk_bucket_forward`` (one sweep of the student
            for its off-support logsumexp, the dense kernel over the ``k + 1``
            outcomes, one sweep writing the gradient in the forward:
            :mod:`kdfast.ops.triton.topk_bucket`).

    Returns:
        float32 (float64 for float64 inputs): a scalar, or ``(N,)`` for
        ``reduction="none"`` (zero on ignored rows).

    Raises:
        ValueError: bad options, shapes or devices; an index out of range or
            repeated within a row; a log-prob that is NaN, +inf or > 0; a row
            whose mass exceeds 1; a valid row whose distribution is undefined
            (all ``-inf``).
        TypeError: non-integer indices, unsupported float dtypes.
    """
    check_tail(tail)
    # The options obey exactly the rules of distill_loss; make_config checks
    # them against a dense teacher of the student's shape, which here is the
    # student itself (only its shape and device are looked at).
    cfg = make_config(student_logits, student_logits, **options)
    check_topk_inputs(student_logits, topk_indices, topk_logprobs, tail_logprobs)
    if tail_logprobs is not None and tail != "bucket":
        raise ValueError(f"tail_logprobs is the teacher's bucket: it needs tail='bucket', got tail={tail!r}")
    if cfg.backend != "torch":
        from ..ops.topk import fused_topk_loss

        loss = fused_topk_loss(student_logits, topk_indices, topk_logprobs, cfg, tail, tail_logprobs)
        if loss is not None:
            return loss
    return topk_loss(student_logits, topk_indices, topk_logprobs, cfg, tail, tail_logprobs)


def topk_loss(student_logits: torch.Tensor, topk_indices: torch.Tensor, topk_logprobs: torch.Tensor,
              cfg: LossConfig, tail: str, tail_logprobs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`topk_distill_loss` of checked options and inputs (the chunks of the fused linear top-k loss).

    ``cfg`` and ``tail`` are valid, and the tensors passed
    :func:`check_topk_inputs`; their values are checked here, row by row.
    """
    V, k = student_logits.shape[-1], topk_indices.shape[-1]
    acc = reference.accumulation_dtype(student_logits, topk_logprobs)
    rows = student_logits.reshape(-1, V)
    idx = topk_indices.reshape(-1, k).long()
    lp = topk_logprobs.detach().reshape(-1, k).to(acc)
    rest = None if tail_logprobs is None else tail_logprobs.detach().reshape(-1, 1).to(acc)
    valid, labels = _valid_rows(cfg, rows.shape[0], V, rows.device)
    hard = labels is not None and cfg.hard_weight != 0.0
    # Full student rows in the accumulation dtype only when something reads
    # them (the bucket, the cross-entropy); renormalising gathers k entries.
    zs = rows.to(acc) if tail == "bucket" or hard else None
    if labels is not None:
        # Ignored rows become neutral, well-defined rows (zero logits, the
        # first k entries, a uniform teacher) so that nothing in them can reach
        # the value or the gradient, as in the dense reference.
        idx, lp, rest = neutral_ignored_rows(valid, idx, lp, rest)
        zs = None if zs is None else torch.where(valid[:, None], zs, torch.zeros_like(zs))
    if not torch.compiler.is_compiling():
        check_topk_values(idx, lp, V, topk_logprobs.dtype, rest)

    logp = teacher_log_probs(lp, tail, cfg.temperature, V, rest)
    if tail == "renormalize":
        on_support = rows.gather(-1, idx).to(acc)
        if labels is not None:
            on_support = torch.where(valid[:, None], on_support, torch.zeros_like(on_support))
        logq = renormalized_student_log_probs(on_support, cfg.student_temperature)
    else:
        logq = bucketed_student_log_probs(zs, idx, cfg.student_temperature)
    soft = reference.divergence(cfg.divergence, logp, logq, cfg.alpha, cfg.beta, cfg.skew)
    per_row = cfg.soft_weight * cfg.scale * soft
    if hard:
        per_row = per_row + cfg.hard_weight * reference.cross_entropy(zs, torch.where(valid, labels, 0))
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    return reference.reduce_rows(per_row, valid, cfg)


# ----------------------------------------------------------------- the two distributions
TEACHER_UNDEFINED = "topk_logprobs row {} is all -inf: the renormalised teacher is undefined"
BUCKET_TEACHER_UNDEFINED = "topk_logprobs row {} (with its tail) is all -inf: the teacher distribution is undefined"
STUDENT_UNDEFINED_ON_SUPPORT = "student_logits row {} is all -inf on its top-k support: the student is undefined"


def neutral_ignored_rows(valid: torch.Tensor, idx: torch.Tensor, lp: torch.Tensor, rest=None):
    """``(idx, lp, rest)`` with the rows not ``valid`` replaced by the first k entries and a uniform teacher.

    ``rest`` (``(N, 1)`` tail log-masses, or None) gets ``-inf`` on those rows.
    """
    k, keep = idx.shape[-1], valid[:, None]
    return (torch.where(keep, idx, torch.arange(k, device=idx.device)),
            torch.where(keep, lp, torch.full_like(lp, -math.log(k))),
            None if rest is None else torch.where(keep, rest, torch.full_like(rest, -math.inf)))


def check_counted_topk_rows(cfg: LossConfig, vocab_size: int, topk_indices: torch.Tensor,
                            topk_logprobs: torch.Tensor, tail_logprobs: Optional[torch.Tensor]) -> None:
    """:func:`check_topk_values` on the rows that count, ``(N, k)`` inputs (ignored rows may hold anything)."""
    if torch.compiler.is_compiling():
        return
    k = topk_indices.shape[-1]
    acc = torch.float64 if topk_logprobs.dtype == torch.float64 else torch.float32
    lp = topk_logprobs.detach().reshape(-1, k).to(acc)
    rest = None if tail_logprobs is None else tail_logprobs.detach().reshape(-1, 1).to(acc)
    valid, _ = _valid_rows(cfg, lp.shape[0], vocab_size, lp.device)
    idx, lp, rest = neutral_ignored_rows(valid, topk_indices.reshape(-1, k).long(), lp, rest)
    check_topk_values(idx, lp, vocab_size, topk_logprobs.dtype, rest)


def teacher_log_probs(topk_logprobs: torch.Tensor, tail: str, temperature: float, vocab_size: int,
                      rest: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The teacher's log-probability rows over the common support: ``(N, k)`` or ``(N, k + 1)``.

    The bucket is ``rest`` (``(N, 1)`` log-masses) when given, else
    ``log(1 - sum exp(topk_logprobs))``.  When ``k == vocab_size`` it is empty
    by construction: ``1 - sum`` would instead hold the rounding error of the
    stored log-probs, a phantom mass that the equally empty student bucket
    would turn into an infinite KL.
    """
    rows = topk_logprobs
    if tail == "bucket":
        rows = torch.cat([rows, teacher_bucket(rows, vocab_size, rest)], -1)
    else:
        _check_defined(rows, TEACHER_UNDEFINED)
    return torch.log_softmax(rows / temperature, -1)


def teacher_bucket(topk_logprobs: torch.Tensor, vocab_size: int, rest: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The teacher's log-mass off its top-k, ``(N, 1)``: ``rest`` when given, else ``log(1 - sum exp(topk_logprobs))``.

    Empty (``-inf``) when ``k == vocab_size`` (see :func:`teacher_log_probs`).
    """
    if topk_logprobs.shape[-1] == vocab_size:
        return torch.full_like(topk_logprobs[:, :1], -math.inf)
    if rest is not None:
        return rest
    # 1 - sum within the rounding of the stored log-probs is no mass either
    # (whether it rounds to 0 or to 1e-16 depends on the SIMD width).
    top_mass = torch.logsumexp(topk_logprobs, -1, keepdim=True)
    return log1mexp(top_mass).masked_fill(-top_mass <= sum_rounding(topk_logprobs.dtype, topk_logprobs.shape[-1]),
                                          -math.inf)


def renormalized_student_log_probs(on_support: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(z_s[S] / tau_s)``: the student restricted to the support, ``(N, k)``."""
    _check_defined(on_support, STUDENT_UNDEFINED_ON_SUPPORT)
    return torch.log_softmax(on_support / temperature, -1)


def bucketed_student_log_probs(zs: torch.Tensor, idx: torch.Tensor, temperature: float) -> torch.Tensor:
    """The student on the support plus its remaining mass as one bucket, ``(N, k + 1)``.

    Builds one masked copy of the ``(N, V)`` scaled logits (two when
    ``tau_s != 1``) for the logsumexp of the complement.
    """
    scaled = zs if temperature == 1.0 else zs / temperature
    on_support = scaled.gather(-1, idx)
    off_support = scaled.scatter(-1, idx, -math.inf)
    # torch.logsumexp's backward on an all -inf row is exp(-inf - -inf) = NaN
    # even for a zero incoming gradient (k = V, or every logit off the support
    # masked): such rows get one 0 entry here and -inf again after.
    empty = torch.isneginf(off_support).all(-1, keepdim=True)
    off_support[:, :1].masked_fill_(empty, 0.0)
    lse_off = torch.logsumexp(off_support, -1, keepdim=True).masked_fill(empty, -math.inf)
    lse_all = torch.logaddexp(torch.logsumexp(on_support, -1, keepdim=True), lse_off)
    _check_defined(lse_all, "student_logits row {} is all -inf: the student distribution is undefined")
    return torch.cat([on_support - lse_all, lse_off - lse_all], -1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0`` (larger ``x`` is clamped to 0): ``-inf`` at 0, never NaN.

    The two branches are Maechler's: ``log(-expm1(x))`` near 0, where ``1 -
    exp(x)`` cancels, and ``log1p(-exp(x))`` far below, where ``expm1`` loses
    ``exp(x)``'s digits.
    """
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ----------------------------------------------------------------- checks
def check_topk_inputs(student_logits: torch.Tensor, topk_indices, topk_logprobs, tail_logprobs=None) -> None:
    """Types, dtypes, shapes and devices of the top-k tensors against the student's logits."""
    tensors = [("topk_indices", topk_indices, INDEX_DTYPES, "int32 or int64"),
               ("topk_logprobs", topk_logprobs, LOGPROB_DTYPES, "float16, bfloat16, float32 or float64")]
    if tail_logprobs is not None:
        tensors.append(("tail_logprobs", tail_logprobs, LOGPROB_DTYPES, "float16, bfloat16, float32 or float64"))
    for name, t, dtypes, kind in tensors:
        check_tensor(name, t)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must be {kind}, got {t.dtype}")
        check_same_device(name, t, "student_logits", student_logits)
    if topk_indices.shape != topk_logprobs.shape:
        raise ValueError(
            f"topk_indices shape {tuple(topk_indices.shape)} does not match "
            f"topk_logprobs shape {tuple(topk_logprobs.shape)}"
        )
    if topk_indices.dim() != student_logits.dim() or topk_indices.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"topk_indices shape {tuple(topk_indices.shape)} needs the leading dims of "
            f"student_logits shape {tuple(student_logits.shape)}, i.e. (..., k)"
        )
    if tail_logprobs is not None and tail_logprobs.shape != topk_indices.shape[:-1]:
        raise ValueError(f"tail_logprobs shape {tuple(tail_logprobs.shape)} must be the leading dims of "
                         f"topk_indices shape {tuple(topk_indices.shape)}")
    V, k = student_logits.shape[-1], topk_indices.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"k (the last dim of topk_indices) must be in [1, V={V}], got k={k}")


def sum_rounding(dtype: torch.dtype, k: int) -> float:
    """How far the mass of ``k`` valid ``dtype`` log-probs can round from its true value.

    Rounding each ``log p_j`` to ``dtype`` moves the mass by at most
    ``u * sum p_j |log p_j| <= u * log k`` (``u`` = half an ulp); twice ``eps``
    gives a 4x margin.
    """
    return 2.0 * torch.finfo(dtype).eps * max(1.0, math.log(k))


def mass_tolerance(dtype: torch.dtype, k: int) -> float:
    """How far above 1 the top-k mass of valid ``dtype`` log-probs can round.

    :func:`sum_rounding`, and at least 1e-5, which covers float32 log-softmaxes stored as float64.
    """
    return max(1e-5, sum_rounding(dtype, k))


def check_topk_values(idx: torch.Tensor, lp: torch.Tensor, V: int, logprob_dtype: torch.dtype,
                      rest: Optional[torch.Tensor] = None) -> None:
    """ValueError naming the first bad row: indices out of ``[0, V)`` or repeated, log-probs not a sub-distribution.

    ``rest`` (``(N, 1)``, optional) is the teacher's log-mass outside the top-k.
    """
    if idx.numel() == 0:
        return
    out = (idx < 0) | (idx >= V)
    if bool(out.any()):
        i, j = (int(x) for x in out.nonzero()[0])
        raise ValueError(f"topk_indices value {int(idx[i, j])} at row {i} is outside [0, {V})")
    ordered = idx.sort(-1).values
    repeated = ordered[:, 1:] == ordered[:, :-1]
    if bool(repeated.any()):
        i, j = (int(x) for x in repeated.nonzero()[0])
        raise ValueError(f"topk_indices row {i} repeats index {int(ordered[i, j])}: the k entries must be distinct")
    check_topk_logprobs(lp, logprob_dtype, rest)


def check_topk_logprobs(lp: torch.Tensor, logprob_dtype: torch.dtype, rest: Optional[torch.Tensor] = None) -> None:
    """ValueError naming the first row whose log-probs (``(N, k)``, and ``rest``, ``(N, 1)``) are not a sub-distribution."""
    if lp.numel() == 0:
        return
    tol = mass_tolerance(logprob_dtype, lp.shape[-1])
    for name, values in (("topk_logprobs", lp), ("tail_logprobs", rest)):
        if values is None:
            continue
        bad = torch.isnan(values) | torch.isposinf(values)
        if bool(bad.any()):
            i, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"{name} must be finite or -inf, row {i} has {float(values[i, j])}")
        positive = values > tol
        if bool(positive.any()):
            i, j = (int(x) for x in positive.nonzero()[0])
            raise ValueError(f"{name} are log-probabilities and must be <= 0, row {i} has {float(values[i, j])}")
    mass = torch.logsumexp(lp if rest is None else torch.cat([lp, rest], -1), -1).exp()
    over = mass > 1.0 + tol
    if bool(over.any()):
        i = int(over.nonzero()[0, 0])
        with_tail = "" if rest is None else " (with tail_logprobs)"
        raise ValueError(
            f"topk_logprobs row {i}{with_tail} holds probability mass {float(mass[i]):.6g} > 1: they must be "
            f"the teacher's log-probabilities (log_softmax over the full vocabulary, then top-k), not logits"
        )


def _check_defined(rows: torch.Tensor, message: str) -> None:
    """ValueError (``message`` formatted with the row) for the first row that is all ``-inf``."""
    if torch.compiler.is_compiling():
        return
    dead = torch.isneginf(rows).all(-1)
    if bool(dead.any()):
        raise ValueError(message.format(int(dead.nonzero()[0, 0])))


def _valid_rows(cfg: LossConfig, N: int, V: int, device: torch.device, check: bool = True):
    """``(valid, labels)``: the rows that count, and the flattened labels (None without labels).

    ``check``: the labels' range is checked (a host sync); False where they were already.
    """
    if cfg.labels is None:
        return torch.ones(N, dtype=torch.bool, device=device), None
    labels = cfg.labels.reshape(-1).long()
    valid = labels != cfg.ignore_index
    if check:
        reference.check_labels(labels, valid, V, cfg.ignore_index)
    return valid, labels


# ----------------------------------------------------------------- module form
class TopKDistillLoss(OptionsModule):
    """``TopKDistillLoss(**options)(student_logits, topk_indices, topk_logprobs, labels=None, tail_logprobs=None)``.

    ``options`` are the keyword arguments of :func:`topk_distill_loss` but the
    per-batch tensors, checked here (:class:`kdfast.modules.OptionsModule`).
    """

    loss_fn = staticmethod(topk_distill_loss)
    call_time_error = ("{name} are passed at call time: "
                       "module(student_logits, topk_indices, topk_logprobs, labels=..., tail_logprobs=...)")
    option_checks = {"tail": check_tail}

    def forward(self, student_logits: torch.Tensor, topk_indices: torch.Tensor, topk_logprobs: torch.Tensor,
                labels: Optional[torch.Tensor] = None, tail_logprobs: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.loss_fn(student_logits, topk_indices, topk_logprobs, labels=labels, tail_logprobs=tail_logprobs,
                            **self.options)
