"""The on-disk format of a top-k teacher cache: names, the index, atomic writes, integrity.

A cache is a folder::

    index.json                   the index (JSON, below)
    shard-00000.safetensors      token_ids (rows,) int64, topk_indices (rows, k) int32,
    shard-00001.safetensors      topk_logprobs (rows, k) float16/bfloat16/float32,
    ...                          tail_logprobs (rows,) float32

and nothing else of its own while no writer runs (a writer's unfinished files
end in ``.tmp`` and are never read).  Only JSON and safetensors are parsed: no
pickle anywhere, so opening a cache from elsewhere cannot run code.  Nor can it
make the reader open anything outside its folder: the index is checked entry
by entry (:func:`check_index`), a shard's ``file`` must be a plain shard name
(``shard-<digits>.safetensors``), and shards (and the index) that are symbolic
links are refused, even links that point inside (:func:`open_shard`).

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
import math
import os
import re
import reprlib
import stat
from collections import Counter
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch

from ...atomic_files import replace_atomically

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
# Every entry the writer puts in the index and in each of its shards.
INDEX_KEYS = ("format", "format_version", "complete", "k", "vocab_size", "temperature", "teacher", "logprob_dtype",
              "tokens_per_shard", "num_rows", "num_batches", "shards")
SHARD_KEYS = ("file", "rows", "batch_shapes", "k", "vocab_size", "dtypes", "bytes", "sha256", "tokens_sha256")
# ASCII digits only: str.isdigit() would also take other scripts' digits.
_SHARD_NAME = re.compile(re.escape(SHARD_PREFIX) + "[0-9]+" + re.escape(SHARD_SUFFIX))
_SHA256 = re.compile("[0-9a-f]{64}")
# O_NOFOLLOW makes the open itself fail on a link swapped in after the check (absent on Windows).
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
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


def is_shard_file_name(name) -> bool:
    """Whether ``name`` is a shard's file name: ``shard-<digits>.safetensors``, no folder part."""
    return isinstance(name, str) and _SHARD_NAME.fullmatch(name) is not None


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


def file_digest(f: BinaryIO) -> str:
    """sha256 of an open file, read in 1 MiB blocks (shards can be larger than one wants in memory twice)."""
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def shard_stat(folder: Path, name: str) -> os.stat_result:
    """The ``lstat`` of shard ``name`` of the cache in ``folder``, which must be a regular file in that folder.

    Opens nothing.  With ``name`` a plain shard name (no separator, not
    absolute), only a symbolic link could lead elsewhere; links are refused
    whatever they point to, so the file checked is the file listed.

    Raises:
        CacheCorruptedError: ``name`` is not a shard name, or the shard is missing, a link or not a regular file.
    """
    if not is_shard_file_name(name):
        raise CacheCorruptedError(f"{_show(name)} is not a shard file name (shard-<digits>{SHARD_SUFFIX}) of the "
                                  f"cache in {folder}")
    where = f"shard {name} of the cache in {folder}"
    try:
        st = os.lstat(folder / name)
    except FileNotFoundError:
        raise CacheCorruptedError(f"{where} is missing") from None
    if stat.S_ISLNK(st.st_mode):
        raise CacheCorruptedError(f"{where} is a symbolic link: a cache reads only regular files in its own folder")
    if not stat.S_ISREG(st.st_mode):
        raise CacheCorruptedError(f"{where} is not a regular file")
    return st


