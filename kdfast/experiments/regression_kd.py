"""Distributional regression KD on a real time series: ``kdfast distill-regression``.

Tests the claims of Li et al., "Distributional Correlation-Aware Knowledge
Distillation for Stock Trading Volume Prediction" (ECML PKDD 2022; the losses:
:mod:`kdfast.regression`) on the weekly Mauna Loa CO2 series bundled with
statsmodels (``statsmodels.datasets.co2``: 2,284 weeks, 1958-2001, 59 missing;
its CSV is read directly, so only the statsmodels package files are needed).
It is the longest time series statsmodels ships (the others have at most a
few hundred points): real measurements with a trend, a yearly cycle and
week-to-week noise, so a forecast has both a predictable part and an
uncertainty for a Gaussian forecaster's variance head to learn.

Task: from a sliding window of the last ``L`` weekly values, forecast the
change of the series ``horizon`` weeks ahead, ``y_{t+h} - y_t``, as a
Gaussian.  Two window lengths, as the paper's two settings: 13 weeks (a
quarter: the model sees the local slope but not the yearly cycle) and 52
weeks (a whole cycle).  Inputs are the window minus its last value (the
series' level is not stationary); targets and inputs are standardised by the
training split.  Missing weeks are linearly interpolated inside the inputs,
and samples whose target or last input week was missing are dropped.  The
samples are split in time order by their target week: the first 60 % train,
the next 20 % validation (checkpoint selection and the MSE students'
variance), the last 20 % test (only scored).

Models are MLPs with a Gaussian head (mean and log-variance): the teacher
(hidden 64-64, dropout 0.1; 21x the student's parameters at window 13, 8.8x
at 52) is trained on the Gaussian NLL; each student (hidden 16) with

* ``mse``: MSE on the targets, no teacher;
* ``nll``: Gaussian NLL on the targets, no teacher (the distributional
  student without a teacher, the ablation the paper does not separate);
* ``kd-mean``: plain regression KD on the mean, ``MSE(y) + MSE(mu_t)``;
* ``dist-kd``: ``NLL(y) + KL(teacher || student)`` (the paper's ``kd_ma_loss``);
* ``dist-corr-kd``: ``dist-kd`` + ``5 (1 - Pearson(mu_s, mu_t))`` + ``5``
  pairwise-difference consistency, over each batch.

The paper's settings (its released code, ``run_kd.sh``): Adam at lr 1e-3,
batch 32, KD weight 1 and correlational weights 5, the checkpoint with the
best validation MSE (evaluated every epoch here).  No setting was tuned on the
test split: the teacher's size and dropout and the number of epochs (60, for
the students to converge) were chosen on the first 80 % of the series alone
(train, and the validation split cut in two).  The ``mse`` and ``kd-mean``
students have no variance head; their predictive variance is their
validation MSE (homoscedastic).

Reports test MSE and MAE (in ppm), direction accuracy (the paper's ACC: the
sign of the predicted change), Gaussian NLL (per week, in ppm units),
coverage of the central 50/90/95 % predictive intervals and the calibration
error of the predictive CDF; over seeds, means with 95 % t-intervals and
paired differences (same seed: same teacher, data order and initial
weights) against the MSE student, plain KD and the NLL student.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..regression import (batch_pearson_loss, gaussian_calibration, gaussian_kd_loss, gaussian_nll_loss,
                          pairwise_difference_loss, GaussianHead)
from .environment import results_environment
from .stats import interval, paired_difference, verdict

METHODS = ("mse", "nll", "kd-mean", "dist-kd", "dist-corr-kd")
METHOD_TITLES = {
    "mse": "MSE student (no teacher)",
    "nll": "Gaussian-NLL student (no teacher)",
    "kd-mean": "plain KD on the mean",
    "dist-kd": "distributional KD (NLL + KL(T||S))",
    "dist-corr-kd": "distributional + correlational KD",
}
BASELINES = ("mse", "kd-mean", "nll")
METRICS = ("mse", "mae", "direction_accuracy", "nll", "coverage_50", "coverage_90", "coverage_95",
           "calibration_error")
# +1: higher is better, -1: lower is better, 0: neither (coverage: closer to the nominal level is better).
METRIC_DIRECTION = {"mse": -1, "mae": -1, "direction_accuracy": 1, "nll": -1, "coverage_50": 0, "coverage_90": 0,
                    "coverage_95": 0, "calibration_error": -1}
STATSMODELS_HINT = ("kdfast distill-regression needs statsmodels for its bundled CO2 series: "
                    "pip install --no-deps statsmodels==0.15.0 patsy")


@dataclass
class RegressionKDConfig:
    """The settings of the experiment (the defaults: the committed run)."""

    seeds: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    windows: List[int] = field(default_factory=lambda: [13, 52])
    horizon: int = 4
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    student_hidden: List[int] = field(default_factory=lambda: [16])
    teacher_hidden: List[int] = field(default_factory=lambda: [64, 64])
    teacher_dropout: float = 0.1
    epochs: int = 60
    teacher_epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    kd_weight: float = 1.0
    pearson_weight: float = 5.0
    difference_weight: float = 5.0
    direction: str = "forward"
    student_fraction: float = 1.0
    train_fraction: float = 0.6
    validation_fraction: float = 0.2
    threads: int = 1

    def check(self) -> "RegressionKDConfig":
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown} (known: {', '.join(METHODS)})" if unknown
                             else "at least one method is needed")
        if any(w < 2 for w in self.windows) or not self.windows:
            raise ValueError(f"window lengths must be >= 2 weeks, got {self.windows}")
        for name in ("horizon", "epochs", "teacher_epochs", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (the correlational losses relate pairs in a batch)")
        if not 0 < self.student_fraction <= 1:
            raise ValueError(f"student_fraction must be in (0, 1], got {self.student_fraction}")
        if self.teacher_dropout < 0 or self.teacher_dropout >= 1:
            raise ValueError(f"teacher_dropout must be in [0, 1), got {self.teacher_dropout}")
        if not (0 < self.train_fraction and 0 < self.validation_fraction
                and self.train_fraction + self.validation_fraction < 1):
            raise ValueError("train_fraction and validation_fraction must be > 0 and leave a test split")
        return self


def quick_config(**overrides) -> RegressionKDConfig:
    """A smoke-test configuration: two seeds, a few epochs, both windows (a few seconds)."""
    base = RegressionKDConfig(seeds=[0, 1], epochs=2, teacher_epochs=2, student_hidden=[8], teacher_hidden=[48])
    return replace(base, **overrides)


# ----------------------------------------------------------------- data
def co2_path() -> str:
    """The CSV of ``statsmodels.datasets.co2`` inside the installed statsmodels package.

    Read directly (the same 2,284 values as ``co2.load_pandas()``): importing
    ``statsmodels.datasets`` would pull in scipy and pandas, which reading one
    CSV does not need.  ImportError (with the install command) when
    statsmodels is not installed, FileNotFoundError if its copy lacks the file.
    """
    import importlib.util

    spec = importlib.util.find_spec("statsmodels")
    if spec is None or spec.origin is None:
        raise ImportError(STATSMODELS_HINT)
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "co2", "co2.csv")
    if not os.path.exists(path):
        raise FileNotFoundError(f"statsmodels is installed but has no {path}; {STATSMODELS_HINT}")
    return path


def load_co2() -> Tuple[List[str], torch.Tensor]:
    """The weekly CO2 series (ppm) of statsmodels: (ISO dates, float64 values with NaN where missing)."""
    import csv

    with open(co2_path(), newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or set(rows[0]) != {"date", "co2"}:
        raise ValueError(f"unexpected columns in {co2_path()}: {list(rows[0]) if rows else 'no rows'}")
    dates = [f"{r['date'][:4]}-{r['date'][4:6]}-{r['date'][6:8]}" for r in rows]
    values = [float(r["co2"]) if r["co2"].strip() else math.nan for r in rows]
    return dates, torch.tensor(values, dtype=torch.float64)


def _interpolate(values: torch.Tensor) -> torch.Tensor:
    """Linear interpolation over the NaNs (ends: the nearest observed value)."""
    known = torch.nonzero(~torch.isnan(values)).squeeze(1)
    if known.numel() == 0:
        raise ValueError("the series has no observed value")
    out = values.clone()
    idx = torch.arange(len(values), dtype=torch.float64)
    missing = torch.nonzero(torch.isnan(values)).squeeze(1)
    pos = torch.searchsorted(known, missing).clamp(1, len(known) - 1) if len(known) > 1 else None
    for k, m in enumerate(missing.tolist()):
        if len(known) == 1 or m < known[0] or m > known[-1]:
            out[m] = values[known[0] if len(known) == 1 or m < known[0] else known[-1]]
            continue
        lo, hi = known[pos[k] - 1], known[pos[k]]
        w = (idx[m] - lo) / (hi - lo)
        out[m] = values[lo] * (1 - w) + values[hi] * w
    return out


@dataclass
class WindowData:
    """One window length's splits: standardised tensors plus the target scale (ppm per unit)."""

    window: int
    x: Dict[str, torch.Tensor]
    y: Dict[str, torch.Tensor]
    target_mean: float
    target_scale: float
    dates: Dict[str, Tuple[str, str]]


