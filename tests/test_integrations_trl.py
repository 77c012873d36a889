"""kdfast.integrations.trl: TRL's GKD trainer on kdfast's fused loss, TRL's generalized JSD, Liger's call signature.

The reference is TRL's own code on the same batch: ``GKDTrainer.generalized_jsd_loss``
and TRL's ``GKDTrainer.compute_loss`` (both models' full logits).  The models are
tiny randomly initialised LlamaForCausalLM (vocab 256, hidden 32, 2 layers) and
the tokenizer a word-level one built here with ``tokenizers`` (no network).
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl", reason="trl is not installed: pip install kdfast[trl]")
pytest.importorskip("datasets", reason="datasets is not installed: pip install kdfast[trl]")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL's notice that trl.experimental is experimental
    from kdfast.integrations import trl as kdtrl  # noqa: E402
    from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer  # noqa: E402

import datasets  # noqa: E402

from kdfast import fused_linear_distill_loss  # noqa: E402

V, PAD, BOS, EOS = 256, 0, 1, 2
trl_jsd = TRLGKDTrainer.generalized_jsd_loss


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


# ----------------------------------------------------------------- models, tokenizer, data
def llama(seed=0, head_scale=1.0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS))
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)  # a sharper teacher: something to teach
    return model.to(dtype)


def tokenizer():
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3, **{f"w{i}": i for i in range(4, V)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


def dataset(tok, n=16, seed=0):
    """Prompt + completion examples of different lengths (the collator left-pads and masks the prompts with -100)."""
    g = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(f"w{g.randrange(4, V)}" for _ in range(3 + i % 3))
        completion = " ".join(f"w{g.randrange(4, V)}" for _ in range(4 + i % 4)) + " </s>"
        prompt_ids = tok(prompt)["input_ids"]
        completion_ids = tok(completion)["input_ids"]
        rows.append({"prompt": prompt, "input_ids": prompt_ids + completion_ids,
                     "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)})
    return datasets.Dataset.from_list(rows)


def gkd_config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                    learning_rate=1e-2, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                    seed=0, dataloader_num_workers=0, bf16=False, gradient_checkpointing=False, lmbda=0.0,
                    beta=0.5, max_new_tokens=3, max_length=64)
    settings.update(overrides)
    return kdtrl.GKDConfig(**settings)


def make_trainer(cls, tmp_path, student=None, teacher=None, examples=16, **overrides):
    tok = tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model=llama(0) if student is None else student,
                   teacher_model=llama(1, head_scale=4.0) if teacher is None else teacher,
                   args=gkd_config(tmp_path, **overrides), train_dataset=dataset(tok, examples),
                   processing_class=tok)


def student_grads(loss, model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_grads_close(got, want, rtol=1e-4, atol=1e-5):
    """Entry by entry, ``atol`` relative to the largest entry of each tensor."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
            continue
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol * float(w.abs().max()) + 1e-9)


# ----------------------------------------------------------------- TRL's generalized JSD on logits
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_generalized_jsd_loss_equals_trls(beta, temperature):
    g = torch.Generator().manual_seed(int(10 * beta + temperature))
    B, T = 3, 7
    student = (3 * torch.randn(B, T, V, generator=g)).requires_grad_()
    teacher = 3 * torch.randn(B, T, V, generator=g)
    labels = torch.randint(4, V, (B, T), generator=g)
    labels[0, :3] = labels[1, :5] = -100  # prompts
    labels[2, -2:] = -100  # padding
    cases = [dict(), dict(reduction="sum"), dict(reduction="mean"), dict(num_items_in_batch=torch.tensor(29.0)),
             dict(labels=None), dict(labels=None, reduction="mean")]
    for case in cases:
        options = {"labels": labels, "beta": beta, "temperature": temperature, **case}
        want = trl_jsd(student, teacher, **options)
        got = kdtrl.generalized_jsd_loss(student, teacher, **options)
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{case}: {m}")
        (g_got,), (g_want,) = torch.autograd.grad(got, student), torch.autograd.grad(want, student)
        assert_grads_close([g_got], [g_want], rtol=1e-4, atol=1e-5)


