"""Batched generation for distillation: the student's own samples, and speculative interleaved sampling.

Two samplers for any pair of Hugging Face causal LMs (used by duck typing:
``model(input_ids=..., attention_mask=..., position_ids=..., past_key_values=...,
use_cache=...)`` returning ``.logits`` and ``.past_key_values``):

* :func:`generate`: the model's own completions (on-policy distillation,
  GKD's ``lmbda`` fraction; or a teacher's, for sequence-level KD);
* :func:`speculative_generate`: speculative KD's interleaved sampling
  (Xu et al., 2024): at every position the student proposes a token; it is
  kept when it is among the teacher's top-``K`` tokens at that position,
  otherwise the teacher replaces it by a token drawn from the teacher's own
  distribution.  The sequences stay close to what the student generates,
  within the teacher's support.

Both take a batch of left-padded prompts (``tokenizer.padding_side = "left"``)
and step token by token with each model's KV cache (``past_key_values``; the
prompt is encoded once, then one token per step), positions taken from the
attention mask (so a padded row is encoded as it would be alone).  Each row
stops at one of its EOS tokens (kept as its last completion token) or after
its ``max_new_tokens``; later positions hold the pad token and are masked.
Tokens are drawn with temperature and nucleus (top-p) sampling from a
``torch.Generator`` (:mod:`kdfast.llm.sampling`), so a seeded generator gives
the same sequences every time; ``temperature=0`` is greedy.  Generation runs
under ``torch.no_grad()`` with the models in eval mode (their modes are
restored afterwards).  The result, a :class:`Generation`, is the prompt and
the completion side by side, ready to be a distillation batch
(:mod:`kdfast.llm.onpolicy`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..integrations.heads import UnsplittableModelError, takes_keyword, unwrap_model
from .sampling import check_sampling, in_top_k, sample_tokens

__all__ = ["Generation", "generate", "position_ids_from_mask", "speculative_generate"]

IGNORE_INDEX = -100  # the label of the positions that do not count (prompt and padding)

GeneratorLike = Union[None, int, torch.Generator]
TokenIds = Union[None, int, Sequence[int]]


@dataclass(frozen=True, eq=False)
class Generation:
    """Prompts and their generated completions, side by side.

    Attributes:
        sequences: ``(B, P + L)`` int64: the (left-padded) prompts, then the
            completions (right-padded with the pad token).  ``L`` is the most
            tokens any row generated (at most ``max_new_tokens``).
        attention_mask: ``(B, P + L)`` int64: the prompts' mask, then 1 on each
            row's completion tokens and 0 on its padding.
        prompt_length: ``P``.
        lengths: ``(B,)`` int64: the completion tokens of each row (its EOS included).
        replaced: speculative sampling only: ``(B, L)`` bool, where the teacher
            replaced the student's proposal (False on padding); None otherwise.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    lengths: torch.Tensor
    replaced: Optional[torch.Tensor] = None

    @property
    def completions(self) -> torch.Tensor:
        """``(B, L)``: the generated tokens (the pad token after each row's end)."""
        return self.sequences[:, self.prompt_length:]

    @property
    def completion_mask(self) -> torch.Tensor:
        """``(B, L)`` bool: the generated positions of each row (its EOS included)."""
        L = self.sequences.shape[1] - self.prompt_length
        return torch.arange(L, device=self.lengths.device) < self.lengths.unsqueeze(1)

    @property
    def position_ids(self) -> torch.Tensor:
        """``(B, P + L)``: the positions the models saw the tokens at (:func:`position_ids_from_mask`)."""
        return position_ids_from_mask(self.attention_mask)

    def labels(self, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """``(B, P + L)``: the completion tokens, ``ignore_index`` on the prompts and the padding."""
        target = torch.zeros_like(self.attention_mask, dtype=torch.bool)
        target[:, self.prompt_length:] = self.completion_mask
        return self.sequences.masked_fill(~target, ignore_index)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` int64: each token's position among its row's attended tokens (0 at the first); 0 on left padding.

    What ``transformers``' ``generate`` gives a left-padded batch, so that each
    row is encoded as it would be alone.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
             max_new_tokens: Union[int, Sequence[int], torch.Tensor], temperature: float = 1.0, top_p: float = 1.0,
             eos_token_id: TokenIds = None, pad_token_id: Optional[int] = None, generator: GeneratorLike = None,
             use_cache: bool = True, progress: bool = False) -> Generation:
    """Complete a batch of left-padded prompts with ``model``'s own samples, token by token.

    Args:
        model: a causal LM of ``transformers`` (any ``*ForCausalLM``; PEFT- or
            compile-wrapped ones too): called with ``input_ids``,
            ``attention_mask``, ``position_ids`` (when its forward takes them)
            and, with ``use_cache``, ``past_key_values``.
        input_ids: ``(B, P)`` integer token ids of the prompts, left-padded.
        attention_mask: ``(B, P)`` 0/1 (or bool), 0 on the left padding only,
            at least one 1 per row; None: no padding.
        max_new_tokens: the most tokens to generate per row: an int, or one
            int per row (``(B,)``); 0 generates nothing for that row.
        temperature: of the sampling distribution; 0 is greedy (argmax).
        top_p: nucleus sampling: the fewest most probable tokens whose mass
            reaches ``top_p``; 1 keeps all.
        eos_token_id: an id or ids that end a row (kept as its last token);
            None: the model's ``generation_config.eos_token_id`` (else
            ``config.eos_token_id``; none if neither is set); ``()`` for none.
        pad_token_id: the token after a row's end (masked anyway); None: the
            model's pad token, else its first EOS, else 0.
        generator: a ``torch.Generator`` (its device is where the tokens are
            drawn), an int seed (a new generator on the model's device), or
            None (torch's global generator).
        use_cache: step with the model's KV cache (the prompt is encoded once);
            False recomputes the whole prefix at every step (slower; the same
            tokens up to floating-point rounding).
        progress: show a tqdm progress bar of the steps (nothing if tqdm is
            not installed).

    Returns:
        a :class:`Generation` (on the model's device).

    Raises:
        ValueError / TypeError: malformed prompts (not 2-D integer ids,
            right-padded or empty rows, ids out of the vocabulary), bad
            sampling options or token ids, a model that returns no logits or
            (with ``use_cache``) no ``past_key_values``.
    """
    return _decode(model, None, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator,
                   use_cache=use_cache, progress=progress, top_k=None, vocab_policy="error")


def speculative_generate(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor,
                         attention_mask: Optional[torch.Tensor] = None, *, top_k: int,
                         max_new_tokens: Union[int, Sequence[int], torch.Tensor], temperature: float = 1.0,
                         top_p: float = 1.0, eos_token_id: TokenIds = None, pad_token_id: Optional[int] = None,
                         generator: GeneratorLike = None, use_cache: bool = True, progress: bool = False,
                         vocab_policy: str = "error") -> Generation:
    """Speculative KD's interleaved sampling: the student proposes each token, the teacher vets it.

    At every step, for every unfinished row: the student's next-token logits
    give a proposal (drawn with ``temperature`` / ``top_p``, or its argmax at
    temperature 0); the teacher's logits at the same position are computed on
    the same prefix; the proposal is kept when it is among the teacher's
    ``top_k`` largest logits (:func:`kdfast.llm.sampling.in_top_k`), otherwise
    it is replaced by a token drawn from the teacher's distribution (same
    ``temperature`` / ``top_p``).  The chosen token extends the prefix of both
    models (each with its own KV cache).  ``top_k=1`` with greedy decoding is
    the teacher's greedy generation; ``top_k >= V`` is the student's.

    Random numbers, per step: the student's proposals for all ``B`` rows (one
    ``torch.multinomial`` call), then the teacher's candidates for all ``B``
    rows (one call), used where the proposal is rejected.

    Args:
        student, teacher: causal LMs of ``transformers`` on the same tokenizer
            (devices and dtypes may differ: the teacher's logits come to the
            student's device).
        top_k: ``K >= 1``, the size of the teacher's accepted set.
        vocab_policy: ``"error"`` (the two vocabularies must have the same
            size) or ``"truncate"`` (a larger teacher vocabulary, one that only
            pads the student's, is cut to the student's ``V``), as in
            :func:`kdfast.fused_linear_distill_loss`.
        input_ids, attention_mask, max_new_tokens, temperature, top_p,
            eos_token_id, pad_token_id, generator, use_cache, progress: as in
            :func:`generate` (the EOS and pad defaults are the student's).

    Returns:
        a :class:`Generation` whose ``replaced`` marks the teacher's tokens.

    Raises:
        ValueError / TypeError: as :func:`generate`, plus a bad ``top_k`` or
            ``vocab_policy``, vocabularies of different sizes.
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module (a causal LM), got {type(teacher).__name__}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1 (the size of the teacher's accepted set), got {top_k!r}")
    if vocab_policy not in ("error", "truncate"):
        raise ValueError(f"vocab_policy must be 'error' or 'truncate', got {vocab_policy!r}")
    return _decode(student, teacher, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                   generator=generator, use_cache=use_cache, progress=progress, top_k=top_k,
                   vocab_policy=vocab_policy)


# ----------------------------------------------------------------- the loop
def _decode(student, teacher, input_ids, attention_mask, *, max_new_tokens, temperature, top_p, eos_token_id,
            pad_token_id, generator, use_cache, progress, top_k, vocab_policy) -> Generation:
    if not isinstance(student, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a causal LM), got {type(student).__name__}")
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {use_cache!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}")
    temperature, top_p = check_sampling(temperature, top_p)
    device = model_device(student)
    vocab = _vocab_size(student)
    if teacher is not None:
        _check_vocabularies(student, teacher, vocab_policy)
        teacher_vocab = _vocab_size(teacher)
        vocab = teacher_vocab if vocab is None else vocab if teacher_vocab is None else min(vocab, teacher_vocab)
    ids, mask = check_prompts(input_ids, attention_mask, vocab)
    ids, mask = ids.to(device), mask.to(device)
    B, P = ids.shape
    limits = max_new_tokens_per_row(max_new_tokens, B).to(device)
    eos = torch.tensor(resolve_eos_token_id(student, eos_token_id), dtype=torch.long, device=device)
    pad = resolve_pad_token_id(student, pad_token_id, eos.tolist())
    generator = make_generator(generator, device)

    runners = [_Runner(student, "model" if teacher is None else "student", use_cache)]
    if teacher is not None:
        runners.append(_Runner(teacher, "teacher", use_cache))
    finished = limits == 0
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    steps = int(limits.max())
    seq, call_mask = ids, mask
    tokens, replaced = [], []
    with _generating(*(runner.model for runner in runners)), _progress_bar(
            progress, steps, "kdfast speculative sampling" if teacher is not None else "kdfast generation") as bar:
        for _ in range(steps):
            if bool(finished.all()):
                break
            logits = runners[0].next_logits(seq, call_mask).to(device)
            token = sample_tokens(logits, temperature=temperature, top_p=top_p, generator=generator)
            if teacher is not None:
                teacher_logits = _common_vocabulary(runners[1].next_logits(seq, call_mask).to(device), logits.shape[1],
                                                    vocab_policy)
                accept = in_top_k(teacher_logits, token, top_k)
                candidate = sample_tokens(teacher_logits, temperature=temperature, top_p=top_p, generator=generator)
                token = torch.where(accept, token, candidate)
                replaced.append(~accept & ~finished)
            token = token.masked_fill(finished, pad)
            tokens.append(token)
            lengths += (~finished).long()
            finished = finished | torch.isin(token, eos) | (lengths >= limits)
            seq = torch.cat([seq, token.unsqueeze(1)], dim=1)
            call_mask = torch.cat([call_mask, torch.ones_like(call_mask[:, :1])], dim=1)
            bar.update(1)
    completions = torch.stack(tokens, dim=1) if tokens else ids.new_zeros((B, 0))
    completion_mask = torch.arange(completions.shape[1], device=device) < lengths.unsqueeze(1)
    return Generation(
        sequences=torch.cat([ids, completions], dim=1),
        attention_mask=torch.cat([mask, completion_mask.long()], dim=1),
        prompt_length=P,
        lengths=lengths,
        replaced=None if teacher is None else (
            torch.stack(replaced, dim=1) if replaced else torch.zeros((B, 0), dtype=torch.bool, device=device)),
    )


class _Runner:
    """One model's next-token logits for a growing batch of sequences, with or without its KV cache."""

    def __init__(self, model: nn.Module, name: str, use_cache: bool):
        self.model, self.name, self.use_cache = model, name, use_cache
        self.device = model_device(model)
        inner = _innermost(model)  # a wrapper (PEFT, torch.compile) passes the keywords on to it
        self.takes = {key for key in ("position_ids", "use_cache", "past_key_values", "logits_to_keep")
                      if takes_keyword(inner, key)}
        if use_cache and not {"use_cache", "past_key_values"} <= self.takes:
            raise ValueError(f"the {name} {type(model).__name__} takes no past_key_values / use_cache in its forward: "
                             f"generate with use_cache=False")
        self.cache = None
        self.fed = 0  # the positions already in the cache

    def next_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, V)``: the logits after the last position of ``ids`` (all ``(B, T)`` so far)."""
        new = ids[:, self.fed:] if self.use_cache else ids
        kwargs = {"input_ids": new.to(self.device), "attention_mask": mask.to(self.device)}
        if "position_ids" in self.takes:
            kwargs["position_ids"] = position_ids_from_mask(mask)[:, -new.shape[1]:].to(self.device)
        if self.use_cache:
            kwargs.update(past_key_values=self.cache, use_cache=True)
        elif "use_cache" in self.takes:
            kwargs["use_cache"] = False
        if "logits_to_keep" in self.takes:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, (tuple, list)) and out:
            logits = out[0]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[0] != ids.shape[0]:
            raise ValueError(f"the {self.name} {type(self.model).__name__} returned no (B, T, V) logits: kdfast "
                             f"generates with causal LMs whose output has .logits")
        if self.use_cache:
            cache = getattr(out, "past_key_values", None)
            if cache is None:
                raise ValueError(f"the {self.name} {type(self.model).__name__} returned no past_key_values with "
                                 f"use_cache=True: generate with use_cache=False")
            self.cache, self.fed = cache, ids.shape[1]
        return logits[:, -1]


def _common_vocabulary(teacher_logits: torch.Tensor, V: int, vocab_policy: str) -> torch.Tensor:
    """The teacher's logits over the student's ``V`` tokens (cut with ``vocab_policy="truncate"``), or a ValueError."""
    V_t = teacher_logits.shape[1]
    if V_t == V:
        return teacher_logits
    if vocab_policy == "truncate" and V_t > V:
        return teacher_logits[:, :V]
    raise _vocabulary_error(V_t, V)


def _check_vocabularies(student: nn.Module, teacher: nn.Module, vocab_policy: str) -> None:
    """The vocabulary check of :func:`_common_vocabulary` before any step, where the LM heads tell their sizes."""
    sizes = []
    for model in (teacher, student):
        get = getattr(model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        weight = getattr(head, "weight", None)
        sizes.append(weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None)
    V_t, V = sizes
    if V_t is not None and V is not None and V_t != V and not (vocab_policy == "truncate" and V_t > V):
        raise _vocabulary_error(V_t, V)


def _vocabulary_error(V_t: int, V: int) -> ValueError:
    return ValueError(f"the teacher's vocabulary has {V_t} entries and the student's {V}: speculative sampling "
                      f"compares their tokens, so they need the same tokenizer" + (
                          "; vocab_policy='truncate' cuts a larger teacher vocabulary to the student's" if V_t > V
                          else ""))


# ----------------------------------------------------------------- checks and defaults
def check_prompts(input_ids, attention_mask, vocab_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` as int64 tensors, or a clear error for prompts that are not a left-padded batch.

    Raises:
        TypeError: non-tensors, non-integer ids, a floating mask.
        ValueError: not 2-D, empty, shapes that differ, mask values other than
            0 / 1, padding after a row's tokens (right padding), a row with no
            token, ids outside ``[0, vocab_size)``.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a (B, P) batch of prompts with B, P >= 1, got shape "
                         f"{tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.long)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"attention_mask must be integer (0 / 1) or bool, got {attention_mask.dtype}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}: they must be the same")
    mask = attention_mask.long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1")
    right_padded = (mask[:, 1:] < mask[:, :-1]).any(dim=1)
    if bool(right_padded.any()):
        row = int(right_padded.nonzero()[0, 0])
        raise ValueError(f"the prompts must be left-padded (tokenizer.padding_side = 'left'): row {row} of "
                         f"attention_mask has padding after its tokens")
    empty = mask.sum(dim=1) == 0
    if bool(empty.any()):
        raise ValueError(f"row {int(empty.nonzero()[0, 0])} of the prompts has no token (its attention_mask is all "
                         f"0): every prompt needs at least one (e.g. BOS)")
    ids = input_ids.long()
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bad = low if low < 0 else high
        raise ValueError(f"input_ids holds token id {bad}, outside the model's vocabulary [0, {vocab_size}) "
                         f"(padding too must be a valid id, e.g. the tokenizer's pad_token_id)")
    return ids, mask


