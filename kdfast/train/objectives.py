"""The loss terms of the trainer, in one convention: a sum over valid rows divided by a given count.

The trainer divides every term by a *global* count of rows (over the
accumulated micro-batches and over all ranks), so that gradient accumulation
and DDP give the gradient of one large batch.  kdfast's row-wise losses take
that count directly (``normalizer=``); the batch-level ones (DIST, DKD,
correlation, user callables) return a mean over the rows they see, which is
turned into the same convention by multiplying with ``rows / normalizer``.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from .. import correlation_losses, losses
from ..config import finite_float, integer


def softmax_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, labels=None,
                     ignore_index: int = -100, normalizer: float, temperature: float = 1.0,
                     weighting: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean Teacher's consistency: ``mean over classes of (softmax(s/T) - softmax(t/T))^2``, per row.

    As ``softmax_mse_loss`` of the reference Mean Teacher code (squared error
    summed over the V classes and divided by V), summed over the valid rows
    (label not ``ignore_index``; every row when ``labels`` is None), times the
    optional per-row ``weighting``, divided by ``normalizer``.  Pure PyTorch,
    float32; the teacher gets no gradient.
    """
    T = finite_float("temperature", temperature)
    if not T > 0:
        raise ValueError(f"temperature must be > 0, got temperature={temperature}")
    V = student_logits.shape[-1]
    s = torch.softmax(student_logits.reshape(-1, V).float() / T, -1)
    t = torch.softmax(teacher_logits.detach().reshape(-1, V).float() / T, -1)
    per_row = (s - t).square().mean(-1)
    if weighting is not None:
        per_row = per_row * weighting.reshape(-1).float()
    valid = _valid_rows(labels, student_logits, ignore_index)
    return torch.where(valid, per_row, torch.zeros_like(per_row)).sum() / normalizer


# name -> (kdfast function, how it is called)
_LOSSES: Dict[str, tuple] = {
    "kd": (losses.kd_loss, "rowwise"),
    "ttm": (losses.ttm_loss, "rowwise"),
    "wttm": (losses.wttm_loss, "rowwise"),
    "distill": (losses.distill_loss, "rowwise"),
    "dist": (correlation_losses.dist_loss, "batch"),
    "correlation": (correlation_losses.correlation_loss, "batch"),
    "dkd": (correlation_losses.dkd_loss, "labelled"),
    "softmax_mse": (softmax_mse_loss, "rowwise"),
}
LOSS_NAMES = tuple(_LOSSES)
HARD_LOSSES = ("ce", "mse")

# Options the trainer sets itself on every call; giving them in a loss spec is a mistake.
_TRAINER_OPTIONS = ("labels", "normalizer", "reduction", "ignore_index", "hard_weight")

LossSpec = Union[str, Mapping, Callable, "DistillObjective"]


class DistillObjective:
    """A distillation loss ``(student_logits, teacher_logits, labels, *, weights, normalizer)``.

    Returns ``sum over valid rows / normalizer`` as a float32 scalar (the
    trainer's convention, see the module docstring).  ``labels`` only mask
    rows whose label is ``ignore_index`` (and give DKD its target class);
    ``weights`` are optional per-row weights (a ``(N,)`` tensor), supported
    by the row-wise kdfast losses that have no weighting of their own.

    Build one with :func:`resolve_loss`.
    """

    def __init__(self, name: str, fn: Callable, kind: str, options: Mapping, ignore_index: int = -100):
        self.name = name
        self.fn = fn
        self.kind = kind  # "rowwise", "batch", "labelled" or "callable"
        self.options = dict(options)
        self.ignore_index = integer("ignore_index", ignore_index)

    @property
    def needs_labels(self) -> bool:
        """True when the loss itself uses the labels (DKD's target class)."""
        return self.kind == "labelled"

    @property
    def accepts_weights(self) -> bool:
        """True when per-row weights can be passed (a row-wise kdfast loss without its own weighting)."""
        return self.kind == "rowwise" and self.name != "wttm" and self.options.get("weighting") is None

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 labels: Optional[torch.Tensor], *, weights: Optional[torch.Tensor] = None,
                 normalizer: float) -> torch.Tensor:
        if weights is not None and not self.accepts_weights:
            raise ValueError(
                f"loss {self.name!r} cannot take per-sample teacher weights (it is not a row-wise kdfast loss, "
                f"or it already weights rows: options {self.options}); use e.g. {{'name': 'distill'}}"
            )
        if self.needs_labels and labels is None:
            raise ValueError(f"loss {self.name!r} needs labels")
        if self.kind == "rowwise":
            extra = {} if weights is None else {"weighting": weights}
            return self.fn(student_logits, teacher_logits, labels=labels, ignore_index=self.ignore_index,
                           normalizer=normalizer, **extra, **self.options)
        valid = _valid_rows(labels, student_logits, self.ignore_index)
        rows = int(valid.sum())
        if rows == 0:  # nothing to learn from; keep the graph so every rank runs the same backward
            return student_logits.sum() * 0.0
        if self.kind == "labelled":
            mean = self.fn(student_logits, teacher_logits, labels, ignore_index=self.ignore_index, **self.options)
        elif self.kind == "batch":
            # The batch-level losses have no row mask: they see the valid rows only.
            V = student_logits.shape[-1]
            s, t = student_logits.reshape(-1, V)[valid], teacher_logits.reshape(-1, V)[valid]
            mean = self.fn(s, t, **self.options)
        else:
            mean = self.fn(student_logits, teacher_logits, labels)
        return mean.float() * (rows / normalizer)

    def __repr__(self) -> str:
        return f"DistillObjective({self.name!r}, {self.options})"


