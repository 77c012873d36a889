"""Helpers of ``examples/distill_smollm2.py``: a real LLM teacher distilled into a small student.

One module per job: :mod:`.teacher` (find and load SmolLM2-135M-Instruct offline),
:mod:`.corpus` (BBC News text packed into fixed-length token sequences),
:mod:`.student` (the small Llama-style student), :mod:`.lm_heads` (a causal LM
split into hidden states and LM-head weight), :mod:`.teacher_targets` (the
teacher's hidden states and top-k cache, computed once), :mod:`.objectives`
(the training losses compared), :mod:`.training` (the loop),
:mod:`.evaluation` (held-out perplexity) and :mod:`.loss_benchmark` (one loss
step: fused linear vs eager, time and memory).
"""
