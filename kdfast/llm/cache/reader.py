"""Reading a top-k teacher cache, with every shard checked against the index before use."""

from __future__ import annotations

import bisect
import hashlib
from pathlib import Path
from typing import Iterator, List, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file as safetensors_load_file

from ._format import (
    INDEX_DTYPE, LOGPROB_DTYPES, TAIL_DTYPE, TENSOR_NAMES, TOKEN_DTYPE, CacheCorruptedError, TopKRows, file_digest,
    open_shard, read_index, shard_stat,
)

class TopKCache:
    """A top-k teacher cache written by :func:`kdfast.llm.cache.write_topk_cache`.

    ``len(cache)`` is the number of token rows; ``cache[i:j]`` the rows ``i``
    to ``j`` (across shards) as :class:`TopKRows` ``(token_ids (n,),
    topk_indices (n, k) int32, topk_logprobs (n, k), tail_logprobs (n,))``; iterating gives one
    ``TopKRows`` per shard, :meth:`iter_rows` fixed-size runs of rows and
    :meth:`iter_batches` the teacher's batches in their original shapes.

    Args:
        path: the cache folder.
        verify: ``True`` (default): every shard's presence and byte size are
            checked here, its sha256 when it is first loaded.  ``"all"``: the
            sha256 of every shard here too (reads the whole cache once).
            ``False``: no size or digest checks (a trusted cache; loads are
            memory-mapped).  Whatever the setting, the index is checked entry
            by entry, and a shard that is a symbolic link, or not a plain
            shard name in ``path``, is refused before it is opened.
        allow_incomplete: open a cache whose writer has not finished (only its
            complete shards are visible); by default that is a ValueError.

    Raises:
        FileNotFoundError: no index in ``path``.
        CacheCorruptedError: a missing, truncated or altered shard (naming it
            and what differs), a shard that is a symbolic link, or an index
            that is not a cache index (naming the entry).
        ValueError: an incomplete cache without ``allow_incomplete``.
    """

    def __init__(self, path: Union[str, Path], verify: Union[bool, str] = True, allow_incomplete: bool = False):
        if not (verify is True or verify is False or verify == "all"):
            raise ValueError(f"verify must be True, False or 'all', got {verify!r}")
        self.path = Path(path)
        self.verify = verify
        self.index = read_index(self.path)
        if not self.index["complete"] and not allow_incomplete:
            raise ValueError(f"the cache in {self.path} is incomplete (its writer was interrupted after "
                             f"{len(self.index['shards'])} shards): re-run write_topk_cache with the same arguments "
                             f"to finish it, or pass allow_incomplete=True")
        self.shards: List[dict] = self.index["shards"]
        # starts[i] is the first row of shard i; starts[-1] the number of rows.
        self._starts = [0]
        for shard in self.shards:
            self._starts.append(self._starts[-1] + shard["rows"])
        self._verified = set()
        self._loaded: Optional[tuple] = None  # (shard number, TopKRows): the last shard read
        if verify:
            for shard in self.shards:
                self._check_size(shard)
        if verify == "all":
            for number, shard in enumerate(self.shards):
                with open_shard(self.path, shard["file"]) as f:
                    self._check_digest(shard, file_digest(f))
                self._verified.add(number)

    # ------------------------------------------------------------ metadata
    @property
    def k(self) -> int:
        return self.index["k"]

    @property
    def vocab_size(self) -> Optional[int]:
        """The teacher's vocabulary size (None for a cache of no rows)."""
        return self.index["vocab_size"]

    @property
    def temperature(self) -> float:
        """The temperature of the stored log-probs (1.0: the teacher's own distribution)."""
        return self.index["temperature"]

    @property
    def teacher_name(self) -> Optional[str]:
        return self.index.get("teacher")

    @property
    def logprob_dtype(self) -> torch.dtype:
        return LOGPROB_DTYPES[self.index["logprob_dtype"]]

    @property
    def complete(self) -> bool:
        return bool(self.index["complete"])

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        return (f"TopKCache({str(self.path)!r}, rows={len(self)}, shards={len(self.shards)}, k={self.k}, "
                f"vocab_size={self.vocab_size}, logprob_dtype={self.index['logprob_dtype']})")

    # ------------------------------------------------------------ access
    def shard(self, number: int) -> TopKRows:
        """All rows of shard ``number``, loaded (and verified, the first time) from disk."""
        if not 0 <= number < len(self.shards):
            raise IndexError(f"shard {number} is out of range: the cache has {len(self.shards)} shards")
        if self._loaded is None or self._loaded[0] != number:
            self._loaded = (number, self._load(number))
        return self._loaded[1]

    def __iter__(self) -> Iterator[TopKRows]:
        """One :class:`TopKRows` per shard, in order."""
        return (self.shard(number) for number in range(len(self.shards)))

    def iter_rows(self, batch_rows: int) -> Iterator[TopKRows]:
        """Consecutive runs of ``batch_rows`` rows (the last may be shorter), across shard boundaries."""
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows must be an int >= 1, got {batch_rows!r}")
        return (self[start:start + batch_rows] for start in range(0, len(self), batch_rows))

    def iter_batches(self) -> Iterator[TopKRows]:
        """The teacher's batches in the order written, reshaped to ``(*batch_shape)`` / ``(*batch_shape, k)``."""
        for number, shard in enumerate(self.shards):
            rows = self.shard(number)
            start = 0
            for shape in shard["batch_shapes"]:
                n = _numel(shape)
                yield TopKRows(rows.token_ids[start:start + n].reshape(shape),
                               rows.topk_indices[start:start + n].reshape(*shape, self.k),
                               rows.topk_logprobs[start:start + n].reshape(*shape, self.k),
                               rows.tail_logprobs[start:start + n].reshape(shape))
                start += n

    def __getitem__(self, item: Union[int, slice]) -> TopKRows:
        """Row ``item`` (``token_ids``, ``tail_logprobs`` 0-d, the others ``(k,)``) or the rows of a slice (step 1)."""
        if isinstance(item, int):
            n = len(self)
            if not -n <= item < n:
                raise IndexError(f"row {item} is out of range: the cache has {n} rows")
            row = item % n
            return TopKRows(*(t[0] for t in self[row:row + 1]))
        if not isinstance(item, slice):
            raise TypeError(f"a cache is indexed by an int or a slice of rows, got {type(item).__name__}")
        start, stop, step = item.indices(len(self))
        if step != 1:
            raise ValueError(f"cache slices take step 1 (rows are read shard by shard), got step {step}")
        parts = []
        number = bisect.bisect_right(self._starts, start) - 1  # the shard holding row `start`
        while start < stop and number < len(self.shards):
            offset = self._starts[number]
            hi = min(stop, self._starts[number + 1])
            if start < hi:
                parts.append(TopKRows(*(t[start - offset:hi - offset] for t in self.shard(number))))
                start = hi
            number += 1
        if not parts:
            return self._empty_rows()
        return parts[0] if len(parts) == 1 else TopKRows(*(torch.cat(ts) for ts in zip(*parts)))

    # ------------------------------------------------------------ loading and checks
    def _load(self, number: int) -> TopKRows:
        shard = self.shards[number]
        if self.verify and number not in self._verified:
            self._check_size(shard)
            with open_shard(self.path, shard["file"]) as f:
                data = f.read()
            self._check_digest(shard, hashlib.sha256(data).hexdigest())
            self._verified.add(number)
            tensors = self._parse(shard, lambda: safetensors_load(data))
        else:
            # Unverified is trust in the contents, not in where they are read from: links are refused here too.
            shard_stat(self.path, shard["file"])
            tensors = self._parse(shard, lambda: safetensors_load_file(self.path / shard["file"]))
        return TopKRows(*(tensors[name] for name in TENSOR_NAMES))

    def _check_size(self, shard: dict) -> None:
        size = shard_stat(self.path, shard["file"]).st_size
        if size != shard["bytes"]:
            how = "truncated" if size < shard["bytes"] else "grown"
            raise CacheCorruptedError(f"shard {shard['file']} of the cache in {self.path} has {size} bytes but the "
                                      f"index says {shard['bytes']} ({how})")

    def _check_digest(self, shard: dict, digest: str) -> None:
        if digest != shard["sha256"]:
            raise CacheCorruptedError(f"shard {shard['file']} of the cache in {self.path} has sha256 {digest} but the "
                                      f"index says {shard['sha256']}: its contents were altered")

    def _parse(self, shard: dict, load) -> dict:
        """The shard's tensors, checked against the names, shapes and dtypes the index gives."""
        where = f"shard {shard['file']} of the cache in {self.path}"
        try:
            tensors = load()
        except SafetensorError as e:
            raise CacheCorruptedError(f"{where} is not a valid safetensors file ({e})") from None
        if sorted(tensors) != sorted(TENSOR_NAMES):
            raise CacheCorruptedError(f"{where} holds the tensors {sorted(tensors)}, expected {sorted(TENSOR_NAMES)}")
        expected = {
            "token_ids": ((shard["rows"],), TOKEN_DTYPE),
            "topk_indices": ((shard["rows"], self.k), INDEX_DTYPE),
            "topk_logprobs": ((shard["rows"], self.k), self.logprob_dtype),
            "tail_logprobs": ((shard["rows"],), TAIL_DTYPE),
        }
        for name, (shape, dtype) in expected.items():
            t = tensors[name]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise CacheCorruptedError(f"{where}: {name} is {t.dtype} {tuple(t.shape)}, "
                                          f"the index says {dtype} {shape}")
        return tensors

    def _empty_rows(self) -> TopKRows:
        return TopKRows(torch.empty(0, dtype=TOKEN_DTYPE), torch.empty(0, self.k, dtype=INDEX_DTYPE),
                        torch.empty(0, self.k, dtype=self.logprob_dtype), torch.empty(0, dtype=TAIL_DTYPE))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
