"""Long-tailed knowledge distillation (LTKD): the KD term split over class groups, the teacher's group bias removed.

Kim, "Biased Teacher, Balanced Student" (arXiv:2506.18496, v1 2025; v2, CVPR 2026,
titled "Distilling Balanced Knowledge from a Biased Teacher").  A teacher
trained on long-tailed data puts too much probability on the head classes, and
plain KD hands that bias to the student.  The classes are partitioned into
groups (head / medium / tail by their training-set frequency), and Hinton's
KD term is split exactly, by the chain rule of the KL divergence, into

* an **inter-group** (cross-group) term, the KL between the teacher's and the
  student's distributions over the groups, ``P_g = sum_{c in g} p_c`` and
  ``Q_g = sum_{c in g} q_c``; and
* an **intra-group** (within-group) term, the KL between the distributions
  *inside* each group, ``p_c / P_g`` and ``q_c / Q_g`` for ``c in g``,
  weighted by the teacher's group probability ``P_g``::

      KL(p || q) = KL(P || Q) + sum_g P_g KL(p_{.|g} || q_{.|g})

  (:func:`kd_group_decomposition` returns both parts; the identity holds to
  rounding for any logits and any partition).

The paper reads the teacher's bias off both parts: the inter-group target
``P`` over-weights the head group, and the weights ``P_g`` let the head
group's within-group term dominate the gradient.  LTKD therefore (1)
*rebalances* the inter-group target, calibrating the teacher's group-level
prediction, and (2) weights the within-group terms *uniformly*, so every group
contributes equally::

      LTKD = tau^2 [ inter_weight * KL(P~ || Q) + intra_weight * sum_g KL(p_{.|g} || q_{.|g}) ]

What was followed, and what could not be checked.  The decomposition, the two
corrections and their roles are those of the paper's abstract (both arXiv
versions) and of its summaries; the text of its method section (the exact
calibration formula and its hyper-parameters) was not available to us.  The
calibration implemented here is the natural reading of "calibrates the
teacher's group-level predictions": each row's teacher group distribution is
divided by the teacher's *average* group distribution and renormalised,
``P~_g ∝ P_g / mean_batch(P_g)`` (``rebalance=True``; the average is over the
rows of the call, without gradient), so a teacher that gives the head group
more mass on average than the other groups no longer passes that offset on; a
fixed prior, e.g. the teacher's mean group probability over the whole training
set, can be given instead (``rebalance=tensor``).  "Uniform" is implemented as
weight 1 for every group (not ``1 / G``; the difference is a factor that
``intra_weight`` absorbs).  ``rebalance=False, intra_weighting="teacher"``
gives back plain KD exactly: ``ltkd_loss`` then equals ``kdfast.kd_loss``.

Numerics follow docs/contract.md, section 7: computed in float32 (float64 for
float64 inputs) from log-probabilities; masked logits (``-inf``) are legal and
``0 log 0`` counts as 0 in the value and the gradient (a student that masks a
class on which the teacher has mass makes the loss ``+inf``, as KL is); a row
with a NaN or ``+inf`` logit gives NaN for that row and its gradient; an
all ``-inf`` row is a ValueError.  Only the student gets a gradient.
"""

from __future__ import annotations

import numbers
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .config import REDUCTIONS, check_logits, float32_coefficient, integer, positive_float32
from .ops.backends import pick
from .reference.distill import accumulation_dtype, check_rows_defined, kl, nan_or_posinf_rows, nan_rows_where
from .reference.longtail import (decompose, group_log_probs, group_members, logit_rows, rebalanced,
                                 teacher_group_log_probs)

INTRA_WEIGHTINGS = ("uniform", "teacher")
GroupsLike = Union[torch.Tensor, Sequence[int]]
Rebalance = Union[bool, None, str, torch.Tensor, Sequence[float]]


