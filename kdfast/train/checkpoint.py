"""Atomic, checksummed, safely loadable training checkpoints, and the random-number state they carry.

A checkpoint file is a fixed-size header (magic, payload length, sha256 of the
payload) followed by the payload, a ``torch.save`` archive.  It is written to
a temporary file in the target directory, flushed and fsynced, then
``os.replace``d over the old one (and the directory entry is fsynced): a run
killed at any moment leaves either the previous or the new checkpoint, never
a torn one.  At load the length and sha256 are checked before anything is
unpickled, so a flipped byte, a truncated, empty or foreign file is a
:class:`CheckpointCorruptedError` naming the file, never a silently different
run.  Checkpoints hold tensors and plain Python types only, so they load with
``torch.load(weights_only=True)``: no arbitrary object is unpickled.  The
random states (torch CPU and CUDA generators, Python's ``random``, numpy's
global generator) are stored as tensors.

``Distiller.fit`` keeps two: ``last.pt`` and, renamed from it before a new
one is written, ``previous.pt``; :func:`load_latest_checkpoint` falls back to
the second when the first is damaged.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import reprlib
import warnings
from typing import Any, Dict, Optional, Tuple

import torch

from ..atomic_files import replace_atomically

CHECKPOINT_NAME = "last.pt"
PREVIOUS_CHECKPOINT_NAME = "previous.pt"
FORMAT_VERSION = 1

# Fixed width, so that it is written as a placeholder first and filled in once
# the payload has streamed through the hash (no second copy in memory).
_HEADER = re.compile(rb"kdfast-checkpoint 1\nbytes=([0-9]{20}) sha256=([0-9a-f]{64})\n")
_HEADER_SIZE = len(b"kdfast-checkpoint 1\nbytes=") + 20 + len(b" sha256=") + 64 + 1
_MAGIC = b"kdfast-checkpoint "
# What torch.save writes first: a checkpoint of a kdfast that wrote no header.
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointCorruptedError(ValueError):
    """A checkpoint that is damaged (flipped bytes, truncated, empty, garbage) or holds no valid state.

    The message names the file and what is wrong with it.
    """


def save_checkpoint(state: Dict[str, Any], path, previous=None) -> str:
    """Write ``state`` to ``path`` atomically, with the sha256 of its payload in a header; return the path.

    ``previous``: where to keep the checkpoint now at ``path`` (renamed there
    before the new one is written), so that a good checkpoint remains if the
    new one is later damaged.  A crash between the rename and the write leaves
    only ``previous``, which :func:`load_latest_checkpoint` then uses.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if previous is not None and os.path.exists(path):
        os.replace(path, os.fspath(previous))
    replace_atomically(path, lambda f: _write(state, f))
    return path


