"""kdfast.llm generation-based distillation: sampling, speculative interleaved sampling, the on-policy training step.

The models are tiny randomly initialised LlamaForCausalLM (hidden 32 and 48, 2
layers, vocabulary 64; the teacher's head scaled up so that its distributions
are sharper than the student's).  The references are direct computations:
the models run on the whole prefix at every step (no KV cache), tokens drawn
with ``torch.multinomial`` from the same seeded generator, the teacher's top-K
from ``torch.topk``; the loss is the plain PyTorch loss on both models'
materialised logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install kdfast[hf]")

from test_integrations_transformers import llama as tiny_llama  # noqa: E402

from kdfast.llm import (  # noqa: E402
    DistillBatch, Generation, OnPolicyDistiller, generate, generated_batch, in_top_k, position_ids_from_mask,
    sample_tokens, sampling_probs, speculative_generate, teacher_forced_batch,
)

V = 64
PAD = 1
NO_EOS = ()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


# ----------------------------------------------------------------- models and prompts
def llama(seed=0, hidden=32, vocab=V, head_scale=1.0):
    """The Trainer tests' tiny random Llama, with this file's vocabulary of 64 by default."""
    return tiny_llama(hidden=hidden, vocab=vocab, seed=seed, head_scale=head_scale)


@pytest.fixture(scope="module")
def student():
    return llama(0)


@pytest.fixture(scope="module")
def teacher():
    return llama(1, hidden=48, head_scale=3.0)


def prompts(B=3, P=5, seed=0):
    """Left-padded prompts: row b has b * 2 padding positions (at most P - 1), ids in [3, V), padding PAD."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    for b in range(B):
        pad = min(2 * b, P - 1)
        ids[b, :pad], mask[b, :pad] = PAD, 0
    return ids, mask


def completions(B=3, C=4, seed=1):
    """Right-padded dataset completions: row b has b padding positions (at most C - 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, C), generator=g)
    mask = torch.ones(B, C, dtype=torch.long)
    for b in range(B):
        pad = min(b, C - 1)
        if pad:
            ids[b, -pad:], mask[b, -pad:] = 7, 0  # any id: the batch puts the pad token there
    return ids, mask


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------- direct computations
def full_prefix_logits(model, seq, mask):
    """The next-token logits recomputed on the whole prefix (no cache), positions counted over the mask."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=seq, attention_mask=mask, position_ids=position_ids, use_cache=False).logits[:, -1]


def nucleus_probs(logits, temperature, top_p):
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def reference_loss(student, teacher, batch, *, divergence="kl", beta=None, temperature=1.0, hard_weight=0.0,
                   soft_weight=1.0, normalizer=None):
    """What people write: both logits, log-softmaxes, the divergence per token, averaged over the shifted targets."""
    inputs = batch.model_inputs()
    s = student(**inputs).logits[:, :-1].double()
    with torch.no_grad():
        t = teacher(**inputs).logits[:, :-1].double()
    y = batch.labels[:, 1:]
    valid = y != -100
    s, t, y = s[valid], t[valid], y[valid]
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "kl":
        per_token = (p * (log_p - log_q)).sum(-1)
    elif divergence == "reverse_kl":
        per_token = (q * (log_q - log_p)).sum(-1)
    elif divergence == "jsd":
        log_m = torch.log(beta * p + (1 - beta) * q)
        per_token = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    else:
        raise AssertionError(divergence)
    n = float(valid.sum()) if normalizer is None else float(normalizer)
    loss = soft_weight * per_token.sum() / n
    if hard_weight:
        loss = loss + hard_weight * F.cross_entropy(s, y, reduction="sum") / n
    return loss


# ----------------------------------------------------------------- generation: shapes, stopping
def test_generate_shapes_and_layout(student):
    ids, mask = prompts()
    gen = generate(student, ids, mask, max_new_tokens=6, generator=seeded(), eos_token_id=NO_EOS, pad_token_id=PAD)
    assert isinstance(gen, Generation)
    assert gen.sequences.shape == (3, 11) and gen.sequences.dtype == torch.int64
    assert gen.prompt_length == 5 and gen.lengths.tolist() == [6, 6, 6] and gen.replaced is None
    assert torch.equal(gen.sequences[:, :5], ids)
    assert torch.equal(gen.attention_mask, torch.cat([mask, torch.ones(3, 6, dtype=torch.long)], 1))
    assert gen.completions.shape == (3, 6) and bool(gen.completion_mask.all())
    labels = gen.labels()
    assert bool((labels[:, :5] == -100).all()) and torch.equal(labels[:, 5:], gen.completions)
    assert bool(((gen.completions >= 0) & (gen.completions < V)).all())
    assert torch.equal(gen.position_ids, position_ids_from_mask(gen.attention_mask))
    assert gen.position_ids[2].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6]


