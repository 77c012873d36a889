"""Building a top-k teacher cache from a teacher model and text: the library side of ``kdfast cache build``.

>>> from kdfast.llm.cache import build_topk_cache, TopKCacheDataset
>>> result = build_topk_cache("models/teacher", "corpus.jsonl", "cache/", seq_len=512, k=64)
>>> dataset = TopKCacheDataset(result.cache)            # example i = packed sequence i

What it does:

1. **Teacher**: a local Hugging Face model folder (``config.json``, weights and
   tokenizer; read with ``AutoModelForCausalLM`` / ``AutoTokenizer``,
   ``local_files_only=True``) or a ``.gguf`` file (``transformers``' GGUF
   loading, ``gguf_file=``, for the model and its tokenizer; needs ``gguf``).
   Nothing is downloaded.
2. **Data** (:func:`read_documents`): a ``.txt`` file (documents separated by
   one or more blank lines; the lines of a document are joined with
   ``"\\n"``), a ``.jsonl`` file (one JSON object per line, the document
   under ``text_field``, default ``"text"``), or a folder written by
   ``datasets``' ``save_to_disk`` (needs ``pip install datasets``; column
   ``text_field``, split ``split`` of a ``DatasetDict``, default ``"train"``).
3. **Packing** (:func:`pack_documents`): each document is tokenized without
   special tokens and followed by the tokenizer's EOS token; the documents,
   in file order, form one stream cut into sequences of ``seq_len`` tokens
   (a sequence can hold the end of one document and the start of the next:
   plain packing, no attention mask); the tokens after the last whole
   sequence are dropped.  **The example id of a sequence is its index in
   this order**, and row ``id * seq_len ...`` of the cache is its first token.
4. **Teacher pass**: batches of sequences under ``torch.no_grad``, stored by
   :func:`kdfast.llm.cache.write_topk_cache` (top-k log-probabilities, their
   indices, the float32 log of the tail mass, the token ids).

**Settings and refusal.** The cache folder gets a ``build.json`` next to the
cache's own files: the teacher (file name and a fingerprint of its files),
the data (path and sha256 of its bytes), ``seq_len``, ``k``, the dtypes, the
tokenizer (class, a digest of its vocabulary, its EOS id), the text field,
the split and the shard size.  A build into a folder that holds a cache of
other settings or other data is refused (:class:`CacheBuildError`, naming each
difference) before the teacher runs; so is a folder holding a cache that
``kdfast cache build`` did not write.  ``overwrite=True`` starts over instead
(as does any build into a folder whose cache holds no shard yet: nothing
would be lost).
The token ids of every stored shard are checked too (their sha256 is in the
index): a cache built with another tokenizer or packing is refused as well.

**Resume.** The writer lists a shard in the index only once it is on disk, so
an interrupted build (a crash, Ctrl-C, a killed job) re-run with the same
arguments skips the stored sequences without running the teacher and goes
on from there; at most one shard of work (``tokens_per_shard`` tokens) is
redone.  A build limited by ``max_sequences`` is a prefix of the full one: a
later build without the limit (or with a larger one) extends it.  The batch
size may differ between runs (the stored sequences are re-batched as they
were stored; the values are the same up to float rounding of batched
matrix products).
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, List, NamedTuple, Optional, Union

import torch

from ._format import INDEX_FILE, LOGPROB_DTYPES, atomic_write, encode_index, read_index, tokens_digest
from .reader import TopKCache
from .writer import DEFAULT_TOKENS_PER_SHARD, write_topk_cache, writer_lock

__all__ = ["BUILD_FILE", "BuildResult", "CacheBuildError", "LoadedTeacher", "build_topk_cache", "load_teacher",
           "pack_documents", "read_documents"]

BUILD_FILE = "build.json"
BUILD_FORMAT = "kdfast-cache-build"
BUILD_FORMAT_VERSION = 1
# How documents become sequences; a change of this rule must change the name.
PACKING = "eos-after-each-document/no-special-tokens/v1"
TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Documents tokenized per call of the tokenizer.
_TOKENIZE_CHUNK = 256


class CacheBuildError(ValueError):
    """A build that cannot go on: other settings or data than the cache in the folder, unreadable data, ..."""


class LoadedTeacher(NamedTuple):
    """A teacher loaded for a build: the causal LM (eval, frozen), its tokenizer, and what identifies it."""

    model: torch.nn.Module
    tokenizer: object
    name: str            # the file or folder name: recorded in the cache index as its teacher
    path: Path
    fingerprint: str     # sha256 over the teacher's file names, sizes and config (see teacher_fingerprint)
    dtype: str           # "float32", "bfloat16" or "float16"


class BuildResult(NamedTuple):
    """What :func:`build_topk_cache` did."""

    cache: TopKCache
    num_sequences: int       # sequences the cache holds now
    written: int             # sequences the teacher ran on in this call
    resumed_from: int        # sequences already stored when this call began
    seq_len: int
    dropped_tokens: Optional[int]  # tokens after the last whole sequence (None: data read only in part)
    seconds: float           # wall time of the teacher pass of this call

    def summary(self) -> str:
        cache = self.cache
        size = sum(shard["bytes"] for shard in cache.shards) / 2**20
        rate = self.written * self.seq_len / self.seconds if self.seconds > 0 else 0.0
        parts = [f"{cache.path}: {self.num_sequences} sequences x {self.seq_len} tokens "
                 f"(k={cache.k}, V={cache.vocab_size}, {cache.index['logprob_dtype']} log-probs, "
                 f"{len(cache.shards)} shards, {size:.1f} MiB)",
                 f"this run: {self.written} sequences in {self.seconds:.1f} s ({rate:.0f} tokens/s)"]
        if self.resumed_from:
            parts.append(f"resumed after {self.resumed_from}")
        if self.dropped_tokens:
            parts.append(f"{self.dropped_tokens} tokens after the last whole sequence dropped")
        return "; ".join(parts)


# ----------------------------------------------------------------- the build
def build_topk_cache(
    teacher: Union[str, Path, LoadedTeacher],
    data: Union[str, Path],
    out_dir: Union[str, Path],
    *,
    seq_len: int,
    k: int,
    batch_size: int = 8,
    logprob_dtype: str = "float16",
    teacher_dtype: str = "float32",
    device: Union[str, torch.device] = "cpu",
    max_sequences: Optional[int] = None,
    text_field: str = "text",
    split: Optional[str] = None,
    tokens_per_shard: int = DEFAULT_TOKENS_PER_SHARD,
    overwrite: bool = False,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> BuildResult:
    """Run ``teacher`` over the packed sequences of ``data`` and store its top-k rows in ``out_dir`` (resumable).

    Args:
        teacher: a model folder or a ``.gguf`` file (loaded with
            :func:`load_teacher`), or a :class:`LoadedTeacher`.
        data: a ``.txt`` / ``.jsonl`` file or a ``datasets`` ``save_to_disk`` folder (module docstring).
        out_dir: the cache folder (created if needed).
        seq_len: tokens per sequence (>= 1).
        k: top-k entries kept per token (``1 <= k <= V``).
        batch_size: sequences per teacher call.
        logprob_dtype: the stored log-probabilities: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
        teacher_dtype: the dtype the teacher is loaded in (a path ``teacher`` only).
        device: where the teacher runs (a path ``teacher`` only; a loaded one stays where it is).
        max_sequences: store only the first ``max_sequences`` sequences (a later
            call without it extends the cache); None: all.
        text_field: the field of a JSONL line / the column of a ``datasets`` dataset holding the text.
        split: the split of a ``DatasetDict`` folder (default ``"train"``).
        tokens_per_shard: rows per shard (a shard is the unit of resume).
        overwrite: discard a cache already in ``out_dir`` (its own files
            only) instead of resuming it or refusing it.
        progress: a progress bar on stderr (tqdm if installed, else a line now and then).
        log: called with one line of status text per step (default: nothing).

    Returns:
        :class:`BuildResult` (``.cache`` is the :class:`TopKCache`; ``.summary()`` one line of text).

    Raises:
        CacheBuildError: ``out_dir`` holds a cache of other settings or data
            (or one not written by a build), unreadable data, a tokenizer without EOS, ...
        FileNotFoundError: a missing teacher or data path.
        ImportError: ``transformers`` (or ``datasets`` for a folder) is not installed.
    """
    say = log or (lambda message: None)
    seq_len, k, batch_size = (_positive_int(name, value) for name, value in
                              (("seq_len", seq_len), ("k", k), ("batch_size", batch_size)))
    tokens_per_shard = _positive_int("tokens_per_shard", tokens_per_shard)
    if max_sequences is not None:
        max_sequences = _positive_int("max_sequences", max_sequences)
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logprob_dtype must be one of {sorted(LOGPROB_DTYPES)}, got {logprob_dtype!r}")
    if teacher_dtype not in TEACHER_DTYPES:
        raise ValueError(f"teacher_dtype must be one of {sorted(TEACHER_DTYPES)}, got {teacher_dtype!r}")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
    out_dir = Path(out_dir)
    data = Path(data)
    data_format = data_format_of(data)

    if isinstance(teacher, LoadedTeacher):
        teacher_path, teacher_name, fingerprint, teacher_dtype = (
            teacher.path, teacher.name, teacher.fingerprint, teacher.dtype)
    else:
        teacher_path = _teacher_path(Path(teacher))
        teacher_name, fingerprint = teacher_path.resolve().name, teacher_fingerprint(teacher_path)
    say(f"hashing {data}")
    settings = {
        "format_version": BUILD_FORMAT_VERSION, "teacher": teacher_name, "teacher_fingerprint": fingerprint,
        "teacher_dtype": teacher_dtype, "data_format": data_format, "data_sha256": data_digest(data),
        "text_field": None if data_format == "text" else text_field,
        "split": (split or "train") if data_format == "datasets" else None,
        "seq_len": seq_len, "k": k, "logprob_dtype": logprob_dtype, "tokens_per_shard": tokens_per_shard,
        "packing": PACKING,
    }
    info = {"teacher_path": str(teacher_path), "data_path": str(data)}
    # A folder without stored rows has nothing to lose: it is (re)started whatever it records.
    fresh = overwrite or not _holds_rows(out_dir)
    if not fresh:
        _check_recorded(out_dir, settings)  # early: before the teacher is loaded

    if not isinstance(teacher, LoadedTeacher):
        say(f"loading the teacher {teacher_path}")
        teacher = load_teacher(teacher_path, dtype=teacher_dtype, device=device, progress=progress)
    tokenizer = teacher.tokenizer
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise CacheBuildError(f"the tokenizer of {teacher.name} has no EOS token, which packing puts between "
                              f"documents")
    settings.update(tokenizer=f"{type(tokenizer).__name__} of {teacher.name}",
                    tokenizer_sha256=tokenizer_digest(tokenizer), eos_token_id=int(eos))
    if not fresh:
        _check_recorded(out_dir, settings)
    vocab_out = _output_rows(teacher.model)
    if vocab_out is not None and k > vocab_out:
        raise ValueError(f"k={k} exceeds the teacher's vocabulary size V={vocab_out}")

    say(f"reading and tokenizing {data}")
    want_tokens = None if max_sequences is None else max_sequences * seq_len
    sequences, dropped = pack_documents(read_documents(data, text_field=text_field, split=split), tokenizer,
                                        seq_len, max_tokens=want_tokens)
    if max_sequences is not None:
        sequences = sequences[:max_sequences]
    if len(sequences) == 0:
        raise CacheBuildError(f"{data} holds fewer than seq_len={seq_len} tokens: no sequence to build")
    vocab_rows = _embedding_rows(teacher.model)
    if vocab_rows is not None and int(sequences.max()) >= vocab_rows:
        raise CacheBuildError(f"the tokenizer of {teacher.name} gives token id {int(sequences.max())}, but the "
                              f"teacher's embedding has only {vocab_rows} rows")
    say(f"{len(sequences)} sequences of {seq_len} tokens")

    out_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        stored_shapes = []
        with _lock(out_dir):
            _write_build_file(out_dir, settings, info)
    else:
        stored_shapes = _prepare_resume(out_dir, sequences)
    resumed_from = sum(shape[0] for shape in stored_shapes)

    model = teacher.model
    model_device = _model_device(model)
    bar = _Progress(total=len(sequences), initial=resumed_from, enabled=progress)
    counter = {"written": 0}

    def run_teacher(batch: dict) -> torch.Tensor:
        ids = batch["input_ids"].to(model_device)
        logits = model(input_ids=ids, use_cache=False).logits
        counter["written"] += ids.shape[0]
        bar.advance(ids.shape[0])
        return logits

    started = time.monotonic()
    try:
        with _writer_errors():
            cache = write_topk_cache(run_teacher, _batches(sequences, stored_shapes, batch_size), out_dir, k=k,
                                     logprob_dtype=LOGPROB_DTYPES[logprob_dtype], tokens_per_shard=tokens_per_shard,
                                     teacher_name=teacher.name, resume=not fresh, progress=False)
    finally:
        bar.close()
    return BuildResult(cache, len(cache) // seq_len, counter["written"], resumed_from, seq_len,
                       None if max_sequences is not None else dropped, time.monotonic() - started)


def _prepare_resume(out_dir: Path, sequences: torch.Tensor) -> List[list]:
    """The batch shapes already stored in ``out_dir`` (checked against ``sequences``), the index made resumable.

    A cache that holds fewer sequences than wanted but is marked complete (a
    build limited by ``max_sequences``) is marked incomplete again, so that the
    writer goes on after its last shard; one that holds at least as many is
    marked complete (nothing to run).
    """
    with _lock(out_dir):
        index = read_index(out_dir)
        seq_len = sequences.shape[1]
        shapes = [shape for shard in index["shards"] for shape in shard["batch_shapes"]]
        if any(len(shape) != 2 or shape[1] != seq_len for shape in shapes):
            raise CacheBuildError(f"the cache in {out_dir} holds batches of shapes other than (B, {seq_len}): "
                                  f"it was not written by kdfast cache build with seq_len={seq_len}")
        start = 0
        for shard in index["shards"]:
            count = shard["rows"] // seq_len
            if start + count <= len(sequences):
                digest = tokens_digest(sequences[start:start + count])
                if digest != shard["tokens_sha256"]:
                    raise CacheBuildError(
                        f"the cache in {out_dir} was built from other token sequences than these: "
                        f"{shard['file']} (sequences {start} to {start + count - 1}) differs (another "
                        f"tokenizer or data); build into another folder, or pass --overwrite")
            start += count
        stored = start
        complete = stored >= len(sequences)
        if index["complete"] != complete:
            index["complete"] = complete
            atomic_write(out_dir / INDEX_FILE, encode_index(index))
    return shapes


def _holds_rows(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a cache index that lists at least one shard."""
    return (out_dir / INDEX_FILE).exists() and bool(read_index(out_dir)["shards"])


