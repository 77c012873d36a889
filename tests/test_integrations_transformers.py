"""kdfast.integrations.transformers: DistillationTrainer on the real transformers.Trainer, tiny random models.

The models are randomly initialised LlamaForCausalLM (hidden 32, 2 layers, vocab
256) and a few other families' tiny configs; the reference is the plain PyTorch
loss people write (both logits materialised, F.kl_div of log-softmaxes plus the
cross-entropy).
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install kdfast[hf]")
pytest.importorskip("accelerate", reason="accelerate is not installed: pip install kdfast[hf]")

from kdfast.integrations.heads import UnsplittableModelError, split_causal_lm  # noqa: E402
from kdfast.integrations.transformers import (  # noqa: E402
    DistillationConfig, DistillationTrainer, TopKCacheDataset,
)
from kdfast.llm.cache import write_topk_cache  # noqa: E402
from kdfast.llm.topk import topk_distill_loss  # noqa: E402

V, T = 256, 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


# ----------------------------------------------------------------- models and data
def llama(hidden=32, vocab=V, seed=0, head_scale=1.0):
    """A tiny random Llama; ``head_scale`` sharpens its output distribution (a teacher with something to teach)."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


def gpt2(seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # no dropout: the reference sees the same trunk


def gemma2(seed=0, softcap=0.5, hidden=32):
    torch.manual_seed(seed)
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=softcap, max_position_embeddings=64))


def granite(seed=0):
    torch.manual_seed(seed)
    return transformers.GraniteForCausalLM(transformers.GraniteConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, logits_scaling=4.0, max_position_embeddings=64))


class TokenDataset(torch.utils.data.Dataset):
    """Fixed random sequences.  With ``ignore``, example ``i`` has its first ``(3 i) % 7`` labels -100 (a prompt)
    and its last ``(2 i) % 5`` positions padded (attention mask 0, labels -100): the examples differ in their
    numbers of target tokens."""

    def __init__(self, n, seed=0, ignore=True):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, V, (n, T), generator=g)
        self.ignore = ignore

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids, mask = self.ids[i].clone(), torch.ones(T, dtype=torch.long)
        labels = ids.clone()
        if self.ignore:
            labels[: (3 * i) % 7] = -100
            pad = (2 * i) % 5
            if pad:
                ids[-pad:], mask[-pad:], labels[-pad:] = 0, 0, -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate(dataset, indices=None):
    items = [dataset[i] for i in (range(len(dataset)) if indices is None else indices)]
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


