"""Fused linear + distillation losses: the loss of two LM heads without their ``(N, V)`` logits.

At LLM vocabularies the logits dominate the memory of distillation: ``N``
tokens times ``V = 128k`` entries, for the student, the teacher and the
student's gradient.  :func:`fused_linear_distill_loss` takes the heads instead
(hidden states and weights, ``logits = hidden @ weight.T + bias``) and returns
exactly ``kdfast.distill_loss`` of their logits, with the same options, while
only ``chunk_size`` rows of logits exist at any time:

* per chunk of rows: the teacher's logits (no gradient), the student's logits
  as a detached leaf, the chunk's loss from ``kdfast.distill_loss`` (whose
  fused CPU/Triton kernel writes the logits' gradient ``g`` in its forward),
  and at once ``grad_hidden[chunk] = g @ W_s``, ``grad_W_s += g^T h_chunk``,
  ``grad_b_s += sum(g)`` (:mod:`kdfast.llm.chunking`);
* ``"batchmean"`` divides every chunk by the *global* normaliser (the valid
  rows of the whole batch, or ``normalizer``), so the chunks add up to the
  full loss; the gradients are computed in the forward and only they are
  saved for the backward, which scales them by the incoming gradient.

The design is that of Liger-Kernel's fused linear cross-entropy, with kdfast's
losses (every divergence, weighting, hard-label term and reduction of docs/contract.md).
:func:`fused_linear_topk_distill_loss` is the same loop against a sparse
teacher (cached top-k log-probabilities, :func:`kdfast.llm.topk.topk_distill_loss`).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Optional

import torch

from .. import reference
from .chunking import (ChunkLossFactory, ChunkPlan, LinearHead, chunked_linear_loss, default_chunk_size,
                       weight_sized_budget_bytes)
from .inputs import (
    batchmean_normalizer,
    check_chunk_size,
    check_same_rows,
    check_softcap,
    check_vocab_policy,
    element_size,
    make_head,
    reconcile_vocabularies,
    row_tensor,
    virtual_logits,
)
from .topk import check_counted_topk_rows, check_tail, check_topk_inputs, topk_loss
from ..ops.fused_op import wants_grad
from ..ops.topk import (cpu_topk_loss_and_grad_, fused_topk_loss, runs_triton_ops, teacher_arguments,
                        topk_op_arguments, triton_teacher_rows)
from ..config import LossConfig, make_config, takes_loss_options
from ..modules import OptionsModule
from ..ops.backends import implementation, resolve_backend

__all__ = [
    "FusedLinearDistillLoss",
    "FusedLinearTopKDistillLoss",
    "fused_linear_distill_loss",
    "fused_linear_topk_distill_loss",
]

# Extra (chunk, V) float32 temporaries per logit that the pure-PyTorch losses
# build (log-softmaxes, probabilities, products), counted in the chunk budget;
# the fused kernels need none besides the gradient.
_REFERENCE_TEMPORARIES = 8
_TOPK_TEMPORARIES = 3


@takes_loss_options()
def fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    vocab_policy: str = "error",
    softcap: Optional[float] = None,
    shift: bool = False,
    accumulate_fp32: bool = True,
    process_group=None,
    **options,
) -> torch.Tensor:
    """``kdfast.distill_loss(student_hidden @ student_weight.T + b_s, teacher_hidden @ teacher_weight.T + b_t, ...)``
    without materialising either ``(N, V)`` logits tensor.

    Args:
        student_hidden: ``(B, T, H_s)`` or ``(N, H_s)`` hidden states before the
            student's LM head; gets a gradient.
        student_weight: ``(V, H_s)`` LM-head weight (dtype of ``student_hidden``);
            gets a gradient.
        teacher_hidden, teacher_weight: ``(B, T, H_t)`` / ``(N, H_t)`` and
            ``(V_t, H_t)``; ``H_t`` may differ from ``H_s``.  Never get a gradient.
        labels: ``(B, T)`` / ``(N,)`` token ids (or ``ignore_index``), for the
            row mask and the hard-label term, as in ``distill_loss``.
        student_bias, teacher_bias: optional ``(V,)`` biases; the student's gets a gradient.
        chunk_size: rows of logits per chunk.  None: the most rows whose
            temporaries fit a budget (CPU: 256 MiB; CUDA: 1/8 of the free
            memory, clamped to [64 MiB, 2 GiB]), where a row costs ``V`` times
            the bytes of one student logit, one teacher logit and one gradient
            entry (none on CPU, whose kernel writes the gradient over the
            student logits, except with a softcap; plus 8 float32 temporaries of
            the pure-PyTorch loss when ``backend`` resolves to ``"torch"``),
            rounded down to a multiple of 16.
        vocab_policy: ``"error"`` (``V_t != V_s`` is a ValueError naming both) or
            ``"truncate"`` (a larger teacher vocabulary is cut to the student's
            first ``V_s`` entries and renormalised over them).
        softcap: Gemma-style soft-capping ``c * tanh(z / c)`` of both models'
            logits before the loss (the chain rule through tanh is applied).
        shift: causal-LM shift: the hidden states at positions ``0..T-2``
            predict the labels at ``1..T-1``.  Needs 3-D ``(B, T, H)`` hidden
            states (and ``(B, T)`` labels); the loss has ``B * (T - 1)`` rows and
            the last position's hidden states get a zero gradient.  Without it
            labels are taken as already aligned with the hidden states.
        accumulate_fp32: accumulate the gradients of a bf16/fp16 weight and bias
            across chunks in float32 (cast to the parameter's dtype at the end);
            each chunk's ``g^T h`` is taken in the weight's dtype (one rounding
            per chunk, none compounding across chunks).
        process_group: for vocabulary-parallel heads (``student_weight`` and
            ``teacher_weight`` are this rank's vocabulary shards, the hidden
            states are replicated): each chunk's loss is
            :func:`kdfast.llm.vocab_parallel.vocab_parallel_distill_loss` (the loss
            of the full vocabulary, the same on every rank), the hidden-state
            gradient is all-reduced over the group (so it is the full
            gradient), the weight and bias gradients are this rank's shard.
            Every rank must call with the same rows and options; ``backend``
            must stay ``"auto"``.
        options: the options below, exactly as :func:`kdfast.distill_loss`'s (a
            weighting tensor has one weight per loss row, i.e. after the
            shift).  ``"batchmean"`` divides by the valid rows of the whole call
            (or by ``normalizer``: pass the global token count to make gradient
            accumulation over micro-batches equal one big batch).

    Returns:
        float32 (float64 for float64 inputs): a scalar, or ``(N,)`` per loss
        row for ``reduction="none"`` (whose backward recomputes the logits
        chunk by chunk: its gradient depends on the incoming gradient row by row).

    Raises:
        ValueError: bad options (as ``distill_loss``), mismatched shapes,
            vocabularies or devices (naming both), labels out of range.
        TypeError: non-tensors, unsupported dtypes, a weight whose dtype differs
            from its hidden states.
    """
    student = make_head("student", student_hidden, student_weight, student_bias, shift=shift,
                        softcap=check_softcap(softcap))
    teacher = make_head("teacher", teacher_hidden, teacher_weight, teacher_bias, shift=shift, softcap=student.softcap)
    check_same_rows(student_hidden, teacher_hidden, "teacher_hidden")
    teacher = reconcile_vocabularies(student, teacher, vocab_policy)
    labels = row_tensor("labels", labels, student_hidden, shift=shift, drop_first=True)
    cfg = make_config(virtual_logits(student), virtual_logits(teacher), labels=labels, **options)
    in_place_kernel = None
    if process_group is None:
        _check_label_range(cfg.labels, student.vocab_size, cfg.ignore_index)
        resolved = resolve_backend(cfg.backend, student.weight.device)
        loss_fn = implementation(resolved)
        fused_kernel = resolved != "torch"
        in_place_kernel = _in_place_kernel(resolved, student, teacher)
    else:
        if cfg.backend != "auto":
            raise ValueError(f"backend={cfg.backend!r} cannot be combined with process_group: the vocabulary-parallel "
                             "loss is built from PyTorch operations")
        loss_fn = functools.partial(_vocab_parallel_loss(), process_group=process_group)
        fused_kernel = False

    separate_gradient = in_place_kernel is None
    bytes_per_row = student.vocab_size * (
        (2 if separate_gradient else 1) * element_size(student.weight.dtype) + element_size(teacher.weight.dtype)
        + (0 if fused_kernel else 4 * _REFERENCE_TEMPORARIES))
    rows_per_chunk = _resolve_chunk_size(chunk_size, student, bytes_per_row, process_group)
    plan = ChunkPlan(
        make_chunk_loss=_dense_chunk_losses(teacher, loss_fn, _chunks_config(cfg, student.rows), in_place_kernel),
        chunk_size=rows_per_chunk,
        softcap=student.softcap,
        per_row=cfg.reduction == "none",
        accumulate_fp32=accumulate_fp32,
        reduce_grad_hidden=None if process_group is None else _all_reduce_over(process_group),
    )
    return chunked_linear_loss(student, plan)


@takes_loss_options(exclude=("weighting",))
def fused_linear_topk_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_logprobs: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    tail: str = "renormalize",
    tail_logprobs: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    softcap: Optional[float] = None,
    shift: bool = False,
    accumulate_fp32: bool = True,
    **options,
) -> torch.Tensor:
    """:func:`kdfast.llm.topk.topk_distill_loss` of ``student_hidden @ student_weight.T (+ bias)``, no ``(N, V)`` logits.

    The sparse-teacher (offline, cached top-k) form of
    :func:`fused_linear_distill_loss`, with the same chunk loop.  On CPU the
    C++ top-k kernel writes each chunk's gradient over its logits (no
    per-chunk autograd, no gradient buffer: a chunk costs one ``(chunk, V)``
    logits buffer).

    Args:
        student_hidden, student_weight, student_bias: the student's head, as in
            :func:`fused_linear_distill_loss`.
        topk_indices, topk_logprobs: ``(B, T, k)`` / ``(N, k)`` the teacher's
            top-k vocabulary entries per token and their log-probabilities (see
            :func:`kdfast.llm.topk.topk_distill_loss`), one row per position of the
            hidden states.
        labels: ``(B, T)`` / ``(N,)``, as in :func:`fused_linear_distill_loss`.
        tail: as :func:`kdfast.llm.topk.topk_distill_loss`.
        tail_logprobs: ``(B, T)`` / ``(N,)``, ``tail="bucket"`` only: the
            teacher's log-mass off its top-k per position (a cache stores it:
            :mod:`kdfast.llm.cache`), as in :func:`kdfast.llm.topk.topk_distill_loss`.
        chunk_size: rows of logits per chunk; None: the most rows whose
            buffers fit the budget of :func:`fused_linear_distill_loss`.
        accumulate_fp32: as :func:`fused_linear_distill_loss`.
        softcap: soft-capping of the *student's* logits (the teacher's
            log-probabilities are given as they are).
        shift: causal-LM shift, as in :func:`fused_linear_distill_loss`; the
            top-k rows follow the hidden states (their last position is dropped).
        options: the options below, as :func:`kdfast.llm.topk.topk_distill_loss`'s
            (``"batchmean"`` divides by the valid rows of the whole call, or by
            ``normalizer``); ``backend="torch"`` runs each chunk in PyTorch.

    Returns / Raises: as :func:`kdfast.llm.topk.topk_distill_loss`.
    """
    student = make_head("student", student_hidden, student_weight, student_bias, shift=shift,
                        softcap=check_softcap(softcap))
    topk_indices = row_tensor("topk_indices", topk_indices, student_hidden, shift=shift, drop_first=False)
    topk_logprobs = row_tensor("topk_logprobs", topk_logprobs, student_hidden, shift=shift, drop_first=False)
    tail_logprobs = row_tensor("tail_logprobs", tail_logprobs, student_hidden, shift=shift, drop_first=False)
    labels = row_tensor("labels", labels, student_hidden, shift=shift, drop_first=True)
    check_tail(tail)
    if tail_logprobs is not None and tail != "bucket":
        raise ValueError(f"tail_logprobs is the teacher's bucket: it needs tail='bucket', got tail={tail!r}")
    logits = virtual_logits(student)
    cfg = make_config(logits, logits, labels=labels, **options)
    k = topk_indices.shape[-1] if isinstance(topk_indices, torch.Tensor) and topk_indices.dim() else 0
    rest = None if tail_logprobs is None else tail_logprobs.reshape(-1)
    check_topk_inputs(logits, _rows_of(topk_indices, k), _rows_of(topk_logprobs, k), rest)
    _check_label_range(cfg.labels, student.vocab_size, cfg.ignore_index)

    chunks_cfg = _chunks_config(cfg, student.rows)
    resolved = resolve_backend(cfg.backend, student.weight.device)
    if resolved == "cpu":
        chunk_losses = _CpuTopkChunkLoss.factory(student, chunks_cfg, tail, topk_indices.reshape(-1, k),
                                                 topk_logprobs.reshape(-1, k), rest)
        in_place = student.softcap is None  # a softcap's chain rule needs the logits after the loss
    else:
        chunk_losses = _topk_chunk_losses(chunks_cfg, tail, logits, topk_indices.reshape(-1, k),
                                          topk_logprobs.reshape(-1, k), rest)
        in_place = False
    temporaries = 0 if resolved == "cpu" else 4 * _TOPK_TEMPORARIES
    bytes_per_row = student.vocab_size * ((1 if in_place else 2) * element_size(student.weight.dtype) + temporaries)
    plan = ChunkPlan(
        make_chunk_loss=chunk_losses,
        chunk_size=_resolve_chunk_size(chunk_size, student, bytes_per_row, None,
                                       budget_bytes=weight_sized_budget_bytes(student.weight) if in_place else None),
        softcap=student.softcap,
        per_row=cfg.reduction == "none",
        accumulate_fp32=accumulate_fp32,
    )
    return chunked_linear_loss(student, plan)


# ----------------------------------------------------------------- the per-chunk losses
class _DenseChunkLoss:
    """The loss of a chunk of rows against the teacher's logits of the same rows (into one reused buffer).

    Called, it is ``loss_fn(student_logits, teacher_logits, cfg)`` (differentiable).
    With an ``in_place_kernel`` it also has ``loss_and_grad_``, which the chunk
    loop prefers: the fused kernel writes the gradient over the student
    logits, so a chunk costs one student and one teacher logits buffer instead
    of three buffers, and the default chunk holds more rows (larger matmuls) in
    the same memory.
    """

    def __init__(self, teacher: LinearHead, capacity: int, loss_fn, cfg: LossConfig, in_place_kernel):
        self.teacher = teacher
        self.teacher_buffer = teacher.new_logits_buffer(capacity)
        self.loss_fn = loss_fn
        self.cfg = cfg
        if in_place_kernel is not None:
            self.in_place_kernel = in_place_kernel
            self.loss_and_grad_ = self._loss_and_grad_

    def __call__(self, student_logits: torch.Tensor, rows: slice) -> torch.Tensor:
        teacher_logits = self.teacher.logits_into(rows, self.teacher_buffer)
        return self.loss_fn(student_logits, teacher_logits, self.cfg.select_rows(rows))

    def _loss_and_grad_(self, student_logits: torch.Tensor, rows: slice) -> torch.Tensor:
        teacher_logits = self.teacher.logits_into(rows, self.teacher_buffer)
        return self.in_place_kernel(student_logits, teacher_logits, self.cfg.select_rows(rows))


def _dense_chunk_losses(teacher: LinearHead, loss_fn, cfg: LossConfig, in_place_kernel=None) -> ChunkLossFactory:
    """Per chunk: the teacher's logits of the chunk's rows, then ``loss_fn`` (see :class:`_DenseChunkLoss`)."""
    return functools.partial(_DenseChunkLoss, teacher, loss_fn=loss_fn, cfg=cfg, in_place_kernel=in_place_kernel)


def _in_place_kernel(backend: str, student: LinearHead, teacher: LinearHead):
    """The fused kernel that can write a chunk's gradient over its student logits, or None.

    The C++ kernel, when it runs the loss as is: not with a softcap (whose
    chain rule needs the logits after the loss) nor when one head is float64
    and the other not (the logits would be converted, not overwritten).
    """
    if backend != "cpu" or student.softcap is not None:
        return None
    if (student.weight.dtype == torch.float64) != (teacher.weight.dtype == torch.float64):
        return None
    from ..ops.cpu import distill_loss_and_grad_cpu_

    return distill_loss_and_grad_cpu_


def _topk_chunk_losses(cfg: LossConfig, tail: str, logits: torch.Tensor, topk_indices: torch.Tensor,
                       topk_logprobs: torch.Tensor, tail_logprobs: Optional[torch.Tensor]) -> ChunkLossFactory:
    """Per chunk: the top-k loss of the chunk's rows on ``cfg.backend`` (PyTorch, or the Triton ops).

    The rows' values are checked once for the whole call first, so that an
    error names the row of the call (a chunk's own checks would name its row
    in the chunk) and comes before any chunk runs: on Triton by the teacher
    rows' kernel (:func:`kdfast.ops.topk.triton_teacher_rows`, whose rows the
    chunks then share), else in PyTorch.  ``logits`` stands for the student's
    ``(N, V)`` logits (its shape, dtype and device, which picks the backend).
    """
    teacher_rows = None
    if runs_triton_ops(resolve_backend(cfg.backend, logits.device), cfg, tail, topk_indices.shape[-1]):
        teacher_rows = triton_teacher_rows(logits, topk_indices, topk_logprobs, tail_logprobs, tail, cfg)
    else:
        check_counted_topk_rows(cfg, logits.shape[-1], topk_indices, topk_logprobs, tail_logprobs)

    def make(capacity: int):
        def chunk_loss(student_logits: torch.Tensor, rows: slice) -> torch.Tensor:
            chunk_cfg = cfg.select_rows(rows)
            rest = None if tail_logprobs is None else tail_logprobs[rows]
            if cfg.backend != "torch":
                loss = fused_topk_loss(student_logits, topk_indices[rows], topk_logprobs[rows], chunk_cfg, tail, rest,
                                       None if teacher_rows is None else teacher_rows.select(rows))
                if loss is not None:
                    return loss
            return topk_loss(student_logits, topk_indices[rows], topk_logprobs[rows], chunk_cfg, tail, rest)

        return chunk_loss

    return make


class _CpuTopkChunkLoss:
    """A chunk's top-k loss on the C++ kernel, which checks the chunk's teacher rows as it reads them.

    Called, it is differentiable (the op's saved gradient); without a softcap
    (whose chain rule needs the logits after the loss) it also has
    ``loss_and_grad_``, which writes the gradient over the chunk's logits and
    which the chunk loop prefers.  Errors name rows of the whole call.
    """

    def __init__(self, cfg: LossConfig, indices: torch.Tensor, teacher: tuple, in_place: bool):
        self.cfg, self.indices, self.teacher = cfg, indices, teacher
        if in_place:
            self.loss_and_grad_ = self._loss_and_grad_

    @classmethod
    def factory(cls, student: LinearHead, cfg: LossConfig, tail: str, topk_indices: torch.Tensor,
                topk_logprobs: torch.Tensor, tail_logprobs: Optional[torch.Tensor]) -> ChunkLossFactory:
        teacher = teacher_arguments(topk_logprobs, tail_logprobs, tail, student.weight.dtype)
        indices = topk_indices.long().contiguous()
        return lambda capacity: cls(cfg, indices, teacher, in_place=student.softcap is None)

    def _chunk_teacher(self, rows: slice) -> tuple:
        lp, rest, *bounds = self.teacher
        return (lp[rows], None if rest is None else rest[rows], *bounds)

    def __call__(self, student_logits: torch.Tensor, rows: slice) -> torch.Tensor:
        loss, _ = torch.ops.kdfast.topk_distill_forward(student_logits, self.indices[rows], *self._chunk_teacher(rows),
                                                        *topk_op_arguments(self.cfg.select_rows(rows)), rows.start,
                                                        wants_grad(student_logits))
        return loss

    def _loss_and_grad_(self, student_logits: torch.Tensor, rows: slice) -> torch.Tensor:
        return cpu_topk_loss_and_grad_(student_logits, self.indices[rows], self._chunk_teacher(rows),
                                       self.cfg.select_rows(rows), rows.start)


def _chunks_config(cfg: LossConfig, rows: int) -> LossConfig:
    """The configuration the chunks share: the one of the whole call, with ``"batchmean"``'s global normaliser.

    A chunk's ``"batchmean"`` is then its sum divided by the normaliser of all
    the rows, so that the chunks add up to the whole loss; the fused kernels
    apply it while writing the gradient (no extra pass).
    """
    if cfg.reduction != "batchmean":
        return cfg
    return replace(cfg, normalizer=batchmean_normalizer(cfg.normalizer, cfg.labels, rows, cfg.ignore_index))


# ----------------------------------------------------------------- helpers
def _resolve_chunk_size(chunk_size, student: LinearHead, bytes_per_row: int, process_group,
                        budget_bytes: Optional[int] = None) -> int:
    size = check_chunk_size(chunk_size)
    if size is not None:
        return size
    size = default_chunk_size(student.rows, bytes_per_row, student.weight.device, budget_bytes)
    if process_group is not None:
        # Every rank must run the same chunks (each chunk's loss communicates);
        # free memory and shard sizes may differ, so agree on the smallest.
        import torch.distributed as dist

        agreed = torch.tensor([size], dtype=torch.int64, device=student.weight.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=process_group)
        size = int(agreed)
    return size


def _check_label_range(labels: Optional[torch.Tensor], V: int, ignore_index: int) -> None:
    """Labels outside ``[0, V)`` are reported with their global row (a chunk would only know its own)."""
    if labels is None:
        return
    flat = labels.reshape(-1).long()
    reference.check_labels(flat, flat != ignore_index, V, ignore_index)


def _rows_of(t, k: int):
    """``t`` as ``(N, k)`` rows for the checks (non-tensors pass through to be reported)."""
    return t.reshape(-1, k) if isinstance(t, torch.Tensor) and t.dim() else t


def _vocab_parallel_loss():
    # Imported on first use: it pulls in torch.distributed, which single-device training does not need.
    from .vocab_parallel import vocab_parallel_loss

    return vocab_parallel_loss


def _all_reduce_over(process_group):
    import torch.distributed as dist

    def reduce(grad_hidden: torch.Tensor) -> None:
        dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=process_group)

    return reduce


# ----------------------------------------------------------------- module forms
class FusedLinearDistillLoss(OptionsModule):
    """``FusedLinearDistillLoss(**options)(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
    student_bias=None, teacher_bias=None)``: :func:`fused_linear_distill_loss` as a module.

    The heads' weights are arguments of the call (they belong to the models),
    the loss options (divergence, temperature, chunk_size, softcap, ...) to the
    module, which checks them (:class:`kdfast.modules.OptionsModule`).
    """

    loss_fn = staticmethod(fused_linear_distill_loss)
    option_checks = {"chunk_size": check_chunk_size, "softcap": check_softcap, "vocab_policy": check_vocab_policy}

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None) -> torch.Tensor:
        return self.loss_fn(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                            student_bias=student_bias, teacher_bias=teacher_bias, **self.options)


class FusedLinearTopKDistillLoss(OptionsModule):
    """``FusedLinearTopKDistillLoss(**options)(student_hidden, student_weight, topk_indices, topk_logprobs,
    labels=None, student_bias=None)``: :func:`fused_linear_topk_distill_loss` as a module."""

    loss_fn = staticmethod(fused_linear_topk_distill_loss)

    option_checks = {"tail": check_tail, "chunk_size": check_chunk_size, "softcap": check_softcap}

    def forward(self, student_hidden, student_weight, topk_indices, topk_logprobs, labels=None,
                student_bias=None) -> torch.Tensor:
        return self.loss_fn(student_hidden, student_weight, topk_indices, topk_logprobs, labels,
                            student_bias=student_bias, **self.options)
