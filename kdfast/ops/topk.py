"""The top-k loss (:mod:`kdfast.llm.topk`) on the fused kernels.

On CPU both tails run in one C++ op, ``kdfast::topk_distill_forward``
(csrc/topk_op.cpp): per row it marks the teacher's support in a bitmap (the
index checks come free), reads the teacher's log-probs once in whatever dtype
they are stored, checking them there (the checks of
:func:`kdfast.llm.topk.check_topk_logprobs`) and deriving the bucket's
log-mass from the same sum, sweeps the row with the support's entries masked out
for the student's exact off-support log-mass (``bucket``) and the
cross-entropy's normaliser,
runs the ``k`` (or ``k + 1``) outcome divergence on the dense row kernel
(every divergence and parameter of ``distill_loss``), and writes the ``(N,
V)`` gradient in one more sweep while the row is still in L2: the logits are
read once from memory, the gradient written once, nothing else of size ``(N,
V)`` exists.  ``topk_distill_forward_inplace`` writes the gradient over the
logits (the fused linear loss's chunks).

On CUDA (Triton) the teacher's rows are checked, the ignored ones made
neutral and the bucket derived in one pass, ``kdfast::triton_topk_teacher``
(:mod:`kdfast.ops.triton.topk_teacher`); the renormalised tail is then ``distill_loss`` of the ``(N, k)``
gathered rows against the teacher "logits" ``log p1_S`` (exact: see
:mod:`kdfast.llm.topk`), its ``(N, k)`` gradient scattered into zeros.  The
bucket tail is the op ``kdfast::triton_topk_bucket_forward``
(:mod:`kdfast.ops.triton.topk_bucket`): a row kernel sweeps the student once
for its off-support logsumexp (and the cross-entropy's normaliser), the dense
Triton kernel runs the ``k + 1`` outcomes, and one more sweep writes the
``(N, V)`` gradient, all in the forward, as on CPU.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import reference
from ..config import LossConfig
from .backends import resolve_backend
from .extension import cpu_extension_available
from .fused_op import fake_distill_loss, loss_arguments, register_saved_grad_autograd, wants_grad

_N_INPUTS = 19
_REDUCTION_ARG = 15

if cpu_extension_available():
    @torch.library.register_fake("kdfast::topk_distill_forward")
    def _fake_topk_forward(student, indices, logprobs, tail_logprobs, mass_tolerance, empty_bucket_below, bucket,
                           labels, divergence, params, tau, tau_s, ignore_index, hard_weight, soft_coef, reduction,
                           normalizer, first_row, compute_grad):
        V = student.shape[-1]
        grad = student.new_empty((student.numel() // V, V) if compute_grad else (0,))
        return fake_distill_loss(student, student, reduction), grad

    @torch.library.register_fake("kdfast::topk_distill_forward_inplace")
    def _fake_topk_forward_inplace(student, indices, logprobs, tail_logprobs, mass_tolerance, empty_bucket_below,
                                   bucket, labels, divergence, params, tau, tau_s, ignore_index, hard_weight,
                                   soft_coef, reduction, normalizer, first_row):
        return fake_distill_loss(student, student, reduction)

    register_saved_grad_autograd("kdfast::topk_distill_forward", _N_INPUTS,
                                 per_row=lambda inputs: inputs[_REDUCTION_ARG] == "none")


def topk_op_arguments(cfg: LossConfig) -> tuple:
    """The top-k op's arguments after ``bucket``, up to ``normalizer`` (the dense op's, without the weighting)."""
    labels, _weights, divergence, params, _weighting, *rest = loss_arguments(cfg)
    return (labels, divergence, params, *rest)


def teacher_arguments(topk_logprobs: torch.Tensor, tail_logprobs: Optional[torch.Tensor], tail: str,
                      student_dtype: torch.dtype) -> tuple:
    """The op's teacher arguments, ``(logprobs, tail_logprobs, mass_tolerance, empty_bucket_below, bucket)``.

    The log-probs go as stored, ``(N, k)`` (and the tail ``(N,)``): the
    kernel reads each row once, rounds it to float32 (float64 for a float64
    student), checks it with the tolerances of
    :func:`kdfast.llm.topk.check_topk_logprobs` and derives the bucket as
    :func:`kdfast.llm.topk.teacher_bucket` does; ignored rows are never read.
    """
    from ..llm.topk import mass_tolerance, sum_rounding

    k = topk_logprobs.shape[-1]
    lp = topk_logprobs.detach().reshape(-1, k)
    rest = None if tail_logprobs is None else tail_logprobs.detach().reshape(-1)
    rounded_to = torch.float64 if student_dtype == torch.float64 else torch.float32
    return (lp, rest, mass_tolerance(topk_logprobs.dtype, k), sum_rounding(rounded_to, k), tail == "bucket")


def cpu_topk_loss(student_logits: torch.Tensor, topk_indices: torch.Tensor, topk_logprobs: torch.Tensor,
                  cfg: LossConfig, tail: str, tail_logprobs: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`kdfast.topk_distill_loss` on the C++ top-k op (checked options and tensor shapes).

    float64 log-probs give a float64 loss, as on the other backends; it is
    computed in float32 lanes unless the student is float64.
    """
    V, k = student_logits.shape[-1], topk_indices.shape[-1]
    rows = student_logits.reshape(-1, V)
    loss, _ = torch.ops.kdfast.topk_distill_forward(
        rows, topk_indices.reshape(-1, k), *teacher_arguments(topk_logprobs, tail_logprobs, tail, rows.dtype),
        *topk_op_arguments(cfg), 0, wants_grad(student_logits))
    return loss.to(torch.float64) if topk_logprobs.dtype == torch.float64 else loss


