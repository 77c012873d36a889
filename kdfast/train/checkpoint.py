"""Atomic, safely loadable training checkpoints, and the random-number state they carry.

A checkpoint is written to a temporary file in the target directory, flushed
and fsynced, then ``os.replace``d over the old one (and the directory entry is
fsynced): a run killed at any moment leaves either the previous or the new
checkpoint, never a torn one.  Checkpoints hold tensors and plain Python types
only, so they load with ``torch.load(weights_only=True)``: nothing is
unpickled.  The random states (torch CPU and CUDA generators, Python's
``random``, numpy's global generator) are stored as tensors.
"""

from __future__ import annotations

import os
import random
from typing import Any, Dict, Optional

import torch

from .._atomic import replace_atomically

CHECKPOINT_NAME = "last.pt"
FORMAT_VERSION = 1


def save_checkpoint(state: Dict[str, Any], path) -> str:
    """Write ``state`` to ``path`` atomically (temporary file + fsync + ``os.replace``); return the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    replace_atomically(path, lambda f: torch.save(state, f))
    return path


def load_checkpoint(path, map_location: Optional[torch.device] = None) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``."""
    state = torch.load(os.fspath(path), map_location=map_location or "cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a kdfast.train checkpoint of format {FORMAT_VERSION}")
    return state


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
