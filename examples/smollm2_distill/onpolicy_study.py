"""Teacher-forced vs on-policy vs speculative KD of the SmolLM2 student, at equal student-update budgets.

The setting of GKD (Agarwal et al., 2024) and speculative KD (Xu et al., 2024),
shrunk to a CPU: a student first trained with cross-entropy (the papers start
from a supervised fine-tuned student; here :func:`warm_start` trains it on BBC
News text), then distilled from the teacher on prompt / completion pairs (the
first tokens of a BBC News article, and its continuation) under one of the
:data:`CONDITIONS`, all with the same number of optimiser steps, the same
prompts per step, the same completion length, the same divergence and
optimiser.  Only where the completions come from differs:

* ``teacher_forced``: the dataset's continuation (supervised KD, GKD's λ = 0);
* ``onpolicy_0.5``: the student's own samples for a random half of the batches
  (GKD's λ = 0.5), the dataset's for the rest;
* ``onpolicy_1``: always the student's own samples (λ = 1);
* ``speculative``: speculative KD's interleaved sampling: the student proposes
  every token, the teacher replaces proposals outside its top-``K``.

Each step is one :meth:`kdfast.llm.OnPolicyDistiller.step`.  The student is
then scored on held-out BBC News (perplexity) and by the teacher
(:mod:`.generation_quality`: the teacher's log-likelihood of the student's
samples on held-out prompts).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, NamedTuple

import torch

from kdfast.llm import OnPolicyDistiller

from .evaluation import perplexity
from .generation_quality import score_samples
from .training import TrainSettings, batch_schedule, learning_rate_factor


class Condition(NamedTuple):
    title: str
    lmbda: float
    sampler: str


CONDITIONS: Dict[str, Condition] = {
    "teacher_forced": Condition("teacher-forced KD (lambda = 0)", 0.0, "student"),
    "onpolicy_0.5": Condition("on-policy KD, lambda = 0.5 (GKD mix)", 0.5, "student"),
    "onpolicy_1": Condition("on-policy KD, lambda = 1", 1.0, "student"),
    "speculative": Condition("speculative KD (interleaved sampling)", 1.0, "speculative"),
}


@dataclass(frozen=True)
class DistillSettings:
    """The distillation phase, the same for every condition."""

    steps: int
    batch_size: int  # prompts per step
    completion_len: int
    lr: float = 1e-3
    warmup_steps: int = 5
    divergence: str = "kl"  # forward KL(teacher || student), as the example's teacher-forced KD
    top_k: int = 25  # speculative KD's accepted set (and the top-K fraction of the evaluation)
    sampling_temperature: float = 1.0

    def as_dict(self) -> dict:
        return asdict(self)


def distill(student: torch.nn.Module, teacher: torch.nn.Module, condition: Condition, prompts: torch.Tensor,
            completions: torch.Tensor, settings: DistillSettings, *, seed: int, eos_token_id: int,
            log: Callable[[str], None] = print, log_every: int = 10) -> dict:
    """Distil ``teacher`` into ``student`` (in place) under ``condition``; the training record.

    Step ``i`` uses the prompts ``prompts[schedule[i]]`` (a seeded permutation:
    the same for every condition of a seed) and, for dataset batches, their
    ``completions``.  AdamW with linear warm-up and cosine decay, gradients
    clipped at norm 1, as :func:`~smollm2_distill.training.train`.
    """
    distiller = OnPolicyDistiller(
        student, teacher, max_new_tokens=settings.completion_len, lmbda=condition.lmbda, sampler=condition.sampler,
        top_k=settings.top_k if condition.sampler == "speculative" else None,
        sampling_temperature=settings.sampling_temperature, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
        generator=seed, divergence=settings.divergence)
    schedule = batch_schedule(prompts.shape[0], settings.steps, settings.batch_size, seed)
    train_settings = TrainSettings(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                                   warmup_steps=settings.warmup_steps)
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=train_settings.weight_decay,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, train_settings))
    student.train()
    losses, sources, replaced, lengths = [], [], [], []
    started = time.perf_counter()
    for step, rows in enumerate(schedule):
        loss = distiller.step(prompts[rows], None, completions[rows], None)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite distillation loss {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), train_settings.grad_clip)
        optimizer.step()
        scheduler.step()
        batch = distiller.last_batch
        losses.append(loss.item())
        sources.append(batch.source)
        if batch.generation is not None:
            mask = batch.generation.completion_mask
            lengths.append(float(batch.generation.lengths.float().mean()))
            if batch.generation.replaced is not None:
                replaced.append(float(batch.generation.replaced[mask].float().mean()))
        if log_every and (step + 1) % log_every == 0:
            log(f"  step {step + 1}/{settings.steps}  loss {losses[-1]:.4f}  "
                f"({(time.perf_counter() - started) / (step + 1):.2f} s/step)")
    wall = time.perf_counter() - started
    return {
        "steps": len(losses),
        "losses": losses,
        "generated_batches": sum(source != "dataset" for source in sources),
        "mean_generated_length": sum(lengths) / len(lengths) if lengths else None,
        "speculative_replaced_fraction": sum(replaced) / len(replaced) if replaced else None,
        "train_wall_s": wall,
        "s_per_step": wall / max(1, len(losses)),
    }


def evaluate_student(student: torch.nn.Module, teacher: torch.nn.Module, *, held_out: torch.Tensor,
                     eval_prompts: torch.Tensor, completion_len: int, eos_token_id: int, seed: int, top_k: int,
                     eval_batch_size: int = 8) -> dict:
    """Held-out perplexity, and the teacher's scores of the student's samples on held-out prompts."""
    started = time.perf_counter()
    result = {"held_out_perplexity": perplexity(student, held_out, eval_batch_size)}
    result.update(score_samples(student, teacher, eval_prompts, max_new_tokens=completion_len,
                                eos_token_id=eos_token_id, seed=seed, top_k=top_k, batch_size=eval_batch_size))
    result["eval_wall_s"] = time.perf_counter() - started
    return result


def student_state(student: torch.nn.Module) -> dict:
    """A copy of the student's weights (to restart every condition from the same warm start)."""
    return {name: tensor.detach().clone() for name, tensor in student.state_dict().items()}