def test_generalized_jsd_loss_refuses_what_it_cannot_reproduce():
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="reduction='none'"):
        kdtrl.generalized_jsd_loss(s, t, reduction="none")
    with pytest.raises(ValueError, match="beta"):
        kdtrl.generalized_jsd_loss(s, t, beta=1.5)


# ----------------------------------------------------------------- the fused linear mapping
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fused_linear_jsd_is_trls_loss_of_the_two_heads(beta):
    """The mapping: TRL's beta is kdfast's jsd beta, its temperature both temperatures, shift and -100 as TRL's."""
    g = torch.Generator().manual_seed(7)
    B, T, H_s, H_t, tau = 2, 9, 16, 24, 1.7
    h_s = torch.randn(B, T, H_s, generator=g).requires_grad_()
    w_s = (0.5 * torch.randn(V, H_s, generator=g)).requires_grad_()
    b_s = (0.1 * torch.randn(V, generator=g)).requires_grad_()
    h_t, w_t, b_t = torch.randn(B, T, H_t, generator=g), torch.randn(V, H_t, generator=g), torch.randn(V, generator=g)
    labels = torch.randint(4, V, (B, T), generator=g)
    labels[0, :4] = labels[1, :2] = -100
    want = trl_jsd(F.linear(h_s, w_s, b_s)[:, :-1], F.linear(h_t, w_t, b_t)[:, :-1], labels[:, 1:], beta=beta,
                   temperature=tau)
    got = fused_linear_distill_loss(h_s, w_s, h_t, w_t, labels, student_bias=b_s, teacher_bias=b_t, shift=True,
                                    divergence="jsd", beta=beta, temperature=tau, chunk_size=5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_grads_close(torch.autograd.grad(got, (h_s, w_s, b_s)), torch.autograd.grad(want, (h_s, w_s, b_s)))


# ----------------------------------------------------------------- the GKD trainer
@pytest.fixture(scope="module")
def gkd(tmp_path_factory):
    trainer = make_trainer(kdtrl.GKDTrainer, tmp_path_factory.mktemp("gkd"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(5)])
    return trainer, batch


def test_the_collated_batch_masks_prompts_and_padding(gkd):
    _, batch = gkd
    prompt_width = batch["prompts"].shape[1]
    assert (batch["labels"] == -100).any(dim=1).all()
    assert (batch["labels"][:, 1:] != -100).sum() > 10
    assert batch["attention_mask"][:, 0].eq(0).any()  # left padding
    assert batch["input_ids"].shape[1] > prompt_width


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_compute_loss_equals_trls(gkd, beta):
    """kdfast's compute_loss vs TRL's, on the same trainer, models and batch: value and every student gradient."""
    trainer, batch = gkd
    trainer.beta = beta
    model = trainer.model.train()
    valid = int((batch["labels"][:, 1:] != -100).sum())
    try:
        for n in (None, torch.tensor(float(2 * valid))):  # the batch alone, one of two accumulated micro-batches
            got = trainer.compute_loss(model, dict(batch), num_items_in_batch=n)
            want = TRLGKDTrainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=n)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert_grads_close(student_grads(got, model), student_grads(want, model))
        loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
        assert outputs["loss"] is loss
    finally:
        trainer.beta = trainer.args.beta


def test_gkd_trains_like_trls_gkd_without_any_logits(tmp_path, monkeypatch):
    """Off-policy GKD (lmbda=0): the loss of every step is TRL's (same seed, data, models), falls, and neither
    model's forward (the (tokens, vocab) logits) runs."""
    steps = dict(examples=4, max_steps=8, learning_rate=1e-2)  # one batch, seen 8 times: the loss falls steadily
    reference = make_trainer(TRLGKDTrainer, tmp_path / "trl", teacher=llama(1, head_scale=8.0), **steps)
    reference.train()
    trainer = make_trainer(kdtrl.GKDTrainer, tmp_path / "kdfast", teacher=llama(1, head_scale=8.0), **steps)
    forwards = []
    for model in (trainer.model, trainer.teacher_model):
        model.register_forward_pre_hook(lambda module, args: forwards.append(type(module).__name__))
    trainer.train()
    assert forwards == []

    def losses(t):
        return [entry["loss"] for entry in t.state.log_history if "loss" in entry]

    got, want = losses(trainer), losses(reference)
    assert len(got) == len(want) == 8
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-3, atol=1e-5)
    assert all(b < a for a, b in zip(got, got[1:])) and got[-1] < 0.7 * got[0], got