class GroupKL(NamedTuple):
    """The group decomposition of ``KL(p || q)`` per row (see :func:`kd_group_decomposition`).

    ``inter``: ``(N,)``, ``KL(P || Q)`` between the group distributions.
    ``intra``: ``(N, G)``, ``KL(p_{.|g} || q_{.|g})`` inside each group (0 for a
    group on which the teacher has no mass, and for a group without classes).
    ``teacher_groups``, ``student_groups``: ``(N, G)``, ``P_g`` and ``Q_g``.
    """

    inter: torch.Tensor
    intra: torch.Tensor
    teacher_groups: torch.Tensor
    student_groups: torch.Tensor


# ----------------------------------------------------------------- validation
def check_groups(groups: GroupsLike, num_classes: int, num_groups: Optional[int] = None,
                 device: Union[None, str, torch.device] = None) -> Tuple[torch.Tensor, int]:
    """``groups`` as an int64 tensor of ``num_classes`` group ids in ``[0, G)``, and ``G``.

    ``groups[c]`` is the group of class ``c`` (e.g. 0 head, 1 medium, 2 tail);
    a tensor of an integer dtype or a sequence of ints.  ``G`` is
    ``num_groups`` when given (an int >= 1 above every id: ids without classes
    are empty groups, which contribute nothing), else ``max(groups) + 1``.
    TypeError for a non-integer dtype or element, ValueError for a wrong length
    or an id out of range.
    """
    ids: Optional[List[int]] = None  # the ids as Python ints, when given so: checked without reading a tensor
    if isinstance(groups, torch.Tensor):
        if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
            raise TypeError(f"groups must hold integer group ids, got a {groups.dtype} tensor")
        index = groups.detach()
    else:
        try:
            items = list(groups)
        except TypeError:
            raise TypeError(f"groups must be a tensor or a sequence of integer group ids, "
                            f"got {type(groups).__name__}") from None
        bad = [g for g in items if isinstance(g, bool) or not isinstance(g, numbers.Integral)]
        if bad:
            raise TypeError(f"groups must hold integer group ids, got {bad[0]!r}")
        ids = [int(g) for g in items]
        index = torch.tensor(ids, dtype=torch.long)
    if index.dim() != 1 or index.numel() != num_classes:
        raise ValueError(f"groups must have one group id per class: shape {tuple(index.shape)} for "
                         f"{num_classes} classes (the logits' last dimension)")
    index = index.to(device=device, dtype=torch.long)
    if num_groups is not None:
        count = integer("num_groups", num_groups)
        if count < 1:
            raise ValueError(f"num_groups must be >= 1, got num_groups={num_groups}")
        if ids is None and torch.compiler.is_compiling():
            return index, count  # reading a tensor's values breaks the graph; the fused ops check the ids
    low, high = (min(ids), max(ids)) if ids is not None else (int(index.min()), int(index.max()))
    if low < 0:
        c = int((index < 0).nonzero()[0, 0])
        raise ValueError(f"groups[{c}] = {int(index[c])} is negative: group ids must be in [0, G)")
    if num_groups is None:
        count = high + 1
    elif high >= count:
        c = int((index >= count).nonzero()[0, 0])
        raise ValueError(f"groups[{c}] = {int(index[c])} is outside [0, {count}) (num_groups={count})")
    return index, count


def _rebalance_mode(rebalance: Rebalance, count: int, dtype: torch.dtype,
                    device: torch.device) -> Union[None, str, torch.Tensor]:
    """None (no rebalancing), ``"batch"``, or the log of a validated ``(G,)`` prior."""
    if rebalance is None or rebalance is False:
        return None
    if rebalance is True or (isinstance(rebalance, str) and rebalance == "batch"):
        return "batch"
    if isinstance(rebalance, str):
        raise ValueError(f"rebalance must be True/'batch', False/None or a tensor of {count} group priors, "
                         f"got {rebalance!r}")
    prior = torch.as_tensor(rebalance).detach()
    if prior.is_complex() or prior.dtype == torch.bool:
        raise TypeError(f"a rebalance prior must be real, got {prior.dtype}")
    if prior.shape != (count,):
        raise ValueError(f"a rebalance prior needs one value per group: shape {tuple(prior.shape)} for {count} groups")
    prior = prior.to(device=device, dtype=dtype)
    if not torch.compiler.is_compiling() and not bool((torch.isfinite(prior) & (prior > 0)).all()):
        raise ValueError(f"a rebalance prior must be finite and > 0 in every group, got {prior.tolist()}")
    return prior.log()