def cpu_topk_loss_and_grad_(chunk_logits: torch.Tensor, topk_indices: torch.Tensor, teacher: tuple,
                            cfg: LossConfig, first_row: int) -> torch.Tensor:
    """The loss of :func:`cpu_topk_loss`, not differentiable: its gradient overwrites ``chunk_logits``.

    ``chunk_logits`` is a contiguous ``(n, V)`` tensor, ``teacher`` the
    chunk's :func:`teacher_arguments`, ``cfg`` the chunk's configuration,
    ``first_row`` the chunk's first row in the whole call (error messages).
    """
    return torch.ops.kdfast.topk_distill_forward_inplace(chunk_logits, topk_indices, *teacher,
                                                         *topk_op_arguments(cfg), first_row)


# ----------------------------------------------------------------- CUDA: the teacher rows, checked
class TeacherRows(NamedTuple):
    """The teacher's rows of a Triton top-k loss, checked (:func:`triton_teacher_rows`)."""

    indices: torch.Tensor  # (N, k) int64, the ignored rows' replaced by 0..k-1
    ordered: Optional[torch.Tensor]  # the same, sorted along each row (the bucket's; None for "renormalize")
    teacher: torch.Tensor  # (N, k) log-probs, or (N, k + 1) with the bucket's log-mass last

    def select(self, rows: slice) -> "TeacherRows":
        return TeacherRows(self.indices[rows], None if self.ordered is None else self.ordered[rows],
                           self.teacher[rows])


def triton_teacher_rows(student_logits: torch.Tensor, topk_indices: torch.Tensor, topk_logprobs: torch.Tensor,
                        tail_logprobs: Optional[torch.Tensor], tail: str, cfg: LossConfig) -> TeacherRows:
    """:func:`kdfast.ops.triton.topk_teacher.topk_teacher_rows` of the call: the rows checked and, where
    ``cfg`` has labels, the ignored ones made neutral, in one Triton pass; float64 when the student or the
    log-probs are.  Errors name rows of ``topk_indices`` (so, computed once for a chunked call, rows of the
    whole call), held for the whole call there: the renormalised tail drops the sorted copy (20 bytes
    per top-k entry with it, 12 without)."""
    from ..llm.topk import _valid_rows
    from .triton.topk_teacher import triton_topk_teacher

    V, k = student_logits.shape[-1], topk_indices.shape[-1]
    flat = topk_indices.reshape(-1, k)
    valid, labels = _valid_rows(cfg, flat.shape[0], V, flat.device)
    f64 = torch.float64 in (student_logits.dtype, topk_logprobs.dtype)
    lp, rest, tolerance, empty_bucket_below, bucket = teacher_arguments(
        topk_logprobs, tail_logprobs, tail, torch.float64 if f64 else torch.float32)
    indices, ordered, teacher = triton_topk_teacher(flat, lp, rest, None if labels is None else valid, V, tolerance,
                                                    empty_bucket_below, bucket, f64)
    return TeacherRows(indices, ordered if bucket else None, teacher)


