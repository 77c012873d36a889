"""The chunk loop of the fused linear losses: the logits of a few rows at a time, never of all N.

A fused linear loss takes the hidden states and the weight of an LM head
instead of its logits.  :func:`run_chunks` walks the ``N`` rows in chunks of
``chunk_size``; per chunk it computes the student logits ``h W^T (+ b)`` (into a
reused buffer, or by oneDNN: :mod:`kdfast.llm.onednn`), hands them (as a detached leaf) to a per-chunk loss, takes the
gradient of that loss with respect to the logits, and turns it at once into the
gradients of the hidden states, the weight and the bias:

    grad_hidden[chunk] = g @ W        grad_W += g^T @ h[chunk]        grad_b += g.sum(0)

so the largest temporaries are ``(chunk_size, V)``.  The per-chunk loss is a
parameter (a :data:`ChunkLoss`): it computes whatever the teacher side needs
(the teacher's logits of the same rows, or its cached top-k) and the loss, so
the dense and the sparse-teacher forms share this loop.  :func:`chunked_linear_loss`
is the entry point: the loop inside an autograd Function (:class:`ChunkedLinearLoss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..ops.fused_op import _is_concrete, may_hand_out_saved_gradient, refuse_double_backward
from .onednn import onednn_grad_rows, onednn_logits, uses_onednn

# ``loss = chunk_loss(student_logits_chunk, rows)``: the loss of the rows
# ``rows`` (a slice of the N rows), differentiable in ``student_logits_chunk``.
ChunkLoss = Callable[[torch.Tensor, slice], torch.Tensor]
# ``chunk_loss = make_chunk_loss(capacity)``: a ChunkLoss for chunks of at most
# ``capacity`` rows.  A fresh one per pass over the rows, so that its scratch
# buffers (the teacher's logits) live only while the loop runs.
ChunkLossFactory = Callable[[int], ChunkLoss]
# A ChunkLoss may also have a method ``loss_and_grad_(student_logits_chunk, rows)``
# that returns the (non-differentiable) loss and overwrites the logits with its
# gradient (a fused kernel writing in place): the loop then uses it, and the
# chunk needs no gradient buffer besides the logits it already has.  A loss
# offers it only where it is valid for the head (never with a softcap, whose
# chain rule needs the capped logits after the loss): the caller, who also
# sizes the chunks by it, decides.
IN_PLACE_METHOD = "loss_and_grad_"

CPU_CHUNK_BUDGET_BYTES = 256 * 2**20
CUDA_CHUNK_BUDGET_FRACTION = 8  # use at most 1/8 of the free device memory ...
CUDA_CHUNK_BUDGET_MAX_BYTES = 2 * 2**30  # ... and at most 2 GiB ...
CUDA_CHUNK_BUDGET_MIN_BYTES = 64 * 2**20  # ... but at least 64 MiB
# A loop whose only (chunk, V) temporary is the logits buffer (the gradient
# written into it) and no teacher head gets a budget the size of the weight
# gradient it holds anyway, at least this much: below it the matmuls slow down.
WEIGHT_SIZED_BUDGET_MIN_BYTES = 64 * 2**20
# Rows per chunk are rounded down to a multiple of this (when larger), which
# keeps the matmuls' row count friendly to the GEMM kernels' tiles.
CHUNK_ROW_MULTIPLE = 16


def chunk_budget_bytes(device: torch.device) -> int:
    """How many bytes the ``(chunk_size, V)`` temporaries of one chunk may take together.

    CPU: a fixed 256 MiB (large enough that the matmuls run at full speed, small
    next to the ``(N, V)`` logits it replaces).  CUDA: 1/8 of the free memory,
    clamped to [64 MiB, 2 GiB].
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(max(free // CUDA_CHUNK_BUDGET_FRACTION, CUDA_CHUNK_BUDGET_MIN_BYTES),
                       CUDA_CHUNK_BUDGET_MAX_BYTES))
    return CPU_CHUNK_BUDGET_BYTES


