"""Distributional regression KD: Gaussian forecasters and the losses that distil them.

After Li, Zhang, Bao, Harimoto and Sun, "Distributional Correlation-Aware
Knowledge Distillation for Stock Trading Volume Prediction" (ECML PKDD 2022,
arXiv:2208.07232; code: github.com/lancopku/DCKD).  A regression model becomes
a probabilistic forecaster by giving it two heads (:class:`GaussianHead`): a
mean ``mu`` and a log-variance ``s = log sigma^2``, so that it predicts
``N(mu, sigma^2)`` for the target ``y``.  The student then learns from

* the targets, by the Gaussian negative log-likelihood (:func:`gaussian_nll_loss`);
* the teacher's predictive distribution, by the closed-form KL divergence
  between the two Gaussians, in either direction (:func:`gaussian_kd_loss`;
  the paper's is ``KL(teacher || student)``);
* the teacher's pairwise relations across the batch ("correlational
  distillation"): the Pearson correlation of the predicted means over the batch
  (:func:`batch_pearson_loss`), and the consistency of the pairwise differences
  (:func:`pairwise_difference_loss`) or orders (:func:`pairwise_order_loss`) of
  the means.

:func:`distributional_kd_loss` (and :class:`DistributionalKDLoss`) is the
weighted sum of these terms.  Every function takes the mean and log-variance
tensors of any (matching) shape; the batch losses read the first dimension as
the batch (``(N,)`` or ``(N, D)``, ``D`` outputs each correlated over the
batch).  Only the student gets a gradient from the distillation losses (the
teacher's tensors are detached); :func:`gaussian_kl` and
:func:`gaussian_nll_loss` differentiate every argument.

Variance floor: ``sigma^2 = exp(max(s, log var_floor))`` (default ``1e-6``,
as ``torch.nn.GaussianNLLLoss``'s ``eps``): a log-variance below the floor
counts as the floor and gets no gradient.

Errors: a non-tensor or a non-floating tensor is a ``TypeError``; mismatched
shapes or devices, non-finite values, an empty input, a batch loss with fewer
than two rows, a bad reduction or a non-positive floor are ``ValueError``\\ s
naming the argument.  Results are float32 (float64 for float64 inputs; float16
and bfloat16 inputs are computed in float32).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_same_device, check_tensor, finite_float, float32_coefficient, positive_float32

VAR_FLOOR = 1e-6
REGRESSION_REDUCTIONS = ("mean", "sum", "none")
KL_DIRECTIONS = ("forward", "reverse", "symmetric")
_LOG_2PI = math.log(2.0 * math.pi)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = [
    "BatchPearsonLoss",
    "DistributionalKDLoss",
    "GaussianHead",
    "GaussianKDLoss",
    "KL_DIRECTIONS",
    "PairwiseDifferenceLoss",
    "PairwiseOrderLoss",
    "REGRESSION_REDUCTIONS",
    "VAR_FLOOR",
    "batch_pearson_loss",
    "distributional_kd_loss",
    "gaussian_calibration",
    "gaussian_kd_loss",
    "gaussian_kl",
    "gaussian_nll_loss",
    "pairwise_difference_loss",
    "pairwise_order_loss",
]


# ----------------------------------------------------------------- checks
def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_inputs(named: Sequence[Tuple[str, torch.Tensor]]) -> torch.dtype:
    """Types, dtypes, equal shapes, one device, no empty or non-finite tensor; returns the compute dtype."""
    for name, t in named:
        check_tensor(name, t)
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float32, float64, float16 or bfloat16), got {t.dtype}")
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.shape != first.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match {first_name} shape {tuple(first.shape)}")
        check_same_device(name, t, first_name, first)
    if first.numel() == 0:
        raise ValueError(f"{first_name} is empty (shape {tuple(first.shape)}): there is nothing to average")
    if not _is_compiling():
        for name, t in named:
            if not bool(torch.isfinite(t.detach()).all()):
                raise ValueError(f"{name} has non-finite values (NaN or infinity)")
    dtype = torch.float64 if any(t.dtype == torch.float64 for _, t in named) else torch.float32
    return dtype


def _check_reduction(reduction) -> str:
    if reduction not in REGRESSION_REDUCTIONS:
        raise ValueError(f"reduction must be one of {REGRESSION_REDUCTIONS}, got {reduction!r}")
    return reduction


def _floor(var_floor) -> float:
    """``log(var_floor)``, after checking the floor is a finite real > 0."""
    return math.log(positive_float32("var_floor", var_floor))


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def _batch_view(name: str, t: torch.Tensor) -> torch.Tensor:
    """``(N,)`` -> ``(N, 1)``; ``(N, D)`` as is; other ranks are a ValueError.  Needs N >= 2."""
    if t.dim() == 1:
        t = t.unsqueeze(1)
    elif t.dim() != 2:
        raise ValueError(f"{name} must have shape (N,) or (N, D) (the batch first), got {tuple(t.shape)}")
    if t.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows to relate across the batch, "
                         f"got shape {tuple(t.shape)}")
    return t


# ----------------------------------------------------------------- pointwise losses
def gaussian_nll_loss(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean",
                      var_floor: float = VAR_FLOOR, full: bool = True) -> torch.Tensor:
    """Gaussian negative log-likelihood of ``target`` under ``N(mean, exp(logvar))``.

    ``nll = 0.5 * (log(2 pi) + s + (y - mu)^2 / exp(s))`` per element, with
    ``s = max(logvar, log var_floor)``; ``full=False`` drops the constant
    ``0.5 log(2 pi)`` (as ``torch.nn.functional.gaussian_nll_loss``, which takes
    the variance rather than its log).  Equals
    ``-torch.distributions.Normal(mean, exp(s / 2)).log_prob(target)``.
    ``reduction``: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per element).
    """
    dtype = _check_inputs([("mean", mean), ("logvar", logvar), ("target", target)])
    _check_reduction(reduction)
    log_floor = _floor(var_floor)
    mu, s, y = mean.to(dtype), logvar.to(dtype).clamp(min=log_floor), target.to(dtype)
    nll = 0.5 * (s + (y - mu).square() * torch.exp(-s))
    if full:
        nll = nll + 0.5 * _LOG_2PI
    return _reduce(nll, reduction)


def gaussian_kl(mean_p: torch.Tensor, logvar_p: torch.Tensor, mean_q: torch.Tensor, logvar_q: torch.Tensor, *,
                reduction: str = "mean", var_floor: float = VAR_FLOOR) -> torch.Tensor:
    """Closed-form ``KL(N(mu_p, sigma_p^2) || N(mu_q, sigma_q^2))``, element-wise, then reduced.

    ``KL = 0.5 * (s_q - s_p + (exp(s_p) + (mu_p - mu_q)^2) / exp(s_q) - 1)``
    with ``s = log sigma^2`` (each floored at ``log var_floor``); equals
    ``torch.distributions.kl_divergence(Normal(mu_p, sigma_p), Normal(mu_q, sigma_q))``.
    Non-negative, zero iff the two Gaussians are equal.  All four arguments get
    gradients (see :func:`gaussian_kd_loss` for the distillation form).
    """
    dtype = _check_inputs([("mean_p", mean_p), ("logvar_p", logvar_p), ("mean_q", mean_q), ("logvar_q", logvar_q)])
    _check_reduction(reduction)
    log_floor = _floor(var_floor)
    return _reduce(_kl(mean_p.to(dtype), logvar_p.to(dtype).clamp(min=log_floor),
                       mean_q.to(dtype), logvar_q.to(dtype).clamp(min=log_floor)), reduction)


def _kl(mu_p, s_p, mu_q, s_q):
    # exp(s_p - s_q) rather than exp(s_p) / exp(s_q): one exponential, no overflow of each alone.
    return 0.5 * (s_q - s_p + torch.exp(s_p - s_q) + (mu_p - mu_q).square() * torch.exp(-s_q) - 1.0)


def _check_direction(direction) -> str:
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    return direction


def gaussian_kd_loss(student_mean: torch.Tensor, student_logvar: torch.Tensor, teacher_mean: torch.Tensor,
                     teacher_logvar: torch.Tensor, *, direction: str = "forward", reduction: str = "mean",
                     var_floor: float = VAR_FLOOR) -> torch.Tensor:
    """Distributional KD: the student's Gaussian matches the teacher's, by closed-form KL.

    With ``T = N(mu_t, sigma_t^2)`` and ``S = N(mu_s, sigma_s^2)`` per element:

    * ``"forward"`` (default; the paper's ``kd_ma_loss``): ``KL(T || S)``, mass-covering:
      ``0.5 (s_s - s_t + (sigma_t^2 + (mu_t - mu_s)^2) / sigma_s^2 - 1)``;
    * ``"reverse"``: ``KL(S || T)``, mode-seeking;
    * ``"symmetric"``: ``0.5 (KL(T || S) + KL(S || T))`` (half Jeffreys' divergence).

    The teacher's tensors are detached (only the student gets a gradient).
    ``reduction`` ``"mean"`` (default), ``"sum"`` or ``"none"``.
    """
    dtype = _check_inputs([("student_mean", student_mean), ("student_logvar", student_logvar),
                           ("teacher_mean", teacher_mean), ("teacher_logvar", teacher_logvar)])
    _check_reduction(reduction)
    _check_direction(direction)
    log_floor = _floor(var_floor)
    mu_s, s_s = student_mean.to(dtype), student_logvar.to(dtype).clamp(min=log_floor)
    mu_t, s_t = teacher_mean.detach().to(dtype), teacher_logvar.detach().to(dtype).clamp(min=log_floor)
    if direction == "forward":
        kl = _kl(mu_t, s_t, mu_s, s_s)
    elif direction == "reverse":
        kl = _kl(mu_s, s_s, mu_t, s_t)
    else:
        kl = 0.5 * (_kl(mu_t, s_t, mu_s, s_s) + _kl(mu_s, s_s, mu_t, s_t))
    return _reduce(kl, reduction)


# ----------------------------------------------------------------- correlational (batch) losses
def _centred_unit(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Each column minus its mean, divided by its norm (clamped at ``eps``)."""
    c = x - x.mean(dim=0, keepdim=True)
    return c / c.norm(dim=0, keepdim=True).clamp(min=eps)


def batch_pearson_loss(student_mean: torch.Tensor, teacher_mean: torch.Tensor, *, eps: float = 1e-8,
                       reduction: str = "mean") -> torch.Tensor:
    """``1 - rho``, rho the Pearson correlation of the student's and teacher's means across the batch.

    ``rho = sum_i (a_i - mean a)(b_i - mean b) / (||a - mean a|| ||b - mean b||)``,
    ``a = student_mean[:, d]``, ``b = teacher_mean[:, d]``, each centred norm
    clamped at ``eps`` (as DIST's Pearson).  One value per output column ``d``
    (inputs ``(N,)`` or ``(N, D)``), in ``[0, 2]``; ``reduction`` over the ``D``
    columns.  Invariant to shifting either model's means and to scaling them
    by a positive factor: it transfers which samples the teacher predicts high
    or low relative to the batch, not the level.  A constant column (of either
    model) has ``rho = 0``.  The teacher is detached.  Needs N >= 2.
    """
    dtype = _check_inputs([("student_mean", student_mean), ("teacher_mean", teacher_mean)])
    _check_reduction(reduction)
    eps = positive_float32("eps", eps)
    a = _batch_view("student_mean", student_mean).to(dtype)
    b = _batch_view("teacher_mean", teacher_mean.detach()).to(dtype)
    rho = (_centred_unit(a, eps) * _centred_unit(b, eps)).sum(dim=0)
    return _reduce(1.0 - rho, reduction)


def _normalised_differences(x: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``D[i, j, d] = (x_i - x_j) / mean_{i != j} |x_i - x_j|`` and the off-diagonal mask ``(N, N, 1)``."""
    n = x.shape[0]
    diff = x.unsqueeze(1) - x.unsqueeze(0)  # (N, N, D)
    off = ~torch.eye(n, dtype=torch.bool, device=x.device).unsqueeze(-1)
    scale = diff.abs().sum(dim=(0, 1), keepdim=True) / (n * (n - 1))
    return diff / scale.clamp(min=eps), off


def pairwise_difference_loss(student_mean: torch.Tensor, teacher_mean: torch.Tensor, *, beta: float = 1.0,
                             eps: float = 1e-8, reduction: str = "mean") -> torch.Tensor:
    """Consistency of the pairwise differences of the means, RKD-distance style.

    ``D_ij = (mu_i - mu_j) / m``, ``m = mean_{i != j} |mu_i - mu_j|`` (clamped at
    ``eps``), for each model; the loss is ``mean_{i != j} huber_beta(D^s_ij - D^t_ij)``
    per output column (``huber_beta`` = ``torch.nn.functional.smooth_l1_loss``
    with ``beta``, the paper code's distance loss; the paper's distance is
    between the pairs' Gaussians, here between their means).  The signed,
    normalised differences carry both the order of every pair and the relative
    size of the gaps; the loss is invariant to shifting either model's means
    and to scaling them by a positive factor, and zero iff the student's means
    are a positive affine map of the teacher's.  The teacher is detached.
    Needs N >= 2; ``reduction`` over the output columns.
    """
    dtype = _check_inputs([("student_mean", student_mean), ("teacher_mean", teacher_mean)])
    _check_reduction(reduction)
    eps = positive_float32("eps", eps)
    beta = positive_float32("beta", beta)
    a = _batch_view("student_mean", student_mean).to(dtype)
    b = _batch_view("teacher_mean", teacher_mean.detach()).to(dtype)
    ds, off = _normalised_differences(a, eps)
    dt, _ = _normalised_differences(b, eps)
    n = a.shape[0]
    per_pair = F.smooth_l1_loss(ds, dt, reduction="none", beta=beta) * off
    return _reduce(per_pair.sum(dim=(0, 1)) / (n * (n - 1)), reduction)


def pairwise_order_loss(student_mean: torch.Tensor, teacher_mean: torch.Tensor, *, temperature: float = 1.0,
                        eps: float = 1e-8, reduction: str = "mean") -> torch.Tensor:
    """Pairwise order consistency: a logistic (RankNet) loss on the teacher's order of every pair.

    ``mean over pairs i != j with mu^t_i != mu^t_j of softplus(-sign(mu^t_i - mu^t_j) D^s_ij / temperature)``,
    ``D^s_ij = (mu^s_i - mu^s_j) / mean_{i != j} |mu^s_i - mu^s_j|`` (the student's
    normalised differences, as :func:`pairwise_difference_loss`).  Depends on
    the teacher only through the order of its means (invariant to any
    increasing transform of them); invariant to shifting the student's means
    and to scaling them by a positive factor (the normalisation keeps the
    student from lowering the loss by inflating its spread).  A column where
    the teacher ties every pair contributes 0.  The teacher is detached.
    Needs N >= 2; ``reduction`` over the output columns.
    """
    dtype = _check_inputs([("student_mean", student_mean), ("teacher_mean", teacher_mean)])
    _check_reduction(reduction)
    eps = positive_float32("eps", eps)
    tau = positive_float32("temperature", temperature)
    a = _batch_view("student_mean", student_mean).to(dtype)
    b = _batch_view("teacher_mean", teacher_mean.detach()).to(dtype)
    ds, _ = _normalised_differences(a, eps)
    sign = torch.sign(b.unsqueeze(1) - b.unsqueeze(0))  # 0 on the diagonal and on ties
    ordered = sign != 0
    per_pair = F.softplus(-sign * ds / tau) * ordered
    count = ordered.sum(dim=(0, 1))
    return _reduce(per_pair.sum(dim=(0, 1)) / count.clamp(min=1), reduction)


# ----------------------------------------------------------------- the combined objective
def distributional_kd_loss(student_mean: torch.Tensor, student_logvar: torch.Tensor, teacher_mean: torch.Tensor,
                           teacher_logvar: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                           nll_weight: float = 1.0, kl_weight: float = 1.0, direction: str = "forward",
                           pearson_weight: float = 0.0, difference_weight: float = 0.0, order_weight: float = 0.0,
                           var_floor: float = VAR_FLOOR, return_terms: bool = False):
    """The distributional correlation-aware KD objective (DCKD), one scalar.

    ``nll_weight * NLL(y | S) + kl_weight * KL_direction(T, S)
    + pearson_weight * (1 - rho(mu_s, mu_t)) + difference_weight * L_diff + order_weight * L_order``

    (:func:`gaussian_nll_loss`, :func:`gaussian_kd_loss`, :func:`batch_pearson_loss`,
    :func:`pairwise_difference_loss`, :func:`pairwise_order_loss`, each a mean).
    The paper's settings: NLL and ``KL(T || S)`` with weight 1, and its two
    correlational terms with weight 5 each.  ``target`` None (an unlabelled
    transfer set) needs ``nll_weight = 0``.  The batch terms flatten the means
    to ``(N, -1)``.  With ``return_terms=True`` returns ``(total, {name: term})``
    (the terms detached, the terms with weight 0 left out).
    """
    weights = {name: float32_coefficient(name, value) for name, value in
               (("nll_weight", nll_weight), ("kl_weight", kl_weight), ("pearson_weight", pearson_weight),
                ("difference_weight", difference_weight), ("order_weight", order_weight))}
    if target is None and weights["nll_weight"] != 0:
        raise ValueError("target is None but nll_weight != 0: pass the targets, or nll_weight=0 for unlabelled data")
    _check_inputs([("student_mean", student_mean), ("student_logvar", student_logvar),
                   ("teacher_mean", teacher_mean), ("teacher_logvar", teacher_logvar)]
                  + ([("target", target)] if target is not None else []))
    _check_direction(direction)
    terms: Dict[str, torch.Tensor] = {}
    if weights["nll_weight"] != 0:
        terms["nll"] = gaussian_nll_loss(student_mean, student_logvar, target, var_floor=var_floor)
    if weights["kl_weight"] != 0:
        terms["kl"] = gaussian_kd_loss(student_mean, student_logvar, teacher_mean, teacher_logvar,
                                       direction=direction, var_floor=var_floor)
    if any(weights[k] != 0 for k in ("pearson_weight", "difference_weight", "order_weight")):
        n = student_mean.shape[0] if student_mean.dim() > 0 else 1
        ms, mt = student_mean.reshape(n, -1), teacher_mean.reshape(n, -1)
        if weights["pearson_weight"] != 0:
            terms["pearson"] = batch_pearson_loss(ms, mt)
        if weights["difference_weight"] != 0:
            terms["difference"] = pairwise_difference_loss(ms, mt)
        if weights["order_weight"] != 0:
            terms["order"] = pairwise_order_loss(ms, mt)
    key = {"nll": "nll_weight", "kl": "kl_weight", "pearson": "pearson_weight", "difference": "difference_weight",
           "order": "order_weight"}
    if not terms:
        dtype = torch.float64 if student_mean.dtype == torch.float64 else torch.float32
        total = (student_mean.to(dtype) * 0).sum()
    else:
        total = sum(weights[key[name]] * value for name, value in terms.items())
    if return_terms:
        return total, {name: value.detach() for name, value in terms.items()}
    return total


# ----------------------------------------------------------------- metrics
def gaussian_calibration(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor, *,
                         levels: Sequence[float] = (0.5, 0.9, 0.95), var_floor: float = VAR_FLOOR,
                         grid: int = 99) -> Dict[str, float]:
    """Calibration of the Gaussian forecasts' predictive intervals (float64, no gradient).

    Returns ``coverage_<100 p>``: the fraction of targets inside the central
    interval ``mu +- z_{(1+p)/2} sigma`` for each level ``p``, and
    ``calibration_error``: ``mean_k |mean_i 1[PIT_i <= p_k] - p_k|`` over the
    ``grid`` levels ``p_k = k / (grid + 1)``, ``PIT_i = Phi((y_i - mu_i) / sigma_i)``
    (the mean absolute gap of the reliability diagram of the predictive CDF,
    Kuleshov et al. 2018; 0 for calibrated forecasts).
    """
    _check_inputs([("mean", mean), ("logvar", logvar), ("target", target)])
    grid = int(grid)
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    log_floor = _floor(var_floor)
    with torch.no_grad():
        mu, y = mean.detach().double().reshape(-1), target.detach().double().reshape(-1)
        sigma = torch.exp(0.5 * logvar.detach().double().reshape(-1).clamp(min=log_floor))
        z = (y - mu) / sigma
        normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
        out = {}
        for p in levels:
            p = finite_float("level", p)
            if not 0 < p < 1:
                raise ValueError(f"interval levels must lie in (0, 1), got {p}")
            half = normal.icdf(torch.tensor((1 + p) / 2, dtype=torch.float64))
            out[f"coverage_{100 * p:g}"] = float((z.abs() <= half).double().mean())
        pit = normal.cdf(z)
        ps = torch.arange(1, grid + 1, dtype=torch.float64) / (grid + 1)
        empirical = (pit.unsqueeze(0) <= ps.unsqueeze(1)).double().mean(dim=1)
        out["calibration_error"] = float((empirical - ps).abs().mean())
    return out


# ----------------------------------------------------------------- modules
class GaussianHead(nn.Module):
    """Turns a regression model into a Gaussian forecaster: ``features -> (mean, logvar)``.

    Two linear heads on the same features: ``mean = W_mu h + b_mu`` and
    ``logvar = W_s h + b_s`` (the log of the predictive variance), each of
    shape ``(..., out_features)`` (``(...,)`` when ``squeeze=True`` and
    ``out_features == 1``).  ``init_logvar`` sets the log-variance head's bias
    (its weights start at zero), so training starts from one common variance.
    """

    def __init__(self, in_features: int, out_features: int = 1, *, init_logvar: float = 0.0, squeeze: bool = False):
        super().__init__()
        self.mean = nn.Linear(in_features, out_features)
        self.logvar = nn.Linear(in_features, out_features)
        nn.init.zeros_(self.logvar.weight)
        nn.init.constant_(self.logvar.bias, finite_float("init_logvar", init_logvar))
        self.squeeze = bool(squeeze) and out_features == 1

    def forward(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.mean(features), self.logvar(features)
        if self.squeeze:
            mean, logvar = mean.squeeze(-1), logvar.squeeze(-1)
        return mean, logvar


def _check_options(fn, options: dict) -> None:
    """Check a module's fixed options as the function would, on a tiny float64 batch, at construction."""
    x = torch.zeros(3, dtype=torch.float64) + torch.arange(3, dtype=torch.float64)
    fn(*([x] * _ARITY[fn]), **options)


class GaussianKDLoss(nn.Module):
    """:func:`gaussian_kd_loss` as a module: ``GaussianKDLoss(direction="forward")(mu_s, s_s, mu_t, s_t)``."""

    def __init__(self, *, direction: str = "forward", reduction: str = "mean", var_floor: float = VAR_FLOOR):
        super().__init__()
        self.options = dict(direction=direction, reduction=reduction, var_floor=var_floor)
        _check_options(gaussian_kd_loss, self.options)

    def forward(self, student_mean, student_logvar, teacher_mean, teacher_logvar) -> torch.Tensor:
        return gaussian_kd_loss(student_mean, student_logvar, teacher_mean, teacher_logvar, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class _BatchLoss(nn.Module):
    fn = None

    def __init__(self, **options):
        super().__init__()
        self.options = options
        _check_options(type(self).fn, options)

    def forward(self, student_mean: torch.Tensor, teacher_mean: torch.Tensor) -> torch.Tensor:
        return type(self).fn(student_mean, teacher_mean, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class BatchPearsonLoss(_BatchLoss):
    """:func:`batch_pearson_loss` as a module: ``BatchPearsonLoss()(student_mean, teacher_mean)``."""

    fn = staticmethod(batch_pearson_loss)

    def __init__(self, *, eps: float = 1e-8, reduction: str = "mean"):
        super().__init__(eps=eps, reduction=reduction)


class PairwiseDifferenceLoss(_BatchLoss):
    """:func:`pairwise_difference_loss` as a module: ``PairwiseDifferenceLoss(beta=1.0)(student_mean, teacher_mean)``."""

    fn = staticmethod(pairwise_difference_loss)

    def __init__(self, *, beta: float = 1.0, eps: float = 1e-8, reduction: str = "mean"):
        super().__init__(beta=beta, eps=eps, reduction=reduction)


class PairwiseOrderLoss(_BatchLoss):
    """:func:`pairwise_order_loss` as a module: ``PairwiseOrderLoss(temperature=1.0)(student_mean, teacher_mean)``."""

    fn = staticmethod(pairwise_order_loss)

    def __init__(self, *, temperature: float = 1.0, eps: float = 1e-8, reduction: str = "mean"):
        super().__init__(temperature=temperature, eps=eps, reduction=reduction)


class DistributionalKDLoss(nn.Module):
    """:func:`distributional_kd_loss` with fixed weights:
    ``DistributionalKDLoss(pearson_weight=5, difference_weight=5)(mu_s, s_s, mu_t, s_t, target)``."""

    def __init__(self, *, nll_weight: float = 1.0, kl_weight: float = 1.0, direction: str = "forward",
                 pearson_weight: float = 0.0, difference_weight: float = 0.0, order_weight: float = 0.0,
                 var_floor: float = VAR_FLOOR):
        super().__init__()
        self.options = dict(nll_weight=nll_weight, kl_weight=kl_weight, direction=direction,
                            pearson_weight=pearson_weight, difference_weight=difference_weight,
                            order_weight=order_weight, var_floor=var_floor)
        x = torch.arange(3, dtype=torch.float64)
        distributional_kd_loss(x, x, x, x, x, **self.options)

    def forward(self, student_mean, student_logvar, teacher_mean, teacher_logvar, target=None,
                return_terms: bool = False):
        return distributional_kd_loss(student_mean, student_logvar, teacher_mean, teacher_logvar, target,
                                      return_terms=return_terms, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


_ARITY = {gaussian_kd_loss: 4, batch_pearson_loss: 2, pairwise_difference_loss: 2, pairwise_order_loss: 2}
