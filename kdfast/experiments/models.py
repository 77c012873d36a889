"""The networks of the default experiment: MLPs on flattened 28x28 images, and a small CNN student.

Mostly MLPs because the whole comparison (five teachers and about twenty
student configurations, times five seeds) must finish in minutes on two CPU
cores; on MNIST a 2-hidden-layer MLP is still a much stronger model than a
one-hidden-layer student of width 32, which is the gap distillation needs.
The dual-student method pairs that MLP with a different architecture, the
small CNN of :func:`small_cnn` (its paper's students are heterogeneous).
Mean Teacher's students put :class:`GaussianNoise` in front (the paper's
input noise).
"""

from __future__ import annotations

from typing import Sequence

import torch
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


class GaussianNoise(nn.Module):
    """Adds ``N(0, std^2)`` noise to the input in training mode; the identity in eval mode."""

    def __init__(self, std: float):
        super().__init__()
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not std >= 0:
            raise ValueError(f"noise std must be a number >= 0, got std={std!r}")
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.std > 0:
            return x + torch.randn_like(x) * self.std
        return x

    def extra_repr(self) -> str:
        return f"std={self.std}"


def small_cnn(channels: Sequence[int] = (8, 16), dropout: float = 0.0) -> nn.Sequential:
    """A CNN on the flattened images: ``Conv 5x5/2 -> ReLU -> Conv 3x3/2 -> ReLU -> (Dropout) -> Linear``.

    ``channels``: the two convolutions' widths; 28x28 -> 14x14 -> 7x7, so the
    linear layer reads ``7 * 7 * channels[1]`` features.
    """
    c = list(channels)
    if len(c) != 2 or not all(isinstance(w, int) and w > 0 for w in c):
        raise ValueError(f"channels must be two positive ints, got channels={channels!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got dropout={dropout!r}")
    layers = [nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, c[0], 5, stride=2, padding=2), nn.ReLU(),
              nn.Conv2d(c[0], c[1], 3, stride=2, padding=1), nn.ReLU(), nn.Flatten()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(7 * 7 * c[1], NUM_CLASSES))
    return nn.Sequential(*layers)


class DropIndex(nn.Module):
    """Drops the last input column: the row index the experiment appends to every image (see :class:`LookupTeacher`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :-1]


class LookupTeacher(nn.Module):
    """A frozen teacher whose logits on the training images are computed once, not at every step.

    The experiment's student inputs carry each image's row index in a last
    column (students drop it with :class:`DropIndex`).  Rows with an index
    ``>= 0`` read the table computed by ``model`` (in eval mode) on
    ``images``; a batch with any other index (the held-out images carry -1)
    runs ``model`` on the images.  The distillation targets are the same as
    the model's, up to float rounding, and a KD step no longer pays a
    forward pass of the (larger) teacher.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        with torch.no_grad():
            self.register_buffer("table", model(images))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = x[:, -1].long()
        if bool((index >= 0).all()):
            return self.table[index]
        return self.model(x[:, :-1])


ARCHITECTURES = ("mlp", "cnn")


def build_student(architecture: str, *, hidden: Sequence[int], channels: Sequence[int], dropout: float,
                  input_noise: float = 0.0, index_column: bool = False) -> nn.Module:
    """The student of ``architecture`` (``"mlp"`` or ``"cnn"``), with input noise in front when > 0;
    ``index_column``: its inputs end with a row-index column, dropped first (:class:`DropIndex`)."""
    if architecture == "mlp":
        layers = list(mlp(hidden, dropout))
    elif architecture == "cnn":
        layers = list(small_cnn(channels, dropout))
    else:
        raise ValueError(f"unknown student architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    if input_noise > 0:
        layers.insert(0, GaussianNoise(input_noise))
    if index_column:
        layers.insert(0, DropIndex())
    return nn.Sequential(*layers)


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