def max_new_tokens_per_row(max_new_tokens, batch: int) -> torch.Tensor:
    """``(batch,)`` int64 on the CPU: ``max_new_tokens`` (an int, or one int per row) for each row, checked."""
    if isinstance(max_new_tokens, bool):
        raise TypeError(f"max_new_tokens must be an int or one int per row, got {max_new_tokens!r}")
    if isinstance(max_new_tokens, int):
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        return torch.full((batch,), max_new_tokens, dtype=torch.long)
    if isinstance(max_new_tokens, torch.Tensor):
        if max_new_tokens.is_floating_point() or max_new_tokens.dtype == torch.bool:
            raise TypeError(f"max_new_tokens must hold integers, got {max_new_tokens.dtype}")
        limits = max_new_tokens.detach().cpu().long()
    elif isinstance(max_new_tokens, (list, tuple)) and all(
            isinstance(n, int) and not isinstance(n, bool) for n in max_new_tokens):
        limits = torch.tensor(max_new_tokens, dtype=torch.long).reshape(-1)
    else:
        raise TypeError(f"max_new_tokens must be an int or one int per row, got {max_new_tokens!r}")
    if limits.shape != (batch,):
        raise ValueError(f"max_new_tokens per row must have one entry per prompt ({batch}), got shape "
                         f"{tuple(limits.shape)}")
    if bool((limits < 0).any()):
        raise ValueError(f"max_new_tokens must be >= 0, got {limits.tolist()}")
    return limits