def make_windows(values: torch.Tensor, dates: Sequence[str], window: int, horizon: int, train_fraction: float,
                 validation_fraction: float) -> WindowData:
    """Sliding-window samples of one length, split in time order (see the module docstring)."""
    missing = torch.isnan(values)
    series = _interpolate(values)
    ts = [t for t in range(window - 1, len(series) - horizon) if not missing[t] and not missing[t + horizon]]
    if len(ts) < 10:
        raise ValueError(f"too few samples ({len(ts)}) for window {window} and horizon {horizon}")
    index = torch.tensor(ts)
    offsets = torch.arange(-(window - 1), 0)
    x = series[index.unsqueeze(1) + offsets] - series[index].unsqueeze(1)  # (n, window - 1): the window minus y_t
    y = series[index + horizon] - series[index]
    n = len(ts)
    n_train, n_val = int(n * train_fraction), int(n * validation_fraction)
    parts = {"train": slice(0, n_train), "validation": slice(n_train, n_train + n_val), "test": slice(n_train + n_val, n)}
    xm, xs = x[parts["train"]].mean(0), x[parts["train"]].std(0).clamp(min=1e-8)
    ym, ys = y[parts["train"]].mean(), y[parts["train"]].std().clamp(min=1e-8)
    xs_, ys_, spans = {}, {}, {}
    for name, sl in parts.items():
        xs_[name] = ((x[sl] - xm) / xs).float()
        ys_[name] = ((y[sl] - ym) / ys).float()
        first, last = ts[sl][0] + horizon, ts[sl][-1] + horizon
        spans[name] = (dates[first], dates[last])
    return WindowData(window, xs_, ys_, float(ym), float(ys), spans)


