"""Long-tailed KD in Triton: the row kernels, their launchers and the ops ``kdfast::ltkd_forward_triton`` and
``kdfast::ltkd_teacher_group_log_masses_triton``.

One program per row, the row streamed in vocabulary tiles.  The per-group
statistics are vectors of ``GP`` lanes (``G`` rounded up to a power of two,
at most ``MAX_FUSED_GROUPS``); a tile's classes meet their group through a
``(BLOCK, GP)`` one-hot mask of the group ids, so the per-group running
logsumexps are the row kernel's ``_lse_update`` on the masked tile, each
group with its own running maximum (a tail group far below the row's maximum
keeps its within-group distribution, which uniform weighting counts in full).

``ltkd_rows_kernel``, two sweeps:

  A. per-group online logsumexps of teacher and student at ``T``;
  B. the within-group KLs and the gradient, with the final normalisers.

The inter-group KL comes from the group log-masses of A and the log prior
(``HAS_PRIOR``: the batch's, from ``ltkd_teacher_groups_kernel``, a teacher
pass A alone, or a given one).  Gradient with respect to the student logits,
written in the forward (``c = T / denominator``, ``w_g`` the intra weight)::

    grad_c = c [ inter_weight (Q_g - P~_g) q_{c|g} + intra_weight w_g (q_{c|g} - p_{c|g}) ],  g = group of c

Same contract as ``reference.longtail.ltkd_loss_reference`` and the C++
kernel (csrc/kernels/ltkd_kernel.h); per-row losses are summed by the
fixed-order ``reduce_kernel``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..fused_op import fake_distill_loss, register_saved_grad_autograd
from ..ltkd_fused import MAX_FUSED_GROUPS, fused_ltkd_loss
from . import row_kernel
from .launch import _as_rows, _inv_denominator, _raise_on_bad_rows, interpreting, reduced_loss, row_outputs
from .row_kernel import _finite_shift, _lse_update, _round_to, load_logits

# float64 parameter vector (Triton would pass Python floats as float32)
PARAMS = ("inv_tau", "inter_weight", "intra_weight", "tau2", "grad_scale")
P_INV_TAU = tl.constexpr(0)
P_INTER = tl.constexpr(1)
P_INTRA = tl.constexpr(2)
P_TAU2 = tl.constexpr(3)
P_GRAD_SCALE = tl.constexpr(4)

_REDUCTIONS = ("batchmean", "sum", "none")
_N_INPUTS = 11
_REDUCTION_ARG = 9


@triton.jit
def _group_tile(T_row, S_row, GROUPS_ptr, offs, V, ACC: tl.constexpr, GP: tl.constexpr):
    """A tile's teacher and student logits and its ``(BLOCK, GP)`` one-hot group mask (none past the row's end)."""
    mask = offs < V
    zt, zs = load_logits(T_row, S_row, offs, mask, ACC)
    gid = tl.load(GROUPS_ptr + offs, mask=mask, other=-1)
    return zt, zs, gid[:, None] == tl.arange(0, GP)[None, :]


@triton.jit
def _per_class(onehot, per_group):
    """Each class's entry of a per-group vector (0 past the row's end): a masked sum, exact with one term."""
    return tl.sum(tl.where(onehot, per_group[None, :], 0.0), 1)


@triton.jit
def _group_log_masses(m, total, inv_tau64):
    """``log P_g`` (float64) from per-group running ``(max, sum)``: ``-inf`` for a group without mass."""
    has = total > 0
    lse_g = tl.where(has, _finite_shift(m).to(tl.float64) * inv_tau64 + tl.log(tl.where(has, total, 1.0)),
                     float("-inf"))
    return lse_g - _lse_groups(lse_g)


@triton.jit
def _lse_groups(x):
    """``log sum_g exp(x_g)`` of a float64 vector with at least one finite entry."""
    top = tl.max(x, 0)
    return top + tl.log(tl.sum(tl.exp(x - top), 0))


@triton.jit
def _group_sweep_a(T_row, S_row, GROUPS_ptr, V, inv_tau, ACC: tl.constexpr, BLOCK: tl.constexpr, GP: tl.constexpr):
    """Sweep A: per-group running ``(max, sum)`` of teacher and student."""
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    mt = tl.full([GP], neg_inf, ACC)
    st = tl.zeros([GP], tl.float64)
    ms = tl.full([GP], neg_inf, ACC)
    ss = tl.zeros([GP], tl.float64)
    for start in range(0, V, BLOCK):
        zt, zs, onehot = _group_tile(T_row, S_row, GROUPS_ptr, start + cols, V, ACC, GP)
        mt, st = _lse_update(mt, st, tl.where(onehot, zt[:, None], neg_inf), inv_tau)
        ms, ss = _lse_update(ms, ss, tl.where(onehot, zs[:, None], neg_inf), inv_tau)
    return mt, st, ms, ss


@triton.jit
def _row_status(mt, st, ms, ss):
    """The row's status (all -inf teacher or student) and whether it has a NaN or +inf logit."""
    sum_t = tl.sum(st, 0)
    sum_s = tl.sum(ss, 0)
    status = row_kernel.all_neg_inf_status(tl.max(mt, 0), sum_t, tl.max(ms, 0), sum_s)
    return status, row_kernel.undefined_sums(sum_t, sum_s)


