"""kdfast with the training libraries people already use.

* :mod:`kdfast.integrations.transformers`: ``DistillationTrainer`` (a
  ``transformers.Trainer`` on kdfast's fused linear loss), ``DistillationConfig``
  and ``TopKCacheDataset`` (offline distillation from a top-k teacher cache).
  Needs ``pip install kdfast[hf]``.
* :mod:`kdfast.integrations.heads`: ``split_causal_lm``, the trunk and LM head of
  a causal LM (no dependency beyond torch).

Importing this package imports neither transformers nor accelerate; the
names of :mod:`.transformers` load it on first use.
"""

from __future__ import annotations

import importlib

from .heads import CausalLMParts, UnsplittableModelError, split_causal_lm

_TRANSFORMERS_NAMES = ("DistillationConfig", "DistillationTrainer", "TopKCacheDataset")

__all__ = ["CausalLMParts", "UnsplittableModelError", "split_causal_lm", *_TRANSFORMERS_NAMES]


def __getattr__(name: str):
    if name in _TRANSFORMERS_NAMES:
        return getattr(importlib.import_module(".transformers", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