def test_stops_at_eos_and_pads_the_finished_rows(student):
    ids, mask = prompts()
    free = generate(student, ids, mask, max_new_tokens=8, generator=seeded(3), eos_token_id=NO_EOS)
    eos = int(free.completions[0, 2])
    gen = generate(student, ids, mask, max_new_tokens=8, generator=seeded(3), eos_token_id=eos, pad_token_id=PAD)
    for b in range(3):
        row = free.completions[b].tolist()
        n = row.index(eos) + 1 if eos in row else 8
        assert int(gen.lengths[b]) == n
        assert gen.completions[b, :n].tolist() == row[:n]  # the same tokens up to (and with) the EOS
        assert bool((gen.completions[b, n:] == PAD).all())  # then padding, masked and ignored
        assert bool((gen.attention_mask[b, 5 + n:] == 0).all()) and bool((gen.attention_mask[b, 5:5 + n] == 1).all())
        assert bool((gen.labels()[b, 5 + n:] == -100).all())
    assert int(gen.lengths[0]) <= 3
    assert gen.sequences.shape[1] == 5 + int(gen.lengths.max())


def test_stops_early_once_every_row_has_ended(student):
    ids, mask = prompts()
    free = generate(student, ids, mask, max_new_tokens=8, generator=seeded(4), eos_token_id=NO_EOS)
    firsts = sorted(set(free.completions[:, 0].tolist()))
    gen = generate(student, ids, mask, max_new_tokens=8, generator=seeded(4), eos_token_id=firsts)
    assert gen.sequences.shape == (3, 6) and gen.lengths.tolist() == [1, 1, 1]
    assert torch.equal(gen.completions[:, 0], free.completions[:, 0])


def test_max_new_tokens_per_row_and_zero(student):
    ids, mask = prompts()
    free = generate(student, ids, mask, max_new_tokens=5, generator=seeded(5), eos_token_id=NO_EOS)
    gen = generate(student, ids, mask, max_new_tokens=[0, 3, 5], generator=seeded(5), eos_token_id=NO_EOS,
                   pad_token_id=PAD)
    assert gen.lengths.tolist() == [0, 3, 5] and gen.sequences.shape == (3, 10)
    assert gen.completion_mask.tolist() == [[False] * 5, [True] * 3 + [False] * 2, [True] * 5]
    assert bool((gen.completions[0] == PAD).all()) and bool((gen.completions[1, 3:] == PAD).all())
    assert torch.equal(gen.completions[1, :3], free.completions[1, :3])
    assert torch.equal(gen.completions[2], free.completions[2])
    nothing = generate(student, ids, mask, max_new_tokens=0, eos_token_id=NO_EOS)
    assert torch.equal(nothing.sequences, ids) and nothing.completions.shape == (3, 0)
    assert torch.equal(nothing.attention_mask, mask)


