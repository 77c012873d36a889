"""Resumable long runs: one result file per finished condition, reused when its settings match.

A study (``examples/distill_smollm2_onpolicy.py``, ``examples/distill_smollm2_transfer.py``)
is a list of conditions (a method or a transfer set, at one seed).  Each
finished condition is written at once, atomically, as ``<work_dir>/<key>.json``
together with the fingerprint of everything its result depends on (the
settings, not the output paths).  A rerun of the same command skips every
condition whose file holds the same fingerprint, so an interrupted run resumes
where it stopped; a changed setting recomputes.  Intermediate tensors (a
warm-start checkpoint, the teacher's hidden states) are kept the same way as
``<key>.pt``.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Callable, Optional

import torch

from kdfast.atomic_files import replace_atomically


def fingerprint(settings: dict) -> str:
    """A short hash of ``settings`` (JSON-serialisable, key order irrelevant)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RunStore:
    """The per-condition results of one study in ``work_dir``."""

    def __init__(self, work_dir: Path, log: Callable[[str], None] = print):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.reused: list = []
        self.computed: list = []

    def _json_path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad condition key {key!r}")
        return self.work_dir / f"{key}.json"

    def load(self, key: str, settings_hash: str) -> Optional[dict]:
        """The stored result of ``key`` if it was computed with ``settings_hash``, else None."""
        path = self._json_path(key)
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        if stored.get("fingerprint") != settings_hash:
            self.log(f"[{key}] stored result has other settings: recomputing")
            return None
        return stored["result"]

    def save(self, key: str, settings_hash: str, result: dict) -> None:
        payload = json.dumps({"fingerprint": settings_hash, "result": result}, indent=1) + "\n"
        replace_atomically(self._json_path(key), lambda f: f.write(payload.encode()))

    def get_or_run(self, key: str, settings: dict, compute: Callable[[], dict]) -> dict:
        """The result of ``key``: stored (same settings) or ``compute()``d and stored."""
        settings_hash = fingerprint(settings)
        stored = self.load(key, settings_hash)
        if stored is not None:
            self.log(f"[{key}] done before: reusing {self._json_path(key)}")
            self.reused.append(key)
            return stored
        result = compute()
        self.save(key, settings_hash, result)
        self.computed.append(key)
        return result

    def tensors(self, key: str, settings: dict, compute: Callable[[], dict]) -> dict:
        """A dict of tensors: stored in ``<key>.pt`` (same settings) or ``compute()``d and stored."""
        path = self._json_path(key).with_suffix(".pt")
        settings_hash = fingerprint(settings)
        if path.is_file():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored.get("fingerprint") == settings_hash:
                self.log(f"[{key}] reusing {path}")
                return stored["tensors"]
        tensors = compute()
        buffer = io.BytesIO()
        torch.save({"fingerprint": settings_hash, "tensors": tensors}, buffer)
        replace_atomically(path, lambda f: f.write(buffer.getvalue()))
        return tensors
