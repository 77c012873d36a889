"""Helpers of ``examples/distill_smollm2.py``: a real LLM teacher distilled into a small student.

One module per job: :mod:`.teacher` (find and load SmolLM2-135M-Instruct offline),
:mod:`.corpus` (BBC News text packed into fixed-length token sequences),
:mod:`.student` (the small Llama-style student), :mod:`.lm_heads` (a causal LM
split into hidden states and LM-head weight), :mod:`.teacher_targets` (the
teacher's hidden states and top-k cache, computed once), :mod:`.objectives`
(the training losses compared), :mod:`.training` (the loop),
:mod:`.evaluation` (held-out perplexity) and :mod:`.loss_benchmark` (one loss
step: fused linear vs eager, time and memory).

The two studies built on them (``examples/distill_smollm2_onpolicy.py`` and
``examples/distill_smollm2_transfer.py``) add :mod:`.onpolicy_study`
(teacher-forced / on-policy / speculative KD through
``kdfast.llm.OnPolicyDistiller``), :mod:`.generation_quality` (the teacher's
log-likelihood of a student's samples), :mod:`.generic_corpus` (the English
Wikipedia sample inside ``gensim``, the generic transfer set),
:mod:`.classification` (the downstream BBC News topic task), :mod:`.runs`
(per-condition result files, for resuming) and :mod:`.summary` (means,
ranges and paired differences over seeds).
"""
