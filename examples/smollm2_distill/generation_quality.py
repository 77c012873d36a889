"""Generation quality scored by the teacher: its log-likelihood of a student's samples, and two sanity measures.

A student completes held-out prompts by sampling (:func:`kdfast.llm.generate`);
the teacher then scores every generated token, ``log p_teacher(token | prompt,
earlier tokens)``.  The mean over all generated tokens is the generation-quality
measure of GKD (Agarwal et al., 2024) and speculative KD (Xu et al., 2024) in
the absence of a task metric: how plausible the teacher finds what the student
writes.  Because a teacher also likes degenerate, repetitive text, two
measures go with it: the distinct-bigram ratio of the samples, and the
fraction of sampled tokens inside the teacher's top-``K`` (speculative KD's
acceptance test).
"""

from __future__ import annotations

from typing import Optional

import torch

from kdfast.llm import Generation, generate
from kdfast.llm.sampling import in_top_k


@torch.no_grad()
def teacher_token_logprobs(teacher: torch.nn.Module, generation: Generation, top_k: int,
                           batch_size: int = 8) -> tuple:
    """``(log-probabilities (B, L), in-top-K (B, L) bool)`` of the teacher for every completion token.

    The prompts must be unpadded (all of one length, as
    :func:`~smollm2_distill.corpus.article_prompts` makes them); the completions
    are right-padded, which a causal model never attends to before a real token.
    """
    P = generation.prompt_length
    if bool((generation.attention_mask[:, :P] == 0).any()):
        raise ValueError("teacher_token_logprobs expects unpadded prompts")
    logprobs, inside = [], []
    was_training = teacher.training
    teacher.eval()
    try:
        for start in range(0, generation.sequences.shape[0], batch_size):
            seq = generation.sequences[start:start + batch_size]
            logits = teacher(input_ids=seq, attention_mask=generation.attention_mask[start:start + batch_size]).logits
            logits = logits[:, P - 1:-1].float()  # the positions that predict the completion tokens
            targets = seq[:, P:]
            logprobs.append(torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1))
            flat = logits.reshape(-1, logits.shape[-1])
            inside.append(in_top_k(flat, targets.reshape(-1), top_k).view(targets.shape))
    finally:
        teacher.train(was_training)
    return torch.cat(logprobs), torch.cat(inside)


def distinct_bigram_ratio(generation: Generation) -> float:
    """Distinct bigrams / all bigrams over the completions (1: no bigram repeats; low: repetitive text)."""
    seen, total = set(), 0
    for row, length in zip(generation.completions.tolist(), generation.lengths.tolist()):
        pairs = list(zip(row[:length], row[1:length]))
        seen.update(pairs)
        total += len(pairs)
    return len(seen) / total if total else float("nan")


def score_generation(teacher: torch.nn.Module, generation: Generation, top_k: int, batch_size: int = 8) -> dict:
    """The teacher's scores of ``generation``'s completions (means over every generated token)."""
    logprobs, inside = teacher_token_logprobs(teacher, generation, top_k, batch_size)
    mask = generation.completion_mask
    tokens = int(mask.sum())
    return {
        "teacher_loglik_per_token": float(logprobs[mask].mean()),
        "teacher_top_k_fraction": float(inside[mask].float().mean()),
        "distinct_bigram_ratio": distinct_bigram_ratio(generation),
        "generated_tokens": tokens,
        "mean_length": tokens / mask.shape[0],
    }


def score_samples(model: torch.nn.Module, teacher: torch.nn.Module, prompts: torch.Tensor, *, max_new_tokens: int,
                  eos_token_id: int, seed: int, top_k: int, temperature: float = 1.0, batch_size: int = 8,
                  sample_batch_size: Optional[int] = None) -> dict:
    """``model`` completes ``prompts`` by sampling (seeded); the teacher scores the completions (:func:`score_generation`).

    Also returns the first two completions' token ids (to decode for a look).
    """
    generator = torch.Generator().manual_seed(seed)
    rows = sample_batch_size or prompts.shape[0]
    parts = [generate(model, prompts[start:start + rows], max_new_tokens=max_new_tokens, temperature=temperature,
                      eos_token_id=eos_token_id, pad_token_id=eos_token_id, generator=generator)
             for start in range(0, prompts.shape[0], rows)]
    generation = _concatenate(parts, eos_token_id)
    scores = score_generation(teacher, generation, top_k, batch_size)
    scores["examples"] = [row[:length] for row, length in
                          zip(generation.completions[:2].tolist(), generation.lengths[:2].tolist())]
    return scores


def dataset_generation(prompts: torch.Tensor, completions: torch.Tensor) -> Generation:
    """The dataset's own completions as a :class:`Generation` (to score the real text the same way)."""
    sequences = torch.cat([prompts, completions], dim=1)
    return Generation(sequences=sequences, attention_mask=torch.ones_like(sequences), prompt_length=prompts.shape[1],
                      lengths=torch.full((prompts.shape[0],), completions.shape[1], dtype=torch.long))


def _concatenate(parts, pad: int) -> Generation:
    """One :class:`Generation` of several batches (completions right-padded to the longest)."""
    if len(parts) == 1:
        return parts[0]
    P = parts[0].prompt_length
    L = max(part.sequences.shape[1] - P for part in parts)
    sequences, masks = [], []
    for part in parts:
        extra = L - (part.sequences.shape[1] - P)
        sequences.append(torch.nn.functional.pad(part.sequences, (0, extra), value=pad))
        masks.append(torch.nn.functional.pad(part.attention_mask, (0, extra), value=0))
    return Generation(sequences=torch.cat(sequences), attention_mask=torch.cat(masks), prompt_length=P,
                      lengths=torch.cat([part.lengths for part in parts]))
