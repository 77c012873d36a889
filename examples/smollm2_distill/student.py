"""The student: a small Llama-style causal LM, randomly initialised, on the teacher's vocabulary."""

from __future__ import annotations

from typing import NamedTuple

import torch


class StudentShape(NamedTuple):
    """The sizes of the student (all command-line flags of the example)."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    tied: bool


def build_student(shape: StudentShape, *, vocab_size: int, max_positions: int, seed: int) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` with ``shape``'s sizes, initialised from ``seed`` (same seed: same weights).

    Raises:
        ValueError: a size below 1, or ``hidden`` not divisible by ``heads``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    for name in ("layers", "hidden", "heads", "intermediate"):
        value = getattr(shape, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"student {name} must be an int >= 1, got {value!r}")
    if shape.hidden % shape.heads:
        raise ValueError(f"student hidden ({shape.hidden}) must be divisible by its heads ({shape.heads})")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=shape.tied,
        # No padding is ever used (sequences are packed); the ids are those of the teacher's tokenizer.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    # The initial weights come from the global generator; fork it so that
    # building a student does not shift the random stream of the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float().train()


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding and head counted once)."""
    return sum(p.numel() for p in model.parameters())
