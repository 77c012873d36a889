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

from .. import correlation_losses, grouped_kd, longtail, losses
from ..config import finite_float, integer
from ..label_revision import select_for_distillation


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
    # LTKD: needs {"groups": class -> group id}; batch-level (its rebalancing prior is the batch's mean).
    "ltkd": (longtail.ltkd_loss, "batch"),
    # Grouped KD: the label joins each row's primary group; mean over the rows whose label is not ignore_index.
    "grouped_kd": (grouped_kd.grouped_kd_loss, "labelled"),
}
LOSS_NAMES = tuple(_LOSSES)
HARD_LOSSES = ("ce", "mse")

# Options the trainer sets itself on every call; giving them in a loss spec is a mistake.
_TRAINER_OPTIONS = ("labels", "normalizer", "reduction", "ignore_index", "hard_weight")
# Objective-level options (not keywords of the kdfast function): Data Selection's fraction of distilled labelled rows.
_DATA_SELECTION = "data_selection"

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
        # Data Selection (kdfast.label_revision): the fraction of each batch's labelled rows that is distilled.
        self.data_selection = self.options.pop(_DATA_SELECTION, None)
        if self.data_selection is not None:
            if kind != "rowwise" or name == "softmax_mse":
                raise ValueError(f"{_DATA_SELECTION} needs a row-wise kdfast loss ('kd', 'ttm', 'wttm', 'distill'), "
                                 f"got {name!r}")
            self.data_selection = finite_float(_DATA_SELECTION, self.data_selection)
            if not 0.0 < self.data_selection <= 1.0:
                raise ValueError(f"{_DATA_SELECTION} (the fraction of labelled rows distilled) must be in (0, 1], "
                                 f"got {self.data_selection}")

    @property
    def uses_row_labels(self) -> bool:
        """True when the loss needs each row's label even where the soft term is not masked by it:
        Label Revision (``label_revision``) and Data Selection (``data_selection``).  The trainer then
        passes ``row_labels`` (unlabelled rows ``ignore_index``)."""
        return self.kind == "rowwise" and (self.options.get("label_revision") is not None
                                           or self.data_selection is not None)

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
                 normalizer: float, row_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.uses_row_labels:
            return self._revised_or_selected(student_logits, teacher_logits, labels, weights, normalizer, row_labels)
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

    def _revised_or_selected(self, student_logits, teacher_logits, labels, weights, normalizer, row_labels):
        """A row-wise loss with Label Revision and/or Data Selection (:mod:`kdfast.label_revision`).

        ``labels`` (when given) mask the rows as usual and are the truth;
        without them (the trainer distils unlabelled rows too) ``row_labels``
        are the truth: the labelled rows are revised, the unlabelled ones
        distilled as they are (nothing to revise them with).
        """
        truth = labels if labels is not None else row_labels
        if truth is None:
            raise ValueError(f"loss {self.name!r} with label_revision / {_DATA_SELECTION} needs the rows' labels")
        if self.options.get("weighting") is not None and (weights is not None or self.data_selection is not None):
            raise ValueError(f"loss {self.name!r} already weights rows ({self.options}); {_DATA_SELECTION} and "
                             f"per-sample teacher weights need a loss without a weighting")
        if self.data_selection is not None:
            selected = select_for_distillation(teacher_logits, truth, self.data_selection, self.ignore_index)
            weights = selected if weights is None else weights.reshape(-1) * selected
        extra = {} if weights is None else {"weighting": weights.reshape(-1)}
        if labels is not None or self.options.get("label_revision") is None:
            return self.fn(student_logits, teacher_logits, labels=labels, ignore_index=self.ignore_index,
                           normalizer=normalizer, **extra, **self.options)
        V = student_logits.shape[-1]
        s, t, y = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V), truth.reshape(-1)
        w = None if weights is None else weights.reshape(-1)
        labelled = y != self.ignore_index
        plain = {k: v for k, v in self.options.items() if k != "label_revision"}
        total = s.new_zeros((), dtype=torch.float32)
        for rows, lab, options in ((labelled, y[labelled], self.options), (~labelled, None, plain)):
            if bool(rows.any()):
                part = {} if w is None else {"weighting": w[rows]}
                total = total + self.fn(s[rows], t[rows], labels=lab, ignore_index=self.ignore_index,
                                        normalizer=normalizer, **part, **options)
        return total

    def __repr__(self) -> str:
        extra = {} if self.data_selection is None else {_DATA_SELECTION: self.data_selection}
        return f"DistillObjective({self.name!r}, {dict(self.options, **extra)})"


def resolve_loss(spec: LossSpec, *, ignore_index: int = -100) -> DistillObjective:
    """Turn a loss spec into a :class:`DistillObjective`.

    ``spec`` is a name of :data:`LOSS_NAMES` (``"kd"``, ``"ttm"``, ``"wttm"``,
    ``"distill"``, ``"dist"``, ``"dkd"``, ``"correlation"``, ``"softmax_mse"``
    (:func:`softmax_mse_loss`, Mean Teacher's consistency), ``"ltkd"``
    (:func:`kdfast.longtail.ltkd_loss`; only as a mapping with its class-to-group
    map, ``{"name": "ltkd", "groups": [0, 0, 1, 2, ...], ...}``), ``"grouped_kd"``
    (:func:`kdfast.grouped_kd.grouped_kd_loss`, labelled like ``"dkd"``)), a mapping
    ``{"name": ..., **options}`` whose options are the keyword arguments of that
    kdfast function (``temperature``, ``divergence``, ``weighting``, ``label_revision``
    (Label Revision, :mod:`kdfast.label_revision`), ...) plus, for the row-wise
    losses, ``data_selection`` (the fraction of each batch's labelled rows that
    is distilled, :func:`kdfast.label_revision.select_for_distillation`), an
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
    """Run the loss once on 2 x 3 logits (2 x C with a class-to-group map of C classes) so that invalid
    options raise now, not mid-epoch."""
    groups = objective.options.get("groups")
    classes = (groups.numel() if isinstance(groups, torch.Tensor)
               else len(groups) if isinstance(groups, (list, tuple)) else 3)
    z = torch.zeros(2, max(classes, 1))
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