def resolve_loss(spec: LossSpec, *, ignore_index: int = -100) -> DistillObjective:
    """Turn a loss spec into a :class:`DistillObjective`.

    ``spec`` is a name of :data:`LOSS_NAMES` (``"kd"``, ``"ttm"``, ``"wttm"``,
    ``"distill"``, ``"dist"``, ``"dkd"``, ``"correlation"``, ``"softmax_mse"``
    (:func:`softmax_mse_loss`, Mean Teacher's consistency)), a mapping
    ``{"name": ..., **options}`` whose options are the keyword arguments of that
    kdfast function (``temperature``, ``divergence``, ``weighting``, ...), an
    ``nn.Module`` or callable ``(student_logits, teacher_logits, labels) ->
    scalar`` that returns a mean over the valid rows it is given, or an
    existing :class:`DistillObjective`.  Options are checked here, by calling
    the loss once on a tiny input, so a bad option fails at construction with
    kdfast's own message.
    """
    if isinstance(spec, DistillObjective):
        return spec
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, Mapping):
        options = dict(spec)
        if "name" not in options:
            raise ValueError(f"a loss mapping needs a 'name' (one of {LOSS_NAMES}), got keys {sorted(options)}")
        name = options.pop("name")
    elif callable(spec):
        return DistillObjective(getattr(spec, "__name__", type(spec).__name__), spec, "callable", {}, ignore_index)
    else:
        raise TypeError(f"loss must be a name, a mapping with a 'name', or a callable, got {type(spec).__name__}")
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {LOSS_NAMES} or a callable")
    fixed = sorted(set(options) & set(_TRAINER_OPTIONS))
    if fixed:
        raise ValueError(f"loss options {fixed} are set by the trainer (labels, normaliser, masking); remove them")
    fn, kind = _LOSSES[name]
    objective = DistillObjective(name, fn, kind, options, ignore_index)
    _probe(objective)
    return objective


def _probe(objective: DistillObjective) -> None:
    """Run the loss once on 2 x 3 logits so that invalid options raise now, not mid-epoch."""
    z = torch.zeros(2, 3)
    objective(z, z, torch.zeros(2, dtype=torch.long), normalizer=2.0)


def _valid_rows(labels: Optional[torch.Tensor], logits: torch.Tensor, ignore_index: int) -> torch.Tensor:
    if labels is None:
        return torch.ones(logits.numel() // logits.shape[-1], dtype=torch.bool, device=logits.device)
    return labels.reshape(-1) != ignore_index


def count_valid(labels: torch.Tensor, ignore_index: int) -> int:
    """The number of rows whose label is not ``ignore_index``."""
    return int((labels != ignore_index).sum())


def hard_loss_sum(name: str, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The supervised loss summed over valid rows, in float32.

    ``"ce"``: cross-entropy.  ``"mse"``: ``||softmax(z) - onehot(y)||^2`` per
    row (summed over classes), the teacher-training loss of "How to Train the
    Teacher Model for Effective Knowledge Distillation" (Hamidi et al., 2024).
    """
    V = logits.shape[-1]
    z, y = logits.reshape(-1, V).float(), labels.reshape(-1)
    if name == "ce":
        return F.cross_entropy(z, y, ignore_index=ignore_index, reduction="sum")
    if name == "mse":
        valid = y != ignore_index
        onehot = F.one_hot(torch.where(valid, y, 0), V).float()
        per_row = (torch.softmax(z, -1) - onehot).square().sum(-1)
        return torch.where(valid, per_row, torch.zeros_like(per_row)).sum()
    raise ValueError(f"hard_loss must be one of {HARD_LOSSES}, got {name!r}")


def check_weight(name: str, value) -> float:
    """A finite, non-negative term weight."""
    x = finite_float(name, value)
    if x < 0:
        raise ValueError(f"{name} must be >= 0, got {name}={value}")
    return x