def training_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                    report_to=[], learning_rate=1e-2, save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                    dataloader_num_workers=0)
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def reference_loss(student, teacher, batch, config: DistillationConfig, normalizer=None):
    """What people write: both logits, F.kl_div of log-softmaxes, cross-entropy; over the shifted valid tokens."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s = student(**inputs).logits[:, :-1].float()
    with torch.no_grad():
        t = teacher(**inputs).logits[:, :-1].float()
    y = batch["labels"][:, 1:]
    mask = y != -100
    s, t, y = s[mask], t[mask], y[mask]
    n = float(mask.sum()) if normalizer is None else float(normalizer)
    tau = config.temperature
    tau_s = config.student_temperature or tau
    kl = F.kl_div(F.log_softmax(s / tau_s, -1), F.log_softmax(t / tau, -1), log_target=True, reduction="sum") / n
    ce = F.cross_entropy(s, y, reduction="sum") / n
    return config.hard_weight * ce + config.soft_weight * config.scale * kl


def grads_of(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got, want, rtol=1e-4, atol=1e-6, floor=1e-8):
    """Close entry by entry, ``atol`` relative to the largest entry of each tensor, at least ``floor``."""
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol * float(want[name].abs().max()) + floor,
                                   msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------- the configuration
def test_config_parses_with_hf_argument_parser(tmp_path):
    parser = transformers.HfArgumentParser((DistillationConfig, transformers.TrainingArguments))
    config, args = parser.parse_args_into_dataclasses([
        "--divergence", "jsd", "--beta", "0.3", "--temperature", "2", "--hard_weight", "0.5", "--chunk_size", "64",
        "--log_terms", "false", "--output_dir", str(tmp_path), "--report_to", "none"])
    assert (config.divergence, config.beta, config.temperature, config.hard_weight) == ("jsd", 0.3, 2.0, 0.5)
    assert (config.chunk_size, config.log_terms, config.alpha, config.student_temperature) == (64, False, None, None)
    assert isinstance(args, transformers.TrainingArguments)
    defaults, = transformers.HfArgumentParser(DistillationConfig).parse_args_into_dataclasses([])
    assert defaults == DistillationConfig()
    with pytest.raises(ValueError, match="beta"):
        transformers.HfArgumentParser(DistillationConfig).parse_args_into_dataclasses(["--divergence", "kl",
                                                                                      "--beta", "0.5"])


@pytest.mark.parametrize("options, match", [
    (dict(divergence="nope"), "nope"),
    (dict(divergence="jsd", beta=1.5), "beta"),
    (dict(temperature=0.0), "temperature"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(vocab_policy="pad"), "vocab_policy"),
    (dict(tail="drop"), "tail"),
    (dict(weighting="loud"), "weighting"),
    (dict(backend="cuda"), "backend"),
])
def test_config_refuses_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        DistillationConfig(**options)


# ----------------------------------------------------------------- splitting models
@pytest.mark.parametrize("make, softcap, tied", [
    (llama, None, False), (gpt2, None, True), (gemma2, 0.5, True), (granite, None, False)])
def test_split_reproduces_the_models_logits(make, softcap, tied):
    model = make().eval()  # no dropout (GPT-2's)
    parts = split_causal_lm(model)  # verify=True: checked against model(input_ids).logits
    assert parts.softcap == softcap
    assert (parts.weight is model.get_input_embeddings().weight) == tied
    ids = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(parts.logits(parts.hidden_states({"input_ids": ids})), model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_a_peft_style_wrapper_is_unwrapped():
    class Wrapper(torch.nn.Module):  # what PeftModel offers: get_base_model()
        def __init__(self, model):
            super().__init__()
            self.inner = model

        def get_base_model(self):
            return self.inner

    model = llama()
    assert split_causal_lm(Wrapper(model)).model is model

    class PromptTuned(Wrapper):  # virtual tokens that only the wrapper's forward adds: refused
        active_peft_config = type("PromptTuningConfig", (), {"is_prompt_learning": True})()

    with pytest.raises(UnsplittableModelError, match="prompt-learning"):
        split_causal_lm(PromptTuned(model))


def test_a_model_that_cannot_be_split_is_refused_by_name():
    with pytest.raises(UnsplittableModelError, match="LlamaModel.*no output layer"):
        split_causal_lm(llama().model)
    with pytest.raises(UnsplittableModelError, match="Sequential"):
        split_causal_lm(torch.nn.Sequential(torch.nn.Embedding(V, 8), torch.nn.Linear(8, V)))
    # BERT's MLM head transforms the trunk's output before its decoder: the check sees that the logits differ.
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(UnsplittableModelError, match="BertForMaskedLM"):
        split_causal_lm(bert)


# ----------------------------------------------------------------- the loss
@pytest.mark.parametrize("make", [llama, gemma2, gpt2])
def test_loss_and_gradients_equal_the_plain_pytorch_loss(tmp_path, make):
    student, teacher = make(seed=0), make(seed=1)
    if make is llama:
        teacher = llama(hidden=48, seed=1, head_scale=20.0)
    config = DistillationConfig(temperature=2.0, hard_weight=0.3, soft_weight=0.7, scale=4.0, chunk_size=24)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path),
                                  distillation_config=config)
    batch = collate(TokenDataset(3))
    for normalizer in (None, 29):
        student.zero_grad()
        loss = trainer.compute_loss(student, batch, num_items_in_batch=normalizer)
        loss.backward()
        got = grads_of(student)
        student.zero_grad()
        want = reference_loss(student, teacher, batch, config, normalizer)
        want.backward()
        torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
        assert_grads_close(got, grads_of(student))
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_the_loss_runs_under_cpu_autocast(tmp_path):
    student, teacher = llama(), llama(hidden=48, seed=1, head_scale=20.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path),
                                  distillation_config=DistillationConfig(hard_weight=0.5))
    batch = collate(TokenDataset(2))
    exact = trainer.compute_loss(student, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = trainer.compute_loss(student, batch)
    mixed.backward()
    torch.testing.assert_close(mixed, exact.detach(), rtol=3e-2, atol=3e-2)
    assert student.lm_head.weight.grad.dtype == torch.float32


def test_bf16_training_args_run_the_student_trunk_in_bf16(tmp_path, monkeypatch):
    """bf16=True is accelerate's patch of model.forward, which calling the trunk skips: the trainer applies it."""
    import kdfast.integrations.transformers as integration

    seen = []
    real = integration.fused_linear_distill_loss

    def spy(hidden, *args, **kwargs):
        seen.append(hidden.dtype)
        return real(hidden, *args, **kwargs)

    monkeypatch.setattr(integration, "fused_linear_distill_loss", spy)
    student, teacher = llama(), llama(hidden=48, seed=1, head_scale=20.0)
    batch = collate(TokenDataset(2))
    for bf16, want in ((False, torch.float32), (True, torch.bfloat16)):
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path, bf16=bf16),
                                      distillation_config=DistillationConfig(hard_weight=0.5))
        trainer.compute_loss(student, batch)
        assert seen[-1] == want, (bf16, seen)


