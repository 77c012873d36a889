"""The on-disk format of a top-k teacher cache: names, the index, atomic writes, integrity.

A cache is a folder::

    index.json                   the index (JSON, below)
    shard-00000.safetensors      token_ids (rows,) int64, topk_indices (rows, k) int32,
    shard-00001.safetensors      topk_logprobs (rows, k) float16/bfloat16/float32,
    ...                          tail_logprobs (rows,) float32

and nothing else of its own while no writer runs (a writer's unfinished files
end in ``.tmp`` and are never read).  Only JSON and safetensors are parsed: no
pickle anywhere, so opening a cache from elsewhere cannot run code.

The index::

    {"format": "kdfast-topk-cache", "format_version": 1, "complete": true,
     "k": 64, "vocab_size": 32000, "temperature": 1.0, "teacher": "name or null",
     "logprob_dtype": "float16", "tokens_per_shard": 131072,
     "num_rows": ..., "num_batches": ...,
     "shards": [{"file": "shard-00000.safetensors", "rows": ..., "batch_shapes": [[B, T], ...],
                 "k": 64, "vocab_size": 32000,
                 "dtypes": {"token_ids": "int64", "topk_indices": "int32", "topk_logprobs": "float16",
                            "tail_logprobs": "float32"},
                 "bytes": ..., "sha256": "...", "tokens_sha256": "..."}, ...]}

``topk_logprobs`` are the teacher's log-probabilities of its top-k entries,
largest first; ``tail_logprobs`` the log of its remaining mass, computed in
float32 from the full distribution (``-inf`` when ``k = V``): with float16
log-probs, ``1 - sum exp(topk_logprobs)`` would carry ~1e-3 of rounding.

``sha256`` is the digest of the shard file, ``tokens_sha256`` that of its
token ids (int64, little-endian, row order): the writer uses it on resume to
check that the batches it skips are the ones it wrote.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import torch

from .._atomic import replace_atomically

FORMAT_NAME = "kdfast-topk-cache"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".safetensors"
TEMP_SUFFIX = ".tmp"
# Held (flock) by the writer for as long as it runs; the kernel drops it when
# the process ends, however it ends, so it never goes stale.
LOCK_FILE = ".writer.lock"

TOKEN_DTYPE = torch.int64
INDEX_DTYPE = torch.int32
LOGPROB_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TAIL_DTYPE = torch.float32
TENSOR_NAMES = ("token_ids", "topk_indices", "topk_logprobs", "tail_logprobs")
# Stored in every shard's safetensors header, so that a lone shard says what it
# is.  One key only: safetensors writes its metadata from a hash map whose
# order changes from call to call, and shards must be byte-reproducible.
SHARD_METADATA = {"format": f"{FORMAT_NAME}/{FORMAT_VERSION}"}


class CacheCorruptedError(ValueError):
    """A cache file is missing, truncated, altered or not in the cache format; the message names it."""


class TopKRows(NamedTuple):
    """Rows of a cache: ``token_ids``, ``tail_logprobs`` ``(...)``; ``topk_indices``, ``topk_logprobs`` ``(..., k)``.

    ``tail_logprobs`` is the teacher's log-mass outside its top-k, for
    ``topk_distill_loss(..., tail="bucket", tail_logprobs=rows.tail_logprobs)``.
    """

    token_ids: torch.Tensor
    topk_indices: torch.Tensor
    topk_logprobs: torch.Tensor
    tail_logprobs: torch.Tensor


def shard_file_name(number: int) -> str:
    return f"{SHARD_PREFIX}{number:05d}{SHARD_SUFFIX}"


def is_shard_file_name(name: str) -> bool:
    stem = name[len(SHARD_PREFIX):-len(SHARD_SUFFIX)]
    return name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX) and stem.isdigit()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype)[len("torch."):]


def tensor_dtypes(logprob_dtype: torch.dtype) -> dict:
    """The ``dtypes`` entry of a shard: the dtype name of each stored tensor."""
    return {"token_ids": dtype_name(TOKEN_DTYPE), "topk_indices": dtype_name(INDEX_DTYPE),
            "topk_logprobs": dtype_name(logprob_dtype), "tail_logprobs": dtype_name(TAIL_DTYPE)}


def tokens_digest(token_ids: torch.Tensor) -> str:
    """sha256 of token ids as the shards store them (int64, row order)."""
    flat = token_ids.detach().reshape(-1).to(device="cpu", dtype=TOKEN_DTYPE).contiguous()
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (shards can be larger than one wants in memory twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is always either absent, the old file, or all of ``data``.

    The temporary name is ``path + ".tmp"``: a resumed writer recognises (and removes) leftovers by it.
    """
    replace_atomically(path, lambda f: f.write(data), temp_path=str(path.with_name(path.name + TEMP_SUFFIX)))


def encode_index(index: dict) -> bytes:
    """The index as JSON bytes: a key or a shard per line, keys sorted, so that equal indexes are equal files."""
    head = json.dumps({key: value for key, value in index.items() if key != "shards"}, indent=1, sort_keys=True)
    shards = ",\n  ".join(json.dumps(shard, sort_keys=True) for shard in index["shards"])
    listing = f"[\n  {shards}\n ]" if shards else "[]"
    # head is '{\n "key": value,\n ... \n}': the shards go in as its last entry.
    return (head[:-2] + f',\n "shards": {listing}\n}}\n').encode("utf-8")


def read_index(folder: Path) -> dict:
    """The parsed, checked index of the cache in ``folder``.

    Raises:
        FileNotFoundError: no index (not a cache, or a writer that never finished one shard).
        CacheCorruptedError: an index that is not JSON or not this format.
    """
    path = folder / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a top-k cache "
                                f"(see kdfast.cache.write_topk_cache)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheCorruptedError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise CacheCorruptedError(f"{path} is not a {FORMAT_NAME} index (its 'format' is "
                                  f"{index.get('format') if isinstance(index, dict) else None!r})")
    if index.get("format_version") != FORMAT_VERSION:
        raise CacheCorruptedError(f"{path} has format_version {index.get('format_version')!r}; "
                                  f"this kdfast reads version {FORMAT_VERSION}")
    missing = [key for key in ("complete", "k", "vocab_size", "temperature", "logprob_dtype", "shards")
               if key not in index]
    if missing:
        raise CacheCorruptedError(f"{path} lacks the entries {missing}")
    if index["logprob_dtype"] not in LOGPROB_DTYPES:
        raise CacheCorruptedError(f"{path} has an unknown logprob_dtype {index['logprob_dtype']!r}")
    return index
