"""Pearson + Spearman correlation matching in Triton: the row kernel, its launcher and
the op ``kdfast::correlation_forward_triton``.

One program per row; the whole row (V <= 4096, the loss's cap) is held in
registers, so no scratch memory is needed:

  1. softmaxes of both rows and the Pearson sums of their centred values;
  2. the ranks, in tiles of BLOCK_J rows against the whole row: the teacher's
     exact ranks ``1/2 + sum_k step(z_j - z_k)`` (``step(0) = 1/2``: ties share
     their average rank) and the student's soft ranks ``1/2 + sum_k
     sigmoid((x_j - x_k) / strength)``, scattered into the row vectors;
  3. the Spearman sums, the row loss and, tile by tile, the gradient: the
     softmax Jacobian of the Pearson term plus the dense soft-rank Jacobian
     ``sum_k sigmoid'(d_mk) (h_m - h_k) / (tau strength)``.

Same contract as ``reference_correlation`` and the C++ kernel
(csrc/kernels/correlation_kernel.h); per-row losses are summed by the
fixed-order ``reduce_kernel``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..fused_op import fake_scalar_loss_and_grad, paired_logits, register_saved_grad_autograd, wants_grad
from . import row_kernel
from .launch import _as_rows, _raise_on_bad_rows, interpreting, reduced_loss, row_outputs
from .pearson import centred_pearson
from .row_kernel import _fill_zero_row, _round_to, load_logits

PEARSON_EPS = tl.constexpr(1e-8)  # torchdistill: each centred norm clamped below by eps


@triton.jit
def _tile_of(vec, place):
    """The entries of a row vector at a tile's positions (``place``: tile x row one-hot)."""
    return tl.sum(tl.where(place, vec[None, :], 0.0), 1)