def test_the_teacher_keeps_its_own_dtype(tmp_path):
    student, teacher = llama(), llama(hidden=48, seed=1, head_scale=20.0).to(torch.bfloat16)
    config = DistillationConfig(hard_weight=0.5)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path),
                                  distillation_config=config)
    assert teacher.dtype == torch.bfloat16 and student.dtype == torch.float32
    batch = collate(TokenDataset(2))
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    got = grads_of(student)
    student.zero_grad()
    want = reference_loss(student, teacher, batch, config)  # the bf16 teacher's logits, as its own head makes them
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=2e-3, atol=1e-5)
    assert_grads_close(got, grads_of(student), rtol=1e-2, atol=1e-2)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """SGD with lr 1: the update is the gradient.  Two micro-batches of 2 (GA) and one batch of 4 must agree, and
    equal the reference over the 4 sequences normalised by all their target tokens."""
    dataset = TokenDataset(4)  # different numbers of ignored labels per sequence: mean of means != global mean
    config = DistillationConfig(temperature=2.0, hard_weight=0.5, soft_weight=0.5)

    def update(tag, batch_size, accumulation):
        student, teacher = llama(), llama(hidden=48, seed=1, head_scale=20.0)
        before = {name: p.detach().clone() for name, p in student.named_parameters()}
        args = training_args(tmp_path / tag, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=1.0,
                             lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                      distillation_config=config)
        trainer.train()
        return {name: before[name] - p.detach() for name, p in student.named_parameters()}, trainer

    accumulated, trainer = update("ga", 2, 2)
    single, _ = update("single", 4, 1)
    student, teacher = llama(), llama(hidden=48, seed=1, head_scale=20.0)
    reference_loss(student, teacher, collate(dataset), config).backward()
    reference = grads_of(student)
    # An update read back as before - after carries the float32 rounding of the parameters (1.2e-7 at 1.0).
    assert_grads_close(accumulated, single, rtol=1e-4, atol=1e-5, floor=3e-7)
    assert_grads_close(accumulated, reference, rtol=1e-4, atol=1e-5, floor=3e-7)
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(0.5 * logged["hard_loss"] + 0.5 * logged["soft_loss"], rel=1e-5)


