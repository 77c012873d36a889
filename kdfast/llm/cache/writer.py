"""Writing a top-k teacher cache: run the teacher once, keep its top-k log-probabilities per token.

Crash safety: a shard is written under a temporary name, fsynced and renamed
into place, and only then listed in the index (itself replaced atomically).
So at any moment the index lists complete shards only, and re-running the
writer resumes after the last listed one.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Union

import torch
from safetensors.torch import save as safetensors_bytes

from ...config import finite_float
from ._format import (
    FORMAT_NAME, FORMAT_VERSION, INDEX_DTYPE, INDEX_FILE, LOCK_FILE, LOGPROB_DTYPES, SHARD_METADATA, TAIL_DTYPE,
    TEMP_SUFFIX,
    TOKEN_DTYPE, TopKRows, atomic_write, dtype_name, encode_index, is_shard_file_name, read_index, shard_file_name,
    tensor_dtypes, tokens_digest,
)
from .reader import TopKCache

# 2^17 token rows: with k = 64 and float16 log-probs a shard is ~50 MB, large
# enough that per-file costs vanish, small enough to hold twice in memory.
DEFAULT_TOKENS_PER_SHARD = 1 << 17

# The settings that fix a cache's contents: resuming with any other value would
# mix two caches in one, so it is an error.
_RESUME_SETTINGS = ("k", "logprob_dtype", "temperature", "teacher", "tokens_per_shard")

Batch = Union[torch.Tensor, dict]


def write_topk_cache(
    teacher: Callable[[Batch], torch.Tensor],
    batches: Iterable[Batch],
    out_dir: Union[str, Path],
    *,
    k: int,
    logprob_dtype: torch.dtype = torch.float16,
    tokens_per_shard: int = DEFAULT_TOKENS_PER_SHARD,
    temperature: float = 1.0,
    teacher_name: Optional[str] = None,
    token_key: str = "input_ids",
    resume: bool = True,
    progress: bool = True,
) -> TopKCache:
    """Run ``teacher`` over ``batches`` and store its top-k log-probabilities in ``out_dir``.

    For every token row: ``log_softmax(logits / temperature)`` over the full
    vocabulary (in float32), then its ``k`` largest entries (sorted, largest
    first), stored as ``topk_indices`` int32 and ``topk_logprobs`` in
    ``logprob_dtype``, with the log of the remaining mass ``tail_logprobs``
    (float32) and the input token ids, in safetensors shards of whole
    batches holding at least ``tokens_per_shard`` rows each (the last may hold
    fewer).  Feed them to :func:`kdfast.llm.topk.topk_distill_loss` (which expects
    temperature-1 log-probs: keep ``temperature=1`` unless you mean to cache a
    tempered teacher).

    Args:
        teacher: maps a batch to logits ``(*batch_shape, V)``; called under
            ``torch.no_grad()``, on whatever device it likes.
        batches: an iterable of batches, each a tensor of token ids
            ``(*batch_shape)`` (e.g. ``(B, T)``) or a dict holding them under
            ``token_key``; the teacher receives the batch as it is.
            **Resume contract**: a re-run must iterate the same batches in the
            same order (a deterministic loader: fixed seed, no shuffling that
            differs per run).  The writer skips, without calling the teacher,
            the batches already stored, and checks their token ids against the
            stored ones' digests (ValueError if they differ).
        out_dir: the cache folder (created if needed).  One writer at a
            time: a second process (or call) writing to the same folder gets a
            RuntimeError at once instead of corrupting the first one's shards
            (an advisory ``flock`` on ``out_dir/.writer.lock``, released when
            the writer returns or its process dies; where ``fcntl`` does not
            exist, e.g. Windows, there is no such check).
        k: entries kept per row, ``1 <= k <= V``.
        logprob_dtype: ``torch.float16`` (default), ``torch.bfloat16`` or ``torch.float32``.
        tokens_per_shard: rows after which a shard is closed.
        temperature: teacher temperature of the stored log-probs.
        teacher_name: recorded in the index.
        token_key: the key of the token ids in dict batches.
        resume: continue a cache already in ``out_dir`` (whose settings must
            match these: ValueError otherwise), or finish at once if it is
            complete.  ``False`` deletes that cache's own files (index, shards,
            temporaries; nothing else) and starts over.
        progress: print one line per shard to stderr.

    Returns:
        The cache, opened with :class:`TopKCache` (``verify=False``: the writer has just hashed every shard).
    """
    out_dir = Path(out_dir)
    settings = _check_settings(teacher, k, logprob_dtype, tokens_per_shard, temperature, teacher_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    with writer_lock(out_dir):
        _remove_temporaries(out_dir)
        index = _open_index(out_dir, settings, resume)
        _remove_unlisted_shards(out_dir, index)
        if not index["complete"]:
            _ShardWriter(out_dir, index, progress).run(teacher, iter(batches), token_key)
    return TopKCache(out_dir, verify=False)


@contextlib.contextmanager
def writer_lock(out_dir: Path):
    """Exclusive right to write the cache in ``out_dir``; RuntimeError if another writer holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): unguarded, as documented
        yield
        return
    with open(out_dir / LOCK_FILE, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another writer is writing the top-k cache in {out_dir} (it holds "
                               f"{out_dir / LOCK_FILE}); wait for it to finish, or write elsewhere") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_settings(teacher, k, logprob_dtype, tokens_per_shard, temperature, teacher_name) -> dict:
    if not callable(teacher):
        raise TypeError(f"teacher must be callable (batch -> logits), got {type(teacher).__name__}")
    for name, value in (("k", k), ("tokens_per_shard", tokens_per_shard)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {name}={value}")
    if logprob_dtype not in LOGPROB_DTYPES.values():
        raise ValueError(f"logprob_dtype must be torch.float16, torch.bfloat16 or torch.float32, got {logprob_dtype}")
    tau = finite_float("temperature", temperature)
    if tau <= 0:
        raise ValueError(f"temperature must be > 0, got temperature={temperature}")
    if teacher_name is not None and not isinstance(teacher_name, str):
        raise TypeError(f"teacher_name must be a str or None, got {type(teacher_name).__name__}")
    return {"k": k, "logprob_dtype": dtype_name(logprob_dtype), "temperature": tau, "teacher": teacher_name,
            "tokens_per_shard": tokens_per_shard}


def _open_index(out_dir: Path, settings: dict, resume: bool) -> dict:
    """The index to continue: the one on disk (checked against ``settings``), or a new empty one."""
    if (out_dir / INDEX_FILE).exists():
        if resume:
            index = read_index(out_dir)
            differ = [f"{key}: cache has {index.get(key)!r}, asked for {settings[key]!r}"
                      for key in _RESUME_SETTINGS if index.get(key) != settings[key]]
            if differ:
                raise ValueError(f"cannot resume the cache in {out_dir} with other settings ({'; '.join(differ)}); "
                                 f"pass the original ones, or resume=False to overwrite it")
            return index
        (out_dir / INDEX_FILE).unlink()
    index = dict(settings, format=FORMAT_NAME, format_version=FORMAT_VERSION, complete=False, vocab_size=None,
                 num_rows=0, num_batches=0, shards=[])
    # Written before any shard, so that a resume checks its settings even then.
    atomic_write(out_dir / INDEX_FILE, encode_index(index))
    return index


def _remove_temporaries(out_dir: Path) -> None:
    """Unfinished files of an interrupted writer (never listed in any index)."""
    for path in out_dir.iterdir():
        if path.name.endswith(TEMP_SUFFIX) and (path.name[:-len(TEMP_SUFFIX)] == INDEX_FILE
                                                or is_shard_file_name(path.name[:-len(TEMP_SUFFIX)])):
            path.unlink()


def _remove_unlisted_shards(out_dir: Path, index: dict) -> None:
    """Shards renamed into place by a writer interrupted before it listed them (they will be rewritten)."""
    listed = {shard["file"] for shard in index["shards"]}
    for path in out_dir.iterdir():
        if is_shard_file_name(path.name) and path.name not in listed:
            path.unlink()


def _batch_token_ids(batch: Batch, token_key: str) -> torch.Tensor:
    ids = batch.get(token_key) if isinstance(batch, dict) else batch
    if not isinstance(ids, torch.Tensor):
        what = f"a dict without a tensor under {token_key!r}" if isinstance(batch, dict) else type(batch).__name__
        raise TypeError(f"a batch must be a tensor of token ids or a dict holding them under {token_key!r}, got {what}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
    return ids


def teacher_topk(logits: torch.Tensor, k: int, temperature: float):
    """What the cache stores of ``log_softmax(logits / temperature)``, rows flattened, in float32.

    Returns ``(topk_logprobs (N, k), topk_indices (N, k), tail_logprobs (N,))``:
    the ``k`` largest log-probabilities (largest first), their indices, and
    the log of the mass outside them, a logsumexp of the complement (exact
    where ``log(1 - sum)`` would cancel).  float32 whatever the logits' dtype:
    a float16 log-softmax would round the normaliser before the stored dtype does.
    """
    logprobs = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float() / temperature, -1)
    top = logprobs.topk(k, dim=-1, sorted=True)
    tail = logprobs.scatter_(-1, top.indices, -math.inf).logsumexp(-1)
    return top.values, top.indices, tail


class _ShardWriter:
    """Runs the teacher over the batches not yet stored and writes them out, shard by shard."""

    def __init__(self, out_dir: Path, index: dict, progress: bool):
        self.out_dir, self.index, self.progress = out_dir, index, progress
        self.logprob_dtype = LOGPROB_DTYPES[index["logprob_dtype"]]
        self.pending: List[tuple] = []  # (token ids, indices, log-probs) of the batches of the next shard
        self.pending_rows = 0
        self.rows_this_run = 0
        self.started = time.monotonic()

    def run(self, teacher, batches, token_key: str) -> None:
        self._skip_stored(batches, token_key)
        for number, batch in enumerate(batches, start=self.index["num_batches"]):
            ids = _batch_token_ids(batch, token_key)
            with torch.no_grad():
                logits = teacher(batch)
            self._add(number, ids, logits)
            if self.pending_rows >= self.index["tokens_per_shard"]:
                self._write_shard()
        if self.pending:
            self._write_shard()
        self.index["complete"] = True
        atomic_write(self.out_dir / INDEX_FILE, encode_index(self.index))
        self._say(f"complete: {self.index['num_rows']} rows in {len(self.index['shards'])} shards")

    def _skip_stored(self, batches, token_key: str) -> None:
        """Consume the batches that the listed shards hold, checking that they are the same batches."""
        shards = self.index["shards"]
        consumed = 0
        for shard in shards:
            ids = []
            for _ in shard["batch_shapes"]:
                batch = next(batches, None)
                if batch is None:
                    raise ValueError(f"batches ended after {consumed} batches, but the cache in {self.out_dir} "
                                     f"already holds {self.index['num_batches']}: resuming needs the same batches "
                                     f"as the first run")
                consumed += 1
                ids.append(_batch_token_ids(batch, token_key).reshape(-1))
            if tokens_digest(torch.cat(ids)) != shard["tokens_sha256"]:
                raise ValueError(f"the batches of {shard['file']} are not the ones it was written from (their token "
                                 f"ids differ): resuming needs the same batches in the same order as the first run")
        if shards:
            self._say(f"resuming after {len(shards)} shards ({self.index['num_rows']} rows)")

    def _add(self, number: int, ids: torch.Tensor, logits: torch.Tensor) -> None:
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise TypeError(f"teacher must return a floating-point tensor of logits, got "
                            f"{getattr(logits, 'dtype', type(logits).__name__)} for batch {number}")
        if logits.shape[:-1] != ids.shape:
            raise ValueError(f"teacher logits shape {tuple(logits.shape)} of batch {number} does not match its "
                             f"token ids shape {tuple(ids.shape)} + (V,)")
        V, k = logits.shape[-1], self.index["k"]
        if self.index["vocab_size"] is None:
            if k > V:
                raise ValueError(f"k={k} exceeds the teacher's vocabulary size V={V}")
            self.index["vocab_size"] = V
        elif V != self.index["vocab_size"]:
            raise ValueError(f"the teacher's vocabulary size is {V} in batch {number} but the cache has "
                             f"vocab_size {self.index['vocab_size']}")
        logprobs, indices, tail = teacher_topk(logits, k, self.index["temperature"])
        if not bool(torch.isfinite(logprobs[:, 0]).all()):
            raise ValueError(f"the teacher's logits of batch {number} have a row with NaN or no finite entry")
        rows = TopKRows(ids.reshape(-1).to("cpu", TOKEN_DTYPE), indices.to("cpu", INDEX_DTYPE),
                        logprobs.to("cpu", self.logprob_dtype), tail.to("cpu", TAIL_DTYPE))
        self.pending.append((rows, list(ids.shape)))
        self.pending_rows += ids.numel()

    def _write_shard(self) -> None:
        rows, shapes = zip(*self.pending)
        tensors = {name: torch.cat(parts) for name, parts in zip(TopKRows._fields, zip(*rows))}
        data = safetensors_bytes(tensors, metadata=SHARD_METADATA)
        name = shard_file_name(len(self.index["shards"]))
        atomic_write(self.out_dir / name, data)
        rows = tensors["token_ids"].numel()
        self.index["shards"].append({
            "file": name, "rows": rows, "batch_shapes": list(shapes), "k": self.index["k"],
            "vocab_size": self.index["vocab_size"], "dtypes": tensor_dtypes(self.logprob_dtype),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "tokens_sha256": tokens_digest(tensors["token_ids"]),
        })
        self.index["num_rows"] += rows
        self.index["num_batches"] += len(shapes)
        atomic_write(self.out_dir / INDEX_FILE, encode_index(self.index))
        self.pending, self.pending_rows = [], 0
        self.rows_this_run += rows
        rate = self.rows_this_run / max(time.monotonic() - self.started, 1e-9)
        self._say(f"wrote {name}: {rows} rows, {len(data) / 2**20:.1f} MiB ({rate:.0f} rows/s this run)")

    def _say(self, message: str) -> None:
        if self.progress:
            print(f"kdfast.llm.cache [{self.out_dir}]: {message}", file=sys.stderr, flush=True)