def weight_sized_budget_bytes(weight: torch.Tensor) -> int:
    """A chunk budget for a loop with one ``(chunk, V)`` buffer and no teacher head (the top-k loss).

    The bytes of ``weight`` (its gradient is held anyway), at least
    64 MiB, at most :func:`chunk_budget_bytes`: the fixed 256 MiB would make the
    buffer, not the gradients, the peak.  At N = 4096, H = 576, V = 49152 this
    is 576 rows, 14 % of the materialised path's memory instead of 24 %.
    """
    own = max(weight.numel() * weight.element_size(), WEIGHT_SIZED_BUDGET_MIN_BYTES)
    return min(own, chunk_budget_bytes(weight.device))


def default_chunk_size(rows: int, bytes_per_row: int, device: torch.device, budget_bytes: Optional[int] = None) -> int:
    """The number of rows per chunk when the caller gives none.

    ``bytes_per_row`` is what one row of the chunk temporaries costs (the
    caller counts its logits buffers and the gradient): the chunk is the most
    rows whose temporaries fit ``budget_bytes`` (default
    :func:`chunk_budget_bytes`), rounded down to a multiple of 16, at least 1
    and at most ``rows``.
    """
    budget = chunk_budget_bytes(device) if budget_bytes is None else budget_bytes
    fit = max(1, budget // max(1, bytes_per_row))
    if fit > CHUNK_ROW_MULTIPLE:
        fit -= fit % CHUNK_ROW_MULTIPLE
    return max(1, min(fit, rows))


# ----------------------------------------------------------------- softcap
def apply_softcap_(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(logits / cap)`` in place (Gemma's logit soft-capping)."""
    return logits.div_(cap).tanh_().mul_(cap)


def softcap_backward_(grad: torch.Tensor, capped_logits: torch.Tensor, cap: float) -> torch.Tensor:
    """``grad *= 1 - (capped / cap)^2`` in place: the chain rule through ``cap * tanh(z / cap)``.

    Overwrites ``capped_logits`` (dead by then) instead of allocating a
    ``(chunk, V)`` temporary for the derivative.
    """
    derivative = capped_logits.div_(cap).square_().neg_().add_(1.0)
    return grad.mul_(derivative)


# ----------------------------------------------------------------- one LM head
@dataclass(frozen=True)
class LinearHead:
    """One model's LM head over ``N`` rows: ``logits = hidden @ weight.T (+ bias)``, optionally soft-capped."""

    hidden: torch.Tensor  # (N, H)
    weight: torch.Tensor  # (V, H)
    bias: Optional[torch.Tensor]  # (V,) or None
    softcap: Optional[float] = None

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def new_logits_buffer(self, chunk_size: int) -> Optional[torch.Tensor]:
        """An uninitialised ``(chunk_size, V)`` buffer, reused by every chunk (no page faults per chunk).

        None where the logits come from oneDNN (:mod:`kdfast.llm.onednn`), which
        allocates them itself.
        """
        if uses_onednn(self.weight):
            return None
        return self.weight.new_empty((chunk_size, self.vocab_size))

    @torch.no_grad()
    def logits_into(self, rows: slice, buffer: Optional[torch.Tensor]) -> torch.Tensor:
        """The logits of ``rows``: written into the first rows of ``buffer`` (that view is returned), or new."""
        h = self.hidden[rows].detach()
        weight = self.weight.detach()
        bias = None if self.bias is None else self.bias.detach()
        if buffer is None:
            out = onednn_logits(h, weight, bias)
        else:
            out = buffer[: h.shape[0]]
            if bias is None:
                torch.mm(h, weight.t(), out=out)
            else:
                torch.addmm(bias, h, weight.t(), out=out)
        if self.softcap is not None:
            apply_softcap_(out, self.softcap)
        return out


# ----------------------------------------------------------------- the loop
@dataclass
class ChunkLoopResult:
    """What :func:`run_chunks` returns: the loss and the gradients that were asked for (else None)."""

    loss: torch.Tensor
    grad_hidden: Optional[torch.Tensor]
    grad_weight: Optional[torch.Tensor]
    grad_bias: Optional[torch.Tensor]


def accumulator_dtype(param: torch.Tensor, accumulate_fp32: bool) -> torch.dtype:
    """float32 for a half-precision parameter when ``accumulate_fp32``, else the parameter's dtype."""
    if accumulate_fp32 and param.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return param.dtype


class _StudentGrads:
    """The student's gradients, filled chunk by chunk from each chunk's logit gradient ``g``."""

    def __init__(self, head: LinearHead, needs_grad: tuple, accumulate_fp32: bool):
        want_hidden, want_weight, want_bias = needs_grad
        self.head = head
        self.weight = head.weight.detach()
        self.onednn = uses_onednn(self.weight)
        # contiguous, because every chunk writes its rows with out=
        self.hidden = head.hidden.new_empty(head.hidden.shape) if want_hidden else None
        # Uninitialised: the first chunk's product is written, not added (no pass zeroing a (V, H) tensor).
        self.weight_acc = (torch.empty(self.weight.shape, dtype=accumulator_dtype(self.weight, accumulate_fp32),
                                       device=self.weight.device) if want_weight else None)
        self.weight_started = False
        self.bias_acc = (torch.zeros(head.bias.shape, dtype=accumulator_dtype(head.bias, accumulate_fp32),
                                     device=self.weight.device) if want_bias and head.bias is not None else None)

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight_acc is not None or self.bias_acc is not None

    def add_chunk(self, rows: slice, grad: Optional[torch.Tensor]) -> None:
        """``grad_hidden[rows] = g @ W``, ``grad_W += g^T h[rows]``, ``grad_b += sum(g)``; None means ``g = 0``."""
        if grad is None:
            if self.hidden is not None:
                self.hidden[rows].zero_()
            return
        if self.hidden is not None:
            if self.onednn and grad.dtype == torch.float32:
                self.hidden[rows] = onednn_grad_rows(grad, self.weight)
            else:
                torch.mm(grad, self.weight, out=self.hidden[rows])
        if self.weight_acc is not None:
            _add_matmul_(self.weight_acc, grad.t(), self.head.hidden[rows].detach(), first=not self.weight_started)
            self.weight_started = True
        if self.bias_acc is not None:
            self.bias_acc.add_(grad.sum(0, dtype=self.bias_acc.dtype))

    def result(self):
        """``(grad_hidden, grad_weight, grad_bias)`` in the parameters' dtypes (None where not wanted)."""
        if self.weight_acc is not None and not self.weight_started:
            self.weight_acc.zero_()  # no chunk had a gradient (no rows, or every row ignored)
        weight = None if self.weight_acc is None else self.weight_acc.to(self.weight.dtype)
        bias = None if self.bias_acc is None else self.bias_acc.to(self.head.bias.dtype)
        return self.hidden, weight, bias


def run_chunks(
    head: LinearHead,
    make_chunk_loss: ChunkLossFactory,
    *,
    chunk_size: int,
    scalar_loss: bool,
    needs_grad: tuple[bool, bool, bool],
    accumulate_fp32: bool = True,
    row_grad: Optional[torch.Tensor] = None,
) -> ChunkLoopResult:
    """Run the per-chunk loss over the rows of ``head`` chunk by chunk; accumulate the loss and the student gradients.

    Args:
        head: the student's head (its hidden states, weight, bias, softcap).
        make_chunk_loss: makes the per-chunk loss (see :data:`ChunkLossFactory`);
            that returns a scalar when ``scalar_loss``, else one value per row.
        chunk_size: rows per chunk (the last chunk may be shorter).
        scalar_loss: whether the chunk losses are scalars (summed) or per-row
            vectors (concatenated into ``(N,)``).
        needs_grad: which of (hidden, weight, bias) get a gradient.
        accumulate_fp32: accumulate the weight and bias gradients of a
            bf16/fp16 head in float32 across chunks (cast back at the end;
            see :func:`_add_matmul_`).
        row_grad: for per-row losses, the gradient of the result with respect
            to each row's loss (``grad_output`` of a ``reduction="none"`` loss);
            None means all ones.

    Returns:
        A :class:`ChunkLoopResult`; each gradient has its parameter's dtype.
    """
    grads = _StudentGrads(head, needs_grad, accumulate_fp32)
    capacity = max(1, min(chunk_size, head.rows))
    buffer = head.new_logits_buffer(capacity)
    chunk_loss = make_chunk_loss(capacity)
    in_place = grads.any and hasattr(chunk_loss, IN_PLACE_METHOD)
    losses = []
    for start in range(0, head.rows, chunk_size):
        rows = slice(start, min(start + chunk_size, head.rows))
        logits = head.logits_into(rows, buffer)
        if in_place:
            loss = getattr(chunk_loss, IN_PLACE_METHOD)(logits, rows)
            grad = logits
            if row_grad is not None:
                # in the loss's dtype (float32 at least): one rounding of each half-precision entry
                grad.mul_(row_grad[rows].to(loss.dtype)[:, None])
        else:
            loss, grad = _loss_and_autograd_grad(chunk_loss, logits, rows, grads.any, row_grad)
            if grad is not None and head.softcap is not None:
                softcap_backward_(grad, logits, head.softcap)
        losses.append(loss.detach())
        grads.add_chunk(rows, grad)
        # The fused kernel recycles its gradient buffer for the next chunk, and oneDNN's logits are
        # new per chunk: neither may still be referenced when the next chunk's are made (two alive
        # at once would double the loop's peak memory).
        del grad, logits

    grad_hidden, grad_weight, grad_bias = grads.result()
    return ChunkLoopResult(_combine(losses, scalar_loss, head), grad_hidden, grad_weight, grad_bias)


def _loss_and_autograd_grad(chunk_loss: ChunkLoss, logits: torch.Tensor, rows: slice, want_grad: bool,
                            row_grad: Optional[torch.Tensor]):
    """The chunk's loss and, when wanted, its gradient with respect to ``logits`` by autograd (None: zero)."""
    leaf = logits.detach().requires_grad_(want_grad)
    with torch.set_grad_enabled(want_grad):
        loss = chunk_loss(leaf, rows)
        if not want_grad:
            return loss, None
        seed = None if row_grad is None else row_grad[rows].to(loss.dtype)
        # allow_unused: a loss may not depend on the logits (every row ignored): g = 0
        (grad,) = torch.autograd.grad(loss, leaf, seed, allow_unused=True)
    return loss, grad


def _add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool = False) -> None:
    """``acc += a @ b`` (``acc = a @ b`` when ``first``: ``acc`` may be uninitialised).

    For a float32 accumulator of half-precision operands, the chunk's product
    is taken in the operands' dtype (tensor cores, or the CPU's bf16 GEMM:
    float32 sums inside, one rounding of the ``(V, H)`` result per chunk) and
    added in float32: the rounding does not compound across chunks as it
    would in a half-precision accumulator, and no ``(chunk, V)`` float32 copy
    of the gradient is made.
    """
    if a.dtype == acc.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
    elif first:
        acc.copy_(torch.mm(a, b))
    else:
        acc.add_(torch.mm(a, b))


def _combine(losses: list, scalar_loss: bool, head: LinearHead) -> torch.Tensor:
    """The sum of the chunks' scalar losses, or their per-row losses end to end."""
    if losses:
        return torch.stack(losses).sum() if scalar_loss else torch.cat(losses)
    # No rows: the loss of nothing is 0 (an empty vector per row), in the loss's dtype.
    dtype = torch.float64 if head.weight.dtype == torch.float64 else torch.float32
    return head.weight.new_zeros((), dtype=dtype) if scalar_loss else head.weight.new_zeros((0,), dtype=dtype)


# ----------------------------------------------------------------- autograd
@dataclass(frozen=True)
class ChunkPlan:
    """Everything :class:`ChunkedLinearLoss` needs besides the student's tensors.

    ``per_row`` marks a ``reduction="none"`` loss: its gradient depends on the
    incoming gradient row by row, which the accumulated ``grad_W = sum_i g_i^T
    h_i`` cannot be rescaled by afterwards, so the forward only computes the
    values and the backward runs the chunk loop again (recomputing the logits)
    with the incoming gradient as the rows' seeds.  ``reduce_grad_hidden``
    completes the hidden-state gradient across vocabulary shards (an
    all-reduce) when the head is vocabulary-parallel.
    """

    make_chunk_loss: ChunkLossFactory
    chunk_size: int
    softcap: Optional[float]
    per_row: bool
    accumulate_fp32: bool
    reduce_grad_hidden: Optional[Callable[[torch.Tensor], None]] = None


class ChunkedLinearLoss(torch.autograd.Function):
    """``loss(hidden, weight, bias)`` of a chunked LM head; the gradients come from the forward's chunk loop.

    For a scalar loss the forward computes the gradients of the inputs that
    require one and saves only those (no ``(N, V)`` tensor is ever kept);
    backward scales them by the incoming gradient (not at all when it is 1).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: ChunkPlan):
        ctx.plan = plan
        head = LinearHead(hidden, weight, bias, plan.softcap)
        needs = tuple(ctx.needs_input_grad[:3]) if not plan.per_row else (False, False, False)
        result = run_chunks(head, plan.make_chunk_loss, chunk_size=plan.chunk_size, scalar_loss=not plan.per_row,
                            needs_grad=needs, accumulate_fp32=plan.accumulate_fp32)
        if plan.per_row:
            ctx.save_for_backward(hidden, weight, bias)
        else:
            _complete_grad_hidden(result.grad_hidden, plan)
            ctx.save_for_backward(result.grad_hidden, result.grad_weight, result.grad_bias)
        return result.loss

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward(
            "kdfast's fused linear losses", "Materialise the logits and use distill_loss(..., backend='torch').")
        with torch.no_grad():
            return ChunkedLinearLoss._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        plan: ChunkPlan = ctx.plan
        if plan.per_row:
            hidden, weight, bias = ctx.saved_tensors
            head = LinearHead(hidden, weight, bias, plan.softcap)
            result = run_chunks(head, plan.make_chunk_loss, chunk_size=plan.chunk_size, scalar_loss=False,
                                needs_grad=tuple(ctx.needs_input_grad[:3]), accumulate_fp32=plan.accumulate_fp32,
                                row_grad=grad_loss)
            _complete_grad_hidden(result.grad_hidden, plan)
            return result.grad_hidden, result.grad_weight, result.grad_bias, None
        grads = ctx.saved_tensors
        if not _is_one(grad_loss):
            grads = tuple(None if g is None else g * grad_loss for g in grads)
        elif not may_hand_out_saved_gradient():
            grads = tuple(None if g is None else g.clone() for g in grads)
        return (*grads, None)


def _complete_grad_hidden(grad_hidden: Optional[torch.Tensor], plan: ChunkPlan) -> None:
    if grad_hidden is not None and plan.reduce_grad_hidden is not None:
        plan.reduce_grad_hidden(grad_hidden)


def _is_one(grad_loss: torch.Tensor) -> bool:
    """Whether the incoming gradient is exactly 1 (the usual ``loss.backward()``), read only in eager mode."""
    return _is_concrete(grad_loss) and bool(grad_loss == 1)


# torch.compile (issue 18): the chunk loop runs eagerly, a graph break at this call (the kernels inside are
# already fused).  Traced, dynamo broke the graph a dozen times inside the autograd Function's forward
# (the oneDNN probe, frame after frame of the loop) and inductor failed to lower a chunk's oneDNN logits
# (LoweringException in mkldnn._linear_pointwise); tests/test_compile_train_step.py.
@torch.compiler.disable
def chunked_linear_loss(head: LinearHead, plan: ChunkPlan) -> torch.Tensor:
    """The loss of ``plan`` over the student ``head``, differentiable in its hidden states, weight and bias.

    Without a gradient to compute (grad mode off, e.g. an evaluation loop, or
    no input requiring one) only the values are computed; the autograd
    Function alone cannot tell, as its forward always runs in no-grad mode.
    Never traced by ``torch.compile``: a compiled caller breaks its graph here
    and this runs eagerly (see the README, "FSDP2, DDP and torch.compile").
    """
    params = [t for t in (head.hidden, head.weight, head.bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in params):
        return ChunkedLinearLoss.apply(head.hidden, head.weight, head.bias, plan)
    return run_chunks(head, plan.make_chunk_loss, chunk_size=plan.chunk_size, scalar_loss=not plan.per_row,
                      needs_grad=(False, False, False)).loss