# ----------------------------------------------------------------- CUDA: the renormalised tail on the dense kernel
class GatherSupport(torch.autograd.Function):
    """``rows.gather(-1, idx)`` whose backward scatters the gradient into zeros (no ``(N, V)`` autograd temporaries)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.shape, ctx.like = rows.shape, rows.new_empty(0)
        return rows.gather(-1, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        dense = torch.zeros(ctx.shape[0], ctx.shape[1], dtype=ctx.like.dtype, device=ctx.like.device)
        dense.scatter_(-1, idx, grad.to(dense.dtype))
        return dense, None


def gather_support(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The student's logits on the support, with the scatter-into-zeros gradient where autograd needs one."""
    if rows.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return GatherSupport.apply(rows, idx)
    return rows.gather(-1, idx)


def mask_label(ignore_index: int, k: int) -> Optional[int]:
    """A label in ``[0, k)`` that is not ``ignore_index`` (it only marks a row as counted), or None if none is."""
    return next((label for label in (0, 1) if label < k and label != ignore_index), None)


def runs_triton_ops(backend: str, cfg: LossConfig, tail: str, k: int) -> bool:
    """Whether :func:`fused_topk_loss` runs the Triton ops on resolved ``backend`` (and so reads
    :func:`triton_teacher_rows`): not where the renormalised tail cannot mark the counted rows
    (labels, ``k = 1``, ``ignore_index = 0``), which the PyTorch form then runs."""
    return backend == "triton" and not (tail == "renormalize" and cfg.labels is not None
                                        and mask_label(cfg.ignore_index, k) is None)


def renormalized_topk_loss(student_logits: torch.Tensor, teacher_rows: TeacherRows, cfg: LossConfig,
                           backend: str) -> torch.Tensor:
    """``topk_distill_loss(..., tail="renormalize")`` on ``backend``'s fused dense kernel (checked options and
    shapes; ``teacher_rows`` from :func:`triton_teacher_rows`, where :func:`runs_triton_ops`)."""
    from ..llm.topk import STUDENT_UNDEFINED_ON_SUPPORT, _check_defined, _valid_rows
    from ..losses import distill_loss

    V, k = student_logits.shape[-1], teacher_rows.indices.shape[-1]
    rows = student_logits.reshape(-1, V)
    # the labels were checked with the teacher rows: no second check (a host sync)
    valid, labels = _valid_rows(cfg, rows.shape[0], V, rows.device, check=False)
    row_labels = None if labels is None else torch.where(valid, mask_label(cfg.ignore_index, k), cfg.ignore_index)
    idx, lp = teacher_rows.indices, teacher_rows.teacher
    on_support = gather_support(rows, idx)
    if labels is not None:
        on_support = torch.where(valid[:, None], on_support, torch.zeros_like(on_support))
    options = dict(divergence=cfg.divergence, alpha=cfg.alpha, beta=cfg.beta, skew=cfg.skew,
                   temperature=cfg.temperature, student_temperature=cfg.student_temperature, scale=cfg.scale,
                   soft_weight=cfg.soft_weight, labels=row_labels, ignore_index=cfg.ignore_index,
                   reduction=cfg.reduction, normalizer=cfg.normalizer, backend=backend)
    if torch.compiler.is_compiling():  # no try block for Dynamo to trace (_check_defined is off there anyway)
        loss = distill_loss(on_support, lp, **options)
    else:
        try:
            loss = distill_loss(on_support, lp, **options)
        except ValueError:
            # The teacher's rows are checked: what the dense kernel can refuse is a student row that is
            # all -inf on the support, found by its one host sync; the top-k form of that error is
            # looked for only then, not by a pass and a sync of its own on every call.
            _check_defined(on_support, STUDENT_UNDEFINED_ON_SUPPORT)
            raise
    if labels is not None and cfg.hard_weight != 0.0:
        acc = reference.accumulation_dtype(student_logits, lp)
        # ignored rows may hold NaN: zeroed before, not after, or their NaN would reach the gradient
        full = torch.where(valid[:, None], rows.to(acc), torch.zeros((), dtype=acc, device=rows.device))
        ce = reference.cross_entropy(full, torch.where(valid, labels, 0))
        ce = torch.where(valid, ce, torch.zeros_like(ce))
        loss = loss + cfg.hard_weight * reference.reduce_rows(ce, valid, cfg)
    return loss