def _token_ids(name: str, value) -> Tuple[int, ...]:
    values = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist()
    if not isinstance(values, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{name} must be a token id (an int >= 0) or a sequence of them, got {value!r}")
    return tuple(values)


def _model_attribute(model: nn.Module, name: str):
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, name, None)
        if value is not None:
            return value
    return None


def resolve_eos_token_id(model: nn.Module, eos_token_id: TokenIds = None) -> Tuple[int, ...]:
    """The EOS ids that end a row: ``eos_token_id``, or (None) the model's (``generation_config``, then ``config``)."""
    if eos_token_id is None:
        eos_token_id = _model_attribute(model, "eos_token_id")
        if eos_token_id is None:
            return ()
    return _token_ids("eos_token_id", eos_token_id)


def resolve_pad_token_id(model: nn.Module, pad_token_id: Optional[int], eos: Sequence[int] = ()) -> int:
    """The token after a row's end: ``pad_token_id``, else the model's pad token, else the first EOS, else 0."""
    if pad_token_id is None:
        pad_token_id = _model_attribute(model, "pad_token_id")
        if isinstance(pad_token_id, (list, tuple)):
            pad_token_id = pad_token_id[0] if pad_token_id else None
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise ValueError(f"pad_token_id must be a token id (an int >= 0), got {pad_token_id!r}")
    return pad_token_id


