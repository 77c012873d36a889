"""Large-vocabulary LLM distillation: the pieces that never hold ``(tokens, vocab)`` logits at once.

:mod:`.fused_linear` (linear head + loss, chunked through :mod:`.chunking`),
:mod:`.topk` (losses against a sparse top-k teacher), :mod:`.cache` (the top-k
teacher cache on disk) and :mod:`.vocab_parallel` (vocabulary-sharded logits
over ``torch.distributed``).
"""