# ----------------------------------------------------------------- training
def test_training_lowers_the_loss_logs_both_terms_and_leaves_the_teacher_alone(tmp_path):
    student, teacher = llama(), llama(hidden=48, seed=1, head_scale=20.0)
    teacher_before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    config = DistillationConfig(temperature=1.0, hard_weight=0.2, soft_weight=0.8)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=TokenDataset(8, ignore=False),
                                  args=training_args(tmp_path, max_steps=24, learning_rate=3e-2),
                                  distillation_config=config)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 24
    for entry in logs:  # logging_steps=1: the logged loss is the step's, whose two terms are logged too
        assert entry["loss"] == pytest.approx(0.2 * entry["hard_loss"] + 0.8 * entry["soft_loss"], rel=1e-5)
    first, last = (sum(e[key] for e in part) / 3 for part in (logs[:3], logs[-3:]) for key in ("loss",))
    assert last < 0.8 * first, [e["loss"] for e in logs]
    assert logs[-1]["soft_loss"] < logs[0]["soft_loss"]
    for name, p in teacher.named_parameters():
        assert torch.equal(p, teacher_before[name]) and not p.requires_grad
    assert not teacher.training
    assert "eval_loss" in trainer.evaluate(TokenDataset(4, seed=1))


def test_terms_are_logged_on_the_logging_steps_only(tmp_path):
    student, teacher = llama(), llama(hidden=48, seed=1, head_scale=20.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=TokenDataset(8),
                                  args=training_args(tmp_path, max_steps=4, logging_steps=2),
                                  distillation_config=DistillationConfig(hard_weight=0.5))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert all("hard_loss" in entry and "soft_loss" in entry for entry in logged)