def test_gkd_bf16_and_evaluation_match_trls(tmp_path, monkeypatch):
    """TRL's default bf16=True (accelerate's autocast, here on CPU): the trunks and heads run under it as the models'
    forwards do; and evaluate() (compute_loss with return_outputs=True) gives TRL's eval_loss."""
    dtypes = set()

    def spy(hidden, weight, teacher_hidden, teacher_weight, labels, **options):
        dtypes.add((hidden.dtype, weight.dtype, teacher_hidden.dtype, teacher_weight.dtype))
        return fused_linear_distill_loss(hidden, weight, teacher_hidden, teacher_weight, labels, **options)

    monkeypatch.setattr(kdtrl, "fused_linear_distill_loss", spy)
    results = []
    for cls in (TRLGKDTrainer, kdtrl.GKDTrainer):
        trainer = make_trainer(cls, tmp_path / cls.__module__, teacher=llama(1, head_scale=8.0), examples=4,
                               max_steps=3, bf16=True)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results.append((losses, trainer.evaluate(dataset(tokenizer(), 6, seed=1))["eval_loss"]))
    (want, want_eval), (got, got_eval) = results
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(got_eval, want_eval, rtol=1e-2, atol=1e-4)
    assert dtypes == {(torch.bfloat16,) * 4}  # the heads in the autocast dtype, as the models' own would be


@pytest.mark.parametrize("mode", [dict(lmbda=1.0), dict(lmbda=0.0, seq_kd=True)])
def test_gkd_generation_paths_run_on_kdfast(tmp_path, monkeypatch, mode):
    """On-policy (the student generates) and sequence-level KD (the teacher generates): TRL's generation, then
    kdfast's loss on the generated sequences with the prompt masked."""
    seen = []

    def spy(hidden, weight, teacher_hidden, teacher_weight, labels, **options):
        seen.append((hidden.shape[1], labels.clone()))
        return fused_linear_distill_loss(hidden, weight, teacher_hidden, teacher_weight, labels, **options)

    monkeypatch.setattr(kdtrl, "fused_linear_distill_loss", spy)
    trainer = make_trainer(kdtrl.GKDTrainer, tmp_path, max_steps=2, **mode)
    batch_prompt_widths = []
    collate = trainer.data_collator

    def recording_collator(examples):
        batch = collate(examples)
        batch_prompt_widths.append(batch["prompts"].shape[1])
        return batch

    trainer.data_collator = recording_collator
    trainer.train()
    assert len(seen) == 2
    for (length, labels), prompt_width in zip(seen, batch_prompt_widths):
        assert prompt_width < length <= prompt_width + 3  # prompt + at most max_new_tokens generated
        assert (labels[:, :prompt_width] == -100).all()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(0 <= loss < float("inf") for loss in losses)


def test_gkd_refuses_bad_options():
    with pytest.raises(ValueError, match="backend"):
        kdtrl.GKDTrainer(backend="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        kdtrl.GKDTrainer(chunk_size=0)


# ----------------------------------------------------------------- Liger's call signature
def liger_reference(s_in, w_s, t_in, w_t, labels, b_s, b_t, w_hard, w_soft, beta, tau):
    """Liger's LigerFusedLinearJSDLoss in plain PyTorch: the cross-entropy at temperature 1 plus TRL's JSD."""
    s_logits, t_logits = F.linear(s_in, w_s, b_s), F.linear(t_in, w_t, b_t)
    ce = F.cross_entropy(s_logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="sum")
    ce = ce / (labels != -100).sum().clamp_min(1)
    return w_hard * ce + w_soft * trl_jsd(s_logits, t_logits, labels, beta=beta, temperature=tau)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.0, 1.0)])
