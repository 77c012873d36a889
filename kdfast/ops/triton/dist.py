"""DIST in Triton: three kernels, their launcher and the op ``kdfast::dist_forward_triton``.

The stages of the C++ kernel (csrc/kernels/dist_api.h), as separate launches:

  1. ``dist_row_kernel`` (a program per row): online softmax normalisers, the
     row's centred moments (the mean of a softmax row is exactly 1/V), its
     Pearson and the row terms of dL/dy_s;
  2. ``dist_column_moments_kernel`` (a program per block of columns and
     chunk of rows): the chunk's moments, taken about the first row's values
     in float64; then ``dist_column_kernel`` (a program per block of columns):
     their sum in chunk order, the column Pearson and the column terms of
     dL/dy_s.  One program per block of columns walking every row left a
     65536 x 1000 call with 8 programs on a 132-SM GPU (an H200: 34 ms,
     against 2.5 ms for torch.compile);
  3. ``dist_grad_kernel`` (a program per row): ``y_s (g - <g, y_s>) / tau``.

Softmax values are recomputed by one shared helper in every stage, so the
stages agree on them; nothing of size N x V is allocated but the gradient; the
final sums are fixed-order reductions.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..fused_op import fake_scalar_loss_and_grad, paired_logits, register_saved_grad_autograd, wants_grad
from . import row_kernel
from .launch import INTERPRETER_BLOCK, _as_rows, _raise_on_bad_rows, interpreting
from .pearson import centred_pearson
from .row_kernel import _lse_update, _round_to, load_logits

# per-row statistics, float64: max_t, max_s, log_sum_t, log_sum_s, coef_t, coef_s
ROW_STATS = 6
# float64 parameters: 1/tau, -tau^2 beta / N, -tau^2 gamma / V, eps, N


@triton.jit
def _softmax(z, m, log_sum, inv_tau):
    """``exp((z - max) / tau - log sum)``: the one formula every stage uses for a softmax value."""
    return tl.exp((z - m) * inv_tau - log_sum)


@triton.jit
def dist_row_kernel(S_ptr, T_ptr, s_row_stride, t_row_stride, PARAMS_ptr, ROW_ptr, RHO_ptr, STATUS_ptr, V,
                    ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    S_row = S_ptr + row * s_row_stride
    T_row = T_ptr + row * t_row_stride
    R = ROW_ptr + row * 6
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    inv_tau = tl.load(PARAMS_ptr + 0).to(ACC)
    k_row = tl.load(PARAMS_ptr + 1)  # -tau^2 beta / N
    eps = tl.load(PARAMS_ptr + 3)
    tl.store(STATUS_ptr + row, row_kernel.STATUS_OK)
    tl.store(RHO_ptr + row, 0.0)

    mt = tl.full([], neg_inf, ACC)
    ms = tl.full([], neg_inf, ACC)
    sum_t = tl.zeros([], tl.float64)
    sum_s = tl.zeros([], tl.float64)
    for start in range(0, V, BLOCK):
        offs = start + cols
        zt, zs = load_logits(T_row, S_row, offs, offs < V, ACC)
        mt, sum_t = _lse_update(mt, sum_t, zt, inv_tau)
        ms, sum_s = _lse_update(ms, sum_s, zs, inv_tau)
    if (mt == neg_inf) | (ms == neg_inf):
        tl.store(STATUS_ptr + row, tl.where(mt == neg_inf, row_kernel.STATUS_TEACHER_ALL_NEG_INF,
                                            row_kernel.STATUS_STUDENT_ALL_NEG_INF))
        return
    log_sum_t = tl.log(sum_t)
    log_sum_s = tl.log(sum_s)
    lt = log_sum_t.to(ACC)
    ls = log_sum_s.to(ACC)
    mean = 1.0 / V
    aa = tl.zeros([], tl.float64)
    bb = tl.zeros([], tl.float64)
    ab = tl.zeros([], tl.float64)
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        zt, zs = load_logits(T_row, S_row, offs, mask, ACC)
        a = tl.where(mask, _softmax(zs, ms, ls, inv_tau) - mean, 0.0)  # lanes past V are not classes
        c = tl.where(mask, _softmax(zt, mt, lt, inv_tau) - mean, 0.0)
        aa += tl.sum(a * a, 0).to(tl.float64)
        bb += tl.sum(c * c, 0).to(tl.float64)
        ab += tl.sum(a * c, 0).to(tl.float64)
    rho, coef_b, coef_a = centred_pearson(ab, aa, bb, eps)
    tl.store(RHO_ptr + row, rho)
    tl.store(R + 0, mt.to(tl.float64))
    tl.store(R + 1, ms.to(tl.float64))
    tl.store(R + 2, log_sum_t)
    tl.store(R + 3, log_sum_s)
    tl.store(R + 4, k_row * coef_b)
    tl.store(R + 5, -k_row * coef_a)


# the column moments about the first row: sum ds, sum dt, sum ds^2, sum dt^2, sum ds dt
COLUMN_MOMENTS = 5
_MOMENTS = tl.constexpr(COLUMN_MOMENTS)  # the kernels' copy (a jitted function reads only constexpr globals)


@triton.jit
def _first_row_softmax(S_ptr, T_ptr, ROW_ptr, cols, mask, inv_tau, ACC: tl.constexpr):
    """The first row's softmax values: the column moments are taken about them, so that columns whose
    values are all equal give exactly 0."""
    zt0, zs0 = load_logits(T_ptr, S_ptr, cols, mask, ACC)
    first_s = _softmax(zs0, tl.load(ROW_ptr + 1).to(ACC), tl.load(ROW_ptr + 3).to(ACC), inv_tau)
    first_t = _softmax(zt0, tl.load(ROW_ptr + 0).to(ACC), tl.load(ROW_ptr + 2).to(ACC), inv_tau)
    return first_s, first_t


@triton.jit
def _zero_moments(BLOCK_C: tl.constexpr):
    z = tl.zeros([BLOCK_C], tl.float64)
    return z, z, z, z, z


@triton.jit
def dist_column_moments_kernel(S_ptr, T_ptr, s_row_stride, t_row_stride, PARAMS_ptr, ROW_ptr, MOM_ptr, N, V,
                               ROWS_PER_CHUNK, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(1).to(tl.int64)
    mask = cols < V
    inv_tau = tl.load(PARAMS_ptr + 0).to(ACC)
    first_s, first_t = _first_row_softmax(S_ptr, T_ptr, ROW_ptr, cols, mask, inv_tau, ACC)
    s1, t1, ss, tt, st = _zero_moments(BLOCK_C)
    first = chunk * ROWS_PER_CHUNK
    # (the first row's own terms are exactly 0: its softmax is recomputed bit for bit)
    for r in range(first, tl.minimum(first + ROWS_PER_CHUNK, N)):
        R = ROW_ptr + r * 6
        zt, zs = load_logits(T_ptr + r * t_row_stride, S_ptr + r * s_row_stride, cols, mask, ACC)
        ys = _softmax(zs, tl.load(R + 1).to(ACC), tl.load(R + 3).to(ACC), inv_tau)
        yt = _softmax(zt, tl.load(R + 0).to(ACC), tl.load(R + 2).to(ACC), inv_tau)
        ds = (ys - first_s).to(tl.float64)
        dt = (yt - first_t).to(tl.float64)
        s1 += ds
        t1 += dt
        ss += ds * ds
        tt += dt * dt
        st += ds * dt
    M = MOM_ptr + chunk * (_MOMENTS * V) + cols
    tl.store(M + 0 * V, s1, mask=mask)
    tl.store(M + 1 * V, t1, mask=mask)
    tl.store(M + 2 * V, ss, mask=mask)
    tl.store(M + 3 * V, tt, mask=mask)
    tl.store(M + 4 * V, st, mask=mask)


@triton.jit
def dist_column_kernel(S_ptr, T_ptr, PARAMS_ptr, ROW_ptr, MOM_ptr, COL_ptr, COL_RHO_ptr, V, CHUNKS,
                       ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < V
    inv_tau = tl.load(PARAMS_ptr + 0).to(ACC)
    k_col = tl.load(PARAMS_ptr + 2)  # -tau^2 gamma / V
    eps = tl.load(PARAMS_ptr + 3)
    first_s, first_t = _first_row_softmax(S_ptr, T_ptr, ROW_ptr, cols, mask, inv_tau, ACC)
    s1, t1, ss, tt, st = _zero_moments(BLOCK_C)
    for c in range(0, CHUNKS):  # chunk order: the same sums on every run
        M = MOM_ptr + tl.cast(c, tl.int64) * (_MOMENTS * V) + cols
        s1 += tl.load(M + 0 * V, mask=mask, other=0.0)
        t1 += tl.load(M + 1 * V, mask=mask, other=0.0)
        ss += tl.load(M + 2 * V, mask=mask, other=0.0)
        tt += tl.load(M + 3 * V, mask=mask, other=0.0)
        st += tl.load(M + 4 * V, mask=mask, other=0.0)
    n = tl.load(PARAMS_ptr + 4)
    off_s = s1 / n
    off_t = t1 / n
    rho, coef_b, coef_a = centred_pearson(st - n * off_s * off_t, ss - n * off_s * off_s, tt - n * off_t * off_t, eps)
    u = k_col * coef_b
    v = -k_col * coef_a
    tl.store(COL_RHO_ptr + cols, tl.where(mask, rho, 0.0), mask=mask)
    tl.store(COL_ptr + 0 * V + cols, u, mask=mask)
    tl.store(COL_ptr + 1 * V + cols, v, mask=mask)
    tl.store(COL_ptr + 2 * V + cols, first_s, mask=mask)
    tl.store(COL_ptr + 3 * V + cols, first_t, mask=mask)
    tl.store(COL_ptr + 4 * V + cols, off_s, mask=mask)
    tl.store(COL_ptr + 5 * V + cols, off_t, mask=mask)


@triton.jit
def _grad_terms(T_row, S_row, COL_ptr, offs, mask, V, mt, ms, lt, ls, inv_tau, coef_t, coef_s,
                ACC: tl.constexpr):
    """``(y_s, g)`` of a tile, ``g = dL/dy_s``: row part + column part, each on centred values."""
    zt, zs = load_logits(T_row, S_row, offs, mask, ACC)
    ys = _softmax(zs, ms, ls, inv_tau)
    yt = _softmax(zt, mt, lt, inv_tau)
    mean = 1.0 / V
    g = coef_t * (yt - mean) + coef_s * (ys - mean)
    col = COL_ptr + offs
    dt = (yt - tl.load(col + 3 * V, mask=mask, other=0.0)) - tl.load(col + 5 * V, mask=mask, other=0.0)
    ds = (ys - tl.load(col + 2 * V, mask=mask, other=0.0)) - tl.load(col + 4 * V, mask=mask, other=0.0)
    g += tl.load(col + 0 * V, mask=mask, other=0.0) * dt + tl.load(col + 1 * V, mask=mask, other=0.0) * ds
    return ys, g


@triton.jit
def dist_grad_kernel(S_ptr, T_ptr, s_row_stride, t_row_stride, G_ptr, PARAMS_ptr, ROW_ptr, COL_ptr, V,
                     ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    S_row = S_ptr + row * s_row_stride
    T_row = T_ptr + row * t_row_stride
    G_row = G_ptr + row * V
    R = ROW_ptr + row * 6
    cols = tl.arange(0, BLOCK)
    inv_tau = tl.load(PARAMS_ptr + 0).to(ACC)
    mt = tl.load(R + 0).to(ACC)
    ms = tl.load(R + 1).to(ACC)
    lt = tl.load(R + 2).to(ACC)
    ls = tl.load(R + 3).to(ACC)
    coef_t = tl.load(R + 4).to(ACC)
    coef_s = tl.load(R + 5).to(ACC)
    gy = tl.zeros([], tl.float64)
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        ys, g = _grad_terms(T_row, S_row, COL_ptr, offs, mask, V, mt, ms, lt, ls, inv_tau, coef_t, coef_s, ACC)
        gy += tl.sum(tl.where(mask, g * ys, 0.0), 0).to(tl.float64)
    gy_acc = gy.to(ACC)
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        ys, g = _grad_terms(T_row, S_row, COL_ptr, offs, mask, V, mt, ms, lt, ls, inv_tau, coef_t, coef_s, ACC)
        tl.store(G_row + offs, _round_to(ys * (g - gy_acc) * inv_tau, G_ptr.dtype.element_ty), mask=mask)


_COLUMN_BLOCK = 128
# The column moments' grid: about this many programs (several per SM), in chunks of at least
# _MIN_ROWS_PER_CHUNK rows (fewer rows would spend more on the partial sums than on the rows).
_COLUMN_PROGRAMS = 1024
_MIN_ROWS_PER_CHUNK = 64


def column_chunks(N: int, V: int) -> Tuple[int, int]:
    """``(chunks, rows_per_chunk)`` of the column moments' grid for N rows of V classes."""
    blocks = triton.cdiv(V, _COLUMN_BLOCK)
    chunks = max(1, min(triton.cdiv(_COLUMN_PROGRAMS, blocks), triton.cdiv(N, _MIN_ROWS_PER_CHUNK)))
    rows = triton.cdiv(N, chunks)
    return triton.cdiv(N, rows), rows


