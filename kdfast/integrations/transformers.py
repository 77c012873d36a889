"""Distilling causal LMs with Hugging Face ``transformers.Trainer`` on kdfast's fused linear losses.

>>> from kdfast.integrations.transformers import DistillationConfig, DistillationTrainer
>>> trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args,
...                               train_dataset=dataset, data_collator=collator,
...                               distillation_config=DistillationConfig(divergence="kl", temperature=2.0,
...                                                                      hard_weight=0.5, soft_weight=0.5))
>>> trainer.train()

:class:`DistillationTrainer` runs the student's and the teacher's trunks and
takes the loss of the two LM heads with
:func:`kdfast.fused_linear_distill_loss` (``shift=True``, labels
``-100`` ignored), so neither model's ``(tokens, vocab)`` logits ever exist.
The Trainer's ``num_items_in_batch`` (the valid target tokens of the whole
accumulated batch) is the loss's normaliser: gradient accumulation gives the
loss and gradients of one big batch.  Without a teacher model, the batch
carries a cached teacher (``topk_indices``, ``topk_logprobs``: see
:class:`TopKCacheDataset`) and the loss is
:func:`kdfast.fused_linear_topk_distill_loss`.

Needs ``pip install kdfast[hf]`` (transformers and accelerate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

try:
    import transformers
except ImportError as _error:  # pragma: no cover - exercised only without the extra
    raise ImportError("kdfast.integrations.transformers needs transformers and accelerate: "
                      "pip install kdfast[hf]") from _error

from ..config import LossConfig, check_options
from ..llm.cache.dataset import TopKCacheDataset  # re-exported: it lives in kdfast.llm.cache (torch only)
from ..llm.fused_linear import fused_linear_distill_loss, fused_linear_topk_distill_loss
from ..llm.inputs import check_chunk_size, check_vocab_policy
from ..llm.topk import check_tail
from ..ops.backends import BACKENDS
from .heads import (CausalLMParts, FrozenTeacher, UnsplittableModelError, check_distillable_pair, split_causal_lm,
                    unwrap_model)
from .loss_call import (autocast_off, check_data_parallel, data_parallel_loss_scale, head_operands,
                        student_hidden_states, trainer_normalizer)

__all__ = ["DistillationConfig", "DistillationTrainer", "TopKCacheDataset", "UnsplittableModelError"]

IGNORE_INDEX = -100  # the Trainer's (and the collators') label of positions that do not count
TOPK_KEYS = ("topk_indices", "topk_logprobs", "tail_logprobs")
# Batch entries that are not model inputs.
_LOSS_KEYS = ("labels", "shift_labels", "num_items_in_batch", "return_loss") + TOPK_KEYS
# Logged next to the Trainer's "loss".
HARD_LOSS_KEY = "hard_loss"
SOFT_LOSS_KEY = "soft_loss"
# Rows per chunk of the logged cross-entropy's logits (float32): 64 MiB at V = 128k.
_CE_CHUNK_BYTES = 64 * 2**20


def _help(text: str) -> dict:
    return {"help": " ".join(text.split())}


@dataclass
class DistillationConfig:
    """The distillation loss of :class:`DistillationTrainer` (usable with ``transformers.HfArgumentParser``).

    ``loss = hard_weight * CE(student, labels) + soft_weight * scale * D(teacher || student)``
    over the target tokens (labels other than -100, after the causal shift),
    averaged over the tokens of the whole (accumulated) batch.  The options
    are those of :func:`kdfast.distill_loss` (docs/contract.md) and are checked
    by kdfast's own checks when the config is made.

    Raises:
        ValueError / TypeError: an option that kdfast's losses would refuse.
    """

    divergence: str = field(default="kl", metadata=_help(
        "the divergence D(teacher || student): kl, reverse_kl, jsd, tvd, ... (kdfast.DIVERGENCES)"))
    alpha: Optional[float] = field(default=None, metadata=_help("a parameter of renyi / ab; None: its default"))
    beta: Optional[float] = field(default=None, metadata=_help("a parameter of jsd / ab; None: its default"))
    skew: Optional[float] = field(default=None, metadata=_help("a parameter of skew_kl / skew_reverse_kl"))
    temperature: float = field(default=1.0, metadata=_help("the teacher's temperature"))
    student_temperature: Optional[float] = field(default=None, metadata=_help(
        "the student's temperature; None: the teacher's"))
    scale: float = field(default=1.0, metadata=_help(
        "a factor of the divergence term (temperature**2 for Hinton's convention)"))
    hard_weight: float = field(default=0.0, metadata=_help("the weight of the cross-entropy on the labels"))
    soft_weight: float = field(default=1.0, metadata=_help("the weight of the divergence term"))
    weighting: Optional[str] = field(default=None, metadata=_help(
        "per-token weights of the divergence: None, wttm or entropy (not with a cached top-k teacher)"))
    chunk_size: Optional[int] = field(default=None, metadata=_help(
        "tokens per chunk of the fused loss; None: chosen from a memory budget"))
    vocab_policy: str = field(default="error", metadata=_help(
        "a teacher vocabulary that differs from the student's: error, or truncate (a larger teacher cut to "
        "the student's first V entries)"))
    tail: str = field(default="renormalize", metadata=_help(
        "cached top-k teacher only: renormalize (both models on the top-k) or bucket (plus one 'rest' outcome)"))
    backend: str = field(default="auto", metadata=_help("kdfast's backend: auto, cpu, triton or torch"))
    log_terms: bool = field(default=True, metadata=_help(
        "log the hard (cross-entropy) and soft (divergence) terms as hard_loss and soft_loss; costs one "
        "no-grad pass of the student's LM head on the logged steps"))
    verify_split: bool = field(default=True, metadata=_help(
        "check once that trunk + LM head reproduce each model's logits on a few tokens"))

    def __post_init__(self):
        if isinstance(self.weighting, torch.Tensor):
            raise TypeError("DistillationConfig.weighting is a name (None, 'wttm' or 'entropy'), not a tensor")
        check_options(LossConfig(divergence=self.divergence, temperature=self.temperature,
                                 student_temperature=self.student_temperature, alpha=self.alpha, beta=self.beta,
                                 skew=self.skew, weighting=self.weighting, hard_weight=self.hard_weight,
                                 soft_weight=self.soft_weight, scale=self.scale))
        check_chunk_size(self.chunk_size)
        check_vocab_policy(self.vocab_policy)
        check_tail(self.tail)
        if self.backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {self.backend!r}")
        for name in ("log_terms", "verify_split"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def loss_options(self) -> dict:
        """The keyword options of :func:`kdfast.fused_linear_distill_loss` (but the per-batch ones)."""
        options = {name: getattr(self, name) for name in (
            "divergence", "alpha", "beta", "skew", "temperature", "student_temperature", "scale", "hard_weight",
            "soft_weight", "weighting", "chunk_size", "vocab_policy", "backend")}
        return dict(options, ignore_index=IGNORE_INDEX, reduction="batchmean", shift=True)

    def topk_loss_options(self) -> dict:
        """The keyword options of :func:`kdfast.fused_linear_topk_distill_loss` (but the per-batch ones)."""
        options = self.loss_options()
        for name in ("weighting", "vocab_policy"):
            del options[name]
        return dict(options, tail=self.tail)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------- the trainer
class DistillationTrainer(transformers.Trainer):
    """``transformers.Trainer`` that distills ``teacher_model`` into ``model`` with kdfast's fused linear loss.

    Args:
        *args, **kwargs: those of ``transformers.Trainer`` (``model`` is the
            student: a causal LM, PEFT-wrapped or not).  ``compute_loss_func``
            and ``label_smoothing_factor`` do not apply (the loss is kdfast's).
        teacher_model: the teacher, a causal LM with the student's vocabulary
            (see ``DistillationConfig.vocab_policy``).  It is frozen
            (``requires_grad_(False)``), put in eval mode and kept in its own
            dtype and on its own device: move it yourself (``teacher.to(device)``).
            It is not saved with the checkpoints.  None: offline distillation
            from a cached teacher that the batches carry (``topk_indices``,
            ``topk_logprobs``, optionally ``tail_logprobs``, each ``(B, T, k)`` /
            ``(B, T)``, the teacher's rows of the same positions as ``input_ids``;
            :class:`TopKCacheDataset` yields them).
        distillation_config: the loss (:class:`DistillationConfig`); None: its defaults.

    The batches need ``labels`` (``-100`` where a position does not count, as
    ``DataCollatorForLanguageModeling(tokenizer, mlm=False)`` makes them); the
    causal shift is applied here.  The Trainer's ``num_items_in_batch`` is the
    normaliser of the loss (gradient accumulation is exact).  With
    ``DistillationConfig.log_terms``, the logs of ``logging_strategy="steps"``
    get ``hard_loss`` (the cross-entropy on the labels) and ``soft_loss`` (the
    divergence term, ``scale`` included), unweighted: ``loss = hard_weight *
    hard_loss + soft_weight * soft_loss`` for the logged step (the Trainer's
    ``loss`` is the mean over the steps since the last log; these two are of
    the logged step alone).

    Raises:
        UnsplittableModelError (a ValueError): a model whose trunk and LM head
            cannot be found (the message names its class).
        ValueError: a teacher whose vocabulary (or softcap) differs from the
            student's; a cached teacher of another vocabulary size.
        NotImplementedError: more than one process other than DDP (FSDP,
            DeepSpeed): the LM head is not whole outside the wrapper's forward.
            Under DDP (``torchrun`` / ``accelerate launch``) the student runs
            through the DDP wrapper, its logits cut to the last position
            (``logits_to_keep=1``), and the gradients are those of one process
            on the whole batch.
    """

    def __init__(self, *args, teacher_model: Optional[nn.Module] = None,
                 distillation_config: Optional[DistillationConfig] = None, **kwargs):
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("DistillationTrainer computes its own loss: compute_loss_func cannot be combined with it")
        config = DistillationConfig() if distillation_config is None else distillation_config
        if not isinstance(config, DistillationConfig):
            raise TypeError(f"distillation_config must be a DistillationConfig, got {type(config).__name__}")
        super().__init__(*args, **kwargs)
        self.distillation_config = config
        if self.args.label_smoothing_factor:
            raise ValueError("label_smoothing_factor does not apply to DistillationTrainer (the loss is kdfast's)")
        # The Trainer counts the target tokens of the accumulated batch (num_items_in_batch) only for models that
        # take loss kwargs, over labels[..., 1:] only for shifting losses; this loss is both.
        self.model_accepts_loss_kwargs = True
        if hasattr(self, "_loss_shifts_labels"):
            self._loss_shifts_labels = True

        self._student: Optional[CausalLMParts] = None
        student = self._student_parts(self.model)
        check_data_parallel(self, student.model, "DistillationTrainer")
        self.teacher_model = teacher_model
        self._teacher: Optional[CausalLMParts] = None
        self._teacher_view: Optional[FrozenTeacher] = None
        if teacher_model is not None:
            if unwrap_model(teacher_model) is student.model:
                raise ValueError("teacher_model is the student itself")
            teacher_model.requires_grad_(False)
            teacher_model.eval()
            self._teacher = split_causal_lm(teacher_model, verify=config.verify_split)
            self._teacher_view = FrozenTeacher(self._teacher)
            check_distillable_pair(student, self._teacher, config.vocab_policy,
                                   "DistillationConfig(vocab_policy='truncate')")
        else:
            self._check_offline(student)
        self._pending_terms: Dict[str, torch.Tensor] = {}
        self._terms_step: Optional[int] = None
        self._terms_normalizer: Optional[float] = None

    # ------------------------------------------------------------ checks
    def _check_offline(self, student: CausalLMParts) -> None:
        config = self.distillation_config
        if config.weighting is not None:
            raise ValueError(f"weighting={config.weighting!r} needs the teacher's full distribution; with a cached "
                             f"top-k teacher (no teacher_model) use weighting=None")
        cached_vocab = getattr(self.train_dataset, "vocab_size", None)
        if isinstance(cached_vocab, int) and cached_vocab != student.vocab_size:
            raise ValueError(f"the cached teacher has a vocabulary of {cached_vocab} entries but the student "
                             f"{type(student.model).__name__} has {student.vocab_size}; the cache's top-k indices "
                             f"index the student's vocabulary, so they must be the same")

    # ------------------------------------------------------------ the two models
    def _student_parts(self, model: nn.Module) -> CausalLMParts:
        """The student's split, made again when the Trainer's model changes (``model_init``)."""
        inner = unwrap_model(self.accelerator.unwrap_model(model))
        if self._student is None or self._student.model is not inner:
            self._student = split_causal_lm(inner, verify=self.distillation_config.verify_split)
        return self._student

    # ------------------------------------------------------------ the loss
    def compute_loss(self, model: nn.Module, inputs: Dict[str, object], return_outputs: bool = False,
                     num_items_in_batch: Optional[Union[torch.Tensor, int]] = None):
        """The fused distillation loss of the batch, normalised by ``num_items_in_batch`` when the Trainer gives it."""
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("DistillationTrainer needs labels in the batch (the token ids, -100 where a position "
                             "does not count), e.g. from DataCollatorForLanguageModeling(tokenizer, mlm=False)")
        student = self._student_parts(model)
        model_inputs = {k: v for k, v in inputs.items() if k not in _LOSS_KEYS}
        # The Trainer's mixed precision (bf16=True / fp16=True) lives in accelerate's patch of model.forward,
        # which calling the trunk skips: the trunk runs under the accelerator's autocast here, as there.
        with self.accelerator.autocast():
            hidden, weight, bias = head_operands(student_hidden_states(model, student, model_inputs), student.weight,
                                                 student.bias)
        normalizer = trainer_normalizer(num_items_in_batch)
        config = self.distillation_config
        with autocast_off(hidden.device.type):
            if self._teacher is not None:
                teacher_hidden = self._teacher_view.hidden_states(model_inputs, hidden.device)
                teacher_weight, teacher_bias = self._teacher_view.head(hidden.device)
                loss = fused_linear_distill_loss(
                    hidden, weight, teacher_hidden, teacher_weight, labels, student_bias=bias,
                    teacher_bias=teacher_bias, softcap=student.softcap, normalizer=normalizer,
                    **config.loss_options())
            else:
                loss = fused_linear_topk_distill_loss(
                    hidden, weight, *self._cached_teacher(inputs), labels, student_bias=bias, softcap=student.softcap,
                    normalizer=normalizer, **self._tail_option(inputs), **config.topk_loss_options())
        if model.training and config.log_terms and self._logs_next_step():
            self._record_terms(hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
                               student.softcap, labels, loss.detach(), normalizer)
        scale = data_parallel_loss_scale(self, normalizer)
        if scale != 1:
            loss = loss * scale
        if return_outputs:
            return loss, {"loss": loss}
        return loss

    def _cached_teacher(self, inputs: Mapping[str, object]):
        missing = [key for key in TOPK_KEYS[:2] if inputs.get(key) is None]
        if missing:
            raise ValueError(f"without a teacher_model the batch must carry the cached teacher ({', '.join(TOPK_KEYS)}"
                             f"; the last optional), e.g. from TopKCacheDataset; missing: {', '.join(missing)}")
        return inputs["topk_indices"], inputs["topk_logprobs"]

    def _tail_option(self, inputs: Mapping[str, object]) -> dict:
        tail = inputs.get("tail_logprobs")
        if tail is None or self.distillation_config.tail != "bucket":
            return {}
        return {"tail_logprobs": tail}

    # ------------------------------------------------------------ logging the two terms
    def _logs_next_step(self) -> bool:
        """Whether the Trainer will log after the optimizer step being computed (DefaultFlowCallback's rule)."""
        step = self.state.global_step + 1
        if self.args.logging_first_step and step == 1:
            return True
        if self.args.logging_strategy != transformers.IntervalStrategy.STEPS:
            return False
        every = self.state.logging_steps or self.args.logging_steps
        return bool(every) and step % int(every) == 0

    @torch.no_grad()
    def _record_terms(self, hidden, weight, bias, softcap, labels, loss, normalizer) -> None:
        """Add this micro-batch's hard and soft terms, normalised as its loss, to those of the step."""
        step = self.state.global_step + 1
        if self._terms_step != step:
            self._pending_terms, self._terms_step = {}, step
        self._terms_normalizer = normalizer
        config = self.distillation_config
        rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = labels[:, 1:].reshape(-1).to(rows.device)
        valid = targets != IGNORE_INDEX
        denominator = normalizer if normalizer is not None else float(max(1, int(valid.sum())))
        scaled_for_accumulation = normalizer is not None
        if not scaled_for_accumulation:  # the Trainer divides such a loss by the accumulation steps
            steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            denominator *= steps
            loss = loss / steps
        hard = _cross_entropy_sum(rows[valid], targets[valid], weight, bias, softcap) / denominator
        terms = {HARD_LOSS_KEY: hard}
        if config.soft_weight != 0.0:
            terms[SOFT_LOSS_KEY] = (loss.double() - config.hard_weight * hard) / config.soft_weight
        for key, value in terms.items():
            self._pending_terms[key] = self._pending_terms.get(key, 0.0) + value.detach().double()

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        """The Trainer's log, with ``hard_loss`` and ``soft_loss`` next to a training ``loss``."""
        if "loss" in logs and self._pending_terms and self._terms_step == self.state.global_step:
            keys = sorted(self._pending_terms)
            values = torch.stack([self._pending_terms[key] for key in keys])
            if self.args.world_size > 1:
                # each process holds its own tokens' terms; the logged loss is of all of them (see
                # data_parallel_loss_scale): a sum of terms normalised by the global count, else a mean
                reduction = "sum" if data_parallel_loss_scale(self, self._terms_normalizer) != 1 else "mean"
                values = self.accelerator.reduce(values, reduction=reduction)
            for key, value in zip(keys, values.tolist()):
                logs[key] = float(value)
            self._pending_terms = {}
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------ datasets
    def _set_signature_columns_if_needed(self):
        """Keep the cached teacher's columns of a ``datasets.Dataset`` (``remove_unused_columns``)."""
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, "labels", *TOPK_KEYS]))


# ----------------------------------------------------------------- helpers
def _cross_entropy_sum(rows: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                       bias: Optional[torch.Tensor], softcap: Optional[float]) -> torch.Tensor:
    """``sum CE(softcap(rows @ weight.T + bias), targets)`` in float64, a chunk of rows at a time (no ``(N, V)``)."""
    total = torch.zeros((), dtype=torch.float64, device=rows.device)
    chunk = max(1, _CE_CHUNK_BYTES // (4 * weight.shape[0]))
    for start in range(0, rows.shape[0], chunk):
        logits = nn.functional.linear(rows[start:start + chunk], weight, bias).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        total += nn.functional.cross_entropy(logits, targets[start:start + chunk].long(), reduction="sum").double()
    return total