def test_default_eos_and_pad_come_from_the_model(student):
    ids, mask = prompts()
    eos = student.generation_config.eos_token_id
    gen = generate(student, ids, mask, max_new_tokens=4, temperature=0.0)
    explicit = generate(student, ids, mask, max_new_tokens=4, temperature=0.0, eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(gen.sequences, explicit.sequences)


# ----------------------------------------------------------------- generation: KV cache, direct computation
def test_kv_cache_equals_recomputation_greedy(student, teacher):
    ids, mask = prompts(B=4, P=6)
    for eos in (NO_EOS, 5):
        cached = generate(student, ids, mask, max_new_tokens=10, temperature=0.0, eos_token_id=eos)
        full = generate(student, ids, mask, max_new_tokens=10, temperature=0.0, eos_token_id=eos, use_cache=False)
        assert torch.equal(cached.sequences, full.sequences) and torch.equal(cached.lengths, full.lengths)
    cached = speculative_generate(student, teacher, ids, mask, top_k=24, max_new_tokens=10, temperature=0.0,
                                  eos_token_id=NO_EOS)
    full = speculative_generate(student, teacher, ids, mask, top_k=24, max_new_tokens=10, temperature=0.0,
                                eos_token_id=NO_EOS, use_cache=False)
    assert torch.equal(cached.sequences, full.sequences) and torch.equal(cached.replaced, full.replaced)


def test_kv_cache_equals_recomputation_sampled_in_float64(student, teacher):
    s, t = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    ids, mask = prompts()
    cached = speculative_generate(s, t, ids, mask, top_k=24, max_new_tokens=8, generator=seeded(9),
                                  eos_token_id=NO_EOS)
    full = speculative_generate(s, t, ids, mask, top_k=24, max_new_tokens=8, generator=seeded(9),
                                eos_token_id=NO_EOS, use_cache=False)
    assert torch.equal(cached.sequences, full.sequences) and torch.equal(cached.replaced, full.replaced)


def test_greedy_is_the_argmax_of_the_full_prefix(student):
    ids, mask = prompts()
    gen = generate(student, ids, mask, max_new_tokens=6, temperature=0.0, eos_token_id=NO_EOS)
    seq, call_mask = ids, mask
    for step in range(6):
        token = full_prefix_logits(student, seq, call_mask).argmax(-1)
        assert torch.equal(gen.completions[:, step], token)
        seq, call_mask = torch.cat([seq, token[:, None]], 1), torch.cat([call_mask, torch.ones(3, 1).long()], 1)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampling_equals_a_direct_draw_step_by_step(student, temperature, top_p):
    ids, mask = prompts()
    gen = generate(student, ids, mask, max_new_tokens=6, temperature=temperature, top_p=top_p, generator=seeded(11),
                   eos_token_id=NO_EOS)
    g = seeded(11)
    seq, call_mask = ids, mask
    for step in range(6):
        probs = nucleus_probs(full_prefix_logits(student, seq, call_mask), temperature, top_p)
        token = torch.multinomial(probs, 1, generator=g).squeeze(1)
        assert torch.equal(gen.completions[:, step], token)
        seq, call_mask = torch.cat([seq, token[:, None]], 1), torch.cat([call_mask, torch.ones(3, 1).long()], 1)


# ----------------------------------------------------------------- speculative sampling
@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 24), (0.8, 0.95, 32), (0.0, 1.0, 20)])
def test_speculative_replaces_exactly_the_tokens_outside_the_teachers_top_k(student, teacher, temperature, top_p,
                                                                            top_k):
    ids, mask = prompts(B=4)
    steps = 8
    gen = speculative_generate(student, teacher, ids, mask, top_k=top_k, max_new_tokens=steps,
                               temperature=temperature, top_p=top_p, generator=seeded(13), eos_token_id=NO_EOS)
    g = seeded(13)
    seq, call_mask = ids, mask
    for step in range(steps):
        s_logits = full_prefix_logits(student, seq, call_mask)
        t_logits = full_prefix_logits(teacher, seq, call_mask)
        if temperature == 0.0:
            proposal, candidate = s_logits.argmax(-1), t_logits.argmax(-1)
        else:
            proposal = torch.multinomial(nucleus_probs(s_logits, temperature, top_p), 1, generator=g).squeeze(1)
            candidate = torch.multinomial(nucleus_probs(t_logits, temperature, top_p), 1, generator=g).squeeze(1)
        top = t_logits.topk(top_k, dim=-1).indices
        outside = ~(top == proposal[:, None]).any(-1)
        token = torch.where(outside, candidate, proposal)
        assert torch.equal(gen.replaced[:, step], outside), step
        assert torch.equal(gen.completions[:, step], token), step
        seq, call_mask = torch.cat([seq, token[:, None]], 1), torch.cat([call_mask, torch.ones(4, 1).long()], 1)
    # the check saw both cases
    assert 0 < int(gen.replaced.sum()) < gen.replaced.numel()


def test_speculative_extremes(student, teacher):
    ids, mask = prompts()
    kwargs = dict(max_new_tokens=7, temperature=0.0, eos_token_id=NO_EOS)
    teacher_greedy = generate(teacher, ids, mask, **kwargs)
    student_greedy = generate(student, ids, mask, **kwargs)
    top1 = speculative_generate(student, teacher, ids, mask, top_k=1, **kwargs)
    assert torch.equal(top1.sequences, teacher_greedy.sequences)  # only the teacher's argmax survives
    everything = speculative_generate(student, teacher, ids, mask, top_k=V, **kwargs)
    assert torch.equal(everything.sequences, student_greedy.sequences) and not bool(everything.replaced.any())


