"""Top-k teacher caches: run a teacher once, distill from its stored top-k log-probabilities many times.

>>> from kdfast.llm.cache import write_topk_cache, TopKCache
>>> write_topk_cache(teacher, loader, "cache/", k=64)              # resumable; safetensors + JSON
>>> cache = TopKCache("cache/")                                    # verifies sizes and sha256
>>> for batch, rows in zip(loader, cache.iter_batches()):
...     loss = kdfast.llm.topk.topk_distill_loss(student(batch), rows.topk_indices, rows.topk_logprobs,
...                                          tail="bucket", tail_logprobs=rows.tail_logprobs)

From a model and text in one go (``kdfast cache build`` on the command line)::

>>> from kdfast.llm.cache import build_topk_cache, TopKCacheDataset
>>> build_topk_cache("models/teacher", "corpus.jsonl", "cache/", seq_len=512, k=64)   # resumable
>>> dataset = TopKCacheDataset("cache/")          # example i = packed sequence i, tokens + cached rows

The format (``_format``) is safetensors shards plus a JSON index: nothing is
unpickled, so a cache from elsewhere is data, never code.
"""

from ._format import CacheCorruptedError, TopKRows
from .build import BuildResult, CacheBuildError, LoadedTeacher, build_topk_cache, load_teacher
from .dataset import TopKCacheDataset
from .reader import TopKCache
from .writer import DEFAULT_TOKENS_PER_SHARD, teacher_topk, write_topk_cache

__all__ = ["BuildResult", "CacheBuildError", "CacheCorruptedError", "DEFAULT_TOKENS_PER_SHARD", "LoadedTeacher",
           "TopKCache", "TopKCacheDataset", "TopKRows", "build_topk_cache", "load_teacher", "teacher_topk",
           "write_topk_cache"]
