"""Classification metrics: top-1 accuracy, NLL, expected calibration error, teacher agreement.

Everything is computed by one accumulator, :class:`ClassificationMetrics`,
which keeps sums only (so it is exact over many batches and reduces across
ranks with one ``all_reduce``); the functions ``accuracy``, ``nll``,
``expected_calibration_error`` and ``agreement`` are its one-batch forms.

ECE (Guo et al., 2017): the top-1 confidences are put in ``n_bins`` (15)
equal-width bins ``(k/n_bins, (k+1)/n_bins]``; ``ECE = sum_b |B_b|/n
|acc_b - conf_b|`` where ``acc_b`` and ``conf_b`` are the bin's accuracy and
mean confidence.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Optional

import torch

ECE_BINS = 15

# Slots of the scalar sums.
_ROWS, _CORRECT, _NLL, _AGREE_ROWS, _AGREE = range(5)


class ClassificationMetrics:
    """Sums of a classifier's metrics over batches.

    ``update(logits, labels, teacher_logits=None)`` adds a batch (rows whose
    label is ``ignore_index`` are skipped); ``compute()`` returns ``{"accuracy",
    "nll", "ece"}`` plus ``"agreement"`` (top-1 match rate with the teacher)
    when teacher logits were given.  Logits are ``(..., V)``, flattened to rows.
    """

    def __init__(self, n_bins: int = ECE_BINS, ignore_index: int = -100):
        if not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive int, got n_bins={n_bins!r}")
        self.n_bins = n_bins
        self.ignore_index = ignore_index
        self.sums = torch.zeros(5, dtype=torch.float64)
        # Per confidence bin: count, sum of confidences, number correct.
        self.bins = torch.zeros(3, n_bins, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor,
               teacher_logits: Optional[torch.Tensor] = None) -> "ClassificationMetrics":
        V = logits.shape[-1]
        z = logits.detach().reshape(-1, V).float()
        y = labels.detach().reshape(-1)
        if y.numel() != z.shape[0]:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match the {z.shape[0]} rows of logits "
                             f"shape {tuple(logits.shape)}")
        valid = y != self.ignore_index
        z, y = z[valid], y[valid].long()
        logp = torch.log_softmax(z, -1)
        confidence, prediction = logp.max(-1)
        confidence = confidence.exp()
        correct = (prediction == y).double()

        self.sums[_ROWS] += y.numel()
        self.sums[_CORRECT] += correct.sum().cpu()
        # Rows in float32, their sum in float64: how a float32 sum rounds depends on the
        # batch's length and the SIMD width, and the metrics must not depend on either.
        self.sums[_NLL] += -logp.gather(-1, y[:, None]).double().sum().cpu()
        # Bin k holds confidences in (k/n, (k+1)/n]; a confidence is never 0 (it is >= 1/V).
        index = (torch.ceil(confidence.double() * self.n_bins).long() - 1).clamp(0, self.n_bins - 1)
        for row, values in enumerate((torch.ones_like(correct), confidence.double(), correct)):
            self.bins[row] += torch.zeros(self.n_bins, dtype=torch.float64, device=z.device).index_add_(
                0, index, values).cpu()
        if teacher_logits is not None:
            if teacher_logits.shape != logits.shape:
                raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} does not match "
                                 f"logits shape {tuple(logits.shape)}")
            t = teacher_logits.detach().reshape(-1, V)[valid]
            self.sums[_AGREE_ROWS] += y.numel()
            self.sums[_AGREE] += (t.argmax(-1) == prediction).sum().double().cpu()
        return self

    def all_reduce(self, device: Optional[torch.device] = None) -> "ClassificationMetrics":
        """Sum the counts of every rank (a no-op outside ``torch.distributed``)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            packed = torch.cat([self.sums, self.bins.reshape(-1)]).to(device or "cpu")
            dist.all_reduce(packed)
            packed = packed.cpu()
            self.sums, self.bins = packed[:5].clone(), packed[5:].reshape(3, self.n_bins).clone()
        return self

    def compute(self) -> Dict[str, float]:
        rows = float(self.sums[_ROWS])
        if rows == 0:
            raise ValueError("no labelled rows were seen: the metrics are undefined")
        count, conf_sum, correct_sum = self.bins
        # sum_b |B_b|/n |acc_b - conf_b| = sum_b |correct_b - conf_sum_b| / n
        ece = float((correct_sum - conf_sum).abs().sum()) / rows
        out = {"accuracy": float(self.sums[_CORRECT]) / rows, "nll": float(self.sums[_NLL]) / rows, "ece": ece}
        if self.sums[_AGREE_ROWS] > 0:
            out["agreement"] = float(self.sums[_AGREE] / self.sums[_AGREE_ROWS])
        return out

    def reliability_diagram(self, path) -> Optional[str]:
        """Write the reliability diagram (accuracy and mean confidence per bin) as a PNG at ``path``.

        Needs matplotlib; without it, warns and returns None (nothing else
        depends on the picture).  Returns the path written.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            warnings.warn("matplotlib is not installed: reliability diagram skipped (pip install matplotlib)",
                          stacklevel=2)
            return None
        count, conf_sum, correct_sum = self.bins.numpy()
        filled = count > 0
        edges = [k / self.n_bins for k in range(self.n_bins + 1)]
        centres = [(edges[k] + edges[k + 1]) / 2 for k in range(self.n_bins)]
        accuracy = [correct_sum[k] / count[k] if filled[k] else 0.0 for k in range(self.n_bins)]
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.bar(centres, accuracy, width=1.0 / self.n_bins, edgecolor="black", label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"ECE = {self.compute()['ece']:.4f}")
        ax.legend(loc="upper left")
        fig.tight_layout()
        path = os.fspath(path)
        fig.savefig(path, format="png")
        plt.close(fig)
        return path


def accuracy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> float:
    """Top-1 accuracy over the rows whose label is not ``ignore_index``."""
    return ClassificationMetrics(ignore_index=ignore_index).update(logits, labels).compute()["accuracy"]


def nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> float:
    """Mean negative log-likelihood ``-log softmax(z)[y]``."""
    return ClassificationMetrics(ignore_index=ignore_index).update(logits, labels).compute()["nll"]


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS,
                               ignore_index: int = -100) -> float:
    """ECE with ``n_bins`` equal-width confidence bins (see the module docstring)."""
    return ClassificationMetrics(n_bins, ignore_index).update(logits, labels).compute()["ece"]


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of rows where student and teacher predict the same top-1 class."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits shape {tuple(student_logits.shape)} does not match "
                         f"teacher_logits shape {tuple(teacher_logits.shape)}")
    labels = torch.zeros(student_logits.numel() // student_logits.shape[-1], dtype=torch.long,
                         device=student_logits.device)
    return ClassificationMetrics().update(student_logits, labels, teacher_logits).compute()["agreement"]


def reliability_diagram(logits: torch.Tensor, labels: torch.Tensor, path, n_bins: int = ECE_BINS,
                        ignore_index: int = -100) -> Optional[str]:
    """Write a reliability-diagram PNG of one set of predictions (None, with a warning, without matplotlib)."""
    return ClassificationMetrics(n_bins, ignore_index).update(logits, labels).reliability_diagram(path)