def _block() -> int:
    return INTERPRETER_BLOCK if interpreting() else 4096


@torch.library.custom_op("kdfast::dist_forward_triton", mutates_args=())
def dist_forward_triton(student: torch.Tensor, teacher: torch.Tensor, tau: float, beta: float, gamma: float,
                        compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """DIST loss and student gradient on the Triton kernels; see ``kdfast::dist_forward``."""
    V = student.shape[-1]
    s2, t2 = _as_rows(student), _as_rows(teacher)
    N = s2.shape[0]
    if N == 0:
        raise ValueError(f"dist_loss needs at least one row, got logits shape {tuple(student.shape)}")
    device = student.device
    f64 = student.dtype == torch.float64
    acc, tl_acc = (torch.float64, tl.float64) if f64 else (torch.float32, tl.float32)
    params = torch.tensor([1.0 / tau, -tau * tau * beta / N, -tau * tau * gamma / V, 1e-8, float(N)],
                          dtype=torch.float64, device=device)
    row_stats = torch.empty((N, ROW_STATS), dtype=torch.float64, device=device)
    row_rho = torch.empty(N, dtype=torch.float64, device=device)
    status = torch.empty(N, dtype=torch.int32, device=device)
    block = _block()
    dist_row_kernel[(N,)](s2, t2, s2.stride(0), t2.stride(0), params, row_stats, row_rho, status, V, ACC=tl_acc,
                          BLOCK=block, num_warps=8)
    _raise_on_bad_rows(status, None, V, -100)
    col = torch.empty((6, V), dtype=acc, device=device)
    col_rho = torch.empty(V, dtype=torch.float64, device=device)
    chunks, rows_per_chunk = column_chunks(N, V)
    moments = torch.empty((chunks, COLUMN_MOMENTS, V), dtype=torch.float64, device=device)
    blocks = triton.cdiv(V, _COLUMN_BLOCK)
    dist_column_moments_kernel[(blocks, chunks)](s2, t2, s2.stride(0), t2.stride(0), params, row_stats, moments, N, V,
                                                 rows_per_chunk, ACC=tl_acc, BLOCK_C=_COLUMN_BLOCK)
    dist_column_kernel[(blocks,)](s2, t2, params, row_stats, moments, col, col_rho, V, chunks, ACC=tl_acc,
                                  BLOCK_C=_COLUMN_BLOCK)
    grad = torch.empty((N, V) if compute_grad else (0,), dtype=student.dtype, device=device)
    if compute_grad:
        dist_grad_kernel[(N,)](s2, t2, s2.stride(0), t2.stride(0), grad, params, row_stats, col, V, ACC=tl_acc,
                               BLOCK=block, num_warps=8)
    # tau^2 (beta (1 - mean_i rho_i) + gamma (1 - mean_j rho_j)), both means as fixed-order sums
    means = torch.empty(2, dtype=torch.float64, device=device)
    one = torch.ones(1, dtype=torch.float64, device=device)
    row_kernel.reduce_kernel[(1,)](row_rho, means[0:1], one / N, N, BLOCK=1024)
    row_kernel.reduce_kernel[(1,)](col_rho, means[1:2], one / V, V, BLOCK=1024)
    loss = tau * tau * (beta * (1.0 - means[0]) + gamma * (1.0 - means[1]))
    return loss.to(acc), grad


@dist_forward_triton.register_fake
def _(student, teacher, tau, beta, gamma, compute_grad):
    return fake_scalar_loss_and_grad(student, compute_grad)


register_saved_grad_autograd(dist_forward_triton, 6)


def dist_loss_triton(student_logits, teacher_logits, temperature, beta, gamma):
    """The fused Triton DIST kernels; same contract as ``reference_correlation.dist_loss_reference``."""
    s, t = paired_logits(student_logits, teacher_logits)
    loss, _ = dist_forward_triton(s, t, temperature, beta, gamma, wants_grad(s))
    return loss
