"""The losses that are not a plain per-row divergence: DIST, Pearson + Spearman matching, DKD.

Each function validates its arguments here (the ValueError / TypeError
messages of docs/contract.md) and runs the fused kernel of the tensors' device when one exists
for it, else the reference (``reference.correlation``, ``reference.dkd``).
"""

from __future__ import annotations

from typing import Union

import torch

from .config import (check_label_tensor, check_logits, check_row_tensor, float32_coefficient, integer,
                     positive_float32)
from .ops.backends import pick
from .reference import check_rows_defined, check_labels, entropy_weight
from .reference.correlation import check_rank_vocab, correlation_loss_reference, dist_loss_reference
from .reference.dkd import dkd_loss_reference


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
              beta: float = 1.0, gamma: float = 1.0, *, backend: str = "auto") -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): ``tau^2 (beta * inter + gamma * intra)``.

    ``inter = 1 - mean_i pearson(y_s[i], y_t[i])`` over rows (the classes of one
    sample), ``intra = 1 - mean_j pearson(y_s[:, j], y_t[:, j])`` over columns
    (one class across the batch), ``y = softmax(logits / tau)``; Pearson as
    torchdistill's ``DISTLoss`` (eps = 1e-8 clamps each centred norm).  Leading
    dims are flattened into N rows.  With N = 1 the intra term is the constant
    ``gamma tau^2`` (a single sample has no batch relation to match).

    Returns a float32 scalar (float64 for float64 inputs); only the student gets a gradient.
    Raises ValueError for no rows (N = 0), besides the errors of ``distill_loss``.
    """
    check_logits(student_logits, teacher_logits)
    if student_logits.numel() == 0:
        # Both Pearson means would be over nothing (NaN): refused on every backend alike.
        raise ValueError(f"dist_loss needs at least one row, got logits shape {tuple(student_logits.shape)}")
    tau = positive_float32("temperature", temperature)
    beta, gamma = float32_coefficient("beta", beta), float32_coefficient("gamma", gamma)
    impl = pick("dist", backend, student_logits.device)
    if impl is dist_loss_reference:  # the fused kernels check rows in their pass (a check here costs two sweeps)
        zt, zs = (z.detach().reshape(-1, z.shape[-1]) for z in (teacher_logits, student_logits))
        check_rows_defined(zt, zs, torch.ones(zt.shape[0], dtype=torch.bool, device=zt.device))
    return impl(student_logits, teacher_logits, tau, beta, gamma)


def correlation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                     pearson_weight: float = 1.0, spearman_weight: float = 1.0, rank_strength: float = 1.0,
                     weighting: Union[None, str, torch.Tensor] = None, *, backend: str = "auto") -> torch.Tensor:
    """Pearson + Spearman correlation matching (CMKD), averaged over rows.

    Per row: ``rho_P`` = Pearson of the softmaxes at ``temperature``;
    ``rho_S`` = Pearson of the teacher's exact ranks (ties averaged) and the
    student's soft ranks ``1 + sum_k sigmoid((x_j - x_k) / rank_strength)``,
    ``x = z_s / temperature`` (exact as rank_strength -> 0).  The loss is
    ``mean_i [pearson_weight w_i (1 - rho_P) + spearman_weight (1 - w_i) (1 - rho_S)]``
    where ``w_i`` is the row's weighting: ``"entropy"`` (``1 - H(p1)/log V``:
    confident teachers are matched on values, uncertain ones on ranks), a
    tensor of N values in [0, 1], or None (both terms in full: ``w_i (1 - ...)``
    and ``(1 - w_i)(1 - ...)`` are both replaced by ``(1 - ...)``).

    Cost: the soft ranks are pairwise, O(V^2) time per row; V above
    ``reference_correlation.MAX_RANK_VOCAB`` (4096) is a ValueError (classification
    heads, not LLM vocabularies).
    """
    check_logits(student_logits, teacher_logits)
    check_rank_vocab(student_logits.shape[-1])
    tau = positive_float32("temperature", temperature)
    strength = positive_float32("rank_strength", rank_strength)
    pw, sw = float32_coefficient("pearson_weight", pearson_weight), float32_coefficient("spearman_weight", spearman_weight)
    weights = None
    if isinstance(weighting, torch.Tensor):
        check_row_tensor("weighting", weighting, student_logits)
        weights = weighting.detach()
        if not torch.compiler.is_compiling() and bool(((weights < 0) | (weights > 1)).any()):
            raise ValueError("weighting tensor values must lie in [0, 1]")
    elif weighting == "entropy":
        V = teacher_logits.shape[-1]
        weights = entropy_weight(teacher_logits.detach().reshape(-1, V).float())
    elif weighting is not None:
        raise ValueError(f"weighting must be None, 'entropy' or a tensor of row weights in [0, 1], got {weighting!r}")
    impl = pick("correlation", backend, student_logits.device)
    if impl is correlation_loss_reference:  # the fused kernels check rows in their pass
        zt, zs = (z.detach().reshape(-1, z.shape[-1]) for z in (teacher_logits, student_logits))
        check_rows_defined(zt, zs, torch.ones(zt.shape[0], dtype=torch.bool, device=zt.device))
    return impl(student_logits, teacher_logits, tau, pw, sw, strength, weights)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0, *, ignore_index: int = -100,
             backend: str = "auto") -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022) as mdistiller's ``dkd_loss``, numerically safe.

    ``T^2 (alpha * TCKD + beta * NCKD)`` summed over rows and divided by the
    number of rows whose label is not ``ignore_index``.  TCKD is the KL of the
    binary (target, rest) distributions, NCKD the KL of the distributions over
    the non-target classes (see ``kdfast.reference.dkd`` for the safe forms).
    Needs V >= 2; V = 2 gives NCKD = 0.
    """
    check_logits(student_logits, teacher_logits)
    V = student_logits.shape[-1]
    if V < 2:
        raise ValueError(f"dkd_loss needs at least 2 classes (target and non-target), got V = {V}")
    tau = positive_float32("temperature", temperature)
    alpha, beta = float32_coefficient("alpha", alpha), float32_coefficient("beta", beta)
    check_label_tensor(labels)
    check_row_tensor("labels", labels, student_logits)
    impl = pick("dkd", backend, student_logits.device)
    if impl is dkd_loss_reference:  # the fused kernels check labels and rows themselves, in their pass
        flat = labels.reshape(-1).long()
        valid = flat != ignore_index
        check_labels(flat, valid, V, ignore_index)
        check_rows_defined(teacher_logits.detach().reshape(-1, V), student_logits.detach().reshape(-1, V), valid)
    return impl(student_logits, teacher_logits, labels, tau, alpha, beta, integer("ignore_index", ignore_index))