def _prepare(student_logits: torch.Tensor, teacher_logits: torch.Tensor, groups: GroupsLike,
             num_groups: Optional[int], temperature: float):
    check_logits(student_logits, teacher_logits)
    V = student_logits.shape[-1]
    tau = positive_float32("temperature", temperature)
    index, count = check_groups(groups, V, num_groups, device=student_logits.device)
    zs, zt, undefined = logit_rows(student_logits, teacher_logits)
    return zs, zt, index, count, tau, undefined


def kd_group_decomposition(student_logits: torch.Tensor, teacher_logits: torch.Tensor, groups: GroupsLike,
                           temperature: float = 1.0, *, num_groups: Optional[int] = None) -> GroupKL:
    """The exact split of ``KL(softmax(z_t/tau) || softmax(z_s/tau))`` over class groups, per row.

    With ``P_g``, ``Q_g`` the teacher's and the student's probabilities of
    group ``g`` and ``p_{.|g}``, ``q_{.|g}`` their distributions inside it::

        KL(p || q) = inter + sum_g teacher_groups[:, g] * intra[:, g]

    (the chain rule of the KL divergence; the LTKD paper's decomposition of
    the KD term).  No ``tau^2`` factor.  Rows are the logits' leading dims
    flattened (``N``); ``groups`` as in :func:`ltkd_loss`.  Returns a
    :class:`GroupKL` in float32 (float64 for float64 inputs); the teacher
    gets no gradient.
    """
    zs, zt, index, count, tau, undefined = _prepare(student_logits, teacher_logits, groups, num_groups,
                                                    temperature)
    _, _, group_p, group_q, intra = decompose(zs, zt, index, count, tau)
    inter = nan_rows_where(undefined, kl(group_p, group_q), zs)
    return GroupKL(inter, intra, group_p.exp(), group_q.exp())


def teacher_group_probabilities(teacher_logits: torch.Tensor, groups: GroupsLike, temperature: float = 1.0, *,
                                num_groups: Optional[int] = None) -> torch.Tensor:
    """The teacher's group probabilities ``P_g = sum_{c in g} softmax(z_t / tau)_c``: ``(N, G)``, no gradient.

    Their mean over a data set is a prior for ``ltkd_loss(..., rebalance=prior)``
    (the teacher's average group-level prediction over the training set rather
    than over each batch).
    """
    check_logits(teacher_logits, teacher_logits)
    V = teacher_logits.shape[-1]
    tau = positive_float32("temperature", temperature)
    index, count = check_groups(groups, V, num_groups, device=teacher_logits.device)
    return teacher_group_log_probs(teacher_logits, index, count, tau).exp()


def rebalanced_group_target(teacher_logits: torch.Tensor, groups: GroupsLike, temperature: float = 4.0,
                            rebalance: Rebalance = True, *, num_groups: Optional[int] = None) -> torch.Tensor:
    """LTKD's inter-group target ``P~`` per row: ``(N, G)`` probabilities, no gradient.

    ``P~_g ∝ P_g / prior_g``: ``rebalance`` as in :func:`ltkd_loss` (``True``:
    the prior is the mean of ``P_g`` over the rows given; a ``(G,)`` tensor:
    that prior; ``False``: ``P~ = P``).  A teacher biased toward a group by a
    constant factor in every row (e.g. a constant added to the logits of its
    classes) gives the same ``P~`` as the unbiased teacher when the prior holds
    the same factor.
    """
    check_logits(teacher_logits, teacher_logits)
    V = teacher_logits.shape[-1]
    tau = positive_float32("temperature", temperature)
    index, count = check_groups(groups, V, num_groups, device=teacher_logits.device)
    zt = teacher_logits.detach().reshape(-1, V).to(accumulation_dtype(teacher_logits))
    check_rows_defined(zt, zt, torch.ones(zt.shape[0], dtype=torch.bool, device=zt.device))
    group_p = group_log_probs(torch.log_softmax(zt / tau, -1), group_members(index, count))
    mode = _rebalance_mode(rebalance, count, zt.dtype, zt.device)
    return rebalanced(group_p, mode, nan_or_posinf_rows(zt)).exp()


def ltkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, groups: GroupsLike,
              temperature: float = 4.0, inter_weight: float = 1.0, intra_weight: float = 1.0,
              rebalance: Rebalance = True, *, intra_weighting: str = "uniform", num_groups: Optional[int] = None,
              reduction: str = "batchmean", backend: str = "auto") -> torch.Tensor:
    """Long-tailed KD (Kim, "Biased Teacher, Balanced Student", 2025): group-rebalanced, group-uniform KD.

    Per row, with ``p = softmax(z_t / tau)``, ``q = softmax(z_s / tau)``, the
    group probabilities ``P_g = sum_{c in g} p_c``, ``Q_g = sum_{c in g} q_c``
    and the within-group distributions ``p_{c|g} = p_c / P_g``, ``q_{c|g} = q_c / Q_g``::

        loss = tau^2 [ inter_weight * KL(P~ || Q) + intra_weight * sum_g w_g KL(p_{.|g} || q_{.|g}) ]

    The paper's definition (module docstring: what was followed and what
    could not be checked): plain KD is ``KL(P || Q) + sum_g P_g KL(p_{.|g} ||
    q_{.|g})``; LTKD replaces the biased group target ``P`` by the rebalanced
    ``P~`` and the teacher's weights ``P_g`` by uniform ones.

    Args:
        student_logits, teacher_logits: ``(..., C)`` logits of the same shape;
            leading dims are flattened into ``N`` rows.  Only the student gets
            a gradient.
        groups: ``(C,)`` group id of every class, ``0 .. G-1`` (head, medium,
            tail = 0, 1, 2 in the paper; any ``G >= 1``), a LongTensor or a
            sequence of ints.
        temperature: ``tau`` of both softmaxes (default 4, as DKD's).
        inter_weight, intra_weight: the weights of the two terms (>= 0).
        rebalance: how ``P~`` is made.  ``True`` (or ``"batch"``): divide each
            row's ``P_g`` by the teacher's mean ``P_g`` over the rows of this call
            (without gradient) and renormalise: the teacher's average
            group-level preference is removed.  A ``(G,)`` tensor of positive
            priors ``pi_g`` (e.g. the teacher's mean group probability over the
            training set, :func:`teacher_group_probabilities`): ``P~_g ∝ P_g / pi_g``.
            ``False`` or None: ``P~ = P`` (no rebalancing).
        intra_weighting: ``"uniform"`` (the paper's LTKD): ``w_g = 1`` for
            every group on which the teacher has mass; ``"teacher"``: ``w_g =
            P_g``, plain KD's weights (with ``rebalance=False`` and unit
            weights, ``ltkd_loss`` is then exactly ``kd_loss``).
        num_groups: ``G``; None: ``max(groups) + 1``.  Ids without classes are
            empty groups and contribute nothing.
        reduction: ``"batchmean"`` (sum over rows / N; 0 for N = 0), ``"sum"``
            or ``"none"`` (``(N,)``).  With ``rebalance=True`` the rows share
            the batch's mean (a constant), so ``"none"`` still depends on the
            other rows of the call.
        backend: ``"auto"`` (the fused kernel of the tensors' device: C++ on
            CPU tensors, Triton on CUDA ones; else the PyTorch reference),
            ``"torch"``, ``"cpu"`` or ``"triton"``.  The fused kernels keep
            each row's group statistics in fixed-size arrays: with more than
            :data:`kdfast.ops.ltkd_fused.MAX_FUSED_GROUPS` (16) groups every
            backend computes the PyTorch reference.  Under ``torch.compile``
            pass ``num_groups`` (otherwise it is read from the group ids' values).

    Returns float32 (float64 for float64 inputs).  Masked (``-inf``) logits
    are legal; a row with NaN or ``+inf`` is NaN; an all ``-inf`` row, groups
    of the wrong length or out of range, ``temperature <= 0`` and negative
    weights are errors (ValueError; TypeError for wrong types); RuntimeError
    for a backward with ``create_graph=True`` through a fused kernel (its
    gradient is computed in the forward).
    """
    check_logits(student_logits, teacher_logits)
    tau = positive_float32("temperature", temperature)
    index, count = check_groups(groups, student_logits.shape[-1], num_groups, device=student_logits.device)
    a = float32_coefficient("inter_weight", inter_weight)
    b = float32_coefficient("intra_weight", intra_weight)
    for name, value in (("inter_weight", a), ("intra_weight", b)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {name}={value}")
    if intra_weighting not in INTRA_WEIGHTINGS:
        raise ValueError(f"intra_weighting must be one of {INTRA_WEIGHTINGS}, got {intra_weighting!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    mode = _rebalance_mode(rebalance, count, accumulation_dtype(student_logits, teacher_logits),
                           student_logits.device)
    impl = pick("ltkd", backend, student_logits.device)
    return impl(student_logits, teacher_logits, index, count, tau, a, b, mode, intra_weighting, reduction)


class LTKDLoss(nn.Module):
    """:func:`ltkd_loss` as a module: ``LTKDLoss(groups, temperature=4.0, ...)(student_logits, teacher_logits)``.

    ``groups`` (and a tensor ``rebalance`` prior) are kept as buffers, so they
    follow ``.to(device)``.  Options are checked here, once (the group ids'
    count against the logits when called).
    """

    def __init__(self, groups: GroupsLike, temperature: float = 4.0, inter_weight: float = 1.0,
                 intra_weight: float = 1.0, rebalance: Rebalance = True, *, intra_weighting: str = "uniform",
                 num_groups: Optional[int] = None, reduction: str = "batchmean", backend: str = "auto"):
        super().__init__()
        index, count = check_groups(groups, len(groups), num_groups)
        self.register_buffer("groups", index)
        self.num_groups = count
        self.temperature = positive_float32("temperature", temperature)
        self.inter_weight = float32_coefficient("inter_weight", inter_weight)
        self.intra_weight = float32_coefficient("intra_weight", intra_weight)
        if min(self.inter_weight, self.intra_weight) < 0:
            raise ValueError(f"inter_weight and intra_weight must be >= 0, got {inter_weight}, {intra_weight}")
        if intra_weighting not in INTRA_WEIGHTINGS:
            raise ValueError(f"intra_weighting must be one of {INTRA_WEIGHTINGS}, got {intra_weighting!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.intra_weighting, self.reduction, self.backend = intra_weighting, reduction, backend
        mode = _rebalance_mode(rebalance, count, torch.float64, torch.device("cpu"))
        prior = mode.exp() if isinstance(mode, torch.Tensor) else None
        self.rebalance: Rebalance = None if prior is not None else mode  # None or "batch"
        self.register_buffer("prior", prior)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        rebalance = self.prior if self.prior is not None else self.rebalance
        return ltkd_loss(student_logits, teacher_logits, self.groups, self.temperature, self.inter_weight,
                         self.intra_weight, rebalance, intra_weighting=self.intra_weighting,
                         num_groups=self.num_groups, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        rebalance = "prior" if self.prior is not None else self.rebalance
        return (f"groups={self.num_groups}, temperature={self.temperature}, inter_weight={self.inter_weight}, "
                f"intra_weight={self.intra_weight}, rebalance={rebalance!r}, intra_weighting={self.intra_weighting!r}")
