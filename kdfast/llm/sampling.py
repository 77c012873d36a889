"""Drawing next tokens from a row of logits: temperature, nucleus (top-p), greedy; and the top-K test of speculative KD.

The pieces of :mod:`kdfast.llm.generation`, usable on their own:

* :func:`sampling_probs`: the distribution a token is drawn from,
  ``softmax(logits / temperature)`` restricted to its nucleus (the fewest most
  probable tokens whose mass reaches ``top_p``) and renormalised;
* :func:`sample_tokens`: one token per row from that distribution
  (``torch.multinomial`` with the caller's ``torch.Generator``), or the argmax
  when ``temperature == 0`` (greedy: no random numbers are drawn);
* :func:`in_top_k`: whether each row's token is among the ``K`` largest
  logits of that row (ties with the ``K``-th largest count as inside).

All three take ``(B, V)`` logits of any floating dtype and compute in float32
(float64 for float64 logits).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["check_sampling", "in_top_k", "sample_tokens", "sampling_probs"]


def check_sampling(temperature, top_p) -> tuple:
    """``(temperature, top_p)`` as floats, or a ValueError / TypeError naming the bad one.

    ``temperature`` is finite and ``>= 0`` (0: greedy); ``top_p`` is in ``(0, 1]``
    (1: no nucleus filtering).
    """
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r}")
    temperature, top_p = float(temperature), float(top_p)
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy decoding), got {temperature!r}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1: no nucleus filtering), got {top_p!r}")
    return temperature, top_p


def _check_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be (B, V) with V >= 1, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """``(B, V)``: the distribution :func:`sample_tokens` draws from (``temperature > 0``).

    ``softmax(logits / temperature)``; with ``top_p < 1`` the tokens outside
    the nucleus (sorted by probability, every token whose predecessors already
    hold ``top_p`` of the mass) get probability 0 and the rest are
    renormalised.  The most probable token is always kept.

    Raises:
        ValueError: ``temperature == 0`` (greedy has no distribution), bad
            ``top_p``, logits that are not ``(B, V)``.
    """
    _check_logits(logits)
    temperature, top_p = check_sampling(temperature, top_p)
    if temperature == 0.0:
        raise ValueError("temperature=0 is greedy decoding: there is no distribution to sample from")
    probs = torch.softmax(logits.to(_compute_dtype(logits)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # the mass of the more probable tokens
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``(B,)`` int64: one token per row of ``(B, V)`` logits.

    ``temperature == 0``: the argmax (``top_p`` and ``generator`` unused, no
    random numbers drawn).  Otherwise one ``torch.multinomial`` draw per row
    from :func:`sampling_probs`, with ``generator`` (on the generator's device:
    the probabilities go there and the tokens come back to the logits'
    device), so a seeded generator gives the same tokens every time.
    """
    _check_logits(logits)
    temperature, top_p = check_sampling(temperature, top_p)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_p)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def in_top_k(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """``(B,)`` bool: whether ``tokens[b]`` is among the ``k`` largest ``logits[b]``.

    A token counts as inside when its logit is at least the ``k``-th largest
    logit of its row (so a tie with the ``k``-th is inside); ``k >= V`` accepts
    every token.  Temperature and top-p do not change the ranking, so the test
    is on the raw logits.
    """
    _check_logits(logits)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not isinstance(tokens, torch.Tensor) or tokens.shape != logits.shape[:1]:
        raise ValueError(f"tokens must be a ({logits.shape[0]},) tensor, got "
                         f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    if k >= logits.shape[1]:
        return torch.ones(tokens.shape, dtype=torch.bool, device=logits.device)
    kth = logits.topk(k, dim=-1).values[:, -1]
    return logits.gather(1, tokens.to(logits.device).unsqueeze(1)).squeeze(1) >= kth
