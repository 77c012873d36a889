"""DistillationTrainer with a real PEFT student (peft's LoRA on a tiny random Llama).

The split finds the trunk and head through ``PeftModel.get_base_model()``; the
LoRA layers live in the trunk, so the fused loss trains exactly the adapter.  The
reference is the plain PyTorch loss on the PEFT model's own logits.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed: pip install kdfast[hf]")
pytest.importorskip("accelerate", reason="accelerate is not installed: pip install kdfast[hf]")
peft = pytest.importorskip("peft", reason="peft is not installed: pip install --no-deps peft")

from test_integrations_transformers import (  # noqa: E402
    TokenDataset, assert_grads_close, collate, grads_of, llama, reference_loss, training_args,
)

from kdfast.integrations.heads import UnsplittableModelError, split_causal_lm  # noqa: E402
from kdfast.integrations.transformers import DistillationConfig, DistillationTrainer  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def lora_student(target_modules=("q_proj", "v_proj"), seed=0):
    model = peft.get_peft_model(llama(seed=seed), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                   target_modules=list(target_modules)))
    torch.manual_seed(seed + 10)
    with torch.no_grad():  # LoRA's B starts at zero (no gradient reaches A): give the adapter a nonzero start
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def test_a_lora_student_splits_through_get_base_model():
    student = lora_student()
    parts = split_causal_lm(student)  # verify=True: the split reproduces the PEFT model's logits
    assert parts.model is student.get_base_model()
    assert parts.head is student.get_base_model().lm_head


def test_the_loss_trains_exactly_the_adapter_with_the_reference_gradients(tmp_path):
    dataset = TokenDataset(4)
    config = DistillationConfig(temperature=2.0, hard_weight=0.5, soft_weight=0.5)
    student, teacher = lora_student(), llama(hidden=48, seed=1, head_scale=20.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path),
                                  train_dataset=dataset, distillation_config=config)
    batch = collate(dataset)
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    got = grads_of(student)
    assert got and all("lora_" in name for name in got)  # the frozen base gets no gradient
    student.zero_grad(set_to_none=True)
    reference_loss(student, teacher, batch, config).backward()
    assert_grads_close(got, grads_of(student))


def test_training_a_lora_student_lowers_the_loss_and_leaves_the_base_alone(tmp_path):
    student, teacher = lora_student(), llama(hidden=48, seed=1, head_scale=20.0)
    base = {name: p.detach().clone() for name, p in student.named_parameters() if "lora_" not in name}
    dataset = TokenDataset(4)  # one batch, seen every step
    args = training_args(tmp_path, max_steps=10, learning_rate=5e-2, lr_scheduler_type="constant")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  distillation_config=DistillationConfig(temperature=2.0))

    def loss_now():
        with torch.no_grad():
            return float(trainer.compute_loss(trainer.model, collate(dataset)))

    before = loss_now()
    trainer.train()
    assert loss_now() < 0.99 * before  # measured: 0.904 -> 0.889 in 10 steps (a rank-4 adapter of 2 layers)
    for name, p in student.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p.detach(), base[name]), name


def test_lora_on_the_lm_head_and_prompt_tuning_are_refused():
    with pytest.raises(UnsplittableModelError, match="PEFT adapter"):
        split_causal_lm(lora_student(target_modules=("q_proj", "lm_head")))
    prompt_tuned = peft.get_peft_model(llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(UnsplittableModelError, match="prompt-learning"):
        split_causal_lm(prompt_tuned)