def test_training_resumes_from_a_checkpoint(tmp_path):
    dataset = TokenDataset(8)
    config = DistillationConfig(hard_weight=0.5, soft_weight=0.5)

    def trainer_for(tag, **overrides):
        student, teacher = llama(), llama(hidden=48, seed=1, head_scale=20.0)
        args = training_args(tmp_path / tag, per_device_train_batch_size=2, max_steps=4, **overrides)
        return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                   distillation_config=config)

    class StopAfterTwoSteps(transformers.TrainerCallback):  # as a crash after the first checkpoint would
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    straight = trainer_for("straight")
    straight.train()
    interrupted = trainer_for("resumed", save_strategy="steps", save_steps=2)
    interrupted.add_callback(StopAfterTwoSteps())
    interrupted.train()
    assert interrupted.state.global_step == 2
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()
    resumed = trainer_for("resumed", save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------- refusals
def test_a_teacher_with_another_vocabulary_is_refused(tmp_path):
    args = training_args(tmp_path)
    with pytest.raises(ValueError, match=r"V_t=300, V_s=256.*vocab_policy='truncate'"):
        DistillationTrainer(model=llama(), teacher_model=llama(vocab=300, seed=1), args=args)
    with pytest.raises(ValueError, match="V_t=200 < V_s=256"):
        DistillationTrainer(model=llama(), teacher_model=llama(vocab=200, seed=1), args=args,
                            distillation_config=DistillationConfig(vocab_policy="truncate"))
    # A padded teacher vocabulary, cut to the student's:
    trainer = DistillationTrainer(model=llama(), teacher_model=llama(vocab=300, seed=1), args=args,
                                  distillation_config=DistillationConfig(vocab_policy="truncate"))
    assert torch.isfinite(trainer.compute_loss(trainer.model, collate(TokenDataset(2))))


def test_unsplittable_students_and_teachers_are_refused_by_name(tmp_path):
    args = training_args(tmp_path)
    with pytest.raises(UnsplittableModelError, match="LlamaModel"):
        DistillationTrainer(model=llama().model, teacher_model=llama(seed=1), args=args)
    with pytest.raises(UnsplittableModelError, match="LlamaModel"):
        DistillationTrainer(model=llama(), teacher_model=llama(seed=1).model, args=args)


def test_different_softcaps_and_missing_labels_are_refused(tmp_path):
    args = training_args(tmp_path)
    with pytest.raises(ValueError, match="softcap"):
        DistillationTrainer(model=gemma2(softcap=0.5), teacher_model=gemma2(seed=1, softcap=30.0), args=args)
    trainer = DistillationTrainer(model=llama(), teacher_model=llama(seed=1), args=args)
    batch = collate(TokenDataset(2))
    del batch["labels"]
    with pytest.raises(ValueError, match="labels"):
        trainer.compute_loss(trainer.model, batch)


def test_without_transformers_the_package_imports_and_names_the_extra(monkeypatch):
    import kdfast
    import kdfast.integrations

    monkeypatch.setattr(kdfast, "integrations", kdfast.integrations)  # restored, with the modules, afterwards
    for name in [name for name in sys.modules if name.startswith("kdfast.integrations")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    integrations = importlib.import_module("kdfast.integrations")
    assert callable(integrations.split_causal_lm)  # the model splitting needs torch only
    with pytest.raises(ImportError, match=r"pip install kdfast\[hf\]"):
        integrations.DistillationTrainer


# ----------------------------------------------------------------- offline: a cached teacher
@pytest.fixture
def cache_dir(tmp_path):
    teacher = llama(hidden=48, seed=1, head_scale=20.0).eval()
    ids = TokenDataset(8).ids
    batches = [ids[i:i + 2] for i in range(0, len(ids), 2)]
    write_topk_cache(lambda batch: teacher(input_ids=batch).logits, batches, tmp_path / "cache", k=16,
                     logprob_dtype=torch.float32, tokens_per_shard=48, progress=False)
    return tmp_path / "cache"


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_offline_distillation_from_a_topk_cache(tmp_path, cache_dir, tail):
    dataset = TopKCacheDataset(cache_dir)
    assert (len(dataset), dataset.seq_len, dataset.vocab_size) == (8, T, V)
    torch.testing.assert_close(dataset[5]["input_ids"], TokenDataset(8).ids[5])
    config = DistillationConfig(hard_weight=0.5, soft_weight=0.5, temperature=2.0, tail=tail)
    student = llama()
    trainer = DistillationTrainer(model=student, args=training_args(tmp_path, max_steps=8, learning_rate=3e-2),
                                  train_dataset=dataset, distillation_config=config)
    batch = collate(dataset, [1, 6, 3])
    loss = trainer.compute_loss(student, batch)
    logits = student(input_ids=batch["input_ids"]).logits
    tail_options = {"tail_logprobs": batch["tail_logprobs"][:, :-1]} if tail == "bucket" else {}
    want = topk_distill_loss(logits[:, :-1], batch["topk_indices"][:, :-1], batch["topk_logprobs"][:, :-1],
                             labels=batch["labels"][:, 1:], tail=tail, temperature=2.0, hard_weight=0.5,
                             soft_weight=0.5, **tail_options)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 8
    assert sum(e["loss"] for e in logs[-2:]) < sum(e["loss"] for e in logs[:2]), [e["loss"] for e in logs]


def test_offline_refusals(tmp_path, cache_dir):
    args = training_args(tmp_path)
    with pytest.raises(ValueError, match="vocabulary of 256 entries but the student LlamaForCausalLM has 300"):
        DistillationTrainer(model=llama(vocab=300), args=args, train_dataset=TopKCacheDataset(cache_dir))
    with pytest.raises(ValueError, match="weighting"):
        DistillationTrainer(model=llama(), args=args, distillation_config=DistillationConfig(weighting="entropy"))
    with pytest.raises(ValueError, match="seq_len=5"):
        TopKCacheDataset(cache_dir, seq_len=5)
    trainer = DistillationTrainer(model=llama(), args=args)
    with pytest.raises(ValueError, match="missing: topk_indices, topk_logprobs"):
        trainer.compute_loss(trainer.model, collate(TokenDataset(2)))
