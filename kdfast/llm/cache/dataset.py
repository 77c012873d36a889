"""A top-k teacher cache of fixed-length sequences as a torch ``Dataset``, example ``i`` = sequence ``i``.

Torch only (no ``transformers``): :class:`TopKCacheDataset` is what
``kdfast.integrations.transformers.DistillationTrainer`` trains on offline,
and works as well with a plain ``torch.utils.data.DataLoader`` (shuffled or
not: an example's tokens and its teacher rows come from the same cache rows).

>>> dataset = TopKCacheDataset("cache/")                       # e.g. written by `kdfast cache build`
>>> dataset.check_tokens(my_input_ids)                         # (N, T): the data I pair it with; else ValueError
>>> loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch

from .reader import TopKCache

__all__ = ["TopKCacheDataset"]


class TopKCacheDataset(torch.utils.data.Dataset):
    """The sequences of a top-k teacher cache (:mod:`kdfast.llm.cache`) as training examples.

    Example ``i`` is rows ``i * seq_len`` to ``(i + 1) * seq_len`` of the cache:
    ``{"input_ids", "labels", "topk_indices", "topk_logprobs", "tail_logprobs"}``,
    each ``(seq_len,)`` or ``(seq_len, k)``.  For a cache written by
    ``kdfast cache build`` (:func:`kdfast.llm.cache.build_topk_cache`), ``i``
    is the example id: the index of the sequence in the packed order of the
    data.  The token ids come from the cache itself, so the tokens and the
    teacher's rows cannot drift apart however the loader shuffles.  Every
    position is a target (no padding: the cache keeps no attention mask).
    Shards are loaded on first use and kept (memory: the size of the cache);
    the top-k log-probabilities are those the cache stores (temperature
    ``cache.temperature``, normally 1: the loss applies its own temperature).

    **Pairing with your own data.** If you train on token ids of your own
    (your dataset, your collator) next to the cached rows, check that the
    cache was built from them: :meth:`check_tokens` (or ``expected_token_ids=``
    here) compares token ids and raises a ``ValueError`` naming the first
    example and position that differ.

    Args:
        cache: a :class:`kdfast.llm.cache.TopKCache` or its folder.
        seq_len: tokens per example; None: the sequence length of the batches
            the cache was written from (they must all have the same).
        expected_token_ids: None, or the token ids of all the sequences this
            cache is meant to go with, in example-id order: a ``(N, seq_len)``
            integer tensor (or nested lists), ``N == len(dataset)``; checked
            with :meth:`check_tokens` here.

    Raises:
        ValueError: the cache's batches are not whole sequences of ``seq_len``;
            ``expected_token_ids`` that are not the cache's sequences.
    """

    def __init__(self, cache: Union[TopKCache, str, Path], seq_len: Optional[int] = None, *,
                 expected_token_ids=None):
        self.cache = cache if isinstance(cache, TopKCache) else TopKCache(cache)
        lengths = {tuple(shape)[-1] for shard in self.cache.shards for shape in shard["batch_shapes"] if shape}
        if seq_len is None:
            if len(lengths) != 1:
                raise ValueError(f"the cache in {self.cache.path} holds sequences of lengths {sorted(lengths)}; "
                                 f"pass seq_len")
            seq_len = lengths.pop()
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        if any(length % seq_len for length in lengths) or any(shard["rows"] % seq_len for shard in self.cache.shards):
            raise ValueError(f"the cache in {self.cache.path} was written from sequences of lengths {sorted(lengths)}, "
                             f"which are not whole sequences of seq_len={seq_len}")
        self.seq_len = seq_len
        self._starts = [0]
        for shard in self.cache.shards:
            self._starts.append(self._starts[-1] + shard["rows"])
        self._shards: Dict[int, tuple] = {}
        if expected_token_ids is not None:
            expected = _as_token_matrix(expected_token_ids, "expected_token_ids")
            if expected.shape[0] != len(self):
                raise ValueError(f"expected_token_ids holds {expected.shape[0]} sequences but the cache in "
                                 f"{self.cache.path} holds {len(self)}: the cache was built from other data (or "
                                 f"from a part of it; pass the matching sequences, or use check_tokens for a subset)")
            self.check_tokens(expected)

    @property
    def vocab_size(self) -> Optional[int]:
        """The cached teacher's vocabulary size (checked against the student's by the trainer)."""
        return self.cache.vocab_size

    def __len__(self) -> int:
        return len(self.cache) // self.seq_len

    def _rows(self, i: int) -> tuple:
        """The cache's ``(token_ids, topk_indices, topk_logprobs, tail_logprobs)`` of example ``i``."""
        if isinstance(i, bool) or not isinstance(i, int):
            if isinstance(i, torch.Tensor) and i.numel() == 1 and not i.is_floating_point():
                i = int(i)
            else:
                raise TypeError(f"an example id is an int, got {type(i).__name__}")
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} is out of range: the cache holds {len(self)} sequences")
        start = (i % len(self)) * self.seq_len
        # Sequences never cross shards (the writer stores whole batches per shard).
        number = next(n for n in range(len(self.cache.shards)) if start < self._starts[n + 1])
        if number not in self._shards:
            self._shards[number] = tuple(self.cache.shard(number))
        offset = start - self._starts[number]
        return tuple(t[offset:offset + self.seq_len] for t in self._shards[number])

    def __getitem__(self, i: int) -> dict:
        token_ids, topk_indices, topk_logprobs, tail_logprobs = self._rows(i)
        return {"input_ids": token_ids, "labels": token_ids.clone(), "topk_indices": topk_indices,
                "topk_logprobs": topk_logprobs, "tail_logprobs": tail_logprobs}

    def token_ids(self, i: int) -> torch.Tensor:
        """The token ids ``(seq_len,)`` int64 of example ``i``."""
        return self._rows(i)[0]

    def check_tokens(self, input_ids, example_ids: Union[None, int, Sequence[int], torch.Tensor] = None) -> None:
        """Check that the cache holds the teacher's rows of these token ids; ValueError naming the first difference.

        Args:
            input_ids: one sequence ``(seq_len,)`` or several ``(N, seq_len)``
                (an integer tensor or nested lists): the tokens you train on.
            example_ids: the example id of each sequence (an int for one, a
                sequence or 1-d tensor of ``N`` ints); None: ``0 .. N-1``.

        Raises:
            ValueError: a sequence of another length than ``seq_len``, or token
                ids that differ from the cache's: the cache was built from
                other data (or another tokenizer, or another packing).
            IndexError: an example id the cache does not hold.
        """
        ids = _as_token_matrix(input_ids, "input_ids")
        if ids.shape[1] != self.seq_len:
            raise ValueError(f"input_ids has sequences of {ids.shape[1]} tokens but the cache in {self.cache.path} "
                             f"holds sequences of {self.seq_len}: the cache was built with another --seq-len or "
                             f"from other data")
        if example_ids is None:
            numbers = list(range(ids.shape[0]))
        elif isinstance(example_ids, torch.Tensor):
            numbers = [int(n) for n in example_ids.reshape(-1).tolist()]
        elif isinstance(example_ids, int) and not isinstance(example_ids, bool):
            numbers = [example_ids]
        else:
            numbers = [int(n) for n in example_ids]
        if len(numbers) != ids.shape[0]:
            raise ValueError(f"{len(numbers)} example ids for {ids.shape[0]} sequences of input_ids")
        if ids.shape[0] > len(self) and example_ids is None:
            raise ValueError(f"input_ids holds {ids.shape[0]} sequences but the cache in {self.cache.path} holds "
                             f"only {len(self)}: the cache was built from other data or a part of it")
        for row, number in enumerate(numbers):
            cached = self.token_ids(number)
            given = ids[row]
            if not torch.equal(cached, given):
                position = int((cached != given).nonzero()[0, 0])
                raise ValueError(
                    f"the cache in {self.cache.path} was built from other data than these token ids: example "
                    f"{number}, position {position}: the cache has token {int(cached[position])}, the data "
                    f"{int(given[position])}. Build the cache from this data (same tokenizer, seq_len and "
                    f"order: kdfast cache build), or pair the cache with the data it was built from")


def _as_token_matrix(values, name: str) -> torch.Tensor:
    """Token ids as a ``(N, T)`` int64 CPU tensor (one sequence ``(T,)`` becomes ``(1, T)``)."""
    ids = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got {ids.dtype}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ValueError(f"{name} must be one sequence (T,) or several (N, T), got shape {tuple(ids.shape)}")
    return ids.detach().to("cpu", torch.int64)