def load_checkpoint(path, map_location: Optional[torch.device] = None) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`: length and sha256 checked, then ``weights_only=True``.

    A file without the header (written by a kdfast before checksums) loads
    with a warning that nothing vouches for its bytes.

    Raises:
        CheckpointCorruptedError: the file is empty, truncated, altered, not a
            checkpoint, or not loadable with ``weights_only=True``.
        FileNotFoundError: there is no file at ``path``.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(_HEADER_SIZE)
        if head.startswith(_ZIP_MAGIC):
            warnings.warn(f"{path} has no checksum (written by an older kdfast): it is loaded unverified; "
                          f"the next checkpoint written will have one", stacklevel=2)
            state = _torch_load(f, 0, size, path)
        else:
            length = _check_payload(f, head, size, path)
            state = _torch_load(f, _HEADER_SIZE, length, path)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointCorruptedError(f"{path} is not a kdfast.train checkpoint of format {FORMAT_VERSION}")
    if map_location is not None:
        _move_tensors(state, torch.device(map_location))
    return state


def load_latest_checkpoint(directory, map_location: Optional[torch.device] = None
                           ) -> Optional[Tuple[Dict[str, Any], str]]:
    """The newest good training checkpoint in ``directory`` as ``(state, path)``, or None when there is none.

    ``last.pt`` is tried first, then ``previous.pt``; each is loaded with
    :func:`load_checkpoint` and checked with :func:`check_training_state`.
    When ``last.pt`` is damaged or missing the older one is used, with a
    warning naming the damaged file.

    Raises:
        CheckpointCorruptedError: checkpoints exist but none is good (each is named, with what is wrong).
    """
    last, previous = (os.path.join(os.fspath(directory), name) for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME))
    if not os.path.exists(last) and not os.path.exists(previous):
        return None
    problems = []
    for path in (last, previous):
        if not os.path.exists(path):
            problems.append(f"{path} is missing")
            continue
        try:
            state = load_checkpoint(path, map_location)
            check_training_state(state, path)
        except CheckpointCorruptedError as e:
            problems.append(str(e))
            continue
        if problems:
            warnings.warn(f"{problems[0]}; resuming from the previous checkpoint {path} (epoch {state['epoch']})",
                          stacklevel=2)
        return state, path
    raise CheckpointCorruptedError("no good checkpoint to resume from: " + "; ".join(problems))


def check_training_state(state: Dict[str, Any], path) -> None:
    """Check that ``state`` has the entries and types of ``Distiller.state_dict``; ``path`` names it in errors.

    Run before the Distiller takes anything from it: a bad state would
    otherwise fail half-restored, with a KeyError or TypeError naming no file.

    Raises:
        CheckpointCorruptedError: a missing entry, a wrong type or an impossible value (naming the entry).
    """
    def expect(ok, field, what, value):
        if not ok:
            raise CheckpointCorruptedError(f"{path}: '{field}' must be {what}, got {reprlib.repr(value)}")

    if not isinstance(state, dict):
        raise CheckpointCorruptedError(f"{path} holds a {type(state).__name__}, not a training state (a dict)")
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise CheckpointCorruptedError(f"{path} is not a training checkpoint: it lacks the entries {missing}")
    for key in ("epoch", "step"):
        expect(_is_int(state[key]), key, "an int >= 0", state[key])
    students = state["students"]
    expect(isinstance(students, list) and students, "students", "a non-empty list of state dicts", students)
    for i, student in enumerate(students):
        expect(_is_state_dict(student), f"students[{i}]", "a state dict (names to tensors)", student)
    optimizer = state["optimizer"]
    expect(isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
           and isinstance(optimizer.get("param_groups"), list), "optimizer",
           "an optimizer state dict ('state', 'param_groups')", optimizer)
    for key in ("scheduler", "scaler"):
        expect(state[key] is None or isinstance(state[key], dict), key, "None or a dict", state[key])
    expect(isinstance(state["teacher_signal"], dict), "teacher_signal", "a dict", state["teacher_signal"])
    rng = state["rng"]
    expect(isinstance(rng, list) and rng, "rng", "a non-empty list (one state per rank)", rng)
    for i, rank in enumerate(rng):
        expect(_is_rng_state(rank), f"rng[{i}]", "a random state of capture_rng_state()", rank)
    data = state["data"]
    expect(isinstance(data, dict) and (data.get("sampler_seed") is None or _is_int(data["sampler_seed"]))
           and _is_int(data.get("world_size"), 1), "data", "{'sampler_seed': None or int, 'world_size': int >= 1}",
           data)


_STATE_KEYS = ("format", "epoch", "step", "students", "optimizer", "scheduler", "scaler", "teacher_signal", "rng",
               "data")


def _is_int(value, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_state_dict(value) -> bool:
    # A module's get_extra_state() may return any (weights_only-loadable) value.
    return isinstance(value, dict) and all(
        isinstance(k, str) and (isinstance(v, torch.Tensor) or k.endswith("_extra_state")) for k, v in value.items())


def _is_rng_state(state) -> bool:
    """Whether ``state`` has the shape of :func:`capture_rng_state`'s (what :func:`restore_rng_state` reads)."""
    return (isinstance(state, dict) and isinstance(state.get("torch"), torch.Tensor)
            and state["torch"].dtype == torch.uint8
            and isinstance(state.get("cuda"), list) and all(isinstance(s, torch.Tensor) for s in state["cuda"])
            and _is_python_rng_state(state.get("python"))
            and ("numpy" not in state or _is_numpy_rng_state(state["numpy"])))


def _is_python_rng_state(py) -> bool:
    return (isinstance(py, dict) and _is_int(py.get("version")) and isinstance(py.get("state"), torch.Tensor)
            and py["state"].dim() == 1 and (py.get("gauss") is None or isinstance(py["gauss"], float)))


def _is_numpy_rng_state(np_state) -> bool:
    return (isinstance(np_state, dict) and isinstance(np_state.get("kind"), str)
            and isinstance(np_state.get("keys"), torch.Tensor) and _is_int(np_state.get("pos"))
            and _is_int(np_state.get("has_gauss")) and isinstance(np_state.get("cached_gaussian"), float))


# ------------------------------------------------------------------ the file
def _write(state: Dict[str, Any], f) -> None:
    f.write(bytes(_HEADER_SIZE))
    payload = _HashingWriter(f)
    torch.save(state, payload)
    f.seek(0)
    f.write(b"kdfast-checkpoint 1\nbytes=%020d sha256=%s\n" % (payload.size, payload.sha256.hexdigest().encode()))


def _check_payload(f, head: bytes, size: int, path: str) -> int:
    """Check the header read as ``head`` and the payload after it (``f`` is past the header); its length."""
    if size == 0:
        raise CheckpointCorruptedError(f"{path} is empty")
    match = _HEADER.fullmatch(head)
    if match is None:
        what = ("its header is damaged or cut short" if head.startswith(_MAGIC)
                else "it starts with neither a kdfast checkpoint header nor a torch.save archive")
        raise CheckpointCorruptedError(f"{path} is not a readable kdfast.train checkpoint: {what}")
    length, digest = int(match.group(1)), match.group(2).decode()
    if size - _HEADER_SIZE != length:
        how = "truncated" if size - _HEADER_SIZE < length else "grown"
        raise CheckpointCorruptedError(f"{path} is {how}: its payload has {size - _HEADER_SIZE} bytes, "
                                       f"its header says {length}")
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    if h.hexdigest() != digest:
        raise CheckpointCorruptedError(f"{path} is damaged: its payload has sha256 {h.hexdigest()}, its header "
                                       f"says {digest}")
    return length


def _torch_load(f, offset: int, length: int, path: str) -> Any:
    """``torch.load(weights_only=True)`` of the ``length`` bytes at ``offset`` of ``f``, onto the CPU.

    Onto the CPU so that every failure here is the file's: a device error
    (CUDA out of memory) must not pass for corruption and send the caller to
    an older checkpoint.
    """
    try:
        return torch.load(_Window(f, offset, length), map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load's errors on bad bytes are of every kind: RuntimeError, EOFError, OSError...
        first_line = (str(e).splitlines() or [""])[0]
        raise CheckpointCorruptedError(f"{path} cannot be loaded safely ({type(e).__name__}: {first_line})") from None


def _move_tensors(obj, device: torch.device):
    """Move the tensors of nested dicts and lists to ``device`` in place (keeping their types and attributes)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _move_tensors(value, device)
    elif isinstance(obj, list):
        obj[:] = [_move_tensors(value, device) for value in obj]
    elif isinstance(obj, tuple):  # plain tuples only: weights_only loads no namedtuple
        return tuple(_move_tensors(value, device) for value in obj)
    return obj


class _HashingWriter:
    """The write end torch.save streams into: passes bytes on to ``f``, counting and hashing them."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class _Window(io.RawIOBase):
    """The ``length`` bytes of ``f`` from ``offset``, as a file of their own (torch.load seeks absolutely)."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self.f, self.offset, self.length, self.position = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, base + position)
        return self.position

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.position))
        self.f.seek(self.offset + self.position)
        got = self.f.readinto(memoryview(buffer).cast("B")[:n])
        self.position += got
        return got


# ------------------------------------------------------------------ random states
def seed_everything(seed: int) -> None:
    """Seed every global generator a training loop draws from: torch (CPU and CUDA), ``random``, numpy."""
    random.seed(seed)
    torch.manual_seed(seed)  # seeds the CUDA generators too
    np = _numpy()
    if np is not None:
        np.random.seed(seed % 2**32)


def capture_rng_state() -> Dict[str, Any]:
    """Every global random state a training loop draws from, as tensors and plain types."""
    version, mt_state, gauss = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
    }
    np = _numpy()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"]:
        if not torch.cuda.is_available():
            raise RuntimeError("the checkpoint holds CUDA random states but CUDA is not available")
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np = _numpy()
    if np is not None and "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))


def _numpy():
    try:
        import numpy
    except ImportError:  # numpy is optional for torch; then nothing draws from it
        return None
    return numpy