@triton.jit
def correlation_rows_kernel(S_ptr, T_ptr, s_row_stride, t_row_stride, G_ptr, W_ptr, PARAMS_ptr, ROW_LOSS_ptr,
                            STATUS_ptr, V, HAS_WEIGHTS: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_V: tl.constexpr, BLOCK_J: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    S_row = S_ptr + row * s_row_stride
    T_row = T_ptr + row * t_row_stride
    G_row = G_ptr + row * V
    cols = tl.arange(0, BLOCK_V)
    live = cols < V
    neg_inf = float("-inf")
    pos_inf = float("inf")
    # params: 1/tau, 1/(tau strength), pearson_weight, spearman_weight, 1/N
    inv_tau = tl.load(PARAMS_ptr + 0).to(ACC)
    rank_scale = tl.load(PARAMS_ptr + 1).to(ACC)
    pearson_weight = tl.load(PARAMS_ptr + 2)
    spearman_weight = tl.load(PARAMS_ptr + 3)
    inv_rows = tl.load(PARAMS_ptr + 4)
    tl.store(ROW_LOSS_ptr + row, 0.0)
    tl.store(STATUS_ptr + row, row_kernel.STATUS_OK)

    zt, zs = load_logits(T_row, S_row, cols, live, ACC)
    mt = tl.max(zt, 0)
    ms = tl.max(zs, 0)
    if (mt == neg_inf) | (ms == neg_inf):
        tl.store(STATUS_ptr + row, tl.where(mt == neg_inf, row_kernel.STATUS_TEACHER_ALL_NEG_INF,
                                            row_kernel.STATUS_STUDENT_ALL_NEG_INF))
        if COMPUTE_GRAD:
            _fill_zero_row(G_row, V, BLOCK_V)
        return

    # -- 1: softmaxes and the Pearson sums (the mean of a softmax row is exactly 1/V)
    et = tl.exp((zt - mt) * inv_tau)
    es = tl.exp((zs - ms) * inv_tau)
    yt = et * (1.0 / tl.sum(et.to(tl.float64), 0)).to(ACC)
    ys = es * (1.0 / tl.sum(es.to(tl.float64), 0)).to(ACC)
    mean = 1.0 / V
    a = tl.where(live, ys - mean, 0.0)
    b = tl.where(live, yt - mean, 0.0)
    rho_p, coef_b_p, coef_a_p = centred_pearson(tl.sum((a * b).to(tl.float64), 0), tl.sum((a * a).to(tl.float64), 0),
                                                tl.sum((b * b).to(tl.float64), 0), PEARSON_EPS)

    # -- 2: ranks; padding lanes compare as +inf (they add 0), two -inf logits tie (NaN -> 0)
    zt_cmp = tl.where(live, zt, pos_inf)
    xs = tl.where(live, zs * rank_scale, pos_inf)
    rank_t = tl.zeros([BLOCK_V], ACC)
    rank_s = tl.zeros([BLOCK_V], ACC)
    for j0 in range(0, V, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        ztj, zsj = load_logits(T_row, S_row, offs_j, offs_j < V, ACC)
        dt = ztj[:, None] - zt_cmp[None, :]
        dt = tl.where(dt != dt, 0.0, dt)
        exact = tl.sum(tl.where(dt > 0, 1.0, tl.where(dt == 0, 0.5, 0.0)), 1)
        d = (zsj * rank_scale)[:, None] - xs[None, :]
        d = tl.where(d != d, 0.0, d)
        e = tl.exp(-tl.abs(d))
        soft = tl.sum(tl.where(d > 0, 1.0, e) / (1.0 + e), 1)
        place = offs_j[:, None] == cols[None, :]
        rank_t += tl.sum(tl.where(place, exact[:, None], 0.0), 0).to(ACC)
        rank_s += tl.sum(tl.where(place, soft[:, None], 0.0), 0).to(ACC)
    mean_rank = 0.5 * (V + 1)
    rank_t = tl.where(live, rank_t + (0.5 - mean_rank), 0.0)
    rank_s = tl.where(live, rank_s + (0.5 - mean_rank), 0.0)
    rho_s, coef_b_s, coef_a_s = centred_pearson(tl.sum((rank_s * rank_t).to(tl.float64), 0),
                                                tl.sum((rank_s * rank_s).to(tl.float64), 0),
                                                tl.sum((rank_t * rank_t).to(tl.float64), 0), PEARSON_EPS)

    # -- 3: loss and gradient
    if HAS_WEIGHTS:
        w = tl.load(W_ptr + row).to(tl.float64)
        c_values = pearson_weight * w
        c_ranks = spearman_weight * (1.0 - w)
    else:
        c_values = pearson_weight
        c_ranks = spearman_weight
    tl.store(ROW_LOSS_ptr + row, c_values * (1.0 - rho_p) + c_ranks * (1.0 - rho_s))
    if COMPUTE_GRAD:
        k_values = -c_values * inv_rows
        g = (k_values * coef_b_p).to(ACC) * b - (k_values * coef_a_p).to(ACC) * a
        yg = tl.sum((ys * g).to(tl.float64), 0).to(ACC)
        grad_values = ys * (g - yg) * inv_tau
        k_ranks = -c_ranks * inv_rows
        h = (k_ranks * coef_b_s).to(ACC) * rank_t - (k_ranks * coef_a_s).to(ACC) * rank_s
        for m0 in range(0, V, BLOCK_J):
            offs_m = m0 + tl.arange(0, BLOCK_J)
            mask_m = offs_m < V
            zsm = tl.load(S_row + offs_m, mask=mask_m, other=neg_inf).to(ACC)
            place = offs_m[:, None] == cols[None, :]
            d = (zsm * rank_scale)[:, None] - xs[None, :]
            d = tl.where(d != d, pos_inf, d)  # a -inf pair: no gradient
            e = tl.exp(-tl.abs(d))
            slope = e / ((1.0 + e) * (1.0 + e))
            ranks_part = tl.sum(slope * (_tile_of(h, place)[:, None] - h[None, :]), 1)
            out = _tile_of(grad_values, place) + rank_scale * ranks_part
            tl.store(G_row + offs_m, _round_to(out, G_ptr.dtype.element_ty), mask=mask_m)


def _launch_shape(V: int):
    """``(BLOCK_V, BLOCK_J, num_warps)``: the row in one block, tiles of about 16k pairs."""
    block_v = triton.next_power_of_2(max(V, 1))
    if interpreting():  # numpy: fewer, larger tiles
        return block_v, min(block_v, 64), 4
    return block_v, max(1, min(64, 16384 // block_v)), 4 if block_v <= 1024 else 8


@torch.library.custom_op("kdfast::correlation_forward_triton", mutates_args=())
def correlation_forward_triton(student: torch.Tensor, teacher: torch.Tensor, weights: Optional[torch.Tensor],
                               tau: float, pearson_weight: float, spearman_weight: float, strength: float,
                               compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Correlation loss and student gradient on the Triton kernel (all -inf rows raise)."""
    V = student.shape[-1]
    s2, t2 = _as_rows(student), _as_rows(teacher)
    N = s2.shape[0]
    device = student.device
    f64 = student.dtype == torch.float64
    grad, row_loss, status = row_outputs(student, N, compute_grad, f64)
    w = weights.reshape(-1).to(device=device, dtype=torch.float64).contiguous() if weights is not None else row_loss
    params = torch.tensor([1.0 / tau, 1.0 / (tau * strength), pearson_weight, spearman_weight,
                           1.0 / N if N else 0.0], dtype=torch.float64, device=device)
    if N > 0:
        block_v, block_j, warps = _launch_shape(V)
        correlation_rows_kernel[(N,)](s2, t2, s2.stride(0), t2.stride(0), grad, w, params, row_loss, status, V,
                                      HAS_WEIGHTS=weights is not None, COMPUTE_GRAD=compute_grad,
                                      ACC=tl.float64 if f64 else tl.float32, BLOCK_V=block_v,
                                      BLOCK_J=block_j, num_warps=warps)
        _raise_on_bad_rows(status, None, V, -100)
    return reduced_loss(row_loss, params[4:]), grad


@correlation_forward_triton.register_fake
def _(student, teacher, weights, tau, pearson_weight, spearman_weight, strength, compute_grad):
    return fake_scalar_loss_and_grad(student, compute_grad)


register_saved_grad_autograd(correlation_forward_triton, 8)


def correlation_loss_triton(student_logits, teacher_logits, temperature, pearson_weight, spearman_weight,
                            rank_strength, weights):
    """The fused Triton correlation kernel; same contract as ``reference_correlation.correlation_loss_reference``."""
    s, t = paired_logits(student_logits, teacher_logits)
    loss, _ = correlation_forward_triton(s, t, weights, temperature, pearson_weight, spearman_weight, rank_strength,
                                         wants_grad(s))
    return loss
