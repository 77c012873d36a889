"""The teacher and student networks of the default experiment: plain MLPs on flattened 28x28 images.

MLPs rather than CNNs because the whole comparison (2 teachers and 16
student configurations, times 3 seeds) must finish in minutes on two CPU
cores; on MNIST a 2-hidden-layer MLP is still a much stronger model than a
one-hidden-layer student of width 32, which is the gap distillation needs.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .mnist5k import IMAGE_PIXELS, NUM_CLASSES


def mlp(hidden: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """``Linear -> ReLU (-> Dropout)`` per hidden width, then a linear layer to the 10 class logits."""
    widths = list(hidden)
    if not widths or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(f"hidden must be a non-empty list of positive ints, got hidden={hidden!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got dropout={dropout!r}")
    layers = []
    previous = IMAGE_PIXELS
    for width in widths:
        layers += [nn.Linear(previous, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        previous = width
    layers.append(nn.Linear(previous, NUM_CLASSES))
    return nn.Sequential(*layers)


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