# ----------------------------------------------------------------- models
class GaussianMLP(nn.Module):
    """An MLP (ReLU) whose last layer is a :class:`kdfast.GaussianHead`: ``x -> (mean, logvar)``, each ``(N,)``."""

    def __init__(self, inputs: int, hidden: Sequence[int], dropout: float = 0.0):
        super().__init__()
        layers: List[nn.Module] = []
        width = inputs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
            width = h
        self.body = nn.Sequential(*layers)
        self.head = GaussianHead(width, 1, squeeze=True)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.body(x))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _mean_only_parameters(model: GaussianMLP) -> int:
    return parameter_count(model) - parameter_count(model.head.logvar)


# ----------------------------------------------------------------- training
def _objective(method: str, config: RegressionKDConfig) -> Callable:
    """``loss(mean, logvar, y, teacher_mean, teacher_logvar)`` of a method."""
    kd, pw, dw, direction = config.kd_weight, config.pearson_weight, config.difference_weight, config.direction

    def mse(mu, s, y, tm, ts):
        return (mu - y).square().mean()

    def nll(mu, s, y, tm, ts):
        return gaussian_nll_loss(mu, s, y)

    def kd_mean(mu, s, y, tm, ts):
        return (mu - y).square().mean() + kd * (mu - tm).square().mean()

    def dist_kd(mu, s, y, tm, ts):
        return gaussian_nll_loss(mu, s, y) + kd * gaussian_kd_loss(mu, s, tm, ts, direction=direction)

    def dist_corr_kd(mu, s, y, tm, ts):
        loss = dist_kd(mu, s, y, tm, ts)
        if mu.shape[0] >= 2:  # a last batch of one sample has no pair
            loss = loss + pw * batch_pearson_loss(mu, tm) + dw * pairwise_difference_loss(mu, tm)
        return loss

    return {"mse": mse, "nll": nll, "kd-mean": kd_mean, "dist-kd": dist_kd, "dist-corr-kd": dist_corr_kd}[method]