def test_speculative_stopping_masks_replacements(student, teacher):
    ids, mask = prompts()
    free = speculative_generate(student, teacher, ids, mask, top_k=24, max_new_tokens=8, generator=seeded(2),
                                eos_token_id=NO_EOS)
    eos = int(free.completions[1, 1])
    gen = speculative_generate(student, teacher, ids, mask, top_k=24, max_new_tokens=8, generator=seeded(2),
                               eos_token_id=eos, pad_token_id=PAD)
    assert gen.replaced.shape == gen.completions.shape
    assert not bool(gen.replaced[~gen.completion_mask].any())
    assert bool((gen.completions[~gen.completion_mask] == PAD).all())
    for b in range(3):
        n = int(gen.lengths[b])
        assert torch.equal(gen.completions[b, :n], free.completions[b, :n])
        assert torch.equal(gen.replaced[b, :n], free.replaced[b, :n])


def test_teacher_vocabulary_truncated_for_speculative_sampling(student):
    big = llama(2, vocab=V + 8)
    ids, mask = prompts()
    with pytest.raises(ValueError, match="same tokenizer"):
        speculative_generate(student, big, ids, mask, top_k=4, max_new_tokens=2)
    gen = speculative_generate(student, big, ids, mask, top_k=4, max_new_tokens=5, generator=seeded(),
                               vocab_policy="truncate", eos_token_id=NO_EOS)
    assert bool((gen.completions < V).all())
    with pytest.raises(ValueError, match="same tokenizer"):  # a smaller teacher: refused before any step
        speculative_generate(big, student, ids, mask, top_k=4, max_new_tokens=2, vocab_policy="truncate")


# ----------------------------------------------------------------- determinism, temperature, top-p
def test_determinism_under_a_seed(student, teacher):
    ids, mask = prompts()
    kwargs = dict(max_new_tokens=8, eos_token_id=NO_EOS)
    state = torch.get_rng_state()
    a = generate(student, ids, mask, generator=seeded(7), **kwargs)
    b = generate(student, ids, mask, generator=seeded(7), **kwargs)
    c = generate(student, ids, mask, generator=7, **kwargs)  # an int seed: a generator on the model's device
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.sequences, c.sequences)
    assert not torch.equal(a.sequences, generate(student, ids, mask, generator=seeded(8), **kwargs).sequences)
    s1 = speculative_generate(student, teacher, ids, mask, top_k=24, generator=seeded(7), **kwargs)
    s2 = speculative_generate(student, teacher, ids, mask, top_k=24, generator=seeded(7), **kwargs)
    assert torch.equal(s1.sequences, s2.sequences) and torch.equal(s1.replaced, s2.replaced)
    assert torch.equal(torch.get_rng_state(), state)  # torch's global generator untouched


def test_sampling_probs_temperature_and_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(sampling_probs(logits), torch.tensor([[0.5, 0.3, 0.15, 0.05]]), atol=1e-6)
    assert torch.allclose(sampling_probs(logits, temperature=2.0), torch.softmax(logits / 2, -1), atol=1e-7)
    for top_p, kept in ((0.4, 1), (0.75, 2), (0.85, 3), (0.97, 4), (1.0, 4)):
        probs = sampling_probs(logits, top_p=top_p)
        assert int((probs > 0).sum()) == kept, top_p
        base = torch.tensor([0.5, 0.3, 0.15, 0.05])[:kept]
        assert torch.allclose(probs[0, :kept], base / base.sum(), atol=1e-6)
    # the nucleus is found per row, whatever the order of the vocabulary
    perm = torch.tensor([2, 0, 3, 1])
    kept = sampling_probs(logits, top_p=0.75) > 0
    assert torch.equal(sampling_probs(logits[:, perm], top_p=0.75) > 0, kept[:, perm])


def test_sample_frequencies_follow_temperature_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = logits.expand(20000, -1)
    for temperature, top_p in ((1.0, 1.0), (2.0, 1.0), (0.5, 1.0), (1.0, 0.8)):
        tokens = sample_tokens(rows, temperature=temperature, top_p=top_p, generator=seeded(1))
        freq = torch.bincount(tokens, minlength=6).double() / len(tokens)
        expected = nucleus_probs(logits[None], temperature, top_p)[0].double()
        assert float((freq - expected).abs().max()) < 0.015, (temperature, top_p)
        assert bool((freq[expected == 0] == 0).all())
    # temperature 0 is the argmax and draws no random numbers
    g = seeded(1)
    state = g.get_state()
    assert sample_tokens(torch.randn(5, V), temperature=0.0, generator=g).shape == (5,)
    assert torch.equal(g.get_state(), state)
    z = torch.randn(5, V)
    assert torch.equal(sample_tokens(z, temperature=1e-4, generator=g), z.argmax(-1))
    assert torch.equal(sample_tokens(z, top_p=1e-6, generator=g), z.argmax(-1))


