"""Held-out perplexity: ``exp`` of the mean next-token negative log-likelihood over all predicted tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int) -> float:
    """Perplexity of a causal LM on ``sequences`` ``(num_sequences, T)``: tokens ``1..T-1`` of each are predicted.

    The mean is over every predicted token of every sequence (not a mean of
    per-batch means), so the batch size does not change the result.
    """
    if sequences.dim() != 2 or sequences.shape[1] < 2:
        raise ValueError(f"sequences must be (num_sequences, T) with T >= 2, got shape {tuple(sequences.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for start in range(0, sequences.shape[0], batch_size):
            ids = sequences[start:start + batch_size]
            logits = model(input_ids=ids).logits[:, :-1]
            targets = ids[:, 1:]
            total_nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                               reduction="sum"))
            total_tokens += targets.numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)
