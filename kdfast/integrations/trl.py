"""TRL on kdfast's fused losses: the GKD trainer, TRL's generalized JSD, and Liger's fused linear JSD signature.

The one-line switch (TRL >= 1.16 keeps GKD in ``trl.experimental.gkd``):

>>> from trl.experimental.gkd import GKDConfig, GKDTrainer       # before
>>> from kdfast.integrations.trl import GKDConfig, GKDTrainer    # after: the same trainer on kdfast's fused loss

:class:`GKDTrainer` is TRL's ``GKDTrainer`` with one method replaced:
``compute_loss`` runs the student's and the teacher's trunks and takes the
generalized JSD of their two LM heads with
:func:`kdfast.fused_linear_distill_loss`, so neither model's ``(tokens, vocab)``
logits exist.  Everything else is TRL's: the on-policy generation (``lmbda``),
sequence-level KD (``seq_kd``), the sampling ``temperature``, the collator, the
data and the logging.  The loss is TRL's ``compute_loss`` to rounding:

* ``beta`` is TRL's and kdfast's ``jsd`` ``beta`` unchanged: the mixture is
  ``m = beta * p_teacher + (1 - beta) * p_student`` and the loss
  ``beta * KL(teacher || m) + (1 - beta) * KL(student || m)``; ``beta = 0`` is the
  forward ``KL(teacher || student)``, ``beta = 1`` the reverse ``KL(student || teacher)``
  (both conventions set these endpoints, docs/contract.md section 2);
* temperature 1: TRL's ``compute_loss`` does not pass ``GKDConfig.temperature`` to
  its loss (it is the sampling temperature of the generation), so neither does this;
* the causal shift (logits at ``i`` predict the token at ``i + 1``), positions whose
  shifted label is ``-100`` (the prompt, the padding) ignored;
* the per-token divergence summed over the vocabulary and divided by the
  Trainer's ``num_items_in_batch`` when it is given (gradient accumulation), else
  by the number of target tokens of the batch.

:func:`generalized_jsd_loss` is TRL's ``GKDTrainer.generalized_jsd_loss`` (same
arguments, same value, any temperature) on kdfast's fused logits kernels, and
:class:`LigerFusedLinearJSDLoss` takes the call of Liger-Kernel's
``LigerFusedLinearJSDLoss`` (``student_input``, ``student_weight``,
``teacher_input``, ``teacher_weight``, ``true_labels``, biases) for code written
against Liger, backed by :func:`kdfast.fused_linear_distill_loss`.

Needs ``pip install kdfast[trl]`` (trl, datasets, transformers, accelerate).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

try:
    import trl  # noqa: F401
except ImportError as _error:  # pragma: no cover - exercised only without the extra
    raise ImportError("kdfast.integrations.trl needs trl with transformers, accelerate and datasets: "
                      "pip install kdfast[trl]") from _error
try:
    from trl.experimental.gkd import GKDConfig, GKDTrainer as TRLGKDTrainer
except ModuleNotFoundError as _error:  # pragma: no cover - depends on the installed TRL
    if _error.name not in ("trl.experimental", "trl.experimental.gkd"):
        raise ImportError(f"TRL's GKD trainer cannot be imported: the module {_error.name!r} is missing "
                          f"(TRL's GKD needs datasets, transformers and accelerate: pip install kdfast[trl])"
                          ) from _error
    from trl import GKDConfig, GKDTrainer as TRLGKDTrainer  # TRL before GKD moved to trl.experimental

from ..llm.fused_linear import FusedLinearDistillLoss, fused_linear_distill_loss
from ..llm.inputs import check_chunk_size
from ..losses import distill_loss
from ..ops.backends import BACKENDS
from .heads import CausalLMParts, FrozenTeacher, split_causal_lm, unwrap_model
from .loss_call import (autocast_off, check_data_parallel, data_parallel_loss_scale, head_operands,
                        student_hidden_states, trainer_normalizer)

__all__ = ["GKDConfig", "GKDTrainer", "LigerFusedLinearJSDLoss", "TRLGKDTrainer", "generalized_jsd_loss"]

IGNORE_INDEX = -100  # TRL's label of the positions that do not count (prompt, padding)
_TRL_REDUCTIONS = ("batchmean", "sum", "mean")


# ----------------------------------------------------------------- TRL's loss on logits
def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         labels: Optional[torch.Tensor] = None, beta: float = 0.5, temperature: float = 1.0,
                         reduction: str = "batchmean",
                         num_items_in_batch: Optional[Union[torch.Tensor, int, float]] = None,
                         *, backend: str = "auto") -> torch.Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss`` with kdfast's fused kernels (the logits are given).

    Same arguments and value as TRL's: both logits divided by ``temperature``,
    the generalized JSD of ``beta`` per position (``beta = 0``: ``KL(teacher ||
    student)``, ``1``: ``KL(student || teacher)``), positions whose label is
    ``-100`` dropped, then ``sum / num_items_in_batch`` when that is given, else
    ``reduction``: ``"batchmean"`` (sum over the target positions, divided by
    their number, at least 1; without labels by ``student_logits.shape[0]``, as
    TRL), ``"sum"``, or ``"mean"`` (divided by positions times vocabulary).
    The student's logits get the gradient.

    Args:
        student_logits, teacher_logits: ``(..., V)`` logits (TRL: ``(B, T, V)``, already shifted).
        labels: ``(...)`` the positions' labels, ``-100`` where a position does not count; None: all count.
        backend: kdfast's backend (``"auto"``, ``"cpu"``, ``"triton"``, ``"torch"``).

    Returns:
        a 0-d tensor, float32 (float64 for float64 logits).

    Raises:
        ValueError: ``reduction="none"`` (TRL returns the per-entry terms; kdfast's
            per-position ones are ``kdfast.distill_loss(..., reduction="none")``), an
            unknown reduction, or an option kdfast refuses (``beta`` outside [0, 1]).
    """
    if reduction not in _TRL_REDUCTIONS:
        if reduction == "none":
            raise ValueError("reduction='none' is not supported: TRL returns the (positions, vocab) terms, kdfast "
                             "has the per-position losses: kdfast.distill_loss(..., divergence='jsd', "
                             "reduction='none')")
        raise ValueError(f"reduction must be one of {_TRL_REDUCTIONS}, got {reduction!r}")
    V = student_logits.shape[-1]
    rows = None if labels is None else labels.reshape(-1)
    total = distill_loss(student_logits.reshape(-1, V), teacher_logits.reshape(-1, teacher_logits.shape[-1]),
                         labels=rows, ignore_index=IGNORE_INDEX, divergence="jsd", beta=_number(beta),
                         temperature=_number(temperature), reduction="sum", backend=backend)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    count = (rows != IGNORE_INDEX).sum() if rows is not None else None
    if reduction == "batchmean":
        return total / (count.clamp_min(1) if count is not None else max(student_logits.shape[0], 1))
    positions = count if count is not None else student_logits.numel() // max(V, 1)
    return total / (positions * V)  # "mean": over the (positions, V) entries, NaN without any, as TRL


