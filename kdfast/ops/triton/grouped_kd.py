"""Grouped KD in Triton: the row kernel, its launcher and the op ``kdfast::grouped_kd_forward_triton``.

One program per row, the row streamed in vocabulary tiles (any V, bounded
registers), in four kinds of sweeps:

  A. online logsumexps of teacher and student at ``T`` and the teacher's
     smallest finite logit;
  G. the primary group's threshold logit ``z*`` (reference:
     ``kdfast.reference.grouped_kd.primary_group``), found without a sort by
     a bracketing search over the teacher's logit *values*.  The bracket
     ``[lo, hi]`` holds ``z*`` and both ends are teacher logits, with
     ``F(lo) >= m F(-inf)`` (``F(v)`` the teacher mass at ``T_g`` of the
     logits ``>= v``; ``lo`` starts at the smallest finite logit, ``hi`` at
     the largest).  Each sweep evaluates ``F`` at ``PIVOTS`` (16) points
     spread over the bracket, the last one ``hi``, and for each point the
     nearest logit at or above it and the nearest below it; the bracket then
     shrinks to the two logits around the crossing (``lo`` := the smallest
     logit at or above the last point that reaches the mass, ``hi`` := the
     largest logit below the first that does not).  ``hi`` strictly drops
     every sweep until ``lo == hi == z*``, so the search ends after at most
     as many sweeps as the row has distinct logits; in practice the pivots
     cut the bracket 16-fold per sweep and it snaps to actual logits: in a
     NumPy model of this search (Gaussian rows of 1k-128k logits at scales
     1-8, peaked and Gumbel rows, mass 0.5-0.93) it took 1-6 sweeps, 4-5 for
     32k Gaussian logits.  No (N, V) buffer, no sort, and equal logits need
     no tie-breaking (the group is ``z >= z*``).  Cost: the teacher row is
     read ``3 + sweeps`` times and the student row 3 times (KD's kernel: 2
     and 2), the gradient written once; not yet timed on a GPU.
     ``primary_mass = 1`` needs no search (``z*`` = the smallest finite logit).
     Why not a per-row top-k: the group's size is not known in advance (one
     class for a confident teacher, thousands for a flat one), and a sort of
     a 128k-entry row per program does not fit a program's registers.
  B. online logsumexps of teacher and student over the primary group and
     over the rest (each with its own running maximum: a group far below the
     row's maximum loses nothing to underflow);
  C. Primary-KD's value and the gradient, with the final normalisers.

Binary-KD comes from the scalars of B.  Same contract as
``reference.grouped_kd.grouped_kd_loss_reference``; per-row losses are summed
by the fixed-order ``reduce_kernel`` (deterministic, no atomics).

The gradient with respect to the student logits, written in the forward
(``c = T * inv_denominator``, ``Q`` the student's primary mass, ``P_t`` the
teacher's, ``q_hat``/``p_hat`` within the primary group, ``q_tilde`` within
the rest)::

    j in P:   c (binary_weight (Q - P_t) q_hat_j + primary_weight (q_hat_j - p_hat_j))
    j not in P: c binary_weight (P_t - Q) q_tilde_j
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..fused_op import fake_loss_and_grad, paired_logits, register_saved_grad_autograd, wants_grad
from . import row_kernel
from .dkd import _plogratio
from .launch import _as_rows, _inv_denominator, _raise_on_bad_rows, interpreting, reduced_loss, row_outputs
from .row_kernel import _fill_zero_row, _finite_shift, _lse_update, _round_to, load_logits

# float64 parameter vector (Triton would pass Python floats as float32)
PARAMS = ("inv_tau", "inv_group_tau", "primary_mass", "primary_weight", "binary_weight", "tau2", "grad_scale")
P_INV_TAU = tl.constexpr(0)
P_INV_GROUP_TAU = tl.constexpr(1)
P_MASS = tl.constexpr(2)
P_PRIMARY_WEIGHT = tl.constexpr(3)
P_BINARY_WEIGHT = tl.constexpr(4)
P_TAU2 = tl.constexpr(5)
P_GRAD_SCALE = tl.constexpr(6)

PIVOTS = 16  # points per sweep of the threshold search
_REDUCTIONS = ("batchmean", "sum", "none")
_N_INPUTS = 11
_REDUCTION_ARG = 9


@triton.jit
def _threshold_sweep(T_row, V, lo, hi, mt, inv_group_tau, mass, ACC: tl.constexpr, GBLOCK: tl.constexpr,
                     NPIV: tl.constexpr):
    """One sweep of the threshold search: the new ``(lo, hi)`` bracket (module docstring, G)."""
    neg_inf = float("-inf")
    pos_inf = float("inf")
    ks = tl.arange(0, NPIV)
    frac = (ks + 1).to(ACC) / NPIV
    # lo + (hi - lo) frac without overflow for logits near the dtype's range; monotone in frac, clamped to the
    # bracket, the last pivot exactly hi
    c = (lo * 0.5 + (hi * 0.5 - lo * 0.5) * frac) * 2.0
    c = tl.minimum(tl.maximum(c, lo), hi)
    c = tl.where(ks == NPIV - 1, hi, c)
    gcols = tl.arange(0, GBLOCK)
    above_mass = tl.zeros([NPIV], tl.float64)
    total = tl.zeros([], tl.float64)
    nearest_above = tl.full([NPIV], pos_inf, ACC)
    nearest_below = tl.full([NPIV], neg_inf, ACC)
    for start in range(0, V, GBLOCK):
        offs = start + gcols
        z = tl.load(T_row + offs, mask=offs < V, other=neg_inf).to(ACC)
        e = tl.exp((z - mt) * inv_group_tau)  # 0 for -inf and masked-off lanes
        total += tl.sum(e, 0).to(tl.float64)
        above = z[:, None] >= c[None, :]
        above_mass += tl.sum(tl.where(above, e[:, None], 0.0), 0).to(tl.float64)
        nearest_above = tl.minimum(nearest_above, tl.min(tl.where(above, z[:, None], pos_inf), 0))
        nearest_below = tl.maximum(nearest_below, tl.max(tl.where(above, neg_inf, z[:, None]), 0))
    reaches = above_mass >= mass * total
    # the last pivot that reaches the mass (-1: none); nested sets make `reaches` a prefix
    k_last = tl.max(tl.where(reaches, ks, -1), 0)
    new_lo = tl.where(k_last >= 0, tl.max(tl.where(ks == k_last, nearest_above, neg_inf), 0), lo)
    below_next = tl.max(tl.where(ks == k_last + 1, nearest_below, neg_inf), 0)
    new_hi = tl.where(k_last == NPIV - 1, new_lo, below_next)
    return new_lo, new_hi


@triton.jit
def grouped_kd_rows_kernel(S_ptr, T_ptr, s_row_stride, t_row_stride, G_ptr, LABELS_ptr, PARAMS_ptr, INV_DENOM_ptr,
                           ROW_LOSS_ptr, STATUS_ptr, V, ignore_index,
                           HAS_LABELS: tl.constexpr, FULL_MASS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                           ACC: tl.constexpr, BLOCK: tl.constexpr, GBLOCK: tl.constexpr, NPIV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    S_row = S_ptr + row * s_row_stride
    T_row = T_ptr + row * t_row_stride
    G_row = G_ptr + row * V
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    inv_tau64 = tl.load(PARAMS_ptr + P_INV_TAU)
    inv_tau = inv_tau64.to(ACC)
    inv_group_tau = tl.load(PARAMS_ptr + P_INV_GROUP_TAU).to(ACC)
    mass = tl.load(PARAMS_ptr + P_MASS)
    primary_weight = tl.load(PARAMS_ptr + P_PRIMARY_WEIGHT)
    binary_weight = tl.load(PARAMS_ptr + P_BINARY_WEIGHT)
    tau2 = tl.load(PARAMS_ptr + P_TAU2)

    tl.store(ROW_LOSS_ptr + row, 0.0)
    tl.store(STATUS_ptr + row, row_kernel.STATUS_OK)
    label = -1
    if HAS_LABELS:
        label = tl.load(LABELS_ptr + row)
        if label == ignore_index:
            if COMPUTE_GRAD:
                _fill_zero_row(G_row, V, BLOCK)
            return
        if (label < 0) | (label >= V):
            tl.store(STATUS_ptr + row, row_kernel.STATUS_LABEL_OUT_OF_RANGE)
            return

    # -- A: logsumexps at T and the smallest finite teacher logit
    mt = tl.full([], neg_inf, ACC)
    ms = tl.full([], neg_inf, ACC)
    sum_t = tl.zeros([], tl.float64)
    sum_s = tl.zeros([], tl.float64)
    t_min = tl.full([], float("inf"), ACC)
    for start in range(0, V, BLOCK):
        offs = start + cols
        zt, zs = load_logits(T_row, S_row, offs, offs < V, ACC)
        t_min = tl.minimum(t_min, tl.min(tl.where(zt > neg_inf, zt, float("inf")), 0))
        mt, sum_t = _lse_update(mt, sum_t, zt, inv_tau)
        ms, sum_s = _lse_update(ms, sum_s, zs, inv_tau)
    status = row_kernel.all_neg_inf_status(mt, sum_t, ms, sum_s)
    if status != row_kernel.STATUS_OK:
        tl.store(STATUS_ptr + row, status)
        if COMPUTE_GRAD:
            _fill_zero_row(G_row, V, BLOCK)
        return
    if row_kernel.undefined_sums(sum_t, sum_s):
        tl.store(ROW_LOSS_ptr + row, float("nan"))
        if COMPUTE_GRAD:
            row_kernel.fill_row(G_row, V, float("nan"), BLOCK)
        return

    # -- G: the threshold logit z*; the primary group is {z_t >= z*} and the label
    z_star = t_min
    if not FULL_MASS:
        lo = t_min
        hi = mt
        while lo < hi:
            lo, hi = _threshold_sweep(T_row, V, lo, hi, mt, inv_group_tau, mass, ACC, GBLOCK, NPIV)
        z_star = lo

    # -- B: logsumexps over the primary group and over the rest
    mtp = tl.full([], neg_inf, ACC)
    msp = tl.full([], neg_inf, ACC)
    mto = tl.full([], neg_inf, ACC)
    mso = tl.full([], neg_inf, ACC)
    sum_tp = tl.zeros([], tl.float64)
    sum_sp = tl.zeros([], tl.float64)
    sum_to = tl.zeros([], tl.float64)
    sum_so = tl.zeros([], tl.float64)
    for i in range(0, tl.cdiv(V, BLOCK)):
        offs = row_kernel._tile_start(i, V, True, BLOCK) + cols
        mask = offs < V
        zt, zs = load_logits(T_row, S_row, offs, mask, ACC)
        primary = ((zt >= z_star) | (offs == label)) & mask
        mtp, sum_tp = _lse_update(mtp, sum_tp, tl.where(primary, zt, neg_inf), inv_tau)
        msp, sum_sp = _lse_update(msp, sum_sp, tl.where(primary, zs, neg_inf), inv_tau)
        mto, sum_to = _lse_update(mto, sum_to, tl.where(primary, neg_inf, zt), inv_tau)
        mso, sum_so = _lse_update(mso, sum_so, tl.where(primary, neg_inf, zs), inv_tau)

    mt64 = mt.to(tl.float64)
    ms64 = ms.to(tl.float64)
    log_sum_t = tl.log(sum_t)
    log_sum_s = tl.log(sum_s)
    log_tp = tl.log(sum_tp)  # -inf when the group holds no teacher mass (only a masked label)
    log_sp = tl.log(sum_sp)
    log_to = tl.log(sum_to)  # -inf when the rest is empty or masked
    log_so = tl.log(sum_so)
    # the two groups' log-masses, each relative to the row's own logsumexp
    log_pt = (_finite_shift(mtp).to(tl.float64) - mt64) * inv_tau64 + log_tp - log_sum_t
    log_qs = (_finite_shift(msp).to(tl.float64) - ms64) * inv_tau64 + log_sp - log_sum_s
    log_pt_rest = (_finite_shift(mto).to(tl.float64) - mt64) * inv_tau64 + log_to - log_sum_t
    log_qs_rest = (_finite_shift(mso).to(tl.float64) - ms64) * inv_tau64 + log_so - log_sum_s
    binary = _plogratio(log_pt, log_qs) + _plogratio(log_pt_rest, log_qs_rest)

    # -- C: Primary-KD and the gradient
    has_tp = sum_tp > 0
    has_sp = sum_sp > 0
    has_so = sum_so > 0
    sh_tp = _finite_shift(mtp)
    sh_sp = _finite_shift(msp)
    sh_so = _finite_shift(mso)
    lo_tp = tl.where(has_tp, log_tp, 0.0).to(ACC)
    lo_sp = tl.where(has_sp, log_sp, 0.0).to(ACC)
    lo_so = tl.where(has_so, log_so, 0.0).to(ACC)
    c = tl.load(PARAMS_ptr + P_GRAD_SCALE) * tl.load(INV_DENOM_ptr)  # T^2 / T / denominator
    gap = tl.exp(log_qs) - tl.exp(log_pt)  # Q - P_t
    coef_in_q = (c * (binary_weight * gap + primary_weight)).to(ACC)
    coef_in_p = tl.where(has_tp, -c * primary_weight, 0.0).to(ACC)
    coef_rest = (-c * binary_weight * gap).to(ACC)
    primary_kd = tl.zeros([], tl.float64)
    for i in range(0, tl.cdiv(V, BLOCK)):
        offs = row_kernel._tile_start(i, V, False, BLOCK) + cols
        mask = offs < V
        zt, zs = load_logits(T_row, S_row, offs, mask, ACC)
        primary = ((zt >= z_star) | (offs == label)) & mask
        # a group without mass has no distribution there: -inf everywhere, never NaN
        log_phat = tl.where(has_tp, tl.where(primary, (zt - sh_tp) * inv_tau - lo_tp, neg_inf), neg_inf)
        log_qhat = tl.where(has_sp, tl.where(primary, (zs - sh_sp) * inv_tau - lo_sp, neg_inf), neg_inf)
        phat = tl.exp(log_phat)
        qhat = tl.exp(log_qhat)
        primary_kd += tl.sum(tl.where(phat > 0, phat * (log_phat - log_qhat), 0.0), 0).to(tl.float64)
        if COMPUTE_GRAD:
            q_rest = tl.exp(tl.where(has_so, tl.where(primary, neg_inf, (zs - sh_so) * inv_tau - lo_so), neg_inf))
            out = tl.where(primary, coef_in_q * qhat + coef_in_p * phat, coef_rest * q_rest)
            tl.store(G_row + offs, _round_to(out, G_ptr.dtype.element_ty), mask=mask)
    tl.store(ROW_LOSS_ptr + row, tau2 * (binary_weight * binary + primary_weight * primary_kd))


# Tiles (BLOCK for the streaming sweeps, GBLOCK x PIVOTS for the threshold sweeps) and warps.  The interpreter
# gets small tiles, so that the test shapes (V ~ 40-100) span several tiles and a partial last one.
_GPU_CONFIGS = [triton.Config({"BLOCK": block, "GBLOCK": gblock}, num_warps=warps)
                for block, gblock, warps in ((1024, 256, 4), (4096, 512, 8), (8192, 512, 16))]
INTERPRETER_BLOCK = 16
_INTERPRETER_CONFIGS = [triton.Config({"BLOCK": INTERPRETER_BLOCK, "GBLOCK": INTERPRETER_BLOCK}, num_warps=4)]
_grouped_kd_rows = triton.autotune(
    configs=_INTERPRETER_CONFIGS if interpreting() else _GPU_CONFIGS,
    key=["V", "HAS_LABELS", "FULL_MASS", "COMPUTE_GRAD"],
)(grouped_kd_rows_kernel)


def _check_op_args(student, teacher, labels, tau, primary_mass, group_tau, reduction) -> None:
    """What keeps a direct caller of the op from reading out of bounds or looping on NaN; the public function
    (``kdfast.grouped_kd_loss``) has checked everything else before."""
    if student.shape != teacher.shape or student.dim() == 0 or student.shape[-1] == 0:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} logits must have the "
                         f"same shape with a non-empty last dimension")
    rows = student.numel() // student.shape[-1]
    if labels is not None and labels.numel() != rows:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the {rows} rows of logits shape "
                         f"{tuple(student.shape)}")
    if not (tau > 0 and group_tau > 0 and 0 < primary_mass <= 1):
        raise ValueError(f"need temperature > 0, group_temperature > 0 and primary_mass in (0, 1], got "
                         f"{tau}, {group_tau}, {primary_mass}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


@torch.library.custom_op("kdfast::grouped_kd_forward_triton", mutates_args=())
def grouped_kd_forward_triton(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                              tau: float, primary_mass: float, primary_weight: float, binary_weight: float,
                              group_tau: float, ignore_index: int, reduction: str,
                              compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Grouped KD loss (reduced, or ``(N,)`` for ``reduction="none"``) and the student gradient, on the Triton
    kernel; out-of-range labels and all ``-inf`` rows raise."""
    _check_op_args(student, teacher, labels, tau, primary_mass, group_tau, reduction)
    V = student.shape[-1]
    s2, t2 = _as_rows(student), _as_rows(teacher)
    N = s2.shape[0]
    device = student.device
    f64 = student.dtype == torch.float64 or teacher.dtype == torch.float64
    grad, row_loss, status = row_outputs(student, N, compute_grad, f64)
    labels64 = labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None
    inv_denom = _inv_denominator(reduction, None, labels64, ignore_index, N, device)
    values = dict(inv_tau=1.0 / tau, inv_group_tau=1.0 / group_tau, primary_mass=primary_mass,
                  primary_weight=primary_weight, binary_weight=binary_weight, tau2=tau * tau, grad_scale=tau)
    params = torch.tensor([values[name] for name in PARAMS], dtype=torch.float64, device=device)
    if N > 0:
        _grouped_kd_rows[(N,)](s2, t2, s2.stride(0), t2.stride(0), grad,
                               labels64 if labels64 is not None else status, params, inv_denom, row_loss, status, V,
                               ignore_index, HAS_LABELS=labels is not None, FULL_MASS=primary_mass >= 1.0,
                               COMPUTE_GRAD=compute_grad, ACC=tl.float64 if f64 else tl.float32, NPIV=PIVOTS)
        _raise_on_bad_rows(status, labels64, V, ignore_index)
    if reduction == "none":
        return row_loss, grad
    return reduced_loss(row_loss, inv_denom), grad


@grouped_kd_forward_triton.register_fake
def _(student, teacher, labels, tau, primary_mass, primary_weight, binary_weight, group_tau, ignore_index, reduction,
      compute_grad):
    return fake_loss_and_grad(student, teacher, reduction, compute_grad)


register_saved_grad_autograd(grouped_kd_forward_triton, _N_INPUTS,
                             per_row=lambda inputs: inputs[_REDUCTION_ARG] == "none")


def grouped_kd_loss_triton(student_logits, teacher_logits, labels, temperature, primary_mass, primary_weight,
                           binary_weight, group_temperature, ignore_index, reduction):
    """The fused Triton Grouped KD kernel; same contract as ``reference.grouped_kd.grouped_kd_loss_reference``."""
    s, t = paired_logits(student_logits, teacher_logits)
    loss, _ = grouped_kd_forward_triton(s, t, labels, temperature, primary_mass, primary_weight, binary_weight,
                                        group_temperature, ignore_index, reduction, wants_grad(s))
    return loss
