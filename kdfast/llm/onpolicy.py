"""The training step of generation-based distillation: the batch (dataset or generated) and its fused loss.

On-policy distillation (GKD, Agarwal et al., 2024) trains the student on its
own samples, scored token by token by the teacher; speculative KD (Xu et al.,
2024) on sequences the student proposes and the teacher vets
(:func:`kdfast.llm.generation.speculative_generate`).  :class:`OnPolicyDistiller`
does one step of either:

1. the batch (:meth:`OnPolicyDistiller.make_batch`): with probability
   ``lmbda`` the prompts' completions are generated (by the student, or by
   speculative sampling), else the dataset's completions are used (teacher
   forcing); either way a :class:`DistillBatch` of ``[left-padded prompt |
   right-padded completion]`` rows with ``labels`` ``-100`` on the prompt and
   the padding;
2. the loss (:meth:`OnPolicyDistiller.loss`): the student's and the
   teacher's trunks on that batch (the teacher frozen, under ``no_grad``) and
   :func:`kdfast.fused_linear_distill_loss` of their two LM heads with the
   causal shift, any divergence and option of ``kdfast.distill_loss``
   (``divergence="jsd", beta=...`` is GKD's generalized JSD), so neither
   model's ``(tokens, vocab)`` logits exist.

The caller owns the optimizer::

    distiller = OnPolicyDistiller(student, teacher, lmbda=0.5, max_new_tokens=64, generator=0,
                                  divergence="jsd", beta=0.5)
    loss = distiller.step(prompt_ids, prompt_mask, completion_ids, completion_mask)
    loss.backward(); optimizer.step(); optimizer.zero_grad()

:func:`teacher_forced_batch` and :func:`generated_batch` build the batches
without a distiller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

from ..config import check_call_options, finite_float
from ..integrations.heads import (CausalLMParts, FrozenTeacher, check_distillable_pair, split_causal_lm, takes_keyword,
                                  unwrap_model)
from ..integrations.loss_call import autocast_off, head_operands, student_hidden_states
from .fused_linear import fused_linear_distill_loss
from .generation import (IGNORE_INDEX, Generation, GeneratorLike, TokenIds, check_prompts, generate, make_generator,
                         max_new_tokens_per_row, model_device, position_ids_from_mask, resolve_eos_token_id,
                         resolve_pad_token_id, speculative_generate)
from .inputs import check_chunk_size, check_vocab_policy
from .sampling import check_sampling

__all__ = ["DistillBatch", "OnPolicyDistiller", "generated_batch", "teacher_forced_batch"]

SAMPLERS = ("student", "speculative")
# The options of fused_linear_distill_loss that the distiller sets itself, and where each comes from.
_FIXED_OPTIONS = {
    "labels": "the batch's labels",
    "student_bias": "the student's LM head",
    "teacher_bias": "the teacher's LM head",
    "softcap": "the models' configs (final_logit_softcapping)",
    "shift": "the causal shift (always on)",
    "ignore_index": f"the batch's labels ({IGNORE_INDEX} on the prompt and the padding)",
    "process_group": "a single process (vocabulary-parallel heads are not supported here)",
    "normalizer": "the call: pass normalizer= to loss() or step()",
}


@dataclass(frozen=True, eq=False)
class DistillBatch:
    """One distillation batch: ``[left-padded prompt | right-padded completion]`` rows.

    Attributes:
        input_ids: ``(B, T)`` int64.
        attention_mask: ``(B, T)`` int64, 0 on the padding.
        labels: ``(B, T)`` int64: the completion tokens, ``-100`` on the
            prompts and the padding (the loss shifts them: the hidden states at
            ``t`` predict the label at ``t + 1``).
        position_ids: ``(B, T)``: each token's position in its row
            (:func:`kdfast.llm.generation.position_ids_from_mask`), as at generation.
        source: ``"dataset"`` (teacher forcing), ``"student"`` (the student's
            samples) or ``"speculative"`` (speculative interleaved sampling).
        generation: the :class:`~kdfast.llm.generation.Generation` it was made
            from, or None for a dataset batch.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    source: str
    generation: Optional[Generation] = None

    def model_inputs(self) -> Dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``position_ids``: the keywords of a model's (or trunk's) forward."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}

    @property
    def num_targets(self) -> int:
        """The tokens the loss counts: the labels other than ``-100`` after the causal shift."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def generated_batch(generation: Generation, source: str = "student") -> DistillBatch:
    """The :class:`DistillBatch` of a :class:`~kdfast.llm.generation.Generation` (``source`` names the sampler)."""
    if not isinstance(generation, Generation):
        raise TypeError(f"generation must be a kdfast.llm.Generation, got {type(generation).__name__}")
    if source not in SAMPLERS:
        raise ValueError(f"source must be one of {SAMPLERS}, got {source!r}")
    return DistillBatch(input_ids=generation.sequences, attention_mask=generation.attention_mask,
                        labels=generation.labels(IGNORE_INDEX), position_ids=generation.position_ids, source=source,
                        generation=generation)


def teacher_forced_batch(prompt_ids: torch.Tensor, prompt_mask: Optional[torch.Tensor], completion_ids: torch.Tensor,
                         completion_mask: Optional[torch.Tensor] = None, *, pad_token_id: int = 0) -> DistillBatch:
    """The :class:`DistillBatch` of prompts and the dataset's completions (teacher forcing).

    The same layout as a generated batch: the left-padded prompts, then the
    completions right-padded (``pad_token_id`` where ``completion_mask`` is 0).

    Args:
        prompt_ids, prompt_mask: ``(B, P)`` left-padded prompts (mask None: no padding).
        completion_ids: ``(B, C)`` integer ids of the completions (EOS included
            if the student should learn to stop).
        completion_mask: ``(B, C)`` 0/1, right-padded (1s then 0s); None: no padding.
        pad_token_id: the id put on the completions' padding.

    Raises:
        TypeError / ValueError: malformed prompts (see
            :func:`kdfast.llm.generation.generate`), completions of another
            batch size, a completion mask that is not right-padded 0/1.
    """
    ids, mask = check_prompts(prompt_ids, prompt_mask)
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise ValueError(f"pad_token_id must be a token id (an int >= 0), got {pad_token_id!r}")
    if not isinstance(completion_ids, torch.Tensor):
        raise TypeError(f"completion_ids must be a torch.Tensor of token ids, got {type(completion_ids).__name__}")
    if completion_ids.is_floating_point() or completion_ids.is_complex() or completion_ids.dtype == torch.bool:
        raise TypeError(f"completion_ids must hold integer token ids, got {completion_ids.dtype}")
    if completion_ids.dim() != 2 or completion_ids.shape[0] != ids.shape[0]:
        raise ValueError(f"completion_ids must be (B, C) with the prompts' B = {ids.shape[0]}, got shape "
                         f"{tuple(completion_ids.shape)}")
    if completion_mask is None:
        completion_mask = torch.ones_like(completion_ids, dtype=torch.long)
    if not isinstance(completion_mask, torch.Tensor) or completion_mask.shape != completion_ids.shape:
        shape = tuple(completion_mask.shape) if isinstance(completion_mask, torch.Tensor) else type(completion_mask)
        raise ValueError(f"completion_mask must be a tensor of completion_ids' shape {tuple(completion_ids.shape)}, "
                         f"got {shape}")
    if completion_mask.is_floating_point() or completion_mask.is_complex():
        raise TypeError(f"completion_mask must be integer (0 / 1) or bool, got {completion_mask.dtype}")
    cmask = completion_mask.to(ids.device).long()
    if bool(((cmask != 0) & (cmask != 1)).any()):
        raise ValueError("completion_mask must hold only 0 and 1")
    left_padded = (cmask[:, 1:] > cmask[:, :-1]).any(dim=1)
    if bool(left_padded.any()):
        raise ValueError(f"the completions must be right-padded (their tokens first, then padding): row "
                         f"{int(left_padded.nonzero()[0, 0])} of completion_mask has padding before a token")
    completions = completion_ids.to(ids.device).long()
    keep = cmask.bool()
    if bool((completions[keep] < 0).any()):
        raise ValueError("completion_ids holds a negative token id where completion_mask is 1")
    completions = completions.masked_fill(~keep, pad_token_id)
    input_ids = torch.cat([ids, completions], dim=1)
    attention_mask = torch.cat([mask, cmask], dim=1)
    target = torch.cat([torch.zeros_like(mask, dtype=torch.bool), keep], dim=1)
    return DistillBatch(input_ids=input_ids, attention_mask=attention_mask,
                        labels=input_ids.masked_fill(~target, IGNORE_INDEX),
                        position_ids=position_ids_from_mask(attention_mask), source="dataset")


class OnPolicyDistiller:
    """One training step of on-policy / speculative / teacher-forced distillation of a causal LM pair.

    Args:
        student: the causal LM being trained (``transformers``; PEFT-, compile-
            or DDP-wrapped ones too); its mode (train / eval) is the caller's,
            generation switches it to eval for the time it runs.
        teacher: the causal LM distilled from, on the same tokenizer; frozen
            here (``requires_grad_(False)``, eval mode).  Devices and dtypes may
            differ from the student's.
        lmbda: the probability that a batch's completions are generated (GKD's
            λ): 0 always uses the dataset's (teacher forcing: needs
            ``completion_ids``), 1 always generates (no coin is drawn at 0 or 1).
        sampler: ``"student"`` (the student's own samples, GKD) or
            ``"speculative"`` (speculative KD: the student proposes, the
            teacher replaces proposals outside its ``top_k``).
        top_k: the teacher's accepted set for ``sampler="speculative"``
            (required there, unused otherwise).
        max_new_tokens, top_p, eos_token_id, pad_token_id, use_cache,
            progress: the generation's, as in
            :func:`kdfast.llm.generation.generate` (``pad_token_id`` also pads
            the dataset's completions; the EOS and pad defaults are the student's).
        sampling_temperature: the generation's ``temperature`` (0: greedy);
            ``temperature`` among the loss options is the divergence's.
        generator: a ``torch.Generator``, an int seed (a generator on the
            student's device) or None: draws both the ``lmbda`` coin and the
            tokens, so a seeded distiller repeats its batches exactly.
        verify_split: check once that each model's trunk and LM head reproduce
            its logits (:func:`kdfast.integrations.heads.split_causal_lm`).
        chunk_size, vocab_policy, loss_options: of
            :func:`kdfast.fused_linear_distill_loss` (``divergence``, ``beta``,
            ``temperature``, ``hard_weight``, ``reduction``, ``backend``, ...);
            the options it sets itself (labels, biases, softcap, shift,
            ``ignore_index``) are refused, ``normalizer`` goes to :meth:`loss`.

    Raises:
        TypeError / ValueError: bad options (named), a student that is the
            teacher, vocabularies of different sizes (unless
            ``vocab_policy="truncate"`` and the teacher's is larger), models
            that soft-cap differently, models that cannot be split
            (:class:`~kdfast.integrations.heads.UnsplittableModelError`).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, max_new_tokens: Union[int, Sequence[int]],
                 lmbda: float = 1.0, sampler: str = "student", top_k: Optional[int] = None,
                 sampling_temperature: float = 1.0, top_p: float = 1.0, eos_token_id: TokenIds = None,
                 pad_token_id: Optional[int] = None, generator: GeneratorLike = None, use_cache: bool = True,
                 progress: bool = False, verify_split: bool = True, chunk_size: Optional[int] = None,
                 vocab_policy: str = "error", **loss_options):
        for name, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module (a causal LM), got {type(model).__name__}")
        self.student = student
        inner = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
        self._generating_model = inner
        if unwrap_model(teacher) is unwrap_model(inner):
            raise ValueError("teacher is the student itself: distillation needs two models")
        self.lmbda = finite_float("lmbda", lmbda)
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda must be a probability in [0, 1], got {lmbda!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.sampler = sampler
        if sampler == "speculative" and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"sampler='speculative' needs top_k, an int >= 1 (the size of the teacher's accepted "
                             f"set), got {top_k!r}")
        self.top_k = top_k
        self.sampling_temperature, self.top_p = check_sampling(sampling_temperature, top_p)
        rows = (max_new_tokens.numel() if isinstance(max_new_tokens, torch.Tensor)
                else len(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else 1)
        max_new_tokens_per_row(max_new_tokens, rows)  # checked now rather than at the first batch
        self.max_new_tokens = max_new_tokens
        self.eos_token_id = resolve_eos_token_id(inner, eos_token_id)
        self.pad_token_id = resolve_pad_token_id(inner, pad_token_id, self.eos_token_id)
        for name, value in (("use_cache", use_cache), ("progress", progress), ("verify_split", verify_split)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        self.use_cache, self.progress = use_cache, progress
        self.generator = make_generator(generator, model_device(inner))

        fixed = sorted(set(loss_options) & set(_FIXED_OPTIONS))
        if fixed:
            raise TypeError(f"OnPolicyDistiller sets {fixed[0]} itself (from {_FIXED_OPTIONS[fixed[0]]})")
        if isinstance(loss_options.get("weighting"), torch.Tensor):
            raise TypeError("weighting must be None, 'wttm' or 'entropy' here: a tensor of row weights would depend "
                            "on the batch, which the distiller makes")
        check_chunk_size(chunk_size)
        check_vocab_policy(vocab_policy)
        check_call_options(fused_linear_distill_loss, loss_options)
        self.loss_options = dict(loss_options, chunk_size=chunk_size, vocab_policy=vocab_policy)

        teacher.requires_grad_(False)
        teacher.eval()
        self.teacher = teacher
        self.student_parts: CausalLMParts = split_causal_lm(inner, verify=verify_split)
        self.teacher_parts: CausalLMParts = split_causal_lm(teacher, verify=verify_split)
        self._teacher_view = FrozenTeacher(self.teacher_parts)
        check_distillable_pair(self.student_parts, self.teacher_parts, vocab_policy)
        self.last_batch: Optional[DistillBatch] = None

    # ------------------------------------------------------------ the batch
    def make_batch(self, prompt_ids: torch.Tensor, prompt_mask: Optional[torch.Tensor] = None,
                   completion_ids: Optional[torch.Tensor] = None,
                   completion_mask: Optional[torch.Tensor] = None) -> DistillBatch:
        """The step's batch: generated with probability ``lmbda``, else the prompts with the dataset's completions.

        Args:
            prompt_ids, prompt_mask: ``(B, P)`` left-padded prompts.
            completion_ids, completion_mask: ``(B, C)`` the dataset's
                completions, right-padded; needed unless ``lmbda == 1``.

        Raises:
            ValueError: no completions with ``lmbda < 1``; malformed prompts or completions.
        """
        if self.lmbda < 1.0 and completion_ids is None:
            raise ValueError(f"lmbda={self.lmbda:g} uses the dataset's completions for a fraction of the batches: "
                             f"pass completion_ids (and completion_mask)")
        if self.lmbda == 1.0 or (self.lmbda > 0.0 and self._coin() < self.lmbda):
            return generated_batch(self._generate(prompt_ids, prompt_mask), self.sampler)
        return teacher_forced_batch(prompt_ids, prompt_mask, completion_ids, completion_mask,
                                    pad_token_id=self.pad_token_id)

    def _coin(self) -> float:
        if self.generator is None:
            return float(torch.rand(()))
        return float(torch.rand((), generator=self.generator, device=self.generator.device))

    def _generate(self, prompt_ids, prompt_mask) -> Generation:
        options = dict(max_new_tokens=self.max_new_tokens, temperature=self.sampling_temperature, top_p=self.top_p,
                       eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, generator=self.generator,
                       use_cache=self.use_cache, progress=self.progress)
        if self.sampler == "speculative":
            return speculative_generate(self._generating_model, self.teacher, prompt_ids, prompt_mask,
                                        top_k=self.top_k, vocab_policy=self.loss_options["vocab_policy"], **options)
        return generate(self._generating_model, prompt_ids, prompt_mask, **options)

    # ------------------------------------------------------------ the loss
    def loss(self, batch: DistillBatch, *, normalizer: Optional[float] = None) -> torch.Tensor:
        """:func:`kdfast.fused_linear_distill_loss` of the student's and the teacher's heads on ``batch``.

        The student's trunk runs with autograd (through the DDP wrapper if the
        student is one), the teacher's under ``no_grad``; the loss has the
        causal shift and counts the targets of ``batch.labels``.

        Args:
            batch: a :class:`DistillBatch` (from :meth:`make_batch`,
                :func:`generated_batch` or :func:`teacher_forced_batch`).
            normalizer: the denominator of ``reduction="batchmean"`` instead of
                the batch's target count (e.g. the target tokens of all the
                micro-batches of an accumulated step).

        Returns:
            the loss (a float32 scalar for ``"batchmean"`` / ``"sum"``), with a
            gradient to the student's parameters only.
        """
        if not isinstance(batch, DistillBatch):
            raise TypeError(f"batch must be a kdfast.llm.DistillBatch, got {type(batch).__name__}")
        student = self.student_parts
        device = student.device
        inputs = {key: value.to(device) for key, value in batch.model_inputs().items()
                  if key != "position_ids" or takes_keyword(student.trunk, "position_ids")}
        hidden, weight, bias = head_operands(student_hidden_states(self.student, student, inputs), student.weight,
                                             student.bias)
        teacher_inputs = dict(inputs)
        if "position_ids" not in teacher_inputs or not takes_keyword(self.teacher_parts.trunk, "position_ids"):
            teacher_inputs.pop("position_ids", None)
        with autocast_off(hidden.device.type):
            teacher_hidden = self._teacher_view.hidden_states(teacher_inputs, hidden.device)
            teacher_weight, teacher_bias = self._teacher_view.head(hidden.device)
            return fused_linear_distill_loss(
                hidden, weight, teacher_hidden, teacher_weight, batch.labels.to(hidden.device), student_bias=bias,
                teacher_bias=teacher_bias, softcap=student.softcap, shift=True, ignore_index=IGNORE_INDEX,
                normalizer=normalizer, **self.loss_options)

    def step(self, prompt_ids: torch.Tensor, prompt_mask: Optional[torch.Tensor] = None,
             completion_ids: Optional[torch.Tensor] = None, completion_mask: Optional[torch.Tensor] = None, *,
             normalizer: Optional[float] = None) -> torch.Tensor:
        """:meth:`make_batch` then :meth:`loss`: the loss to call ``backward()`` on (the batch is ``last_batch``)."""
        batch = self.make_batch(prompt_ids, prompt_mask, completion_ids, completion_mask)
        self.last_batch = batch
        return self.loss(batch, normalizer=normalizer)