# ----------------------------------------------------------------- CUDA: the bucket tail on its Triton op
def bucket_topk_loss_triton(student_logits: torch.Tensor, teacher_rows: TeacherRows, cfg: LossConfig) -> torch.Tensor:
    """``topk_distill_loss(..., tail="bucket")`` on the Triton op (checked options and tensor shapes).

    ``teacher_rows`` (:func:`triton_teacher_rows`) are checked, the ignored
    ones neutral, the bucket derived, the support sorted (the student sweep's
    order); a valid row whose teacher (with its tail) is all ``-inf`` was its
    ValueError there.
    """
    from .triton.topk_bucket import triton_topk_bucket_forward

    rows = student_logits.reshape(-1, student_logits.shape[-1])
    loss, _ = triton_topk_bucket_forward(rows, *teacher_rows, *topk_op_arguments(cfg), wants_grad(student_logits))
    return loss


def fused_topk_loss(student_logits: torch.Tensor, topk_indices: torch.Tensor, topk_logprobs: torch.Tensor,
                    cfg: LossConfig, tail: str, tail_logprobs: Optional[torch.Tensor],
                    teacher_rows: Optional[TeacherRows] = None) -> Optional[torch.Tensor]:
    """The top-k loss on the fused kernel that ``cfg.backend`` names (not ``"torch"``), or None for the PyTorch form.

    None too for ``"renormalize"`` rows that are not unit-stride along the
    vocabulary on CPU (a transposed or expanded view): the op would copy them,
    and the PyTorch form reads only the ``k`` gathered entries; and for
    ``"renormalize"`` with ``k = 1`` and ``ignore_index = 0`` on Triton (see
    :func:`runs_triton_ops`).  ``"bucket"`` on Triton is
    :func:`bucket_topk_loss_triton` (any strides).  On Triton,
    ``teacher_rows`` are these rows' :func:`triton_teacher_rows` when the
    caller has them already (a chunk of a call checked as a whole).
    """
    backend = resolve_backend(cfg.backend, student_logits.device)
    if backend == "cpu" and tail == "renormalize" and student_logits.stride(-1) != 1 and student_logits.shape[-1] > 1:
        return None  # the op would copy the rows to unit stride; the PyTorch form only gathers the k
    if backend == "cpu":
        return cpu_topk_loss(student_logits, topk_indices, topk_logprobs, cfg, tail, tail_logprobs)
    if not runs_triton_ops(backend, cfg, tail, topk_indices.shape[-1]):
        return None
    if teacher_rows is None:
        teacher_rows = triton_teacher_rows(student_logits, topk_indices, topk_logprobs, tail_logprobs, tail, cfg)
    if tail == "renormalize":
        return renormalized_topk_loss(student_logits, teacher_rows, cfg, backend)
    return bucket_topk_loss_triton(student_logits, teacher_rows, cfg)
