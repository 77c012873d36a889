"""The training loop shared by every objective: same batches, same optimiser, same schedule."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, List, NamedTuple

import torch

Objective = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser and schedule: AdamW, linear warm-up then cosine decay to ``min_lr_ratio * lr``."""

    steps: int
    batch_size: int
    lr: float = 2e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0


class TrainResult(NamedTuple):
    """The per-step training losses and the wall time of the loop."""

    losses: List[float]
    wall_s: float


def batch_schedule(num_sequences: int, steps: int, batch_size: int, seed: int) -> List[torch.Tensor]:
    """The training rows of every step: seeded permutations of the sequences, one per epoch, cut into batches.

    Every objective gets the same schedule, so the methods differ only in their loss.

    Raises:
        ValueError: ``batch_size`` larger than the number of sequences, or a size below 1.
    """
    for name, value in (("num_sequences", num_sequences), ("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if batch_size > num_sequences:
        raise ValueError(f"batch_size ({batch_size}) exceeds the number of training sequences ({num_sequences})")
    generator = torch.Generator().manual_seed(seed)
    per_epoch = num_sequences // batch_size  # the incomplete last batch of an epoch is dropped
    schedule: List[torch.Tensor] = []
    while len(schedule) < steps:
        order = torch.randperm(num_sequences, generator=generator)
        schedule.extend(order[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch))
    return schedule[:steps]


def learning_rate_factor(step: int, settings: TrainSettings) -> float:
    """The multiplier of ``lr`` at ``step`` (0-based): linear warm-up, then cosine down to ``min_lr_ratio``."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    decay_steps = max(1, settings.steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / decay_steps)
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(student: torch.nn.Module, objective: Objective, sequences: torch.Tensor, schedule: List[torch.Tensor],
          settings: TrainSettings, *, log: Callable[[str], None] = print, log_every: int = 25) -> TrainResult:
    """Train ``student`` in place on ``sequences[schedule[step]]`` for every step of the schedule.

    Raises:
        FloatingPointError: a non-finite loss (the run is meaningless past it).
    """
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, settings))
    student.train()
    losses: List[float] = []
    started = time.perf_counter()
    for step, rows in enumerate(schedule):
        loss = objective(student, sequences[rows], rows)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log(f"  step {step + 1}/{len(schedule)}  loss {losses[-1]:.4f}  "
                f"({(time.perf_counter() - started) / (step + 1):.2f} s/step)")
    return TrainResult(losses, time.perf_counter() - started)