def test_in_top_k():
    z = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, 5.0, 1.0]])
    assert in_top_k(z, torch.tensor([2, 3]), 2).tolist() == [True, False]
    assert in_top_k(z, torch.tensor([1, 2]), 1).tolist() == [False, True]  # a tie with the k-th counts as inside
    assert in_top_k(z, torch.tensor([3, 0]), 4).tolist() == [True, True]


def test_generation_temperature_and_top_p(student):
    ids, mask = prompts()
    kwargs = dict(max_new_tokens=6, eos_token_id=NO_EOS)
    greedy = generate(student, ids, mask, temperature=0.0, **kwargs)
    assert torch.equal(generate(student, ids, mask, top_p=1e-6, generator=seeded(1), **kwargs).sequences,
                       greedy.sequences)
    assert torch.equal(generate(student, ids, mask, temperature=1e-4, generator=seeded(1), **kwargs).sequences,
                       greedy.sequences)
    assert not torch.equal(generate(student, ids, mask, temperature=2.0, generator=seeded(1), **kwargs).sequences,
                           greedy.sequences)


def test_models_left_in_their_modes_and_without_gradients(student, teacher):
    ids, mask = prompts()
    student.train()
    teacher.eval()
    try:
        speculative_generate(student, teacher, ids, mask, top_k=4, max_new_tokens=2)
        assert student.training and all(m.training for m in student.modules())
        assert not any(m.training for m in teacher.modules())
        assert all(p.grad is None for p in student.parameters())
    finally:
        student.eval()


def test_progress_bar(student, capsys):
    pytest.importorskip("tqdm")
    ids, mask = prompts()
    generate(student, ids, mask, max_new_tokens=3, eos_token_id=NO_EOS, progress=True)
    assert "kdfast generation" in capsys.readouterr().err
    generate(student, ids, mask, max_new_tokens=3, eos_token_id=NO_EOS)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


# ----------------------------------------------------------------- batches and the mixing rate
def test_teacher_forced_batch_layout():
    ids, mask = prompts()
    comp, cmask = completions()
    batch = teacher_forced_batch(ids, mask, comp, cmask, pad_token_id=PAD)
    assert isinstance(batch, DistillBatch) and batch.source == "dataset" and batch.generation is None
    assert torch.equal(batch.input_ids[:, :5], ids)
    assert torch.equal(batch.input_ids[:, 5:], comp.masked_fill(cmask == 0, PAD))
    assert torch.equal(batch.attention_mask, torch.cat([mask, cmask], 1))
    assert torch.equal(batch.labels[:, 5:], comp.masked_fill(cmask == 0, -100))
    assert bool((batch.labels[:, :5] == -100).all())
    assert batch.num_targets == int(cmask.sum())
    assert torch.equal(batch.position_ids, position_ids_from_mask(batch.attention_mask))


def test_lambda_zero_is_teacher_forcing(student, teacher):
    ids, mask = prompts()
    comp, cmask = completions()
    options = dict(divergence="jsd", beta=0.3)
    g = seeded(3)
    state = g.get_state()
    distiller = OnPolicyDistiller(student, teacher, lmbda=0.0, max_new_tokens=6, generator=g, pad_token_id=PAD,
                                  **options)
    expected = teacher_forced_batch(ids, mask, comp, cmask, pad_token_id=PAD)
    for _ in range(3):
        loss = distiller.step(ids, mask, comp, cmask)
        batch = distiller.last_batch
        assert batch.source == "dataset"
        for name in ("input_ids", "attention_mask", "labels", "position_ids"):
            assert torch.equal(getattr(batch, name), getattr(expected, name)), name
        assert torch.equal(loss, distiller.loss(expected))
        torch.testing.assert_close(loss.double(), reference_loss(student, teacher, expected, **options).detach(),
                                   rtol=1e-5, atol=1e-7)
    assert torch.equal(g.get_state(), state)  # no coin, no sampling


def test_lambda_one_is_the_students_generation(student, teacher):
    ids, mask = prompts()
    distiller = OnPolicyDistiller(student, teacher, lmbda=1.0, max_new_tokens=6, generator=21, eos_token_id=9,
                                  sampling_temperature=0.9, top_p=0.95)
    batch = distiller.make_batch(ids, mask)  # no completions needed
    gen = generate(student, ids, mask, max_new_tokens=6, generator=seeded(21), eos_token_id=9, temperature=0.9,
                   top_p=0.95)
    expected = generated_batch(gen)
    assert batch.source == "student" and isinstance(batch.generation, Generation)
    for name in ("input_ids", "attention_mask", "labels", "position_ids"):
        assert torch.equal(getattr(batch, name), getattr(expected, name)), name