def _predict(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model(x)


def train_model(model: GaussianMLP, data: WindowData, loss_fn: Callable, epochs: int, batch_size: int, lr: float,
                order_seed: int, teacher: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Dict[str, object]:
    """Adam on the training split; keeps the epoch with the best validation MSE (the paper's selection).

    ``teacher``: the teacher's (mean, logvar) on the training split, indexed like it.
    """
    x, y = data.x["train"], data.y["train"]
    tm, ts = teacher if teacher is not None else (y, torch.zeros_like(y))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(order_seed)
    best = (math.inf, -1, None)
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(y), generator=order)
        for start in range(0, len(y), batch_size):
            idx = perm[start:start + batch_size]
            mu, s = model(x[idx])
            loss = loss_fn(mu, s, y[idx], tm[idx], ts[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        mu_val, _ = _predict(model, data.x["validation"])
        val_mse = float((mu_val - data.y["validation"]).square().mean())
        if val_mse < best[0]:
            best = (val_mse, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    return {"validation_mse_std": best[0], "best_epoch": best[1]}


def evaluate(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor, shift: float,
             scale: float) -> Dict[str, float]:
    """Metrics in the target's units (ppm; standardised value * scale + shift): MSE, MAE, direction accuracy
    (the sign of the predicted change y_{t+h} - y_t, the paper's ACC), NLL, interval coverage, calibration."""
    mean, logvar, target = mean.double(), logvar.double(), target.double()
    err = (mean - target) * scale
    metrics = {"mse": float(err.square().mean()), "mae": float(err.abs().mean()),
               "direction_accuracy": float(((mean * scale + shift) * (target * scale + shift) > 0).double().mean())}
    metrics["nll"] = float(gaussian_nll_loss(mean, logvar, target)) + math.log(scale)
    metrics.update(gaussian_calibration(mean, logvar, target))
    return metrics


def run_window(data: WindowData, config: RegressionKDConfig, seed: int,
               log: Callable[[str], None]) -> List[Dict[str, object]]:
    """The teacher and every student of one seed on one window length; returns one record per model."""
    inputs = data.x["train"].shape[1]
    records = []

    def finish(name: str, model: GaussianMLP, info: dict, started: float, homoscedastic: bool) -> None:
        mu, s = _predict(model, data.x["test"])
        if homoscedastic:  # no variance head was trained: the validation MSE is the predictive variance
            mu_val, _ = _predict(model, data.x["validation"])
            var = (mu_val - data.y["validation"]).square().mean().clamp(min=1e-6)
            s = torch.full_like(mu, float(torch.log(var)))
        metrics = evaluate(mu, s, data.y["test"], data.target_mean, data.target_scale)
        params = _mean_only_parameters(model) if homoscedastic else parameter_count(model)
        records.append({"window": data.window, "seed": seed, "method": name, **metrics, **info, "parameters": params,
                        "seconds": round(time.perf_counter() - started, 3)})
        log(f"  window {data.window:>3} seed {seed} {name:<13} test MSE {metrics['mse']:.4f} NLL {metrics['nll']:.3f} "
            f"cover90 {metrics['coverage_90']:.3f} ({time.perf_counter() - started:.1f} s)")

    started = time.perf_counter()
    torch.manual_seed(10_000 + seed)
    teacher = GaussianMLP(inputs, config.teacher_hidden, config.teacher_dropout)
    info = train_model(teacher, data, _objective("nll", config), config.teacher_epochs, config.batch_size, config.lr,
                       order_seed=20_000 + seed)
    finish("teacher", teacher, info, started, homoscedastic=False)
    t_train = _predict(teacher, data.x["train"])
    if config.student_fraction < 1:  # low-resource: the students see a random subset (the teacher saw all)
        n = len(data.y["train"])
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(30_000 + seed))
        keep = keep[:max(config.batch_size, int(n * config.student_fraction))].sort().values
        data = replace(data, x={**data.x, "train": data.x["train"][keep]}, y={**data.y, "train": data.y["train"][keep]})
        t_train = (t_train[0][keep], t_train[1][keep])
    for method in config.methods:
        started = time.perf_counter()
        torch.manual_seed(seed)  # the same initial student for every method of a seed
        student = GaussianMLP(inputs, config.student_hidden)
        info = train_model(student, data, _objective(method, config), config.epochs, config.batch_size, config.lr,
                           order_seed=seed, teacher=t_train)
        finish(method, student, info, started, homoscedastic=method in ("mse", "kd-mean"))
    return records


# ----------------------------------------------------------------- summary
def summarise(runs: List[dict], config: RegressionKDConfig) -> Dict[str, object]:
    """Per window: each model's metrics (mean, 95 % interval) and each method's paired differences to the baselines."""
    summary, paired = {}, {}
    for window in config.windows:
        rows = [r for r in runs if r["window"] == window]
        by = {}
        for r in rows:
            by.setdefault(r["method"], {})[r["seed"]] = r
        summary[str(window)] = {m: {k: interval([r[k] for r in by[m].values()]) for k in METRICS}
                                for m in ["teacher", *config.methods] if m in by}
        paired[str(window)] = {}
        for m in config.methods:
            for base in BASELINES:
                if base == m or base not in by or m not in by:
                    continue
                paired[str(window)].setdefault(m, {})[f"vs {base}"] = {
                    k: paired_difference({s: r[k] for s, r in by[m].items()}, {s: r[k] for s, r in by[base].items()})
                    for k in METRICS}
            if "teacher" in by and m in by:
                ratio = {s: by["teacher"][s]["mse"] / by[m][s]["mse"] for s in by[m] if s in by["teacher"]}
                paired[str(window)].setdefault(m, {})["teacher_mse_over_student_mse"] = interval(list(ratio.values()))
    return {"summary": summary, "paired": paired}


CLAIMS = (
    # (id, statement, method, baseline, metric, direction the paper claims)
    ("dckd-beats-mse", "distributional + correlational KD has a lower test MSE than the MSE student",
     "dist-corr-kd", "mse", "mse", -1),
    ("dckd-beats-kd", "distributional + correlational KD has a lower test MSE than plain KD on the mean",
     "dist-corr-kd", "kd-mean", "mse", -1),
    ("dist-beats-kd", "distributional KD has a lower test MSE than plain KD on the mean",
     "dist-kd", "kd-mean", "mse", -1),
    ("corr-adds", "the correlational terms lower the test MSE of distributional KD",
     "dist-corr-kd", "dist-kd", "mse", -1),
    ("dist-teacher-helps-nll", "distributional KD has a lower test NLL than the same Gaussian student without a "
     "teacher", "dist-kd", "nll", "nll", -1),
    ("dist-teacher-helps-calibration", "distributional KD has a lower calibration error than the Gaussian student "
     "without a teacher", "dist-kd", "nll", "calibration_error", -1),
    ("dckd-direction-vs-kd", "distributional + correlational KD has a higher direction accuracy (the paper's ACC) "
     "than plain KD on the mean", "dist-corr-kd", "kd-mean", "direction_accuracy", 1),
)


def evaluate_claims(runs: List[dict], config: RegressionKDConfig) -> List[dict]:
    """Each claim per window: the paired difference and ``holds``/``reversed``/``not resolved``."""
    out = []
    for cid, text, method, base, metric, direction in CLAIMS:
        for window in config.windows:
            rows = [r for r in runs if r["window"] == window]
            a = {r["seed"]: r[metric] for r in rows if r["method"] == method}
            b = {r["seed"]: r[metric] for r in rows if r["method"] == base}
            diff = paired_difference(a, b) if a and b else None
            out.append({"claim": cid, "statement": text, "window": window, "method": method, "baseline": base,
                        "metric": metric, "difference": diff, "verdict": verdict(diff, direction)})
    return out


def format_table(result: dict) -> str:
    """A markdown table per window: mean [95 % interval] of the main metrics, and the paired MSE differences."""
    lines = []
    for window, methods in result["summary"].items():
        lines.append(f"window {window} weeks (horizon {result['config']['horizon']}):")
        lines.append("| model | MSE | MAE | dir. acc. | NLL | cover 50/90/95 | calib. err. | ΔMSE vs mse "
                     "| ΔMSE vs kd-mean |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for m, stats in methods.items():
            def cell(k, fmt="{:.4f}"):
                s = stats[k]
                if s["low"] is None:
                    return fmt.format(s["mean"])
                return f"{fmt.format(s['mean'])} [{fmt.format(s['low'])}, {fmt.format(s['high'])}]"

            def delta(base):
                d = result["paired"][window].get(m, {}).get(f"vs {base}", {}).get("mse")
                if not d:
                    return "–"
                if d["low"] is None:
                    return f"{d['mean']:+.4f}"
                return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"

            cover = "/".join(f"{stats[k]['mean']:.2f}" for k in ("coverage_50", "coverage_90", "coverage_95"))
            lines.append(f"| {m} | {cell('mse')} | {cell('mae')} | {cell('direction_accuracy', '{:.3f}')} | "
                         f"{cell('nll', '{:.3f}')} | {cover} | {cell('calibration_error', '{:.3f}')} | "
                         f"{delta('mse')} | {delta('kd-mean')} |")
        lines.append("")
    return "\n".join(lines)


def plot_results(result: dict, path: str) -> None:
    """Per window (rows): MSE, the paired MSE difference to the MSE student, NLL, calibration error and 90 %
    coverage of every model: mean and 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("mse", "test MSE (ppm²)"), ("paired", "ΔMSE vs the MSE student (paired)"), ("nll", "test NLL"),
              ("calibration_error", "calibration error"), ("coverage_90", "90% interval coverage"))
    windows = list(result["summary"])
    fig, axes = plt.subplots(len(windows), len(panels), figsize=(4.2 * len(panels), 3.2 * len(windows)),
                             squeeze=False)
    for row, window in enumerate(windows):
        stats = result["summary"][window]
        names = list(stats)
        for col, (metric, title) in enumerate(panels):
            ax = axes[row][col]
            for i, name in enumerate(names):
                if metric == "paired":
                    s = result["paired"][window].get(name, {}).get("vs mse", {}).get("mse")
                    if not s:
                        continue
                else:
                    s = stats[name][metric]
                err = None if s["low"] is None else [[s["mean"] - s["low"]], [s["high"] - s["mean"]]]
                ax.errorbar([i], [s["mean"]], yerr=err, fmt="o", capsize=4,
                            color="black" if name == "teacher" else f"C{i}")
            if metric in ("coverage_90", "paired"):
                ax.axhline(0.9 if metric == "coverage_90" else 0.0, color="grey", linestyle="--", linewidth=1)
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
            ax.set_title(f"{title}, window {window}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    fraction = result["config"].get("student_fraction", 1.0)
    low = f", students on {fraction:.0%} of the training windows" if fraction < 1 else ""
    fig.suptitle(f"Distributional regression KD on weekly CO2 (statsmodels), {result['config']['horizon']}-week-ahead "
                 f"change{low}; {len(result['config']['seeds'])} seeds, mean and 95% interval", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------- the run
def output_paths(out: str) -> Tuple[str, str]:
    """``out`` (a path stem, a trailing ``.json`` dropped) -> (``out.json``, ``out.png``)."""
    stem = out[:-5] if out.endswith(".json") else out
    return stem + ".json", stem + ".png"


def run_experiment(config: RegressionKDConfig, out: Optional[str] = None, plot: bool = True,
                   log: Callable[[str], None] = print) -> dict:
    """Run every (window, seed, model); return the results (and write ``out.json`` / ``out.png`` when ``out``)."""
    config.check()
    if out is not None:
        directory = os.path.dirname(os.path.abspath(output_paths(out)[0]))
        os.makedirs(directory, exist_ok=True)
    dates, values = load_co2()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    runs: List[dict] = []
    data_info = {}
    try:
        for window in config.windows:
            data = make_windows(values, dates, window, config.horizon, config.train_fraction,
                                config.validation_fraction)
            data_info[str(window)] = {"samples": {k: len(v) for k, v in data.y.items()}, "target_weeks": data.dates,
                                      "target_mean_ppm": data.target_mean, "target_std_ppm": data.target_scale,
                                      "inputs": data.x["train"].shape[1]}
            log(f"window {window}: {data_info[str(window)]['samples']} samples (train/validation/test)")
            for seed in config.seeds:
                runs.extend(run_window(data, config, seed, log))
    finally:
        torch.set_num_threads(previous_threads)
    elapsed = time.perf_counter() - started
    params = {}
    for window in config.windows:
        rows = [r for r in runs if r["window"] == window]
        t = next(r["parameters"] for r in rows if r["method"] == "teacher")
        s = max(r["parameters"] for r in rows if r["method"] != "teacher")
        params[str(window)] = {"teacher": t, "student": s, "ratio": round(t / s, 2)}
    result = {
        "experiment": "distill-regression",
        "paper": "Li et al., Distributional Correlation-Aware Knowledge Distillation for Stock Trading Volume "
                 "Prediction, ECML PKDD 2022 (arXiv:2208.07232)",
        "date": datetime.date.today().isoformat(),
        "config": asdict(config),
        "data": {"dataset": "statsmodels.datasets.co2 (weekly Mauna Loa CO2, ppm, 1958-03-29 to 2001-12-29; "
                            f"statsmodels {_version('statsmodels')})",
                 "task": f"forecast y[t+{config.horizon}] - y[t] from the last L weeks (L = window)",
                 "selection": "checkpoint with the best validation MSE; mse/kd-mean variance = validation MSE",
                 "windows": data_info},
        "methods": {m: METHOD_TITLES[m] for m in config.methods},
        "parameters": params,
        "runs": runs,
        **summarise(runs, config),
        "claims": evaluate_claims(runs, config),
        "elapsed_s": round(elapsed, 1),
        "environment": results_environment(),
    }
    if out is not None:
        json_path, png_path = output_paths(out)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        if plot:
            plot_results(result, png_path)
        log(f"wrote {json_path}" + (f" and {png_path}" if plot else ""))
    log(f"elapsed: {elapsed:.1f} s")
    return result


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------- the command line: kdfast distill-regression
DEFAULT_OUT = "runs/distill-regression"


def add_parser(subparsers) -> None:
    """Register ``kdfast distill-regression`` (see :mod:`kdfast.cli`)."""
    import argparse

    d = RegressionKDConfig()
    methods = "\n".join(f"  {m:<13} {METHOD_TITLES[m]}" for m in METHODS)
    p = subparsers.add_parser(
        "distill-regression", help="distributional regression KD on the CO2 series bundled with statsmodels",
        description="Gaussian forecasters (mean and log-variance heads) on the weekly Mauna Loa CO2 series of "
                    "statsmodels: a teacher MLP, then small students with each method, compared on held-out weeks "
                    "(MSE, MAE, direction accuracy, NLL, interval coverage, calibration error; 95 percent "
                    "intervals and paired differences over seeds).",
        epilog=f"""\
methods:
{methods}

Task: forecast the change {d.horizon} weeks ahead from windows of {" and ".join(map(str, d.windows))} weeks; splits in
time order: {d.train_fraction:.0%} train, {d.validation_fraction:.0%} validation (checkpoint selection), the rest test.
Teacher MLP {"-".join(map(str, d.teacher_hidden))} (dropout {d.teacher_dropout}), students MLP \
{"-".join(map(str, d.student_hidden))}; Adam lr {d.lr}, batch {d.batch_size},
{d.epochs} epochs, the paper's KD weights (KL {d.kd_weight}, correlational {d.pearson_weight} and {d.difference_weight}).
Writes OUT.json and OUT.png. Needs statsmodels (pip install --no-deps statsmodels==0.15.0 patsy).

examples:
  kdfast distill-regression                       # the default: 5 seeds, both windows (2-3 minutes on 2 cores)
  kdfast distill-regression --quick --out /tmp/rkd   # a smoke test in seconds
  kdfast distill-regression --seeds 0 1 2 3 4 5 6 --student-fraction 0.1   # low-resource students
""", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", metavar="S", help=f"seeds (default: {' '.join(map(str, d.seeds))})")
    p.add_argument("--out", metavar="PATH", default=DEFAULT_OUT,
                   help=f"output stem: writes PATH.json and PATH.png (default: {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: 2 seeds, 2 epochs, tiny models (the numbers mean nothing)")
    p.add_argument("--threads", type=int, metavar="N", help=f"torch threads (default: {d.threads})")
    p.add_argument("--windows", type=int, nargs="+", metavar="L",
                   help=f"window lengths in weeks (default: {' '.join(map(str, d.windows))})")
    p.add_argument("--methods", nargs="+", metavar="M", choices=METHODS,
                   help=f"students to train (default: all: {' '.join(METHODS)})")
    p.add_argument("--epochs", type=int, metavar="N", help=f"student epochs (default: {d.epochs})")
    p.add_argument("--student-fraction", type=float, metavar="F",
                   help="fraction of the training windows the students see, a random subset per seed (the teacher "
                        f"sees all; default: {d.student_fraction})")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw OUT.png")
    p.add_argument("--force", action="store_true", help="overwrite OUT.json / OUT.png if they exist")


def run(args, extra) -> int:
    """``kdfast distill-regression``: run, write OUT.json and OUT.png, print the table and the verdicts."""
    overrides = {k: v for k, v in (("seeds", args.seeds), ("threads", args.threads), ("windows", args.windows),
                                   ("methods", args.methods), ("epochs", args.epochs),
                                   ("student_fraction", args.student_fraction)) if v is not None}
    config = quick_config(**overrides) if args.quick else replace(RegressionKDConfig(), **overrides)
    config.check()
    json_path, png_path = output_paths(args.out)
    existing = [p for p in (json_path, png_path) if os.path.exists(p)]
    if existing and not args.force:
        raise FileExistsError(f"{' and '.join(existing)} exist: pass --force to overwrite, or another --out")
    load_co2()  # fail now, with the hint, if statsmodels is missing
    result = run_experiment(config, out=args.out, plot=args.plot)
    print()
    print(format_table(result))
    for claim in result["claims"]:
        d = claim["difference"]
        shown = "" if not d or d["low"] is None else f" ({d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}])"
        print(f"window {claim['window']:>3}: {claim['verdict']:<12} {claim['statement']}{shown}")
    return 0
