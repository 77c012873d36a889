"""Downstream task: 5-way BBC News topic classification by fine-tuning a (distilled) student.

The student's trunk (its Llama layers, without the LM head) reads the first
``length`` tokens of an article; the mean of its final hidden states over the
article's tokens goes through a new linear layer to the five topic logits.
Every weight is fine-tuned (AdamW, cross-entropy); the score is the accuracy
on held-out articles.  The transfer-set study fine-tunes each distilled
student, and a randomly initialised one as the control, in exactly the same
way.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .training import TrainSettings, learning_rate_factor


@dataclass(frozen=True)
class FineTuneSettings:
    steps: int = 100
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 10

    def as_dict(self) -> dict:
        return asdict(self)


class TopicClassifier(nn.Module):
    """A causal LM's trunk, mean-pooled over the article's tokens, and a linear layer to ``num_classes`` logits."""

    def __init__(self, causal_lm: nn.Module, num_classes: int):
        super().__init__()
        self.trunk = causal_lm.model
        self.head = nn.Linear(causal_lm.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled)


def encode_articles(texts: Sequence[str], tokenizer, length: int) -> tuple:
    """``(ids, mask)`` ``(N, length)``: each article's first ``length`` tokens, right-padded (mask 0) if shorter."""
    ids = torch.full((len(texts), length), tokenizer.eos_token_id, dtype=torch.int64)
    mask = torch.zeros((len(texts), length), dtype=torch.int64)
    for row, text in enumerate(texts):
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        mask[row, :len(tokens)] = 1
    return ids, mask


def balanced_subset(labels: Sequence[int], per_class: int, num_classes: int) -> List[int]:
    """The indices of the first ``per_class`` examples of each class (in the given order)."""
    chosen, counts = [], [0] * num_classes
    for index, label in enumerate(labels):
        if counts[label] < per_class:
            chosen.append(index)
            counts[label] += 1
    if min(counts) < per_class:
        raise ValueError(f"not enough examples for {per_class} per class: {counts}")
    return sorted(chosen)


@torch.no_grad()
def accuracy(model: TopicClassifier, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for start in range(0, ids.shape[0], batch_size):
        logits = model(ids[start:start + batch_size], mask[start:start + batch_size])
        correct += int((logits.argmax(-1) == labels[start:start + batch_size]).sum())
    return correct / ids.shape[0]


def fine_tune(causal_lm: nn.Module, train: tuple, test: tuple, num_classes: int, settings: FineTuneSettings,
              seed: int) -> dict:
    """Fine-tune ``causal_lm`` (in place) on ``train = (ids, mask, labels)``; its accuracy on ``test``."""
    train_ids, train_mask, train_labels = train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TopicClassifier(causal_lm, num_classes)
    schedule_settings = TrainSettings(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                                      warmup_steps=settings.warmup_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, schedule_settings))
    generator = torch.Generator().manual_seed(seed)
    n = train_ids.shape[0]
    batch = min(settings.batch_size, n)
    order, position = torch.randperm(n, generator=generator), 0
    started = time.perf_counter()
    model.train()
    losses = []
    for _ in range(settings.steps):
        if position + batch > n:
            order, position = torch.randperm(n, generator=generator), 0
        rows = order[position:position + batch]
        position += batch
        loss = F.cross_entropy(model(train_ids[rows], train_mask[rows]), train_labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    train_wall = time.perf_counter() - started
    return {"accuracy": accuracy(model, *test), "train_accuracy": accuracy(model, *train),
            "final_train_loss": losses[-1], "train_wall_s": train_wall}
