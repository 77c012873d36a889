"""Top-k teacher caches: run a teacher once, distill from its stored top-k log-probabilities many times.

>>> from kdfast.llm.cache import write_topk_cache, TopKCache
>>> write_topk_cache(teacher, loader, "cache/", k=64)              # resumable; safetensors + JSON
>>> cache = TopKCache("cache/")                                    # verifies sizes and sha256
>>> for batch, rows in zip(loader, cache.iter_batches()):
...     loss = kdfast.llm.topk.topk_distill_loss(student(batch), rows.topk_indices, rows.topk_logprobs,
...                                          tail="bucket", tail_logprobs=rows.tail_logprobs)

The format (``_format``) is safetensors shards plus a JSON index: nothing is
unpickled, so a cache from elsewhere is data, never code.
"""

from ._format import CacheCorruptedError, TopKRows
from .reader import TopKCache
from .writer import DEFAULT_TOKENS_PER_SHARD, teacher_topk, write_topk_cache

__all__ = ["CacheCorruptedError", "DEFAULT_TOKENS_PER_SHARD", "TopKCache", "TopKRows", "teacher_topk",
           "write_topk_cache"]
