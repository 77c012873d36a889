"""What the teacher contributes to training, computed once: its final hidden states and its top-k cache.

The teacher (135M parameters) is by far the most expensive model here, so it
runs once over the training sequences.  Its final hidden states ``(N, T, H_t)``
feed the fused linear loss (which recomputes the teacher's logits chunk by
chunk from them and the teacher's LM head), and the same hidden states give
the logits from which the top-k cache is written, so the teacher trunk never
runs twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from .lm_heads import final_hidden_states


class TopKTargets(NamedTuple):
    """The teacher's top-k per token of every training sequence: ``(N, T, k)`` indices and log-probabilities,
    and ``(N, T)`` the log-mass off the top-k (the bucket tail's teacher, stored in float32 by the cache)."""

    indices: torch.Tensor
    logprobs: torch.Tensor
    tail_logprobs: torch.Tensor


@torch.no_grad()
def precompute_hidden_states(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The teacher's final hidden states for every sequence: ``(num_sequences, T, H_t)`` float32."""
    parts = [final_hidden_states(model, sequences[start:start + batch_size]).float()
             for start in range(0, sequences.shape[0], batch_size)]
    return torch.cat(parts)


def build_topk_targets(sequences: torch.Tensor, teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                       cache_dir: Path, *, k: int, batch_size: int, teacher_name: str) -> TopKTargets:
    """Write the teacher's top-k cache for ``sequences`` with :func:`kdfast.llm.cache.write_topk_cache`, and read it back.

    The cache's logits are ``teacher_hidden @ teacher_weight.T`` (the teacher's
    own LM head on its precomputed hidden states).  A cache already in
    ``cache_dir`` from the same sequences and settings is reused (the writer
    checks the stored token ids); reading it back checks every shard's sha256.

    Raises:
        ValueError: the cache holds other token ids than ``sequences`` (or other settings).
    """
    from kdfast.llm.cache import TopKCache, write_topk_cache

    if teacher_hidden.shape[:2] != sequences.shape:
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} does not match sequences {tuple(sequences.shape)}")
    batches = ({"input_ids": sequences[start:start + batch_size], "hidden": teacher_hidden[start:start + batch_size]}
               for start in range(0, sequences.shape[0], batch_size))
    write_topk_cache(lambda batch: batch["hidden"] @ teacher_weight.T, batches, cache_dir, k=k,
                     teacher_name=teacher_name, progress=False)
    rows = TopKCache(cache_dir)[:]
    if not torch.equal(rows.token_ids, sequences.reshape(-1)):
        raise ValueError(f"the top-k cache in {cache_dir} was written for other token ids than these sequences")
    num_sequences, seq_len = sequences.shape
    return TopKTargets(rows.topk_indices.view(num_sequences, seq_len, k),
                       rows.topk_logprobs.view(num_sequences, seq_len, k),
                       rows.tail_logprobs.view(num_sequences, seq_len))
