"""The top-k loss's ``tail="bucket"`` in Triton: two kernels, their launcher and ``kdfast::triton_topk_bucket_forward``.

The ``k + 1`` outcomes (the teacher's support ``S`` and one bucket for the
rest, :mod:`kdfast.llm.topk`) are run on the dense Triton row kernel
(:mod:`.launch`), fed with the student's ``(N, k + 1)`` "logits"
``u = [z_S, u_b] - M`` where ``u_b = tau_s logsumexp_{j not in S}(z_j / tau_s)``,
so that ``log_softmax(u / tau_s)`` is exactly the student's bucketed
log-probabilities (no ``log(1 - sum)`` cancellation).  ``M`` is the row's
maximum (a per-row shift, which no softmax sees): the kernels return the
log-sums relative to it, so that logits of 1e4 keep the precision of their
differences instead of the ~1e-3 rounding of a logsumexp of size 1e4.

  1. ``bucket_row_stats_kernel`` (a program per row, vocabulary tiles of
     ``BLOCK``): online logsumexps of ``z / tau_s`` off the support (the
     support's entries of a tile are masked from the row's sorted indices,
     which the teacher rows' kernel sorted already (:mod:`.topk_teacher`),
     whose per-tile ranges were found by ``torch.searchsorted``) and, for the
     hard-label cross-entropy, of ``z`` over the whole row.  ``-inf`` when the
     off-support set is empty (``k = V``, or every logit there is ``-inf``).
  2. the dense kernel on the ``(N, k + 1)`` rows: the value and ``g = dL/du``.
  3. ``bucket_grad_kernel`` (a program per row and tile): ``dL/dz_j =
     g_b softmax_off(z / tau_s)_j + c (softmax(z)_j - [j == label])`` for every
     ``j``; then the ``k`` support entries are overwritten in PyTorch with
     ``g_j + c (softmax(z)_j - [j == label])`` (an ``(N, k)`` scatter).

Nothing of size ``(N, V)`` but the gradient is allocated; the student's rows
may have any strides (the kernels take both).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ... import reference
from ...config import check_logit_dtype
from ...registry import weighting_index
from ..fused_op import fake_distill_loss, register_saved_grad_autograd
from . import launch
from .launch import _inv_denominator, interpreting
from .row_kernel import _finite_shift, _lse_update, _round_to

# Tiles: one for the statistics (a program per row: the support loop costs k
# compares of a tile) and one for the gradient (a program per tile).  The
# interpreter gets tiny tiles, so that the test shapes (V ~ 40) span several
# tiles and a partial last one.
STATS_BLOCK, STATS_WARPS = 2048, 8
GRAD_BLOCK, GRAD_WARPS = 1024, 4
INTERPRETER_BLOCK = 16

# rows of the statistics tensor, (3, N) in the accumulation dtype
STAT_SHIFT = tl.constexpr(0)
STAT_LSE_OFF = tl.constexpr(1)
STAT_LSE1 = tl.constexpr(2)


@triton.jit
def _row_ptrs(S_row, offs, s_col_stride, UNIT_STRIDE: tl.constexpr):
    if UNIT_STRIDE:
        return S_row + offs
    else:
        return S_row + offs.to(tl.int64) * s_col_stride


@triton.jit
def bucket_row_stats_kernel(S_ptr, s_row_stride, s_col_stride, SORTED_ptr, BOUNDS_ptr, STATS_ptr, PARAMS_ptr, N, V, k,
                            n_blocks, HARD: tl.constexpr, UNIT_STRIDE: tl.constexpr, ACC: tl.constexpr,
                            BLOCK: tl.constexpr):
    """Per row: ``M`` (the finite row maximum, or 0), ``logsumexp_off((z - M) / tau_s)`` and ``logsumexp(z - M)``."""
    row = tl.program_id(0).to(tl.int64)
    S_row = S_ptr + row * s_row_stride
    SORTED_row = SORTED_ptr + row * k
    BOUNDS_row = BOUNDS_ptr + row * (n_blocks + 1)
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    inv_tau_s64 = tl.load(PARAMS_ptr)
    inv_tau_s = inv_tau_s64.to(ACC)
    m_off = tl.full([], neg_inf, ACC)
    sum_off = tl.zeros([], tl.float64)
    m_all = tl.full([], neg_inf, ACC)
    sum_all = tl.zeros([], tl.float64)
    lo = tl.load(BOUNDS_row)
    for b in range(0, n_blocks):
        offs = b * BLOCK + cols
        z = tl.load(_row_ptrs(S_row, offs, s_col_stride, UNIT_STRIDE), mask=offs < V, other=neg_inf).to(ACC)
        # the support's entries in this tile: sorted[lo:hi]
        hi = tl.load(BOUNDS_row + b + 1)
        on_support = cols < 0
        for t in range(lo, hi):
            on_support |= offs == tl.load(SORTED_row + t)
        lo = hi
        m_off, sum_off = _lse_update(m_off, sum_off, tl.where(on_support, neg_inf, z), inv_tau_s)
        if HARD:
            m_all, sum_all = _lse_update(m_all, sum_all, z, 1.0)
        else:
            m_all = tl.maximum(m_all, tl.max(z, 0))
    # The shift: the row's maximum when finite (an all -inf row keeps its -inf
    # log-sums; a +inf or NaN logit makes the sums NaN whatever the shift).
    shift = tl.where((m_all == neg_inf) | (m_all == float("inf")), 0.0, _finite_shift(m_all))
    shift64 = shift.to(tl.float64)
    lse_off = (m_off.to(tl.float64) - shift64) * inv_tau_s64 + tl.log(sum_off)
    tl.store(STATS_ptr + STAT_SHIFT * N + row, shift)
    tl.store(STATS_ptr + STAT_LSE_OFF * N + row, lse_off.to(ACC))
    if HARD:
        lse1 = (m_all.to(tl.float64) - shift64) + tl.log(sum_all)
        tl.store(STATS_ptr + STAT_LSE1 * N + row, lse1.to(ACC))
    else:
        tl.store(STATS_ptr + STAT_LSE1 * N + row, tl.zeros([], ACC))


@triton.jit
def bucket_grad_kernel(S_ptr, s_row_stride, s_col_stride, G_ptr, STATS_ptr, GB_ptr, C_ptr, LABELS_ptr, PARAMS_ptr, N,
                       V, HARD: tl.constexpr, UNIT_STRIDE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One tile of a row of ``g_b exp((z - M) / tau_s - lse_off) + c (exp(z - M - lse1) - [j == label])``.

    Exactly 0 on rows whose two coefficients are 0 (ignored rows, whatever
    their logits hold); the support's entries are overwritten afterwards."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    z = tl.load(_row_ptrs(S_ptr + row * s_row_stride, offs, s_col_stride, UNIT_STRIDE), mask=mask,
                other=float("-inf")).to(ACC)
    inv_tau_s = tl.load(PARAMS_ptr).to(ACC)
    shift = tl.load(STATS_ptr + STAT_SHIFT * N + row)
    lse_off = tl.load(STATS_ptr + STAT_LSE_OFF * N + row)
    gb = tl.load(GB_ptr + row).to(ACC)
    # <= 0 off the support; clamped so that the support's entries (overwritten later) cannot overflow
    e_off = tl.exp(tl.minimum((z - shift) * inv_tau_s - lse_off, 0.0))
    out = tl.where(lse_off == float("-inf"), 0.0, gb * e_off)
    zero = gb == 0
    if HARD:
        c = tl.load(C_ptr + row).to(ACC)
        lse1 = tl.load(STATS_ptr + STAT_LSE1 * N + row)
        label = tl.load(LABELS_ptr + row)
        out += c * tl.exp(z - shift - lse1)
        out = tl.where(offs == label, out - c, out)
        zero = zero & (c == 0)
    out = tl.where(zero, 0.0, out)
    if G_ptr.dtype.element_ty == tl.float64:
        tl.store(G_ptr + row * V + offs, out.to(tl.float64), mask=mask)
    else:  # float64 log-probs make ACC float64 for any student: _round_to takes float32
        tl.store(G_ptr + row * V + offs, _round_to(out.to(tl.float32), G_ptr.dtype.element_ty), mask=mask)


def _blocks(V: int) -> Tuple[int, int]:
    """(statistics tile, gradient tile) for rows of ``V`` entries."""
    if interpreting():
        return INTERPRETER_BLOCK, INTERPRETER_BLOCK
    fit = max(16, triton.next_power_of_2(V))
    return min(STATS_BLOCK, fit), min(GRAD_BLOCK, fit)


def _check_args(student, indices, ordered, teacher, labels, reduction) -> None:
    """What keeps a direct caller of the op from reading or writing out of bounds (options were checked in Python)."""
    check_logit_dtype("student_logits", student)
    if student.dim() != 2 or student.shape[-1] == 0:
        raise ValueError(f"student_logits must be (N, V) rows with V >= 1, got shape {tuple(student.shape)}")
    N, V = student.shape
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_indices must be int32 or int64, got {indices.dtype}")
    if indices.dim() != 2 or indices.shape[0] != N or not 1 <= indices.shape[1] <= V:
        raise ValueError(f"topk_indices must be ({N}, k) with 1 <= k <= {V}, got {tuple(indices.shape)}")
    k = indices.shape[1]
    if ordered is not None and (ordered.dtype != torch.int64 or tuple(ordered.shape) != (N, k)):
        raise ValueError(f"the ordered indices must be int64 of shape ({N}, {k}), got {ordered.dtype} "
                         f"{tuple(ordered.shape)}")
    if teacher.dtype not in (torch.float32, torch.float64) or tuple(teacher.shape) != (N, k + 1):
        raise ValueError(f"the teacher rows must be float32/float64 of shape ({N}, {k + 1}), got "
                         f"{teacher.dtype} {tuple(teacher.shape)}")
    if labels is not None and labels.numel() != N:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the {N} rows of the student")
    if reduction not in ("batchmean", "sum", "none"):
        raise ValueError(f"reduction must be 'batchmean', 'sum' or 'none', got {reduction!r}")
    for name, t in (("topk_indices", indices), ("ordered", ordered), ("teacher", teacher), ("labels", labels)):
        if t is not None and t.device != student.device:
            raise ValueError(f"{name} is on {t.device}, student_logits on {student.device}")
    if student.device.type != "cuda" and not interpreting():
        raise ValueError(f"the triton backend takes CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                         f"got tensors on {student.device}")


class _Reduction:
    """The two fields of a configuration that :func:`kdfast.reference.reduce_rows` reads."""

    def __init__(self, reduction: str, normalizer: Optional[float]):
        self.reduction, self.normalizer = reduction, normalizer


def row_statistics(student: torch.Tensor, ordered: torch.Tensor, inv_tau_s: torch.Tensor, hard: bool,
                   acc: torch.dtype) -> torch.Tensor:
    """``(3, N)``: per row the shift ``M``, ``logsumexp_{j not in S}((z_j - M) / tau_s)`` and ``logsumexp(z - M)``.

    The last is 0 unless ``hard``.  ``ordered`` are the ``(N, k)`` int64
    support indices sorted along each row, distinct, in ``[0, V)``;
    ``inv_tau_s`` is ``1 / tau_s`` as a one-element float64 device tensor.
    """
    N, V = student.shape
    k = ordered.shape[1]
    stats_block, _ = _blocks(V)
    n_blocks = triton.cdiv(V, stats_block)
    ordered = ordered.contiguous()
    starts = torch.arange(0, n_blocks + 1, device=student.device, dtype=ordered.dtype) * stats_block
    bounds = torch.searchsorted(ordered, starts.expand(N, n_blocks + 1).contiguous(), out_int32=True)
    stats = torch.empty((3, N), dtype=acc, device=student.device)
    if N > 0:
        bucket_row_stats_kernel[(N,)](
            student, student.stride(0), student.stride(1), ordered, bounds, stats, inv_tau_s, N, V, k, n_blocks,
            HARD=hard, UNIT_STRIDE=student.stride(1) == 1 or V == 1,
            ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=stats_block,
            num_warps=4 if interpreting() else STATS_WARPS)
    return stats


def topk_bucket_forward(
    student: torch.Tensor,
    indices: torch.Tensor,
    ordered: Optional[torch.Tensor],
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    divergence: int,
    params: List[float],
    tau: float,
    tau_s: float,
    ignore_index: int,
    hard_weight: float,
    soft_coef: float,
    reduction: str,
    normalizer: Optional[float],
    compute_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The bucketed top-k loss and its ``(N, V)`` student gradient, computed in the forward.

    ``student`` is ``(N, V)`` (any strides), ``indices`` ``(N, k)`` (distinct,
    in range: checked before, as are the ignored rows neutralised, by
    :mod:`.topk_teacher`), ``ordered`` the same sorted along each row (int64;
    None: sorted here), ``teacher`` the ``(N, k + 1)`` checked log-probability rows, the
    bucket's log-mass last (:func:`kdfast.llm.topk.teacher_bucket`; float64
    makes the whole op float64), the rest the arguments of
    :func:`kdfast.ops.topk.topk_op_arguments`.  Raises the dense kernel's ValueErrors for a valid row whose
    student (or teacher) is all ``-inf``.
    """
    _check_args(student, indices, ordered, teacher, labels, reduction)
    N, V = student.shape
    k = indices.shape[1]
    device = student.device
    f64 = student.dtype == torch.float64 or teacher.dtype == torch.float64
    acc = torch.float64 if f64 else torch.float32
    idx = indices.long()
    if labels is not None:
        labels64 = labels.reshape(-1).long()
        valid = labels64 != ignore_index
        safe_labels = torch.where(valid, labels64, 0)
        # k + 1 >= 2 outcomes: one of 0 and 1 is not ignore_index, and only marks the row as counted
        marker = 0 if ignore_index != 0 else 1
        row_labels = torch.where(valid, marker, ignore_index)
    else:
        labels64 = valid = safe_labels = row_labels = None
    hard = labels is not None and hard_weight != 0.0

    # a float64 tensor: Triton would pass a Python float as float32
    inv_tau_s = torch.tensor([1.0 / tau_s], dtype=torch.float64, device=device)
    if ordered is None:
        ordered = idx.sort(-1).values
    stats = row_statistics(student, ordered, inv_tau_s, hard, acc)
    shift, lse_off, lse1 = stats[STAT_SHIFT.value], stats[STAT_LSE_OFF.value], stats[STAT_LSE1.value]
    z_support = student.gather(-1, idx).to(acc)
    u = torch.cat([z_support - shift[:, None], (tau_s * lse_off)[:, None]], -1)
    if valid is not None:
        u = torch.where(valid[:, None], u, torch.zeros((), dtype=acc, device=device))
    soft, g = launch.distill_forward(u, teacher, row_labels, None, divergence, params, weighting_index("none"), tau,
                                     tau_s, ignore_index, 0.0, soft_coef, reduction, normalizer, compute_grad)
    loss = soft
    if hard:
        z_label = student.gather(-1, safe_labels[:, None]).squeeze(-1).to(acc)
        ce = torch.where(valid, (shift - z_label) + lse1, torch.zeros((), dtype=acc, device=device))
        loss = soft + hard_weight * reference.reduce_rows(ce, valid, _Reduction(reduction, normalizer))

    if not compute_grad:
        return loss, torch.empty((0,), dtype=student.dtype, device=device)
    grad = torch.empty((N, V), dtype=student.dtype, device=device)
    if N == 0:
        return loss, grad
    gb = g[:, k].contiguous()
    if hard:
        # hard_weight times each row's coefficient in reduce_rows(ce, valid, ...)
        inv_denom = _inv_denominator(reduction, normalizer, labels64, ignore_index, N, device)
        c = torch.where(valid, (hard_weight * inv_denom).to(acc), torch.zeros((), dtype=acc, device=device))
    else:
        c = gb  # not read
    _, grad_block = _blocks(V)
    bucket_grad_kernel[(N, triton.cdiv(V, grad_block))](
        student, student.stride(0), student.stride(1), grad, stats, gb, c,
        safe_labels if hard else gb, inv_tau_s, N, V,
        HARD=hard, UNIT_STRIDE=student.stride(1) == 1 or V == 1, ACC=tl.float64 if f64 else tl.float32,
        BLOCK=grad_block, num_warps=4 if interpreting() else GRAD_WARPS)
    on_support = g[:, :k]
    if hard:
        softmax1 = torch.exp(z_support - shift[:, None] - lse1[:, None])
        at_label = (idx == safe_labels[:, None]).to(acc)
        on_support = on_support + c[:, None] * (softmax1 - at_label)
        # ignored rows: c = 0 and g = 0, but their logits may hold NaN
        on_support = torch.where(valid[:, None], on_support, torch.zeros((), dtype=acc, device=device))
    grad.scatter_(-1, idx, on_support.to(student.dtype))
    return loss, grad


triton_topk_bucket_forward = torch.library.custom_op("kdfast::triton_topk_bucket_forward", mutates_args=())(
    topk_bucket_forward)

_N_INPUTS = 15
_REDUCTION_ARG = 12


@triton_topk_bucket_forward.register_fake
def _fake_topk_bucket_forward(student, indices, ordered, teacher, labels, divergence, params, tau, tau_s, ignore_index,
                              hard_weight, soft_coef, reduction, normalizer, compute_grad):
    V = student.shape[-1]
    grad = student.new_empty((student.numel() // V, V) if compute_grad else (0,))
    return fake_distill_loss(student, teacher, reduction), grad


register_saved_grad_autograd(triton_topk_bucket_forward, _N_INPUTS,
                             per_row=lambda inputs: inputs[_REDUCTION_ARG] == "none")
