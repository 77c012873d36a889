"""Label Revision and Data Selection (Lan, Cheung, Xu, Liu, Hu, Li & Chen, "Improve Knowledge Distillation via
Label Revision and Data Selection", arXiv:2404.03693, 2024; IEEE TCDS 2025).

The paper's definitions.  A teacher's soft labels can be wrong, and a student
that matches them learns the teacher's mistakes.  Two remedies:

* **Label Revision (LR)** rectifies the teacher's prediction with the ground
  truth where the teacher is wrong: the soft label becomes
  ``p' = beta p + (1 - beta) y`` (``p`` the teacher's softened distribution,
  ``y`` the one-hot label).  For the label to become the top class of ``p'``,
  ``beta < 1 / (1 + p_max - p_label)``; the paper takes
  ``beta = eta / (1 + p_max - p_label)`` with a hyper-parameter ``eta < 1``.
* **Data Selection (DS)** distils only a subset ``D^t`` of the training
  samples, chosen by an influence-based score, and supervises the rest with
  the ground truth alone, so that fewer samples carry erroneous supervision.

What was followed, and where a choice was made.  Only the paper's abstract and
a summary were available to us (the formula of ``beta`` above is from there);
the choices:

* **Where LR applies.**  LR is the ``label_revision=eta`` option of
  :func:`kdfast.distill_loss` / :func:`kdfast.kd_loss` / ``ttm_loss`` /
  ``wttm_loss`` (needs ``labels``; ``eta`` in (0, 1)).  It revises the
  teacher distribution *at the loss's temperature* ``tau`` (the soft label the
  student matches; the paper's ``p^t`` is the softened prediction), for every
  divergence: each ``D(p || q)`` of :mod:`kdfast.registry` takes a teacher
  distribution and ``p'`` is one, so the definition carries over unchanged.
  A row is *wrong* when its label logit is below the row's maximum
  (``z_t[label] < max z_t``, the same at every temperature; a tie at the top
  counts as right); right rows and rows whose label is ``ignore_index`` are
  untouched.  A per-row ``weighting`` (``"wttm"``, ``"entropy"``) is of the
  unrevised teacher.
* **Backends.**  The reference (:func:`kdfast.reference.revise_teacher_log_probs`)
  and the fused Triton row kernel (a per-row scalar fix-up of the teacher's
  running sums, :func:`kdfast.ops.triton.row_kernel.label_revision_fixup`) have
  it; the C++ kernel does not yet (``backend="cpu"`` raises
  NotImplementedError; ``"auto"`` on a CPU tensor runs the reference).
* **The DS score.**  The paper's influence estimator is not available to us.
  :func:`selection_scores` is the teacher's self-influence at its logits with
  the Hessian replaced by the identity: the squared norm of the gradient of
  the teacher's cross-entropy with respect to its logits,
  ``||softmax(z_t) - y||^2`` (in [0, 2]; the EL2N / gradient-norm scores of
  the data-pruning literature).  A large score is a sample whose teacher
  supervision is far from the truth.
* **Which samples are distilled.**  :func:`select_for_distillation` keeps the
  ``fraction`` of the labelled rows with the *smallest* scores for
  distillation (the teacher most reliable there) and gives the rest weight 0
  in the soft term (ground truth only): the paper's aim, "reducing the impact
  of incorrect predictions".  Rows without a label (``ignore_index``) cannot be
  scored and keep weight 1 (the caller decides whether they are distilled).
  The selection is among the rows it is given: over a whole dataset at once it
  is the paper's fixed subset ``D^t``; the trainer's ``data_selection`` option
  applies it per batch (uniformly shuffled batches rank the same scores).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .config import check_label_tensor, check_logit_dtype, check_tensor, finite_float, integer
from .reference.distill import revise_teacher_log_probs


def _rows(teacher_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    check_tensor("teacher_logits", teacher_logits)
    check_logit_dtype("teacher_logits", teacher_logits)
    check_label_tensor(labels)
    V = teacher_logits.shape[-1]
    zt = teacher_logits.detach().reshape(-1, V)
    y = labels.reshape(-1).to(device=zt.device, dtype=torch.long)
    if y.numel() != zt.shape[0]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the {zt.shape[0]} rows of "
                         f"teacher_logits shape {tuple(teacher_logits.shape)}")
    valid = y != integer("ignore_index", ignore_index)
    bad = valid & ((y < 0) | (y >= V))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"label {int(y[i])} at row {i} is outside [0, {V}) and is not ignore_index ({ignore_index})")
    return zt, y, valid


def teacher_is_wrong(teacher_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``(N,)`` bool: the rows Label Revision revises (a label, and its logit below the row's maximum)."""
    zt, y, valid = _rows(teacher_logits, labels, ignore_index)
    z_label = zt.gather(-1, torch.where(valid, y, 0)[:, None]).squeeze(-1)
    return valid & (z_label < zt.max(-1).values)


