"""The Distiller: one training loop composing kdfast losses, teacher signals and the user's models.

Batches are ``(inputs, labels)`` pairs; ``inputs`` (a tensor, or a tuple /
list / dict of tensors) is moved to the device and given to each model as
``model(inputs)``; models return logits ``(..., V)``.

Normalisation.  Every term is a sum over valid rows divided by a global count
taken over all micro-batches of one optimizer step and over all ranks (the
hard term counts rows whose label is not ``ignore_index``; the distillation
and peer terms count the same rows, or every row with
``distill_unlabeled=True``).  Because DDP averages gradients over ranks, each
rank back-propagates its share times the world size.  So gradient
accumulation and DDP give the gradient of one large batch (exactly so for
row-wise losses; DIST's batch term sees each micro-batch separately).

Reproducibility.  ``fit`` checkpoints after every epoch (models, optimizer,
scheduler, grad scaler, teacher-signal state, step, every rank's random
states, the sampler seed), and ``resume=True`` continues from the last
checkpoint to bit-identical weights, provided the data order is a function of
``(seed, epoch)``: use :func:`~kdfast.train.make_train_loader` (the
Distiller calls ``set_epoch`` on any sampler that has it).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import integer
from ..losses import kd_loss
from .checkpoint import CHECKPOINT_NAME, FORMAT_VERSION, PREVIOUS_CHECKPOINT_NAME, capture_rng_state, \
    load_latest_checkpoint, restore_rng_state, save_checkpoint
from .distributed import all_gather, all_reduce_sum, barrier, current_context, epoch_sampler, is_distributed
from .metrics import ClassificationMetrics
from .objectives import HARD_LOSSES, LossSpec, check_weight, count_valid, hard_loss_sum, resolve_loss
from .progress import progress_bar
from .teachers import FrozenTeacher, MultiTeacher, TeacherSignal

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
TERMS = ("total", "hard", "soft", "peer")
TeacherSpec = Union[None, nn.Module, Sequence[nn.Module], TeacherSignal]


def as_teacher_signal(teacher: TeacherSpec) -> Optional[TeacherSignal]:
    """None, a module (frozen teacher), a sequence of modules (multi-teacher) or a TeacherSignal."""
    if teacher is None or isinstance(teacher, TeacherSignal):
        return teacher
    if isinstance(teacher, nn.Module):
        return FrozenTeacher(teacher)
    if isinstance(teacher, (list, tuple)):
        return MultiTeacher(teacher)
    raise TypeError(f"teacher must be None, an nn.Module, a list of modules or a TeacherSignal, "
                    f"got {type(teacher).__name__}")


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


class Distiller:
    """Train one or more students against a teacher signal with a kdfast loss.

    Args:
        student: the model to train, or a sequence of models (>= 2: peer
            learning, each also distils from the others' detached predictions).
        teacher: None (supervised only), an ``nn.Module`` (frozen, eval mode),
            a list of modules (:class:`MultiTeacher`) or a :class:`TeacherSignal`.
        loss: the distillation loss, see :func:`~kdfast.train.resolve_loss`.
        optimizer: an optimizer over the students' parameters.
        scheduler: an optional LR scheduler, stepped every epoch
            (``scheduler_interval="epoch"``) or every optimizer step (``"step"``).
        hard_loss, hard_weight: the supervised term, ``"ce"``, ``"mse"`` (softmax
            vs one-hot) or None, and its weight.
        soft_weight: the weight of the distillation term.
        peer_weight, peer_temperature: the peer term of multiple students,
            ``kdfast.kd_loss(student_i, student_j.detach(), peer_temperature)``
            averaged over the peers ``j != i``.
        ignore_index: the label of rows that carry no label.
        distill_unlabeled: give rows labelled ``ignore_index`` the distillation
            and peer terms too (semi-supervised, e.g. Mean Teacher).
        device: where to train (default: ``cuda:LOCAL_RANK`` if CUDA is
            available, else the CPU).  Models are moved there.
        amp: None, ``"bf16"`` or ``"fp16"``: ``torch.autocast`` around the
            forward passes and losses (``"fp16"`` adds a GradScaler).
        grad_accum_steps: micro-batches per optimizer step.
    """

    def __init__(self, student: Union[nn.Module, Sequence[nn.Module]], teacher: TeacherSpec = None,
                 loss: LossSpec = "kd", *, optimizer: torch.optim.Optimizer,
                 scheduler=None, scheduler_interval: str = "epoch",
                 hard_loss: Optional[str] = "ce", hard_weight: float = 1.0, soft_weight: float = 1.0,
                 peer_weight: float = 1.0, peer_temperature: float = 1.0, ignore_index: int = -100,
                 distill_unlabeled: bool = False, device: Union[None, str, torch.device] = None,
                 amp: Optional[str] = None, grad_accum_steps: int = 1):
        self.students: List[nn.Module] = [student] if isinstance(student, nn.Module) else list(student)
        if not self.students or not all(isinstance(s, nn.Module) for s in self.students):
            raise TypeError("student must be an nn.Module or a non-empty sequence of nn.Modules")
        if len({id(s) for s in self.students}) != len(self.students):
            raise ValueError("the students must be distinct modules")
        self.names = ["student"] if len(self.students) == 1 else [f"student{i}" for i in range(len(self.students))]
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _check_optimizer_covers(optimizer, self.students)
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        if hard_loss is not None and hard_loss not in HARD_LOSSES:
            raise ValueError(f"hard_loss must be one of {HARD_LOSSES} or None, got {hard_loss!r}")
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
        if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be an int >= 1, got grad_accum_steps={grad_accum_steps!r}")
        if not peer_temperature > 0:
            raise ValueError(f"peer_temperature must be > 0, got peer_temperature={peer_temperature}")

        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.hard_loss = hard_loss
        self.hard_weight = check_weight("hard_weight", hard_weight)
        self.soft_weight = check_weight("soft_weight", soft_weight)
        self.peer_weight = check_weight("peer_weight", peer_weight)
        self.peer_temperature = float(peer_temperature)
        self.ignore_index = integer("ignore_index", ignore_index)
        self.distill_unlabeled = bool(distill_unlabeled)
        self.grad_accum_steps = grad_accum_steps
        self.amp = amp
        self.step = 0  # optimizer steps done

        self.context = current_context(None if device is None else torch.device(device))
        self.device = self.context.device
        for s in self.students:
            s.to(self.device)
        self.signal = as_teacher_signal(teacher)
        self.objective = resolve_loss(loss, ignore_index=self.ignore_index) if self.signal is not None else None
        if self.signal is not None:
            self.signal.attach(self.students)
            self.signal.to(self.device)
            if isinstance(self.signal, MultiTeacher) and not self.objective.accepts_weights:
                raise ValueError(f"a MultiTeacher weights each sample per teacher, but loss {self.objective.name!r} "
                                 f"takes no per-row weights; use e.g. 'kd' or {{'name': 'distill'}}")
            if self.distill_unlabeled and self.objective.needs_labels:
                raise ValueError(f"loss {self.objective.name!r} needs labels, so distill_unlabeled=True cannot work")
        # DDP averages gradients over ranks; find_unused_parameters stays off (every parameter is used).
        self.models = [DistributedDataParallel(s) if is_distributed() else s for s in self.students]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")

    # ------------------------------------------------------------------ one optimizer step
    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AMP_DTYPES[self.amp])

    def _no_sync(self, skip_sync: bool):
        stack = contextlib.ExitStack()
        if skip_sync:
            for m in self.models:
                if isinstance(m, DistributedDataParallel):
                    stack.enter_context(m.no_sync())
        return stack

    def _global_counts(self, batches) -> torch.Tensor:
        """``[labelled rows, distilled rows]`` of a window of micro-batches, summed over ranks."""
        labelled = sum(count_valid(y, self.ignore_index) for _, y in batches)
        distilled = sum(y.numel() for _, y in batches) if self.distill_unlabeled else labelled
        counts = torch.tensor([labelled, distilled], dtype=torch.float64)
        return all_reduce_sum(counts, self.device)

    def _terms(self, inputs, labels, logits: List[torch.Tensor], counts) -> Dict[str, torch.Tensor]:
        """The loss terms of one micro-batch, summed over the students, each ``/ global count``."""
        labelled, distilled = (max(float(c), 1.0) for c in counts)  # 0 rows: the sums are 0 as well
        mask_labels = None if self.distill_unlabeled else labels
        zero = logits[0].new_zeros((), dtype=torch.float32)
        hard, soft, peer = zero, zero, zero
        shared_targets = None
        for i, z in enumerate(logits):
            if self.hard_loss is not None and self.hard_weight != 0.0:
                hard = hard + hard_loss_sum(self.hard_loss, z, labels, self.ignore_index) / labelled
            if self.signal is not None and self.soft_weight != 0.0:
                if self.signal.depends_on_student:
                    targets = self.signal.targets(inputs, z.detach())
                else:
                    shared_targets = shared_targets or self.signal.targets(inputs, z.detach())
                    targets = shared_targets
                # Label Revision / Data Selection need each row's label even where the soft term is not masked.
                truth = {"row_labels": labels} if self.objective.uses_row_labels else {}
                for t in targets:
                    soft = soft + t.scale * self.objective(z, t.logits, mask_labels, weights=t.weights,
                                                           normalizer=distilled, **truth)
            if len(logits) > 1 and self.peer_weight != 0.0:
                peers = [kd_loss(z, other.detach(), self.peer_temperature, labels=mask_labels,
                                 ignore_index=self.ignore_index, normalizer=distilled)
                         for j, other in enumerate(logits) if j != i]
                peer = peer + sum(peers) / len(peers)
        total = self.hard_weight * hard + self.soft_weight * soft + self.peer_weight * peer
        return {"total": total, "hard": hard, "soft": soft, "peer": peer}

    def _optimizer_step(self, window, epoch: int) -> torch.Tensor:
        batches = [(_to_device(x, self.device), _to_device(y, self.device)) for x, y in map(_as_pair, window)]
        counts = self._global_counts(batches)
        values = torch.zeros(len(TERMS), dtype=torch.float64)
        for i, (x, y) in enumerate(batches):
            with self._no_sync(i < len(batches) - 1):
                with self._autocast():
                    logits = [m(x) for m in self.models]
                    terms = self._terms(x, y, logits, counts)
                # DDP divides the summed gradient by the world size; the terms are already global means.
                self.scaler.scale(terms["total"] * self.context.world_size).backward()
            values += torch.tensor([float(terms[k].detach()) for k in TERMS], dtype=torch.float64)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.signal is not None:
            self.signal.after_optimizer_step(self.step, epoch)
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        return values

    def train_epoch(self, loader, epoch: int, progress: bool = True) -> Dict[str, float]:
        """One pass over ``loader`` (``epoch`` is 0-based); returns the mean of each loss term per step."""
        for s in self.students:
            s.train()
        sampler = epoch_sampler(loader)
        if sampler is not None:
            sampler.set_epoch(epoch)
        if self.signal is not None:
            self.signal.on_epoch_start(epoch)
        total = math.ceil(len(loader) / self.grad_accum_steps) if hasattr(loader, "__len__") else None
        bar = progress_bar(progress and self.context.is_main, total, f"epoch {epoch + 1}")
        sums = torch.zeros(len(TERMS), dtype=torch.float64)
        steps = 0
        batches = iter(loader)
        try:
            while True:
                window = list(itertools.islice(batches, self.grad_accum_steps))
                if not window:
                    break
                values = self._optimizer_step(window, epoch)
                sums += values
                steps += 1
                bar.update(1)
                bar.set_postfix({"loss": float(values[0])})
        finally:
            bar.close()
        # Each rank holds its share of every step's global mean: the sum over ranks is the global loss.
        sums = all_reduce_sum(sums, self.device)
        active = self._active_terms()
        return {k: float(sums[i]) / max(steps, 1) for i, k in enumerate(TERMS) if k in active}

    def _active_terms(self):
        active = {"total"}
        if self.hard_loss is not None and self.hard_weight != 0.0:
            active.add("hard")
        if self.signal is not None and self.soft_weight != 0.0:
            active.add("soft")
        if len(self.students) > 1 and self.peer_weight != 0.0:
            active.add("peer")
        return active

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, loader, *, reliability_path=None) -> Dict[str, object]:
        """Accuracy, NLL, ECE (and agreement with the teacher) of the students on ``loader``.

        Returns the first student's metrics; with several students also
        ``"students": {name: metrics}``.  Under DDP every rank evaluates what
        its loader yields and the sums are reduced: give each rank a shard
        (``make_train_loader(..., shuffle=False)``; DistributedSampler pads the
        last shard with repeats) or the whole set (the ratios are unchanged).  ``reliability_path``: write the first
        student's reliability diagram there (rank 0; needs matplotlib).
        """
        reference = self.signal.reference_logits if self.signal is not None else None
        meters = accumulate_metrics(self.students, loader, device=self.device, ignore_index=self.ignore_index,
                                    reference=reference, autocast=self._autocast)
        for meter in meters:
            meter.all_reduce(self.device)
        results: Dict[str, object] = dict(meters[0].compute())
        if len(self.students) > 1:
            results["students"] = {name: meter.compute() for name, meter in zip(self.names, meters)}
        if reliability_path is not None and self.context.is_main:
            meters[0].reliability_diagram(reliability_path)
        return results

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, epochs_done: int, sampler=None) -> dict:
        """Everything a resumed run needs (a collective call under DDP: it gathers every rank's RNG state)."""
        return {
            "format": FORMAT_VERSION,
            "epoch": epochs_done,
            "step": self.step,
            "students": [s.state_dict() for s in self.students],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "teacher_signal": self.signal.state_dict() if self.signal is not None else {},
            "rng": all_gather(capture_rng_state()),
            "data": {"sampler_seed": getattr(sampler, "seed", None), "world_size": self.context.world_size},
        }

    def load_state_dict(self, state: dict, sampler=None) -> int:
        """Restore a :meth:`state_dict`; returns the number of epochs it had completed."""
        if len(state["students"]) != len(self.students):
            raise ValueError(f"the checkpoint holds {len(state['students'])} students, this Distiller has "
                             f"{len(self.students)}")
        saved_seed, seed = state["data"]["sampler_seed"], getattr(sampler, "seed", None)
        if saved_seed != seed:
            raise ValueError(f"the checkpoint was trained with sampler seed {saved_seed}, this loader has {seed}: "
                             f"the data order would differ")
        for s, sd in zip(self.students, state["students"]):
            s.load_state_dict(sd)
        self.optimizer.load_state_dict(state["optimizer"])
        if (state["scheduler"] is None) != (self.scheduler is None):
            raise ValueError("the checkpoint and this Distiller disagree on having a scheduler")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if self.signal is not None:
            self.signal.load_state_dict(state["teacher_signal"])
        self.step = int(state["step"])
        rng = state["rng"]
        if len(rng) != self.context.world_size:
            warnings.warn(f"the checkpoint was written by {len(rng)} processes, this run has "
                          f"{self.context.world_size}: the resumed run will not repeat the random draws exactly")
        restore_rng_state(rng[self.context.rank % len(rng)])
        return int(state["epoch"])

    # ------------------------------------------------------------------ the loop
    def fit(self, train_loader, epochs: int, *, eval_loader=None, checkpoint_dir=None, resume: bool = False,
            metrics_path=None, progress: bool = True,
            on_epoch_end: Optional[Callable[[dict], None]] = None) -> List[dict]:
        """Train until ``epochs`` epochs are done; return this call's per-epoch records.

        A record is ``{"epoch" (1-based), "step", "lr", "losses": {term: mean},
        "time_s"}`` plus the :meth:`evaluate` metrics of ``eval_loader``.
        ``checkpoint_dir``: write ``<dir>/last.pt`` (atomically, with its
        sha256) after every epoch, the one before renamed ``previous.pt``;
        ``resume=True`` continues from ``last.pt``, or from ``previous.pt``
        with a warning when ``last.pt`` is damaged (or starts afresh when there
        is none; a CheckpointCorruptedError when neither is good), and a fresh
        run refuses to overwrite one.  ``metrics_path``:
        append each record as a JSON line (rank 0; on resume, lines of epochs
        after the checkpoint are dropped).  ``on_epoch_end(record)`` runs last.
        """
        if not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got epochs={epochs!r}")
        sampler = epoch_sampler(train_loader)
        start = 0
        path = previous = None
        rotate = True  # whether the next save first renames last.pt to previous.pt
        if checkpoint_dir is not None:
            path = os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_NAME)
            previous = os.path.join(os.fspath(checkpoint_dir), PREVIOUS_CHECKPOINT_NAME)
            existing = [p for p in (path, previous) if os.path.exists(p)]
            if existing and not resume:
                raise FileExistsError(f"{existing[0]} exists: pass resume=True to continue that run, "
                                      f"or choose another checkpoint_dir")
            found = load_latest_checkpoint(checkpoint_dir, self.device) if existing else None
            if found is not None:
                start = self.load_state_dict(found[0], sampler)
                # Resumed from previous.pt: last.pt is damaged, and rotating it would replace the only good one.
                rotate = found[1] == path
        elif resume:
            raise ValueError("resume=True needs a checkpoint_dir")
        if metrics_path is not None and self.context.is_main:
            _keep_metrics_until(metrics_path, start)

        history = []
        for epoch in range(start, epochs):
            began = time.perf_counter()
            losses = self.train_epoch(train_loader, epoch, progress)
            if self.scheduler is not None and self.scheduler_interval == "epoch":
                self.scheduler.step()
            record = {"epoch": epoch + 1, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                      "losses": losses}
            if eval_loader is not None:
                record.update(self.evaluate(eval_loader))
            record["time_s"] = time.perf_counter() - began
            if path is not None:
                state = self.state_dict(epoch + 1, sampler)
                if self.context.is_main:
                    save_checkpoint(state, path, previous=previous if rotate else None)
                rotate = True
                barrier()
            if metrics_path is not None and self.context.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            history.append(record)
            if on_epoch_end is not None:
                on_epoch_end(record)
        return history


def accumulate_metrics(models: Sequence[nn.Module], loader, *, device="cpu", ignore_index: int = -100,
                       reference=None, autocast=contextlib.nullcontext) -> List[ClassificationMetrics]:
    """One :class:`ClassificationMetrics` per model, summed over ``loader``'s ``(inputs, labels)`` batches.

    The models run in eval mode under ``torch.no_grad()`` (their modes are
    restored after).  ``reference(inputs)``, when given, supplies the logits
    the models' agreement is measured against (a teacher's); ``autocast()``
    is entered around the forward passes.  Nothing is reduced across ranks.
    """
    device = torch.device(device)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    meters = [ClassificationMetrics(ignore_index=ignore_index) for _ in models]
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = (_to_device(v, device) for v in _as_pair(batch))
                with autocast():
                    ref = reference(x) if reference is not None else None
                    for model, meter in zip(models, meters):
                        meter.update(model(x), y, ref)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return meters


def _as_pair(batch):
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise TypeError(f"a batch must be an (inputs, labels) pair, got {type(batch).__name__}"
                        + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else ""))
    return batch


def _check_optimizer_covers(optimizer: torch.optim.Optimizer, students: Sequence[nn.Module]) -> None:
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for i, s in enumerate(students):
        params = [p for p in s.parameters() if p.requires_grad]
        if params and not any(id(p) in optimized for p in params):
            raise ValueError(f"the optimizer updates none of student {i}'s parameters")


def _keep_metrics_until(path, epochs_done: int) -> None:
    """Keep the JSON lines of epochs ``<= epochs_done`` (all of a resumed run's checkpoint, none of a fresh run)."""
    kept = []
    if epochs_done > 0 and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["epoch"] <= epochs_done]
    with open(path, "w") as f:
        f.writelines(kept)