def open_shard(folder: Path, name: str) -> BinaryIO:
    """Shard ``name`` of the cache in ``folder``, opened for reading after :func:`shard_stat` accepted it."""
    shard_stat(folder, name)
    try:
        return os.fdopen(os.open(folder / name, _OPEN_FLAGS), "rb")
    except OSError as e:  # e.g. ELOOP: replaced by a link since the check
        raise CacheCorruptedError(f"shard {name} of the cache in {folder} cannot be opened ({e.strerror})") from None


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
        CacheCorruptedError: an index that is a symbolic link, not JSON or not this format (see :func:`check_index`).
    """
    path = folder / INDEX_FILE
    if path.is_symlink():
        raise CacheCorruptedError(f"{path} is a symbolic link: a cache reads only regular files in its own folder")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a top-k cache "
                                f"(see kdfast.llm.cache.write_topk_cache)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheCorruptedError(f"{path} is not valid JSON ({e})") from None
    except RecursionError:  # '[[[[...' nested deeper than the parser's stack
        raise CacheCorruptedError(f"{path} is not a {FORMAT_NAME} index (JSON nested too deeply)") from None
    check_index(index, path)
    return index


def check_index(index, path: Path) -> None:
    """Check every entry of a parsed index (types, ranges, and that its counts agree); ``path`` names it in errors.

    Everything the reader and the writer later take from the index is checked
    here, so that a damaged or hostile index fails here, as a
    :class:`CacheCorruptedError` naming the entry, and not later as a
    TypeError, or as a read outside the cache folder.
    """
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise CacheCorruptedError(f"{path} is not a {FORMAT_NAME} index (its 'format' is "
                                  f"{_show(index.get('format')) if isinstance(index, dict) else None})")
    if not _is_int(index.get("format_version")) or index["format_version"] != FORMAT_VERSION:
        raise CacheCorruptedError(f"{path} has format_version {_show(index.get('format_version'))}; "
                                  f"this kdfast reads version {FORMAT_VERSION}")
    missing = [key for key in INDEX_KEYS if key not in index]
    if missing:
        raise CacheCorruptedError(f"{path} lacks the entries {missing}")
    k, vocab_size, shards = index["k"], index["vocab_size"], index["shards"]
    _expect(type(index["complete"]) is bool, path, "complete", "true or false", index["complete"])
    _expect(_is_int(k, 1), path, "k", "an int >= 1", k)
    _expect(vocab_size is None or _is_int(vocab_size, k), path, "vocab_size", f"null or an int >= k = {k}", vocab_size)
    temperature = index["temperature"]
    _expect(_is_number(temperature) and math.isfinite(temperature) and temperature > 0, path, "temperature",
            "a finite number > 0", temperature)
    _expect(index["teacher"] is None or isinstance(index["teacher"], str), path, "teacher", "null or a string",
            index["teacher"])
    _expect(isinstance(index["logprob_dtype"], str) and index["logprob_dtype"] in LOGPROB_DTYPES, path,
            "logprob_dtype", f"one of {sorted(LOGPROB_DTYPES)}", index["logprob_dtype"])
    for key, least in (("tokens_per_shard", 1), ("num_rows", 0), ("num_batches", 0)):
        _expect(_is_int(index[key], least), path, key, f"an int >= {least}", index[key])
    _expect(isinstance(shards, list), path, "shards", "a list", shards)
    _expect(vocab_size is not None or not shards, path, "vocab_size", "an int once there are shards", vocab_size)
    dtypes = tensor_dtypes(LOGPROB_DTYPES[index["logprob_dtype"]])
    for number, shard in enumerate(shards):
        _check_shard(shard, f"shards[{number}]", index, dtypes, path)
    duplicates = sorted(name for name, n in Counter(shard["file"] for shard in shards).items() if n > 1)
    _expect(not duplicates, path, "shards", "a list of distinct files", duplicates)
    rows = sum(shard["rows"] for shard in shards)
    _expect(index["num_rows"] == rows, path, "num_rows", f"the shards' rows in all ({rows})", index["num_rows"])
    batches = sum(len(shard["batch_shapes"]) for shard in shards)
    _expect(index["num_batches"] == batches, path, "num_batches", f"the shards' batches in all ({batches})",
            index["num_batches"])


def _check_shard(shard, field: str, index: dict, dtypes: dict, path: Path) -> None:
    _expect(isinstance(shard, dict), path, field, "an object", shard)
    missing = [key for key in SHARD_KEYS if key not in shard]
    if missing:
        raise CacheCorruptedError(f"{path}: {field!r} lacks the entries {missing}")
    _expect(is_shard_file_name(shard["file"]), path, f"{field}.file",
            f"a file name in the cache folder of the form shard-<digits>{SHARD_SUFFIX}", shard["file"])
    _expect(_is_int(shard["rows"]), path, f"{field}.rows", "an int >= 0", shard["rows"])
    shapes = shard["batch_shapes"]
    _expect(isinstance(shapes, list) and shapes and all(
        isinstance(shape, list) and all(_is_int(d) for d in shape) for shape in shapes), path,
        f"{field}.batch_shapes", "a non-empty list of shapes (lists of ints >= 0)", shapes)
    _expect(sum(math.prod(shape) for shape in shapes) == shard["rows"], path, f"{field}.batch_shapes",
            f"shapes of {shard['rows']} rows in all (the shard's 'rows')", shapes)
    for key in ("k", "vocab_size"):
        _expect(_is_int(shard[key]) and shard[key] == index[key], path, f"{field}.{key}",
                f"the index's {key} ({index[key]})", shard[key])
    _expect(shard["dtypes"] == dtypes, path, f"{field}.dtypes", repr(dtypes), shard["dtypes"])
    _expect(_is_int(shard["bytes"]), path, f"{field}.bytes", "an int >= 0", shard["bytes"])
    for key in ("sha256", "tokens_sha256"):
        _expect(isinstance(shard[key], str) and _SHA256.fullmatch(shard[key]) is not None, path, f"{field}.{key}",
                "64 lowercase hex digits", shard[key])


def _expect(ok: bool, path: Path, field: str, what: str, value) -> None:
    if not ok:
        raise CacheCorruptedError(f"{path}: {field!r} must be {what}, got {_show(value)}")


def _is_int(value, least: int = 0) -> bool:
    """An int (JSON has no other; ``true`` is a bool, not 1) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value) -> str:
    """A short repr: an index entry can be any JSON, megabytes of it."""
    return reprlib.repr(value)