def revised_teacher_probs(teacher_logits: torch.Tensor, labels: torch.Tensor, eta: float, temperature: float = 1.0,
                          ignore_index: int = -100) -> torch.Tensor:
    """``(N, V)``: the teacher's ``softmax(z_t / temperature)`` after Label Revision (what the loss distils).

    ``p' = beta p + (1 - beta) y`` with ``beta = eta / (1 + p_max - p_label)`` on
    the rows :func:`teacher_is_wrong`; the other rows are ``p``.  Computed in
    float32 (float64 for float64 logits).
    """
    eta = finite_float("eta", eta)
    if not 0.0 < eta < 1.0:
        raise ValueError(f"eta must be in (0, 1), got eta={eta}")
    tau = finite_float("temperature", temperature)
    if not tau > 0:
        raise ValueError(f"temperature must be > 0, got temperature={temperature}")
    zt, y, valid = _rows(teacher_logits, labels, ignore_index)
    acc = torch.float64 if zt.dtype == torch.float64 else torch.float32
    zt = zt.to(acc)
    logp = torch.log_softmax(zt / tau, -1)
    return revise_teacher_log_probs(logp, zt, y, valid, eta).exp()


def selection_scores(teacher_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``(N,)`` float32: ``||softmax(z_t) - onehot(y)||^2``, the Data Selection score (0 on unlabelled rows).

    The teacher's self-influence at its logits with an identity Hessian (the
    squared norm of its cross-entropy gradient there); large where the
    teacher's supervision is far from the truth.  Float64 for float64 logits.
    """
    zt, y, valid = _rows(teacher_logits, labels, ignore_index)
    acc = torch.float64 if zt.dtype == torch.float64 else torch.float32
    p = torch.softmax(zt.to(acc), -1)
    onehot = torch.nn.functional.one_hot(torch.where(valid, y, 0), zt.shape[-1]).to(acc)
    score = (p - onehot).square().sum(-1)
    return torch.where(valid, score, torch.zeros_like(score))


def select_for_distillation(teacher_logits: torch.Tensor, labels: torch.Tensor, fraction: float,
                            ignore_index: int = -100, scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(N,)`` float32 row weights: 1 for the rows whose teacher supervision is kept, 0 for the others.

    Among the labelled rows (label not ``ignore_index``), the
    ``ceil(fraction * n_labelled)`` with the smallest :func:`selection_scores`
    (or the given ``scores``) are kept; ties go to the earlier row.  Unlabelled
    rows get 1.  Pass the result as the loss's ``weighting=`` (a weight 0
    row then has only its cross-entropy), e.g.::

        w = select_for_distillation(teacher_logits, labels, fraction=0.8)
        loss = kd_loss(s, t, 4.0, labels=labels, label_revision=0.9, weighting=w, hard_weight=0.1, soft_weight=0.9)
    """
    fraction = finite_float("fraction", fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction (of the labelled rows that are distilled) must be in (0, 1], got {fraction}")
    zt, y, valid = _rows(teacher_logits, labels, ignore_index)
    if scores is None:
        scores = selection_scores(zt, y, ignore_index)
    else:
        check_tensor("scores", scores)
        scores = scores.detach().reshape(-1).to(zt.device)
        if scores.numel() != zt.shape[0]:
            raise ValueError(f"scores must have one entry per row ({zt.shape[0]}), got shape {tuple(scores.shape)}")
    weights = torch.ones(zt.shape[0], dtype=torch.float32, device=zt.device)
    rows = valid.nonzero().reshape(-1)
    if rows.numel() == 0:
        return weights
    keep = math.ceil(fraction * rows.numel() - 1e-9)
    order = torch.sort(scores[rows].to(torch.float64), stable=True).indices
    weights[rows[order[keep:]]] = 0.0
    return weights
