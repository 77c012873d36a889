"""Decoupled KD in Triton: the row kernel, its launcher and the op ``kdfast::dkd_forward_triton``.

One program per row, two sweeps over vocabulary tiles:

  A. online logsumexps of teacher and student over all classes and over the
     non-target classes (the target lane masked, never subtracted: a target of
     probability ~1 loses nothing to cancellation);
  B. NCKD's value and the gradient, with the final normalisers (so large
     logits never meet a running shift).

TCKD comes from the scalars of A.  Same contract as ``reference.dkd`` and the
C++ kernel (csrc/kernels/dkd_kernel.h); per-row losses are summed by the
fixed-order ``reduce_kernel``.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..fused_op import fake_scalar_loss_and_grad, paired_logits, register_saved_grad_autograd, wants_grad
from . import row_kernel
from .launch import (INTERPRETER_BLOCK, _as_rows, _inv_denominator, _raise_on_bad_rows, interpreting, reduced_loss,
                     row_outputs)
from .row_kernel import _fill_zero_row, _finite_shift, _lse_update, _round_to, load_logits


@triton.jit
def _plogratio(log_p, log_q):
    """``p (log p - log q)`` with ``0 log 0 = 0`` (scalars)."""
    return tl.where(log_p == float("-inf"), 0.0, tl.exp(log_p) * (log_p - log_q))


@triton.jit
def dkd_rows_kernel(S_ptr, T_ptr, s_row_stride, t_row_stride, G_ptr, LABELS_ptr, PARAMS_ptr, ROW_LOSS_ptr,
                    STATUS_ptr, V, ignore_index, COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    S_row = S_ptr + row * s_row_stride
    T_row = T_ptr + row * t_row_stride
    G_row = G_ptr + row * V
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    # params: inv_tau, alpha, beta, tau^2, c = tau^2 / tau / valid rows
    inv_tau = tl.load(PARAMS_ptr + 0).to(ACC)
    alpha = tl.load(PARAMS_ptr + 1)
    beta = tl.load(PARAMS_ptr + 2)
    tau2 = tl.load(PARAMS_ptr + 3)
    c = tl.load(PARAMS_ptr + 4)

    label = tl.load(LABELS_ptr + row)
    tl.store(ROW_LOSS_ptr + row, 0.0)
    tl.store(STATUS_ptr + row, row_kernel.STATUS_OK)
    if (label != ignore_index) & ((label < 0) | (label >= V)):
        tl.store(STATUS_ptr + row, row_kernel.STATUS_LABEL_OUT_OF_RANGE)
        return
    if label == ignore_index:
        if COMPUTE_GRAD:
            _fill_zero_row(G_row, V, BLOCK)
        return

    # -- A: logsumexps over all classes and over the non-target ones
    mt = tl.full([], neg_inf, ACC)
    ms = tl.full([], neg_inf, ACC)
    mot = tl.full([], neg_inf, ACC)
    mos = tl.full([], neg_inf, ACC)
    sum_t = tl.zeros([], tl.float64)
    sum_s = tl.zeros([], tl.float64)
    other_t = tl.zeros([], tl.float64)
    other_s = tl.zeros([], tl.float64)
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        zt, zs = load_logits(T_row, S_row, offs, mask, ACC)
        is_target = offs == label
        mot, other_t = _lse_update(mot, other_t, tl.where(is_target, neg_inf, zt), inv_tau)
        mos, other_s = _lse_update(mos, other_s, tl.where(is_target, neg_inf, zs), inv_tau)
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

    inv_tau64 = inv_tau.to(tl.float64)
    log_sum_t = tl.log(sum_t)
    log_sum_s = tl.log(sum_s)
    log_other_t = tl.log(other_t)  # -inf when the teacher has no mass off the target
    log_other_s = tl.log(other_s)
    z_label_t = tl.load(T_row + label).to(tl.float64)
    z_label_s = tl.load(S_row + label).to(tl.float64)
    log_pt = (z_label_t - mt.to(tl.float64)) * inv_tau64 - log_sum_t
    log_qt = (z_label_s - ms.to(tl.float64)) * inv_tau64 - log_sum_s
    log_pnt = (_finite_shift(mot).to(tl.float64) - mt.to(tl.float64)) * inv_tau64 + log_other_t - log_sum_t
    log_qnt = (_finite_shift(mos).to(tl.float64) - ms.to(tl.float64)) * inv_tau64 + log_other_s - log_sum_s
    tckd = _plogratio(log_pt, log_qt) + _plogratio(log_pnt, log_qnt)

    # -- B: NCKD over the non-target classes and the gradient
    has_t = other_t > 0
    has_s = other_s > 0
    sh_t = _finite_shift(mot)
    sh_s = _finite_shift(mos)
    lo_t = tl.where(has_t, log_other_t, 0.0).to(ACC)
    lo_s = tl.where(has_s, log_other_s, 0.0).to(ACC)
    gap = tl.exp(log_qt) - tl.exp(log_pt)
    beta_nckd = tl.where(has_t, beta, 0.0)  # no NCKD (nor its gradient) without teacher mass there
    coef_q = tl.where(has_s, c * (beta_nckd - alpha * gap), 0.0).to(ACC)
    coef_p = tl.where(has_t, -c * beta, 0.0).to(ACC)
    at_target = (c * alpha * gap).to(ACC)
    nckd = tl.zeros([], tl.float64)
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        is_other = mask & (offs != label)
        zt, zs = load_logits(T_row, S_row, offs, mask, ACC)
        # no mass off the target: no distribution there (all -inf), never NaN
        log_phat = tl.where(has_t, tl.where(is_other, (zt - sh_t) * inv_tau - lo_t, neg_inf), neg_inf)
        log_qhat = tl.where(has_s, tl.where(is_other, (zs - sh_s) * inv_tau - lo_s, neg_inf), neg_inf)
        phat = tl.exp(log_phat)
        qhat = tl.exp(log_qhat)
        nckd += tl.sum(tl.where(phat > 0, phat * (log_phat - log_qhat), 0.0), 0).to(tl.float64)
        if COMPUTE_GRAD:
            out = tl.where(offs == label, at_target, coef_q * qhat + coef_p * phat)
            tl.store(G_row + offs, _round_to(out, G_ptr.dtype.element_ty), mask=mask)
    nckd = tl.where(has_t, nckd, 0.0)
    tl.store(ROW_LOSS_ptr + row, tau2 * (alpha * tckd + beta * nckd))


_GPU_CONFIGS = [triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in ((1024, 4), (4096, 8), (8192, 16))]
_dkd_rows = triton.autotune(
    configs=[triton.Config({"BLOCK": INTERPRETER_BLOCK}, num_warps=4)] if interpreting() else _GPU_CONFIGS,
    key=["V", "COMPUTE_GRAD"],
)(dkd_rows_kernel)


@torch.library.custom_op("kdfast::dkd_forward_triton", mutates_args=())
def dkd_forward_triton(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, tau: float, alpha: float,
                       beta: float, ignore_index: int, compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """DKD loss and student gradient on the Triton kernel (out-of-range labels and all -inf rows raise)."""
    V = student.shape[-1]
    s2, t2 = _as_rows(student), _as_rows(teacher)
    N = s2.shape[0]
    device = student.device
    f64 = student.dtype == torch.float64
    grad, row_loss, status = row_outputs(student, N, compute_grad, f64)
    labels64 = labels.reshape(-1).to(torch.int64).contiguous()
    inv_valid = _inv_denominator("batchmean", None, labels64, ignore_index, N, device)
    params = torch.tensor([1.0 / tau, alpha, beta, tau * tau, tau], dtype=torch.float64, device=device)
    params[4:] = params[4:] * inv_valid  # c = tau^2 / tau / valid rows, on the device: no sync
    if N > 0:
        _dkd_rows[(N,)](s2, t2, s2.stride(0), t2.stride(0), grad, labels64, params, row_loss, status, V,
                        ignore_index, COMPUTE_GRAD=compute_grad, ACC=tl.float64 if f64 else tl.float32)
        _raise_on_bad_rows(status, labels64, V, ignore_index)
    return reduced_loss(row_loss, inv_valid), grad


@dkd_forward_triton.register_fake
def _(student, teacher, labels, tau, alpha, beta, ignore_index, compute_grad):
    return fake_scalar_loss_and_grad(student, compute_grad)


register_saved_grad_autograd(dkd_forward_triton, 8)


def dkd_loss_triton(student_logits, teacher_logits, labels, temperature, alpha, beta, ignore_index):
    """The fused Triton DKD kernel; same contract as ``reference.dkd.dkd_loss_reference``."""
    s, t = paired_logits(student_logits, teacher_logits)
    loss, _ = dkd_forward_triton(s, t, labels, temperature, alpha, beta, ignore_index, wants_grad(s))
    return loss