def test_speculative_distiller_batch(student, teacher):
    ids, mask = prompts()
    distiller = OnPolicyDistiller(student, teacher, sampler="speculative", top_k=24, max_new_tokens=6, generator=5,
                                  eos_token_id=NO_EOS)
    batch = distiller.make_batch(ids, mask)
    gen = speculative_generate(student, teacher, ids, mask, top_k=24, max_new_tokens=6, generator=seeded(5),
                               eos_token_id=NO_EOS)
    assert batch.source == "speculative" and torch.equal(batch.input_ids, gen.sequences)
    assert torch.equal(batch.generation.replaced, gen.replaced)
    loss = distiller.loss(batch)
    torch.testing.assert_close(loss.double(), reference_loss(student, teacher, batch).detach(), rtol=1e-5, atol=1e-7)


def test_lambda_mixes_sources_reproducibly(student, teacher):
    ids, mask = prompts()
    comp, cmask = completions()

    def sources(seed):
        distiller = OnPolicyDistiller(student, teacher, lmbda=0.5, max_new_tokens=1, generator=seed)
        return [distiller.make_batch(ids, mask, comp, cmask).source for _ in range(24)]

    first = sources(0)
    assert set(first) == {"student", "dataset"}
    assert sources(0) == first


# ----------------------------------------------------------------- the loss
@pytest.mark.parametrize("options", [
    dict(divergence="kl"),
    dict(divergence="reverse_kl", temperature=2.0),
    dict(divergence="jsd", beta=0.1),
    dict(divergence="jsd", beta=0.5, hard_weight=0.3, soft_weight=0.7),
], ids=["kl", "reverse_kl-T2", "jsd-0.1", "jsd-0.5-hard"])
def test_loss_equals_plain_pytorch_on_the_generated_batch(student, teacher, options):
    ids, mask = prompts()
    distiller = OnPolicyDistiller(student, teacher, max_new_tokens=7, generator=17, eos_token_id=11, **options)
    batch = distiller.make_batch(ids, mask)
    student.zero_grad(set_to_none=True)
    loss = distiller.loss(batch)
    loss.backward()
    fused_grads = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    reference = reference_loss(student, teacher, batch, **options)
    reference.backward()
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-5, atol=1e-7)
    for name, p in student.named_parameters():
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-4, atol=1e-5 * scale + 1e-8, msg=name)
    student.zero_grad(set_to_none=True)


def test_normalizer_divides_the_batchmean(student, teacher):
    ids, mask = prompts()
    comp, cmask = completions()
    distiller = OnPolicyDistiller(student, teacher, lmbda=0.0, max_new_tokens=4)
    batch = distiller.make_batch(ids, mask, comp, cmask)
    with torch.no_grad():
        plain, doubled = distiller.loss(batch), distiller.loss(batch, normalizer=2 * batch.num_targets)
    torch.testing.assert_close(doubled, plain / 2)


def test_gradients_flow_only_to_the_student(student, teacher):
    ids, mask = prompts()
    comp, cmask = completions()
    distiller = OnPolicyDistiller(student, teacher, lmbda=0.5, max_new_tokens=5, generator=1, divergence="jsd",
                                  beta=0.5)
    student.zero_grad(set_to_none=True)
    for _ in range(2):
        distiller.step(ids, mask, comp, cmask).backward()
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in student.parameters())
    student.zero_grad(set_to_none=True)


def test_training_batch_sees_the_tokens_as_generation_did(student):
    """Greedy completions are the argmax of the student's logits on the training batch: same positions, same mask."""
    ids, mask = prompts(B=4, P=6)
    gen = generate(student, ids, mask, max_new_tokens=6, temperature=0.0, eos_token_id=13)
    batch = generated_batch(gen)
    with torch.no_grad():
        predicted = student(**batch.model_inputs()).logits.argmax(-1)
    targets = batch.labels[:, 1:] != -100
    assert torch.equal(predicted[:, :-1][targets], batch.labels[:, 1:][targets])


# ----------------------------------------------------------------- absolute positions (GPT-2)
@pytest.fixture(scope="module")
def gpt2_pair():
    """GPT-2 has absolute position embeddings: unlike Llama's rotary ones, they see where a left-padded row starts."""
    torch.manual_seed(0)
    config = dict(vocab_size=V, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0)
    return (transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, **config)).eval(),
            transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=48, **config)).eval())