@triton.jit
def ltkd_teacher_groups_kernel(S_ptr, T_ptr, s_row_stride, t_row_stride, GROUPS_ptr, PARAMS_ptr, OUT_ptr, STATUS_ptr,
                               V, NUM_GROUPS, ACC: tl.constexpr, BLOCK: tl.constexpr, GP: tl.constexpr):
    """Sweep A of the teacher alone; of the student only whether it has a NaN or +inf logit (no exponentials).
    An all -inf student row is left to the loss kernel, which refuses it."""
    row = tl.program_id(0).to(tl.int64)
    T_row = T_ptr + row * t_row_stride
    S_row = S_ptr + row * s_row_stride
    inv_tau64 = tl.load(PARAMS_ptr + P_INV_TAU)
    inv_tau = inv_tau64.to(ACC)
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    mt = tl.full([GP], neg_inf, ACC)
    st = tl.zeros([GP], tl.float64)
    student_bad = tl.zeros([], tl.int32)
    for start in range(0, V, BLOCK):
        zt, zs, onehot = _group_tile(T_row, S_row, GROUPS_ptr, start + cols, V, ACC, GP)
        mt, st = _lse_update(mt, st, tl.where(onehot, zt[:, None], neg_inf), inv_tau)
        student_bad += tl.sum(((zs != zs) | (zs == float("inf"))).to(tl.int32), 0)
    sum_t = tl.sum(st, 0)
    dead = (tl.max(mt, 0) == neg_inf) & (sum_t == 0)
    tl.store(STATUS_ptr + row, tl.where(dead, row_kernel.STATUS_TEACHER_ALL_NEG_INF, row_kernel.STATUS_OK))
    gids = tl.arange(0, GP)
    log_p = _group_log_masses(mt, st, inv_tau64)
    # a NaN row stays out of the batch's prior; a dead row raises (its values are never read)
    log_p = tl.where((sum_t != sum_t) | (student_bad > 0) | dead, float("nan"), log_p)
    tl.store(OUT_ptr + row * NUM_GROUPS + gids, log_p, mask=gids < NUM_GROUPS)