# ----------------------------------------------------------------- Liger's fused linear JSD, on kdfast
class LigerFusedLinearJSDLoss(nn.Module):
    """Liger-Kernel's ``LigerFusedLinearJSDLoss`` (same constructor, same call) on kdfast's fused linear loss.

    ``loss = weight_hard_loss * CE(student, true_labels) + weight_soft_loss *
    JSD_beta(teacher / temperature, student / temperature)``, each averaged over
    the positions whose label is not ``ignore_index`` (at least 1); the
    cross-entropy at temperature 1; ``beta`` as Liger's, TRL's and kdfast's
    (``0``: ``KL(teacher || student)``, ``1``: ``KL(student || teacher)``).  No
    ``(N, V)`` logits exist: this is :func:`kdfast.fused_linear_distill_loss`.

    Args:
        weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature:
            as Liger's (defaults 0.5, 0.5, 0.5, -100, 1.0).
        compiled: accepted for Liger's signature, ignored (kdfast's kernels are
            compiled ahead of time).
        chunk_size: rows of logits per chunk; None (the default here, Liger's is
            1024): kdfast chooses from a memory budget.
        return_soft_hard_loss: return ``(loss, soft_loss, hard_loss)`` as Liger
            does; the two terms (unweighted) are computed by two more no-grad passes
            and carry no gradient.
        backend: kdfast's backend.
        vocab_policy: ``"error"`` (a teacher vocabulary of another size is a
            ValueError) or ``"truncate"`` (a larger teacher vocabulary is cut to the
            student's; Liger instead pads the student's logits with zeros).

    ``forward(student_input, student_weight, teacher_input, teacher_weight,
    true_labels, student_bias=None, teacher_bias=None)``: the inputs ``(..., H)``
    (Liger's ``(B*T, H)``, or ``(B, T, H)`` as TRL passes them), the labels of the
    same positions ``(...)``, already aligned (no shift here).  The student's
    input, weight and bias get gradients.
    """

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = IGNORE_INDEX, temperature: float = 1.0, compiled: bool = True,
                 chunk_size: Optional[int] = None, return_soft_hard_loss: bool = False, *, backend: str = "auto",
                 vocab_policy: str = "error"):
        super().__init__()
        self.weight_hard_loss = weight_hard_loss
        self.weight_soft_loss = weight_soft_loss
        self.beta = beta
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.return_soft_hard_loss = bool(return_soft_hard_loss)
        self._options = dict(divergence="jsd", beta=beta, temperature=temperature, ignore_index=ignore_index,
                             chunk_size=chunk_size, backend=backend, vocab_policy=vocab_policy)
        # The module form checks every option now (names and values), as kdfast's losses would at call time.
        self._loss = FusedLinearDistillLoss(hard_weight=weight_hard_loss, soft_weight=weight_soft_loss,
                                            **self._options)

    def extra_repr(self) -> str:
        return (f"weight_hard_loss={self.weight_hard_loss}, weight_soft_loss={self.weight_soft_loss}, "
                f"beta={self.beta}, ignore_index={self.ignore_index}, temperature={self.temperature}, "
                f"chunk_size={self.chunk_size}")

    def forward(self, student_input: torch.Tensor, student_weight: torch.Tensor, teacher_input: torch.Tensor,
                teacher_weight: torch.Tensor, true_labels: torch.Tensor, student_bias: Optional[torch.Tensor] = None,
                teacher_bias: Optional[torch.Tensor] = None):
        student_rows = student_input.reshape(-1, student_input.shape[-1])
        teacher_rows = teacher_input.reshape(-1, teacher_input.shape[-1])
        labels = true_labels.reshape(-1)
        loss = self._loss(student_rows, student_weight, teacher_rows, teacher_weight, labels,
                          student_bias=student_bias, teacher_bias=teacher_bias)
        if not self.return_soft_hard_loss:
            return loss
        with torch.no_grad():
            terms = [fused_linear_distill_loss(student_rows.detach(), student_weight.detach(), teacher_rows,
                                               teacher_weight, labels, hard_weight=hard, soft_weight=soft,
                                               student_bias=None if student_bias is None else student_bias.detach(),
                                               teacher_bias=teacher_bias, **self._options)
                     for hard, soft in ((0.0, 1.0), (1.0, 0.0))]
        return loss, terms[0], terms[1]