def test_gpt2_generation_positions(gpt2_pair):
    s, t = gpt2_pair
    ids, mask = prompts()
    cached = speculative_generate(s, t, ids, mask, top_k=16, max_new_tokens=6, temperature=0.0, eos_token_id=NO_EOS)
    full = speculative_generate(s, t, ids, mask, top_k=16, max_new_tokens=6, temperature=0.0, eos_token_id=NO_EOS,
                                use_cache=False)
    assert torch.equal(cached.sequences, full.sequences)
    gen = generate(s, ids, mask, max_new_tokens=6, temperature=0.0, eos_token_id=NO_EOS)
    seq, call_mask = ids, mask
    for step in range(6):  # each padded row is encoded as it would be alone: positions counted over its mask
        token = full_prefix_logits(s, seq, call_mask).argmax(-1)
        assert torch.equal(gen.completions[:, step], token)
        seq, call_mask = torch.cat([seq, token[:, None]], 1), torch.cat([call_mask, torch.ones(3, 1).long()], 1)
    alone = generate(s, ids[2:, 4:], max_new_tokens=6, temperature=0.0, eos_token_id=NO_EOS)
    assert torch.equal(alone.completions[0], gen.completions[2])


def test_gpt2_training_batch_and_loss(gpt2_pair):
    s, t = gpt2_pair
    ids, mask = prompts()
    gen = generate(s, ids, mask, max_new_tokens=6, temperature=0.0, eos_token_id=NO_EOS)
    batch = generated_batch(gen)
    with torch.no_grad():
        predicted = s(**batch.model_inputs()).logits.argmax(-1)
    targets = batch.labels[:, 1:] != -100
    assert torch.equal(predicted[:, :-1][targets], batch.labels[:, 1:][targets])
    distiller = OnPolicyDistiller(s, t, max_new_tokens=5, generator=0, eos_token_id=NO_EOS, divergence="jsd", beta=0.2)
    for batch in (distiller.make_batch(ids, mask), teacher_forced_batch(ids, mask, *completions())):
        torch.testing.assert_close(distiller.loss(batch).double(),
                                   reference_loss(s, t, batch, divergence="jsd", beta=0.2).detach(), rtol=1e-5,
                                   atol=1e-7)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_student(teacher):
    """A PEFT LoRA student generates through its wrapper (KV cache included) and only its adapter trains."""
    peft = pytest.importorskip("peft", reason="peft is not installed: pip install --no-deps peft")
    s = peft.get_peft_model(llama(3), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in s.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids, mask = prompts()
    cached = generate(s, ids, mask, max_new_tokens=5, temperature=0.0, eos_token_id=NO_EOS)
    full = generate(s, ids, mask, max_new_tokens=5, temperature=0.0, eos_token_id=NO_EOS, use_cache=False)
    assert torch.equal(cached.sequences, full.sequences)
    distiller = OnPolicyDistiller(s, teacher, max_new_tokens=5, generator=0, eos_token_id=NO_EOS)
    loss = distiller.step(ids, mask)
    torch.testing.assert_close(loss.double(), reference_loss(s, teacher, distiller.last_batch).detach(), rtol=1e-5,
                               atol=1e-7)
    loss.backward()
    for name, p in s.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name


# ----------------------------------------------------------------- bad input
class NoCacheLM(torch.nn.Module):
    """A causal LM whose forward takes no KV cache."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def _right_padded():
    ids, mask = prompts()
    return ids, mask.flip(1)


def _generation_errors():
    ids, mask = prompts()
    bad_ids = ids.clone()
    bad_ids[0, 0] = V
    empty = mask.clone()
    empty[1] = 0
    return [
        (dict(input_ids=ids.float()), TypeError, "integer token ids"),
        (dict(input_ids=ids[0]), ValueError, r"\(B, P\)"),
        (dict(input_ids=ids[:, :0], attention_mask=mask[:, :0]), ValueError, r"\(B, P\)"),
        (dict(attention_mask=_right_padded()[1]), ValueError, "left-padded"),
        (dict(attention_mask=empty), ValueError, "no token"),
        (dict(attention_mask=mask[:, 1:]), ValueError, "must be the same"),
        (dict(attention_mask=mask * 2), ValueError, "only 0 and 1"),
        (dict(attention_mask=mask.float()), TypeError, "integer"),
        (dict(input_ids=bad_ids), ValueError, "outside the model's vocabulary"),
        (dict(input_ids=ids - 10), ValueError, "outside the model's vocabulary"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be >= 0"),
        (dict(max_new_tokens=2.5), TypeError, "max_new_tokens"),
        (dict(max_new_tokens=[1, 2]), ValueError, "one entry per prompt"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(eos_token_id=-3), ValueError, "eos_token_id"),
        (dict(pad_token_id=-1), ValueError, "pad_token_id"),
        (dict(generator="seed"), TypeError, "generator"),
        (dict(use_cache=1), TypeError, "use_cache"),
    ]


@pytest.mark.parametrize("case", range(len(_generation_errors())))
def test_generate_rejects_bad_input(student, case):
    ids, mask = prompts()
    overrides, error, match = _generation_errors()[case]
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    kwargs.update(overrides)
    with pytest.raises(error, match=match):
        generate(student, **kwargs)


def test_speculative_rejects_bad_input(student, teacher):
    ids, mask = prompts()
    for top_k in (0, 2.0, None, True):
        with pytest.raises(ValueError, match="top_k"):
            speculative_generate(student, teacher, ids, mask, top_k=top_k, max_new_tokens=2)
    with pytest.raises(ValueError, match="vocab_policy"):
        speculative_generate(student, teacher, ids, mask, top_k=2, max_new_tokens=2, vocab_policy="pad")
    with pytest.raises(TypeError, match="teacher"):
        speculative_generate(student, "teacher", ids, mask, top_k=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="use_cache=False"):
        speculative_generate(student, NoCacheLM(teacher), ids, mask, top_k=2, max_new_tokens=2)
    gen = speculative_generate(student, NoCacheLM(teacher), ids, mask, top_k=2, max_new_tokens=2, use_cache=False)
    assert gen.completions.shape == (3, 2)


def test_sampling_helpers_reject_bad_input():
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        sample_tokens(torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        sample_tokens(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="greedy"):
        sampling_probs(torch.randn(2, 3), temperature=0.0)
    with pytest.raises(TypeError, match="temperature"):
        sample_tokens(torch.randn(2, 3), temperature="hot")
    with pytest.raises(ValueError, match="k must be"):
        in_top_k(torch.randn(2, 3), torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match="tokens"):
        in_top_k(torch.randn(2, 3), torch.tensor([0]), 1)


def test_distiller_rejects_bad_input(student, teacher):
    def make(**kwargs):
        options = dict(max_new_tokens=2)
        options.update(kwargs)
        return OnPolicyDistiller(student, teacher, **options)

    cases = [
        (dict(lmbda=1.5), ValueError, "lmbda"),
        (dict(lmbda="half"), TypeError, "lmbda"),
        (dict(sampler="teacher"), ValueError, "sampler"),
        (dict(sampler="speculative"), ValueError, "top_k"),
        (dict(max_new_tokens=-2), ValueError, "max_new_tokens"),
        (dict(sampling_temperature=-1.0), ValueError, "temperature"),
        (dict(shift=False), TypeError, "sets shift itself"),
        (dict(normalizer=3.0), TypeError, "loss\\(\\) or step\\(\\)"),
        (dict(softcap=2.0), TypeError, "sets softcap itself"),
        (dict(weighting=torch.ones(3)), TypeError, "weighting"),
        (dict(divergence="nope"), ValueError, "nope"),
        (dict(divergence="kl", beta=0.5), ValueError, "beta"),
        (dict(colour="red"), TypeError, "colour"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(vocab_policy="pad"), ValueError, "vocab_policy"),
        (dict(generator=1.5), TypeError, "generator"),
        (dict(progress="yes"), TypeError, "progress"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            make(**kwargs)
    with pytest.raises(ValueError, match="student itself"):
        OnPolicyDistiller(student, student, max_new_tokens=2)
    with pytest.raises(ValueError, match="vocabulary sizes"):
        OnPolicyDistiller(student, llama(2, vocab=V + 8), max_new_tokens=2)
    with pytest.raises(TypeError, match="teacher"):
        OnPolicyDistiller(student, None, max_new_tokens=2)

    ids, mask = prompts()
    comp, cmask = completions()
    distiller = make(lmbda=0.5)
    with pytest.raises(ValueError, match="completion_ids"):
        distiller.make_batch(ids, mask)
    with pytest.raises(TypeError, match="DistillBatch"):
        distiller.loss({"input_ids": ids})
    with pytest.raises(ValueError, match="right-padded"):
        teacher_forced_batch(ids, mask, comp, cmask.flip(1))
    with pytest.raises(ValueError, match="B = 3"):
        teacher_forced_batch(ids, mask, comp[:2], cmask[:2])
    with pytest.raises(ValueError, match="left-padded"):
        teacher_forced_batch(*_right_padded(), comp, cmask)
    with pytest.raises(TypeError, match="Generation"):
        generated_batch(ids)