@triton.jit
def ltkd_rows_kernel(S_ptr, T_ptr, s_row_stride, t_row_stride, G_ptr, GROUPS_ptr, PRIOR_ptr, PARAMS_ptr,
                     INV_DENOM_ptr, ROW_LOSS_ptr, STATUS_ptr, V, HAS_PRIOR: tl.constexpr,
                     TEACHER_WEIGHTING: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr,
                     BLOCK: tl.constexpr, GP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    S_row = S_ptr + row * s_row_stride
    T_row = T_ptr + row * t_row_stride
    G_row = G_ptr + row * V
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    inv_tau64 = tl.load(PARAMS_ptr + P_INV_TAU)
    inv_tau = inv_tau64.to(ACC)
    inter_weight = tl.load(PARAMS_ptr + P_INTER)
    intra_weight = tl.load(PARAMS_ptr + P_INTRA)
    tau2 = tl.load(PARAMS_ptr + P_TAU2)
    tl.store(ROW_LOSS_ptr + row, 0.0)

    # -- A: per-group logsumexps
    mt, st, ms, ss = _group_sweep_a(T_row, S_row, GROUPS_ptr, V, inv_tau, ACC, BLOCK, GP)
    status, undefined = _row_status(mt, st, ms, ss)
    tl.store(STATUS_ptr + row, status)
    if status != row_kernel.STATUS_OK:
        if COMPUTE_GRAD:
            row_kernel._fill_zero_row(G_row, V, BLOCK)
        return
    if undefined:
        tl.store(ROW_LOSS_ptr + row, float("nan"))
        if COMPUTE_GRAD:
            row_kernel.fill_row(G_row, V, float("nan"), BLOCK)
        return

    # -- the inter-group KL between the target P~ and Q
    log_p = _group_log_masses(mt, st, inv_tau64)
    log_q = _group_log_masses(ms, ss, inv_tau64)
    has_p = st > 0
    log_target = log_p
    if HAS_PRIOR:  # P~_g ∝ P_g / prior_g over the groups that have teacher mass
        shifted = tl.where(has_p, log_p - tl.load(PRIOR_ptr + tl.arange(0, GP)), neg_inf)
        log_target = shifted - _lse_groups(shifted)
    has_target = log_target > neg_inf
    inter = tl.sum(tl.where(has_target, tl.exp(log_target) * (log_target - log_q), 0.0), 0)
    if TEACHER_WEIGHTING:
        weight = tl.where(has_p, tl.exp(log_p), 0.0)
    else:
        weight = tl.where(has_p, 1.0, 0.0)

    # -- B: the within-group KLs and the gradient
    sh_t = _finite_shift(mt)
    sh_s = _finite_shift(ms)
    lo_t = tl.where(has_p, tl.log(tl.where(has_p, st, 1.0)), 0.0).to(ACC)
    has_q = ss > 0
    lo_s = tl.where(has_q, tl.log(tl.where(has_q, ss, 1.0)), 0.0).to(ACC)
    c = tl.load(PARAMS_ptr + P_GRAD_SCALE) * tl.load(INV_DENOM_ptr)  # T^2 / T / denominator
    target = tl.where(has_target, tl.exp(log_target), 0.0)
    coef_q = tl.where(has_q, c * (inter_weight * (tl.exp(log_q) - target) + intra_weight * weight), 0.0).to(ACC)
    coef_p = (-c * intra_weight * weight).to(ACC)
    within = tl.zeros([GP], tl.float64)
    for i in range(0, tl.cdiv(V, BLOCK)):
        offs = row_kernel._tile_start(i, V, True, BLOCK) + cols
        zt, zs, onehot = _group_tile(T_row, S_row, GROUPS_ptr, offs, V, ACC, GP)
        # -inf for a class without mass and past the row's end (its group shift reads 0 there)
        log_pc = (zt - _per_class(onehot, sh_t)) * inv_tau - _per_class(onehot, lo_t)
        log_qc = (zs - _per_class(onehot, sh_s)) * inv_tau - _per_class(onehot, lo_s)
        pc = tl.exp(log_pc)
        qc = tl.exp(log_qc)
        term = tl.where(pc > 0, pc * (log_pc - log_qc), 0.0)  # +inf where the student masks a class the teacher holds
        within += tl.sum(tl.where(onehot, term[:, None], 0.0), 0).to(tl.float64)
        if COMPUTE_GRAD:
            out = _per_class(onehot, coef_q) * qc + _per_class(onehot, coef_p) * pc
            tl.store(G_row + offs, _round_to(out, G_ptr.dtype.element_ty), mask=offs < V)
    intra = tl.sum(tl.where(weight > 0, weight * within, 0.0), 0)
    loss = tl.where(inter_weight != 0, inter_weight * inter, 0.0) + tl.where(intra_weight != 0, intra_weight * intra,
                                                                             0.0)
    tl.store(ROW_LOSS_ptr + row, tau2 * loss)


# Tiles.  A tile is a (BLOCK, GP) block of registers in the one-hot sweeps, so BLOCK shrinks as GP grows: about
# 4k live lanes per tensor (1024 classes for LTKD's 3 groups), spread over 8 warps.  A fixed rule rather than
# autotuning: not yet timed on a GPU.  The interpreter gets small tiles, so that the test shapes (V ~ 40) span
# several tiles and a partial last one.
INTERPRETER_BLOCK = 16
_LANES_PER_TILE = 4096


def _launch_config(gp: int) -> dict:
    """``BLOCK`` and ``num_warps`` of the row kernels for ``GP`` group lanes."""
    if interpreting():
        return dict(BLOCK=INTERPRETER_BLOCK, num_warps=4)
    return dict(BLOCK=max(128, _LANES_PER_TILE // gp), num_warps=8)


def _lanes(num_groups: int) -> int:
    """``GP``: the groups' vector width, a power of two >= 2 (Triton's smallest comfortable vector)."""
    return max(2, triton.next_power_of_2(num_groups))


def _group_ids(student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The checks that keep a direct caller of the ops from reading out of bounds, and the ids as int32 on the
    logits' device (the public function, ``kdfast.ltkd_loss``, has checked everything else)."""
    if student.shape != teacher.shape or student.dim() == 0 or student.shape[-1] == 0:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} logits must have the "
                         f"same shape with a non-empty last dimension")
    if not 1 <= num_groups <= MAX_FUSED_GROUPS:
        raise ValueError(f"the fused LTKD kernels take 1 to {MAX_FUSED_GROUPS} groups, got num_groups={num_groups}")
    V = student.shape[-1]
    if groups.shape != (V,) or groups.is_floating_point():
        raise ValueError(f"groups must hold one integer group id per class: {tuple(groups.shape)} for {V} classes")
    if bool(((groups < 0) | (groups >= num_groups)).any()):
        raise ValueError(f"group ids must be in [0, {num_groups})")
    return groups.to(device=student.device, dtype=torch.int32).contiguous()


@torch.library.custom_op("kdfast::ltkd_teacher_group_log_masses_triton", mutates_args=())
def ltkd_teacher_group_log_masses_triton(student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor,
                                         num_groups: int, tau: float) -> torch.Tensor:
    """The teacher's ``(N, G)`` group log-masses ``log P_g`` (float64), NaN on rows with a NaN or ``+inf`` logit in
    either input; all ``-inf`` teacher rows raise (the loss op refuses the student's)."""
    ids = _group_ids(student, teacher, groups, num_groups)
    s2, t2 = _as_rows(student), _as_rows(teacher)
    N, V = s2.shape
    out = torch.empty((N, num_groups), dtype=torch.float64, device=student.device)
    status = torch.zeros(N, dtype=torch.int32, device=student.device)
    if N > 0:
        f64 = student.dtype == torch.float64
        params = torch.tensor([1.0 / tau], dtype=torch.float64, device=student.device)  # P_INV_TAU
        gp = _lanes(num_groups)
        ltkd_teacher_groups_kernel[(N,)](s2, t2, s2.stride(0), t2.stride(0), ids, params, out, status, V, num_groups,
                                         ACC=tl.float64 if f64 else tl.float32, GP=gp, **_launch_config(gp))
        _raise_on_bad_rows(status, None, V, 0)
    return out


@ltkd_teacher_group_log_masses_triton.register_fake
def _(student, teacher, groups, num_groups, tau):
    return student.new_empty((student.numel() // student.shape[-1], num_groups), dtype=torch.float64)


@torch.library.custom_op("kdfast::ltkd_forward_triton", mutates_args=())
def ltkd_forward_triton(student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor, num_groups: int,
                        log_prior: Optional[torch.Tensor], tau: float, inter_weight: float, intra_weight: float,
                        teacher_weighting: bool, reduction: str,
                        compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """LTKD loss (reduced, or ``(N,)`` for ``reduction="none"``) and the student gradient on the Triton kernel;
    all ``-inf`` rows raise."""
    ids = _group_ids(student, teacher, groups, num_groups)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    s2, t2 = _as_rows(student), _as_rows(teacher)
    N, V = s2.shape
    device = student.device
    f64 = student.dtype == torch.float64
    grad, row_loss, status = row_outputs(student, N, compute_grad, f64)
    gp = _lanes(num_groups)
    prior = torch.zeros(gp, dtype=torch.float64, device=device)  # the padding lanes are groups without classes
    if log_prior is not None:
        prior[:num_groups] = log_prior.reshape(num_groups).to(device=device, dtype=torch.float64)
    inv_denom = _inv_denominator(reduction, None, None, 0, N, device)
    values = dict(inv_tau=1.0 / tau, inter_weight=inter_weight, intra_weight=intra_weight, tau2=tau * tau,
                  grad_scale=tau)
    params = torch.tensor([values[name] for name in PARAMS], dtype=torch.float64, device=device)
    if N > 0:
        ltkd_rows_kernel[(N,)](s2, t2, s2.stride(0), t2.stride(0), grad, ids, prior, params, inv_denom, row_loss,
                               status, V, HAS_PRIOR=log_prior is not None, TEACHER_WEIGHTING=teacher_weighting,
                               COMPUTE_GRAD=compute_grad, ACC=tl.float64 if f64 else tl.float32, GP=gp,
                               **_launch_config(gp))
        _raise_on_bad_rows(status, None, V, 0)
    if reduction == "none":
        return row_loss, grad
    return reduced_loss(row_loss, inv_denom), grad


@ltkd_forward_triton.register_fake
def _(student, teacher, groups, num_groups, log_prior, tau, inter_weight, intra_weight, teacher_weighting, reduction,
      compute_grad):
    V = student.shape[-1]
    grad = student.new_empty((student.numel() // V, V) if compute_grad else (0,))
    return fake_distill_loss(student, teacher, reduction), grad


register_saved_grad_autograd(ltkd_forward_triton, _N_INPUTS, per_row=lambda inputs: inputs[_REDUCTION_ARG] == "none")


def ltkd_loss_triton(student_logits, teacher_logits, index, count, temperature, inter_weight, intra_weight, mode,
                     intra_weighting, reduction):
    """The fused Triton LTKD kernels; same contract as ``reference.longtail.ltkd_loss_reference``."""
    return fused_ltkd_loss(ltkd_forward_triton, ltkd_teacher_group_log_masses_triton, student_logits, teacher_logits,
                           index, count, temperature, inter_weight, intra_weight, mode, intra_weighting, reduction)
