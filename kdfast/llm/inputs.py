"""Checking and shaping the inputs of the fused linear losses.

The fused linear losses take hidden states and LM-head weights instead of
logits.  Here they become the ``(N, H)`` rows of a :class:`~kdfast.llm.chunking.LinearHead`
(after the optional causal shift), the per-row tensors are aligned with those
rows, and the vocabulary policy reconciles the two heads.  Errors name the
argument and its shape, as the rest of kdfast does (docs/contract.md).
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from .chunking import LinearHead
from ..config import check_logit_dtype, check_same_device, check_tensor, finite_float

VOCAB_POLICIES = ("error", "truncate")


def _check_tensor(name: str, t, dims: tuple) -> None:
    check_tensor(name, t)
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")


def shifted_positions(name: str, t: torch.Tensor, first: bool) -> torch.Tensor:
    """The causal-LM shift of a ``(B, T, ...)`` tensor: positions ``0..T-2`` (``first``) or ``1..T-1``.

    Hidden states at position ``i`` predict the token at ``i + 1``: the hidden
    states (and the teacher's top-k) drop their last position, the labels their first.
    """
    if t.dim() < 2 or (t.dim() < 3 and name.endswith("hidden")):
        raise ValueError(f"shift=True needs batched sequences: {name} must be (B, T, ...), got shape {tuple(t.shape)}")
    return t[:, :-1] if first else t[:, 1:]


def check_not_dtensor(name: str, t) -> None:
    """TypeError for a DTensor: the head's weight of an FSDP2 model outside its unit's forward, most likely.

    Added for FSDP2 (issue 18): ``fully_shard`` turns the parameters into
    DTensors sharded along dim 0, and makes them whole, plain tensors only
    while its module's forward (or a method registered with
    ``register_fsdp_forward_method``) runs.  A sharded weight passed from
    outside failed deep inside the first chunk's matmul (a RuntimeError
    "mkldnn._linear_pointwise.default got mixed torch.Tensor and DTensor"),
    naming neither the argument nor the remedy.
    """
    # No DTensor can exist unless torch.distributed.tensor was imported: nothing to import here.
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(t, dtensor.DTensor):
        raise TypeError(
            f"{name} is a DTensor (placements {tuple(t.placements)}, local shape {tuple(t.to_local().shape)} of "
            f"{tuple(t.shape)}): the fused linear losses take whole, plain tensors. Under FSDP2 (fully_shard) call "
            f"the loss inside the forward of the module that owns the LM head, where its parameters are unsharded, "
            f"or make the calling method a forward method with torch.distributed.fsdp.register_fsdp_forward_method. "
            f"(A tensor-parallel head split along the vocabulary, with the same hidden states on every rank, passes "
            f"its local shards, to_local(), and process_group=.)")


def make_head(model: str, hidden, weight, bias, *, shift: bool, softcap: Optional[float]) -> LinearHead:
    """The ``(N, H)`` head of one model (``model`` is 'student' or 'teacher'), checked and flattened."""
    _check_tensor(f"{model}_hidden", hidden, (2, 3))
    _check_tensor(f"{model}_weight", weight, (2,))
    for name, t in ((f"{model}_hidden", hidden), (f"{model}_weight", weight), (f"{model}_bias", bias)):
        check_not_dtensor(name, t)
    check_logit_dtype(f"{model}_hidden", hidden)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{model}_weight dtype {weight.dtype} does not match {model}_hidden dtype {hidden.dtype}")
    check_same_device(f"{model}_weight", weight, f"{model}_hidden", hidden)
    if weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{model}_weight shape {tuple(weight.shape)} must be (V, H) with V > 0 and H = the last dim "
                         f"of {model}_hidden shape {tuple(hidden.shape)}")
    if bias is not None:
        _check_tensor(f"{model}_bias", bias, (1,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{model}_bias shape {tuple(bias.shape)} does not match the V={weight.shape[0]} rows "
                             f"of {model}_weight shape {tuple(weight.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{model}_bias dtype {bias.dtype} does not match {model}_weight dtype {weight.dtype}")
        check_same_device(f"{model}_bias", bias, f"{model}_weight", weight)
    if shift:
        hidden = shifted_positions(f"{model}_hidden", hidden, first=True)
    return LinearHead(hidden.reshape(-1, hidden.shape[-1]), weight, bias, softcap)


def check_same_rows(student_hidden: torch.Tensor, other: torch.Tensor, other_name: str, trailing: int = 1) -> None:
    """``other`` covers the tokens of ``student_hidden``: the same leading dims, then ``trailing`` dims of its own."""
    lead = student_hidden.shape[:-1]
    other_lead = other.shape[: other.dim() - trailing] if trailing else other.shape
    if tuple(other_lead) != tuple(lead):
        raise ValueError(f"{other_name} shape {tuple(other.shape)} does not match the tokens of "
                         f"student_hidden shape {tuple(student_hidden.shape)}")
    check_same_device(other_name, other, "student_hidden", student_hidden)


def reconcile_vocabularies(student: LinearHead, teacher: LinearHead, policy: str) -> LinearHead:
    """The teacher head over the student's vocabulary.

    ``"error"``: the sizes must match.  ``"truncate"``: a larger (padded)
    teacher vocabulary keeps its first ``V_s`` entries; the teacher's softmax
    over those is the renormalised restriction, which is exactly what slicing
    the weight rows (a view, no copy) computes.
    """
    check_vocab_policy(policy)
    V_s, V_t = student.vocab_size, teacher.vocab_size
    if V_s == V_t:
        return teacher
    if policy == "error":
        raise ValueError(f"the teacher's vocabulary (V_t={V_t}) differs from the student's (V_s={V_s}); pass "
                         f"vocab_policy='truncate' to restrict a larger teacher to the student's first V_s entries")
    if V_t < V_s:
        raise ValueError(f"vocab_policy='truncate' needs a teacher vocabulary at least as large as the student's, "
                         f"got V_t={V_t} < V_s={V_s}")
    bias = None if teacher.bias is None else teacher.bias[:V_s]
    return LinearHead(teacher.hidden, teacher.weight[:V_s], bias, teacher.softcap)


def row_tensor(name: str, t, student_hidden: torch.Tensor, *, shift: bool, drop_first: bool):
    """A per-token tensor (labels, top-k rows) aligned with the loss rows; None stays None.

    Without ``shift`` it is returned as given (its row count is checked with
    the loss options).  With ``shift`` it must have the ``(B, T)`` leading dims
    of the hidden states and loses its first position (labels) or its last
    (teacher top-k, which belongs to the hidden states' positions).
    """
    if t is None or not shift:
        return t
    check_tensor(name, t)
    trailing = t.dim() - (student_hidden.dim() - 1)
    if trailing not in (0, 1):
        raise ValueError(f"{name} shape {tuple(t.shape)} does not match the tokens of "
                         f"student_hidden shape {tuple(student_hidden.shape)}")
    check_same_rows(student_hidden, t, name, trailing=trailing)
    return shifted_positions(name, t, first=not drop_first)


def virtual_logits(head: LinearHead) -> torch.Tensor:
    """A stand-in for the head's ``(N, V)`` logits with the right shape, dtype and device and no memory.

    It is one element expanded (stride 0): enough for the option checks of
    ``make_config``, which look at shapes, dtypes and devices only.
    """
    return head.weight.new_zeros(()).expand(head.rows, head.vocab_size)


def check_vocab_policy(policy) -> None:
    """ValueError unless ``policy`` is one of :data:`VOCAB_POLICIES`."""
    if policy not in VOCAB_POLICIES:
        raise ValueError(f"vocab_policy must be one of {VOCAB_POLICIES}, got {policy!r}")


def check_softcap(softcap) -> Optional[float]:
    """None, or a finite ``softcap > 0``."""
    if softcap is None:
        return None
    cap = finite_float("softcap", softcap)
    if cap <= 0:
        raise ValueError(f"softcap must be > 0 (or None), got softcap={softcap!r}")
    return cap


def check_chunk_size(chunk_size) -> Optional[int]:
    """None (choose automatically) or a positive int."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got chunk_size={chunk_size}")
    return chunk_size


def valid_row_count(labels: Optional[torch.Tensor], rows: int, ignore_index: int) -> int:
    """The number of rows that count in ``"batchmean"``: labels other than ``ignore_index``, or all rows."""
    if labels is None:
        return rows
    return int((labels.reshape(-1) != ignore_index).sum())


def batchmean_normalizer(normalizer, labels, rows: int, ignore_index: int) -> float:
    """The global denominator of ``"batchmean"``: the caller's ``normalizer``, else the valid rows (at least 1).

    With no valid row every chunk's sum is 0, so dividing by 1 gives the
    contract's 0 (docs/contract.md) rather than 0/0.
    """
    if normalizer is not None:
        return normalizer
    return float(max(1, valid_row_count(labels, rows, ignore_index)))


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