@contextlib.contextmanager
def _writer_errors():
    """The writer's "another writer holds the lock" RuntimeError as a CacheBuildError (a message for the user)."""
    try:
        yield
    except RuntimeError as e:
        if "another writer" in str(e):
            raise CacheBuildError(str(e)) from None
        raise


@contextlib.contextmanager
def _lock(out_dir: Path):
    """The writer's lock on ``out_dir`` (released before the writer takes it itself)."""
    with _writer_errors(), writer_lock(out_dir):
        yield


def _batches(sequences: torch.Tensor, stored_shapes: List[list], batch_size: int) -> Iterator[dict]:
    """The stored sequences in their stored batch shapes (the writer checks their tokens), then ``batch_size`` each."""
    start = 0
    for shape in stored_shapes:
        if start >= len(sequences):
            return
        yield {"input_ids": sequences[start:start + shape[0]]}
        start += shape[0]
    for start in range(start, len(sequences), batch_size):
        yield {"input_ids": sequences[start:start + batch_size]}


# ----------------------------------------------------------------- settings on disk
def _check_recorded(out_dir: Path, settings: dict) -> None:
    """Refuse a cache in ``out_dir`` of other settings (those of ``settings`` present), or not from a build."""
    record = out_dir / BUILD_FILE
    if not record.exists():
        if (out_dir / INDEX_FILE).exists():
            raise CacheBuildError(f"{out_dir} holds a top-k cache that kdfast cache build did not write (no "
                                  f"{BUILD_FILE}): build into another folder, or pass --overwrite to replace it")
        return
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
        if recorded.get("format") != BUILD_FORMAT:
            raise ValueError(f"its 'format' is {recorded.get('format')!r}")
        old = recorded["settings"]
        if not isinstance(old, dict):
            raise ValueError("its 'settings' is not an object")
    except (ValueError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise CacheBuildError(f"{record} is not a {BUILD_FORMAT} record ({e}): build into another folder, or "
                              f"pass --overwrite") from None
    differ = [f"{key}: the cache has {_short(old.get(key))}, this build {_short(value)}"
              for key, value in settings.items() if old.get(key) != value]
    if differ:
        what = "other data" if any(d.startswith(("data_sha256", "data_format")) for d in differ) else "other settings"
        raw = recorded.get("info", {}) if isinstance(recorded.get("info"), dict) else {}
        origin = f" (built from {raw.get('data_path')} with the teacher {raw.get('teacher_path')})" \
            if raw.get("data_path") else ""
        raise CacheBuildError(f"the cache in {out_dir} was built from {what}{origin}; it differs in "
                              f"{'; '.join(differ)}. Build into another folder, pass the original settings to "
                              f"resume it, or pass --overwrite to replace it")


def _short(value) -> str:
    """A setting for a message: digests cut to 12 hex digits."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return repr(value[:12] + "...")
    return repr(value)


def _write_build_file(out_dir: Path, settings: dict, info: dict) -> None:
    from ... import __version__

    record = {"format": BUILD_FORMAT, "settings": settings,
              "info": dict(info, kdfast_version=__version__,
                           created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))}
    atomic_write(out_dir / BUILD_FILE, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def read_build_record(out_dir: Union[str, Path]) -> dict:
    """The parsed ``build.json`` of a cache written by a build (settings and info)."""
    return json.loads((Path(out_dir) / BUILD_FILE).read_text(encoding="utf-8"))


# ----------------------------------------------------------------- the teacher
def _teacher_path(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"the teacher {path} does not exist (a local model folder or a .gguf file)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CacheBuildError(f"the teacher folder {path} has no config.json: it must be a model saved with "
                                  f"save_pretrained (config, weights and tokenizer)")
        return path
    if path.suffix.lower() != ".gguf":
        raise CacheBuildError(f"the teacher {path} is neither a model folder nor a .gguf file")
    return path


def teacher_fingerprint(path: Path) -> str:
    """sha256 over what identifies a teacher without reading its weights.

    A folder: the names and sizes of its weight files (``*.safetensors``,
    ``*.bin``, ``*.pt``, ``*.pth``) and the bytes of its ``config.json`` (the
    tokenizer is checked on its own); a GGUF file: its size and its first
    MiB (the header and metadata).  Cheap for a model of any size; a retrained model of the same
    shape saved under the same name is not told apart (the cache's token
    digests and the data digest are the checks that matter).
    """
    h = hashlib.sha256()
    if path.is_dir():
        for entry in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
            h.update(f"{entry.name}\0{entry.stat().st_size}\n".encode())
        h.update((path / "config.json").read_bytes())
    else:
        h.update(f"{path.stat().st_size}\n".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()


def load_teacher(path: Union[str, Path], dtype: str = "float32", device: Union[str, torch.device] = "cpu",
                 progress: bool = True) -> LoadedTeacher:
    """Load a teacher for a build: a model folder or a ``.gguf`` file, offline, frozen, in eval mode on ``device``.

    ``progress=False`` silences transformers' own progress bars while it loads.
    """
    path = _teacher_path(Path(path))
    if dtype not in TEACHER_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(TEACHER_DTYPES)}, got {dtype!r}")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ImportError(f"kdfast cache build needs transformers (pip install 'kdfast[hf]'): {e}") from None
    if path.is_dir():
        where, extra = path, {}
    else:
        where, extra = path.parent, {"gguf_file": path.name}
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
        model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, dtype=TEACHER_DTYPES[dtype],
                                                     **extra)
    except OSError as e:
        raise CacheBuildError(f"cannot load the teacher {path}: {e}") from None
    finally:
        if bars_were_on and not progress:
            hf_logging.enable_progress_bar()
    model.eval().requires_grad_(False)
    model.to(device)
    return LoadedTeacher(model, tokenizer, path.resolve().name, path, teacher_fingerprint(path), dtype)


def tokenizer_digest(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary (token -> id) and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    special = sorted((str(name), str(value)) for name, value in getattr(tokenizer, "special_tokens_map", {}).items())
    return hashlib.sha256(json.dumps([vocab, special], ensure_ascii=False).encode("utf-8")).hexdigest()


def _embedding_rows(model) -> Optional[int]:
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, TypeError):
        return None


def _output_rows(model) -> Optional[int]:
    """The teacher's logits width: its LM head's rows (else ``config.vocab_size``; None if neither is known)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# ----------------------------------------------------------------- the data
def data_format_of(path: Path) -> str:
    """``"text"``, ``"jsonl"`` or ``"datasets"`` (a folder), by the path's suffix; CacheBuildError otherwise."""
    if not path.exists():
        raise FileNotFoundError(f"the data {path} does not exist")
    if path.is_dir():
        return "datasets"
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise CacheBuildError(f"cannot tell the format of {path}: expected a text file ({', '.join(TEXT_SUFFIXES)}), a "
                          f"JSON-lines file ({', '.join(JSONL_SUFFIXES)}) or a datasets save_to_disk folder")


def data_digest(path: Path) -> str:
    """sha256 of a data file's bytes; of a folder: of its files' relative paths and bytes, in sorted order."""
    h = hashlib.sha256()
    if path.is_dir():
        for entry in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{entry.relative_to(path).as_posix()}\0{entry.stat().st_size}\0".encode())
            _hash_file(h, entry)
    else:
        _hash_file(h, path)
    return h.hexdigest()


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def read_documents(path: Union[str, Path], *, text_field: str = "text", split: Optional[str] = None) -> Iterator[str]:
    """The documents of ``path``, in order (formats: the module docstring); empty documents are skipped."""
    path = Path(path)
    data_format = data_format_of(path)
    if data_format == "text":
        return _text_documents(path)
    if data_format == "jsonl":
        return _jsonl_documents(path, text_field)
    return _datasets_documents(path, text_field, split)


def _text_documents(path: Path) -> Iterator[str]:
    lines: List[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line.strip():
                lines.append(line)
            elif lines:
                yield "\n".join(lines)
                lines = []
    if lines:
        yield "\n".join(lines)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CacheBuildError(f"{path}, line {number}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise CacheBuildError(f"{path}, line {number}: no field {text_field!r} (pass --text-field to name "
                                      f"the field that holds the text)")
            text = record[text_field]
            if not isinstance(text, str):
                raise CacheBuildError(f"{path}, line {number}: the field {text_field!r} is "
                                      f"{type(text).__name__}, not a string")
            if text:
                yield text


def _datasets_documents(path: Path, text_field: str, split: Optional[str]) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path} is a folder, read as a Hugging Face datasets save_to_disk folder, which needs "
                          f"the datasets package: pip install datasets (or pass a .txt or .jsonl file)") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise CacheBuildError(f"{path} is not a datasets save_to_disk folder ({e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise CacheBuildError(f"the DatasetDict in {path} has no split {name!r} (it has {sorted(loaded)}): "
                                  f"pass --split")
        loaded = loaded[name]
    if text_field not in loaded.column_names:
        raise CacheBuildError(f"the dataset in {path} has no column {text_field!r} (it has {loaded.column_names}): "
                              f"pass --text-field")
    for batch in loaded.iter(batch_size=1000):
        for text in batch[text_field]:
            if not isinstance(text, str):
                raise CacheBuildError(f"the column {text_field!r} of {path} holds {type(text).__name__}, not strings")
            if text:
                yield text


def pack_documents(documents, tokenizer, seq_len: int, *, max_tokens: Optional[int] = None):
    """Tokenize ``documents`` (no special tokens), put EOS after each, cut the stream into ``seq_len`` tokens.

    Returns ``(sequences (S, seq_len) int64, dropped)``: ``dropped`` is the
    number of tokens after the last whole sequence.  With ``max_tokens``,
    reading stops once that many tokens are in hand (then ``dropped`` counts
    only the tokens read).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CacheBuildError("the tokenizer has no EOS token, which packing puts between documents")
    stream = array.array("q")
    chunk: List[str] = []

    def flush() -> None:
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
        chunk.clear()

    for document in documents:
        chunk.append(document)
        if len(chunk) >= _TOKENIZE_CHUNK:
            flush()
            if max_tokens is not None and len(stream) >= max_tokens:
                break
    if chunk:
        flush()
    # frombuffer shares the array's memory (and refuses an empty buffer): a copy owns its own.
    stream = torch.frombuffer(stream, dtype=torch.int64).clone() if stream else torch.empty(0, dtype=torch.int64)
    count = len(stream) // seq_len
    return stream[:count * seq_len].reshape(count, seq_len), len(stream) - count * seq_len


# ----------------------------------------------------------------- progress
class _Progress:
    """A tqdm bar of sequences on stderr if tqdm is installed, else a plain line every 10 s or 10 %."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.done, self.enabled = total, initial, enabled
        self._bar = None
        self._last_time, self._last_done = time.monotonic(), initial
        self._started = time.monotonic()
        if not enabled or initial >= total:
            self.enabled = False
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            print(f"kdfast cache build: {initial}/{total} sequences", file=sys.stderr, flush=True)
            return
        self._bar = tqdm(total=total, initial=initial, unit="seq", desc="kdfast cache build", dynamic_ncols=True,
                         file=sys.stderr)

    def advance(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_time >= 10 or self.done - self._last_done >= max(1, self.total // 10) \
                or self.done >= self.total:
            rate = (self.done - self._last_done) / max(now - self._last_time, 1e-9)
            print(f"kdfast cache build: {self.done}/{self.total} sequences ({100 * self.done / self.total:.0f} %, "
                  f"{rate:.1f} sequences/s)", file=sys.stderr, flush=True)
            self._last_time, self._last_done = now, self.done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {name}={value}")
    return value