def make_generator(generator: GeneratorLike, device: torch.device) -> Optional[torch.Generator]:
    """``generator`` itself, a new one on ``device`` seeded with an int, or None (torch's global generator)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator(device=device).manual_seed(generator)
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` takes its inputs: its input embedding's device, else its first parameter's (else the CPU)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _innermost(model: nn.Module) -> nn.Module:
    """The model inside PEFT's and ``torch.compile``'s wrappers (itself for a wrapper that cannot be taken apart)."""
    try:
        return unwrap_model(model)
    except UnsplittableModelError:  # a prompt-learning PEFT adapter: its own forward is the model
        return model


def _vocab_size(model: nn.Module) -> Optional[int]:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    size = getattr(embeddings, "num_embeddings", None)
    return size if isinstance(size, int) else None


@contextlib.contextmanager
def _generating(*models: nn.Module):
    """No autograd, the models in eval mode (no dropout), their modes restored afterwards."""
    modes = [[(m, m.training) for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for saved in modes:
            for module, training in saved:
                module.training = training


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, description: str):
    """A tqdm bar of the steps when wanted and tqdm is installed, else a silent stand-in."""
    bar = None
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional: generation is the same without a bar
            bar = None
        else:
            bar = tqdm(total=total, desc=description, unit="tok", leave=False, dynamic_ncols=True)
    try:
        yield _NoBar() if bar is None else bar
    finally:
        if bar is not None:
            bar.close()
