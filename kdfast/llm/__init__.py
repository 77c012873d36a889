"""Large-vocabulary LLM distillation: the pieces that never hold ``(tokens, vocab)`` logits at once.

:mod:`.fused_linear` (linear head + loss, chunked through :mod:`.chunking`),
:mod:`.topk` (losses against a sparse top-k teacher), :mod:`.cache` (the top-k
teacher cache on disk), :mod:`.vocab_parallel` (vocabulary-sharded logits
over ``torch.distributed``), and generation-based distillation of Hugging Face
causal LMs: :mod:`.sampling` (temperature / top-p draws, the top-K test),
:mod:`.generation` (on-policy and speculative sampling with KV caches) and
:mod:`.onpolicy` (:class:`OnPolicyDistiller`: the lambda mix of generated and
dataset completions, the loss on the fused linear path).
"""

from .generation import Generation, generate, position_ids_from_mask, speculative_generate
from .onpolicy import DistillBatch, OnPolicyDistiller, generated_batch, teacher_forced_batch
from .sampling import in_top_k, sample_tokens, sampling_probs

__all__ = [
    "DistillBatch",
    "Generation",
    "OnPolicyDistiller",
    "generate",
    "generated_batch",
    "in_top_k",
    "position_ids_from_mask",
    "sample_tokens",
    "sampling_probs",
    "speculative_generate",
    "teacher_forced_batch",
]
