"""The top-k teacher's rows, checked in one Triton pass: ``kdfast::triton_topk_teacher``.

Both Triton top-k paths (:mod:`kdfast.ops.topk`) need the teacher as rows of
float log-probabilities, checked as :func:`kdfast.llm.topk.check_topk_values`
checks them, with the ignored rows made neutral
(:func:`kdfast.llm.topk.neutral_ignored_rows`) and, for ``tail="bucket"``, the
bucket's log-mass last (:func:`kdfast.llm.topk.teacher_bucket`).  Done with
PyTorch ops that is a dozen kernels over the ``(N, k)`` inputs and six host
syncs, one per check, each a round trip to the GPU that costs about what the
``(N, V)`` sweeps of a small batch do.  Here one program per row reads the
indices, the log-probs (in whatever dtype they are stored) and the tail once,
sorts the indices (``tl.sort``) to find repeats, and writes the neutralised
indices, the same sorted (which the bucket's student sweep reads), the teacher
rows and a status; the host reads the statuses once.

A row the kernel refuses is explained by the PyTorch checks themselves, rerun
on the error path only: the messages have one source (:mod:`kdfast.llm.topk`).
``k`` above :data:`MAX_KERNEL_K` (one program sorts a whole row) takes that
PyTorch form for everything.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .launch import interpreting

# One program sorts a row of k indices in registers (a bitonic network of
# log2(k)^2 / 2 stages): beyond this the PyTorch form is used.
MAX_KERNEL_K = 4096

# Row statuses.  Only "any is not OK" decides; the codes name the failure in
# the fallback message should the PyTorch checks, rerun, find nothing (a value
# at the very edge of a tolerance, rounded differently).
STATUS_OK = tl.constexpr(0)
STATUS_BAD_INDEX = tl.constexpr(1)
STATUS_BAD_LOGPROB = tl.constexpr(2)
STATUS_MASS_OVER_ONE = tl.constexpr(3)
STATUS_UNDEFINED = tl.constexpr(4)
_STATUS_MESSAGES = {
    1: "an index outside [0, V) or repeated",
    2: "a log-probability that is NaN, +inf or > 0",
    3: "probability mass > 1",
    4: "no probability mass (all -inf)",
}

# parameters, one float64 tensor: (mass tolerance, 1 + it, the empty-bucket threshold, -log k)
PARAM_TOLERANCE = tl.constexpr(0)
PARAM_ONE_PLUS_TOLERANCE = tl.constexpr(1)
PARAM_EMPTY_BUCKET_BELOW = tl.constexpr(2)
PARAM_NEUTRAL_LOGPROB = tl.constexpr(3)

_BEYOND_ANY_INDEX = tl.constexpr(2**62)  # the masked lanes' index: sorts last, equals no real index


@triton.jit
def _neg_expm1(x):
    """``-expm1(x) = 1 - exp(x)`` for ``x <= 0`` to full relative precision (Kahan: the rounding of ``exp``
    cancels against that of ``log`` of the same rounded value)."""
    u = tl.exp(x)
    return tl.where(u == 1.0, -x, (1.0 - u) * (x / tl.log(u)))


@triton.jit
def _log1p(y):
    """``log(1 + y)`` for ``y > -1`` to full relative precision (the same trick)."""
    w = 1.0 + y
    return tl.where(w == 1.0, y, tl.log(w) * (y / (w - 1.0)))


@triton.jit
def _log1mexp(x):
    """``log(1 - exp(x))`` for ``x <= 0`` (larger is clamped): Maechler's two branches, as
    :func:`kdfast.llm.topk.log1mexp`."""
    x = tl.minimum(x, 0.0)
    return tl.where(x > -0.6931471805599453, tl.log(_neg_expm1(x)), _log1p(-tl.exp(x)))


@triton.jit
def topk_teacher_kernel(IDX_ptr, LP_ptr, REST_ptr, VALID_ptr, IDX_OUT_ptr, ORDERED_ptr, TEACHER_ptr, STATUS_ptr,
                        PARAMS_ptr, V, k, HAS_REST: tl.constexpr, HAS_VALID: tl.constexpr, BUCKET: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row: its ``k`` indices (int64, neutral where not valid), teacher row and status."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    live = offs < k
    neg_inf = float("-inf")
    idx = tl.load(IDX_ptr + row * k + offs, mask=live, other=0).to(tl.int64)
    lp = tl.load(LP_ptr + row * k + offs, mask=live, other=neg_inf).to(ACC)
    if HAS_REST:
        rest = tl.load(REST_ptr + row).to(ACC)
    if HAS_VALID:
        # an ignored row may hold anything: it gets the first k indices and a uniform teacher
        valid = tl.load(VALID_ptr + row) != 0
        idx = tl.where(valid, idx, offs.to(tl.int64))
        lp = tl.where(valid | ~live, lp, tl.load(PARAMS_ptr + PARAM_NEUTRAL_LOGPROB).to(ACC))
        if HAS_REST:
            rest = tl.where(valid, rest, neg_inf)
    tl.store(IDX_OUT_ptr + row * k + offs, idx, mask=live)

    out_of_range = tl.max((live & ((idx < 0) | (idx >= V))).to(tl.int32), 0)
    ordered = tl.sort(tl.where(live, idx, _BEYOND_ANY_INDEX))
    tl.store(ORDERED_ptr + row * k + offs, ordered, mask=live)
    tl.debug_barrier()  # the row's threads read one another's stores
    following = tl.load(ORDERED_ptr + row * k + offs + 1, mask=offs + 1 < k, other=_BEYOND_ANY_INDEX)
    repeated = tl.max((live & (following == ordered)).to(tl.int32), 0)

    tol = tl.load(PARAMS_ptr + PARAM_TOLERANCE).to(ACC)
    bad = live & ((lp != lp) | (lp == float("inf")) | (lp > tol))
    bad_value = tl.max(bad.to(tl.int32), 0)
    lp_top = tl.max(lp, 0)
    top = lp_top
    if HAS_REST:
        bad_value = bad_value | ((rest != rest) | (rest == float("inf")) | (rest > tol)).to(tl.int32)
        top = tl.maximum(top, rest)
    shift = tl.where(top == neg_inf, 0.0, top)
    total = tl.sum(tl.exp(lp - shift), 0)
    if HAS_REST:
        total += tl.exp(rest - shift)
    # log of the mass; NaN when a value is NaN or +inf (refused above)
    log_mass = shift + tl.log(total)
    over_one = tl.exp(log_mass) > tl.load(PARAMS_ptr + PARAM_ONE_PLUS_TOLERANCE).to(ACC)

    if BUCKET:
        if HAS_REST:
            bucket = rest
        else:
            # 1 - mass within the rounding of the stored log-probs is no mass either
            empty_below = tl.load(PARAMS_ptr + PARAM_EMPTY_BUCKET_BELOW).to(ACC)
            bucket = tl.where(-log_mass <= empty_below, neg_inf, _log1mexp(log_mass))
        bucket = tl.where(k == V, neg_inf, bucket)
        tl.store(TEACHER_ptr + row * (k + 1) + offs, lp, mask=live)
        tl.store(TEACHER_ptr + row * (k + 1) + k, bucket)
        undefined = tl.maximum(lp_top, bucket) == neg_inf
    else:
        tl.store(TEACHER_ptr + row * k + offs, lp, mask=live)
        undefined = lp_top == neg_inf

    status = tl.where(undefined, STATUS_UNDEFINED, STATUS_OK)
    status = tl.where(over_one, STATUS_MASS_OVER_ONE, status)
    status = tl.where(bad_value != 0, STATUS_BAD_LOGPROB, status)
    status = tl.where((out_of_range | repeated) != 0, STATUS_BAD_INDEX, status)
    tl.store(STATUS_ptr + row, status)


def _block_k(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def _warps(block_k: int) -> int:
    return 4 if interpreting() or block_k <= 512 else 8


def _accumulation(logprobs: torch.Tensor, f64: bool) -> torch.dtype:
    return torch.float64 if f64 or logprobs.dtype == torch.float64 else torch.float32


def _pytorch_rows(indices, logprobs, tail_logprobs, valid, vocab, bucket, acc):
    """The PyTorch form of the op: the teacher rows, checked (raising the checks' ValueErrors)."""
    from ...llm.topk import (BUCKET_TEACHER_UNDEFINED, TEACHER_UNDEFINED, _check_defined, check_topk_values,
                             neutral_ignored_rows, teacher_bucket)

    # copies: a custom op's outputs may not alias its inputs
    idx, lp = indices.to(torch.int64, copy=True), logprobs.to(acc, copy=True)
    rest = None if tail_logprobs is None else tail_logprobs.reshape(-1, 1).to(acc)
    if valid is not None:
        idx, lp, rest = neutral_ignored_rows(valid, idx, lp, rest)
    check_topk_values(idx, lp, vocab, logprobs.dtype, rest)
    ordered = idx.sort(-1).values
    if bucket:
        teacher = torch.cat([lp, teacher_bucket(lp, vocab, rest)], -1)
        _check_defined(teacher, BUCKET_TEACHER_UNDEFINED)
    else:
        teacher = lp
        _check_defined(teacher, TEACHER_UNDEFINED)
    return idx, ordered, teacher.contiguous()


def _check_args(indices, logprobs, tail_logprobs, valid, vocab):
    """What keeps a direct caller of the op from reading out of bounds (the values are the kernel's to check)."""
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 2:
        raise ValueError(f"topk_indices must be (N, k) int32/int64, got {indices.dtype} {tuple(indices.shape)}")
    N, k = indices.shape
    if not logprobs.is_floating_point() or tuple(logprobs.shape) != (N, k):
        raise ValueError(f"topk_logprobs must be floating point of shape ({N}, {k}), got "
                         f"{logprobs.dtype} {tuple(logprobs.shape)}")
    if tail_logprobs is not None and (not tail_logprobs.is_floating_point() or tail_logprobs.numel() != N):
        raise ValueError(f"tail_logprobs must be floating point with {N} entries, got "
                         f"{tail_logprobs.dtype} {tuple(tail_logprobs.shape)}")
    if valid is not None and (valid.dtype != torch.bool or tuple(valid.shape) != (N,)):
        raise ValueError(f"valid must be a bool tensor of shape ({N},), got {valid.dtype} {tuple(valid.shape)}")
    if not 1 <= k <= vocab:
        raise ValueError(f"topk_indices must have 1 <= k <= {vocab} columns, got {k}")
    for name, t in (("topk_logprobs", logprobs), ("tail_logprobs", tail_logprobs), ("valid", valid)):
        if t is not None and t.device != indices.device:
            raise ValueError(f"{name} is on {t.device}, topk_indices on {indices.device}")


def topk_teacher_rows(indices: torch.Tensor, logprobs: torch.Tensor, tail_logprobs: Optional[torch.Tensor],
                      valid: Optional[torch.Tensor], vocab: int, mass_tolerance: float, empty_bucket_below: float,
                      bucket: bool, f64: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indices, ordered, teacher)``: the ``(N, k)`` int64 indices, the same sorted along each row
    (the sort that found the repeats: the bucket's student sweep reads the support in order) and the
    teacher's ``(N, k)`` log-prob rows (``(N, k + 1)`` with the bucket's log-mass last when
    ``bucket``), checked.

    ``indices`` and ``logprobs`` are ``(N, k)`` (any float dtype), ``tail_logprobs`` ``(N,)`` or
    None, ``valid`` ``(N,)`` bool or None (every row counts); rows not valid get the first ``k``
    indices and a uniform teacher, and are not checked.  The teacher is float64 when ``f64`` or
    the log-probs are float64, else float32.  ``mass_tolerance`` and ``empty_bucket_below`` are
    :func:`kdfast.llm.topk.mass_tolerance` of the stored dtype and
    :func:`kdfast.llm.topk.sum_rounding` of the teacher's (the PyTorch form, for ``k`` above
    :data:`MAX_KERNEL_K` and on the error path, derives them from the dtypes itself).  Raises the
    ValueErrors of :func:`kdfast.llm.topk.check_topk_values` and for a teacher row with no mass;
    reading the statuses syncs the host once, also under ``torch.compile`` (so not inside a
    captured CUDA graph).  A row at the very edge of the mass tolerance may round to either side
    in the kernel and in the PyTorch checks.
    """
    _check_args(indices, logprobs, tail_logprobs, valid, vocab)
    N, k = indices.shape
    acc = _accumulation(logprobs, f64)
    indices, logprobs = indices.contiguous(), logprobs.contiguous()
    if k > MAX_KERNEL_K:
        return _pytorch_rows(indices, logprobs, tail_logprobs, valid, vocab, bucket, acc)
    device = indices.device
    idx = torch.empty((N, k), dtype=torch.int64, device=device)
    ordered = torch.empty((N, k), dtype=torch.int64, device=device)
    teacher = torch.empty((N, k + int(bucket)), dtype=acc, device=device)
    status = torch.empty((N,), dtype=torch.int32, device=device)
    params = torch.tensor([mass_tolerance, 1.0 + mass_tolerance, empty_bucket_below, -math.log(k)],
                          dtype=torch.float64, device=device)
    rest = None if tail_logprobs is None else tail_logprobs.reshape(-1).contiguous()
    valid_bytes = None if valid is None else valid.reshape(-1).contiguous().view(torch.uint8)
    block_k = _block_k(k)
    if N > 0:
        topk_teacher_kernel[(N,)](
            indices, logprobs, rest if rest is not None else params, valid_bytes if valid_bytes is not None else params,
            idx, ordered, teacher, status, params, vocab, k,
            HAS_REST=rest is not None, HAS_VALID=valid is not None, BUCKET=bucket,
            ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_K=block_k, num_warps=_warps(block_k))
        refused = status != STATUS_OK.value
        if bool(refused.any()):  # the one host sync
            _pytorch_rows(indices, logprobs, tail_logprobs, valid, vocab, bucket, acc)  # raises the message
            i = int(refused.nonzero()[0, 0])
            raise ValueError(f"top-k teacher row {i} has {_STATUS_MESSAGES.get(int(status[i]), 'an error')}")
    return idx, ordered, teacher


triton_topk_teacher = torch.library.custom_op("kdfast::triton_topk_teacher", mutates_args=())(topk_teacher_rows)


@triton_topk_teacher.register_fake
def _fake_topk_teacher(indices, logprobs, tail_logprobs, valid, vocab, mass_tolerance, empty_bucket_below, bucket,
                       f64):
    N, k = indices.shape
    return (indices.new_empty((N, k), dtype=torch.int64), indices.new_empty((N, k), dtype=torch.int64),
            logprobs.new_empty((N, k + int(bucket)), dtype=_accumulation(logprobs, f64)))