def test_liger_shaped_loss_equals_liger_and_trl(beta, weights):
    g = torch.Generator().manual_seed(3)
    B, T, H = 2, 6, 16
    s_in = torch.randn(B, T, H, generator=g).requires_grad_()  # (B, T, H), as TRL passes them
    w_s = (0.5 * torch.randn(V, H, generator=g)).requires_grad_()
    b_s = (0.1 * torch.randn(V, generator=g)).requires_grad_()
    t_in, w_t, b_t = torch.randn(B, T, 2 * H, generator=g), torch.randn(V, 2 * H, generator=g), torch.randn(V)
    labels = torch.randint(4, V, (B, T), generator=g)
    labels[0, :3] = -100
    loss_fn = kdtrl.LigerFusedLinearJSDLoss(weight_hard_loss=weights[0], weight_soft_loss=weights[1], beta=beta,
                                            temperature=2.0)
    got = loss_fn(student_input=s_in, student_weight=w_s, teacher_input=t_in, teacher_weight=w_t, true_labels=labels,
                  student_bias=b_s, teacher_bias=b_t)
    want = liger_reference(s_in, w_s, t_in, w_t, labels, b_s, b_t, *weights, beta, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_grads_close(torch.autograd.grad(got, (s_in, w_s, b_s)), torch.autograd.grad(want, (s_in, w_s, b_s)))
    # Liger's flattened (B*T, H) call gives the same
    flat = loss_fn(s_in.reshape(-1, H), w_s, t_in.reshape(-1, 2 * H), w_t, labels.reshape(-1), b_s, b_t)
    torch.testing.assert_close(flat, got, rtol=1e-6, atol=1e-7)


def test_liger_shaped_loss_returns_its_terms_and_checks_options():
    g = torch.Generator().manual_seed(5)
    s_in, w_s = torch.randn(10, 8, generator=g), torch.randn(V, 8, generator=g)
    t_in, w_t = torch.randn(10, 8, generator=g), torch.randn(V, 8, generator=g)
    labels = torch.randint(4, V, (10,), generator=g)
    labels[:4] = -100
    loss, soft, hard = kdtrl.LigerFusedLinearJSDLoss(weight_hard_loss=0.3, weight_soft_loss=0.7, temperature=1.5,
                                                     return_soft_hard_loss=True)(s_in, w_s, t_in, w_t, labels)
    torch.testing.assert_close(loss, 0.3 * hard + 0.7 * soft, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hard, F.cross_entropy(s_in @ w_s.T, labels), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(soft, trl_jsd(s_in @ w_s.T, t_in @ w_t.T, labels, temperature=1.5), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="beta"):
        kdtrl.LigerFusedLinearJSDLoss(beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        kdtrl.LigerFusedLinearJSDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="vocabular"):
        kdtrl.LigerFusedLinearJSDLoss()(s_in, w_s, t_in, torch.randn(V + 8, 8), labels)


def test_liger_shaped_loss_equals_liger_kernel_itself():
    """Against Liger-Kernel's own chunked loss (pure PyTorch with compiled=False), where it is installed."""
    jsd = pytest.importorskip("liger_kernel.chunked_loss.jsd_loss", reason="liger-kernel is not installed")
    g = torch.Generator().manual_seed(11)
    s_in = torch.randn(12, 16, generator=g).requires_grad_()
    w_s = (0.5 * torch.randn(V, 16, generator=g)).requires_grad_()
    t_in, w_t = torch.randn(12, 16, generator=g), torch.randn(V, 16, generator=g)
    labels = torch.randint(4, V, (12,), generator=g)
    labels[:5] = -100
    for beta in (0.0, 0.4, 1.0):
        options = dict(weight_hard_loss=0.25, weight_soft_loss=0.75, beta=beta, temperature=2.0)
        want = jsd.LigerFusedLinearJSDLoss(compiled=False, **options)(s_in, w_s, t_in, w_t, labels)
        got = kdtrl.LigerFusedLinearJSDLoss(**options)(s_in, w_s, t_in, w_t, labels)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert_grads_close(torch.autograd.grad(got, (s_in, w_s)), torch.autograd.grad(want, (s_in, w_s)))