# ----------------------------------------------------------------- the GKD trainer
class GKDTrainer(TRLGKDTrainer):
    """TRL's ``GKDTrainer`` whose loss is kdfast's fused linear generalized JSD (no ``(N, V)`` logits).

    Args:
        *args, **kwargs: those of TRL's ``GKDTrainer`` (``model``, ``teacher_model``,
            ``args=GKDConfig(...)``, ``train_dataset``, ``processing_class``, ...),
            unchanged.  ``lmbda`` (on-policy fraction), ``seq_kd``, ``beta`` and the
            sampling ``temperature`` mean what they mean in TRL.
        backend: kdfast's backend for the loss (``"auto"``: the C++ kernel on CPU,
            Triton on CUDA).
        chunk_size: rows of logits per chunk of the fused loss; None: chosen from
            a memory budget.
        verify_split: check once, on a few tokens, that trunk + LM head reproduce
            each model's logits (:func:`kdfast.integrations.split_causal_lm`).

    The models must be causal LMs that :func:`~kdfast.integrations.split_causal_lm`
    can split (Llama, Qwen, Mistral, Gemma, GPT-2 and the like, PEFT-wrapped or
    not), with the same vocabulary and the same softcap.  ``compute_loss``
    returns ``(loss, {"loss": loss})`` for ``return_outputs=True`` (evaluation):
    there are no logits to return.

    Raises:
        UnsplittableModelError (a ValueError): a model whose trunk and LM head
            cannot be found.
        ValueError: two different softcaps; a bad ``backend`` / ``chunk_size``.
        NotImplementedError: more than one process other than DDP (FSDP,
            DeepSpeed). Under DDP the student runs through the DDP wrapper
            (its logits cut to the last position) and the gradients are those
            of one process on the whole batch.
    """

    def __init__(self, *args, backend: str = "auto", chunk_size: Optional[int] = None, verify_split: bool = True,
                 **kwargs):
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        check_chunk_size(chunk_size)
        super().__init__(*args, **kwargs)
        self._kdfast_backend = backend
        self._kdfast_chunk_size = chunk_size
        self._verify_split = verify_split
        self._student: Optional[CausalLMParts] = None
        student = self._student_parts(self.model)
        check_data_parallel(self, student.model, "kdfast's GKDTrainer")
        teacher_model = unwrap_model(self.accelerator.unwrap_model(self.teacher_model))
        if teacher_model is student.model:
            raise ValueError("teacher_model is the student itself")
        self._teacher = _split(teacher_model, verify_split)
        self._teacher_view = FrozenTeacher(self._teacher)
        if self._teacher.softcap != student.softcap:
            raise ValueError(
                f"the teacher {type(self._teacher.model).__name__} and the student {type(student.model).__name__} "
                f"soft-cap their logits differently (final_logit_softcapping {self._teacher.softcap} and "
                f"{student.softcap}); kdfast's fused loss applies one softcap to both")

    def _student_parts(self, model: nn.Module) -> CausalLMParts:
        """The student's split, made again when the Trainer's model changes (``model_init``, a PEFT wrap)."""
        inner = unwrap_model(self.accelerator.unwrap_model(model))
        if self._student is None or self._student.model is not inner:
            self._student = _split(inner, self._verify_split)
        return self._student


    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Optional[Union[torch.Tensor, int]] = None):
        """TRL's GKD loss of the batch (``input_ids``, ``attention_mask``, ``labels``) on kdfast's fused linear loss."""
        student = self._student_parts(model)
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        self.teacher_model.eval()
        # The models' forwards run under the accelerator's mixed precision (accelerate patches them); so do their
        # trunks and heads here.
        with self.accelerator.autocast():
            hidden, weight, bias = head_operands(student_hidden_states(model, student, model_inputs), student.weight,
                                                 student.bias)
            teacher_weight, teacher_bias = self._teacher_view.head(hidden.device)
            teacher_hidden, teacher_weight, teacher_bias = head_operands(
                self._teacher_view.hidden_states(model_inputs, hidden.device), teacher_weight, teacher_bias)
        labels = inputs["labels"].to(hidden.device)
        normalizer = trainer_normalizer(num_items_in_batch)
        with autocast_off(hidden.device.type):
            loss = fused_linear_distill_loss(
                hidden, weight, teacher_hidden, teacher_weight, labels, student_bias=bias, teacher_bias=teacher_bias,
                softcap=student.softcap, shift=True, divergence="jsd", beta=float(self.beta), temperature=1.0,
                ignore_index=IGNORE_INDEX, reduction="batchmean", normalizer=normalizer,
                chunk_size=self._kdfast_chunk_size, backend=self._kdfast_backend)
        scale = data_parallel_loss_scale(self, normalizer)
        if scale != 1:
            loss = loss * scale
        if return_outputs:
            return loss, {"loss": loss}
        return loss


# ----------------------------------------------------------------- helpers
def _split(model: nn.Module, verify: bool) -> CausalLMParts:
    """:func:`split_causal_lm`, verified against the model's own forward, not accelerate's mixed-precision wrap of it.

    ``Accelerator.prepare_model`` (mixed precision) replaces ``model.forward`` by an autocast version and keeps the
    original as ``model._original_forward``; the split runs the trunk without autocast, so it is compared with the
    original forward (``compute_loss`` runs the trunks under the same autocast as the wrapped forward).
    """
    original = getattr(model, "_original_forward", None)
    patched = model.__dict__.get("forward")
    if not verify or original is None or patched is None:
        return split_causal_lm(model, verify=verify)
    model.forward = original
    try:
        return split_causal_lm(model, verify=True)
    finally:
        model.forward = patched


def _number(value) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


