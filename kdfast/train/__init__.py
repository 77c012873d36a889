"""kdfast.train: a thin distillation trainer built on the kdfast losses.

A loop that composes kdfast losses with your models, not a framework.  The
pieces are small and replaceable:

``Distiller(student, teacher, loss, *, optimizer, ...)``  (:mod:`.distiller`)
    One training loop.  ``student`` is a module or a sequence of modules (two or
    more students learn from each other: dual-student peer learning).
    ``teacher`` is ``None`` (plain supervised training), a module (a frozen
    teacher), a sequence of modules (:class:`MultiTeacher`) or any
    :class:`TeacherSignal`.  ``loss`` names a kdfast loss (:func:`resolve_loss`):
    ``"kd"``, ``"ttm"``, ``"wttm"``, ``"distill"``, ``"dist"``, ``"dkd"``,
    ``"correlation"``, ``"softmax_mse"`` (Mean Teacher's consistency), a dict
    ``{"name": "distill", "divergence": "jsd", ...}``,
    or a callable ``(student_logits, teacher_logits, labels) -> scalar``.

    Per optimizer step the objective is, for every student::

        hard_weight * hard(student, labels)                     "ce" or "mse"
      + soft_weight * sum_k scale_k * loss(student, teacher_k)  the teacher signal's targets
      + peer_weight * mean_j kd(student, peer_j.detach())       only with >= 2 students

    every term summed over the valid rows of all accumulated micro-batches
    (and all ranks) and divided by their global count, so gradient
    accumulation and DDP give the gradient of one large batch.

    Keyword options: ``scheduler``, ``scheduler_interval="epoch"|"step"``,
    ``hard_loss="ce"|"mse"|None``, ``hard_weight=1.0``, ``soft_weight=1.0``,
    ``peer_weight=1.0``, ``peer_temperature=1.0``, ``ignore_index=-100``,
    ``distill_unlabeled=False``, ``device``, ``amp=None|"bf16"|"fp16"``,
    ``grad_accum_steps=1``.

    ``fit(train_loader, epochs, *, eval_loader=None, checkpoint_dir=None,
    resume=False, metrics_path=None, progress=True, on_epoch_end=None)``
    returns this call's per-epoch records ``{"epoch" (1-based), "step", "lr",
    "losses": {"total", "hard", "soft", "peer"}, "time_s"}`` plus the
    evaluation metrics; ``metrics_path`` gets them as JSON lines.
    ``evaluate(loader, reliability_path=None)`` returns ``{"accuracy", "nll",
    "ece", "agreement"}`` (of the first student; ``"agreement"`` only with a
    teacher; with several students also ``"students": {name: {...}}``).
    Batches are ``(inputs, labels)`` pairs; models are called ``model(inputs)``.
    ``accumulate_metrics(models, loader)`` is that evaluation for any models,
    without a Distiller (one ``ClassificationMetrics`` per model).

Teacher signals (:mod:`.teachers`, :mod:`.mean_teacher`, :mod:`.stochastic`)
    ``FrozenTeacher(model)``; ``MultiTeacher(models, confidence_temperature=1.0)``
    (per-sample weights: softmax over teachers of minus the entropy);
    ``TeacherSchedule(model, checkpoints, schedule=None)`` (online distillation
    from intermediate teacher checkpoints, epoch -> checkpoint);
    ``MeanTeacher(decay=0.999, consistency_weight=1.0, rampup_epochs=5)``
    (EMA of the student); ``StochasticTeacher(model, passes=4, similarity="kl",
    drop_quantile=0.25)`` (stochastic self-distillation with dropout active);
    ``WarmupTeacher(signal, warmup_epochs)`` (DKD's linear warm-up of the
    distillation term).

Bayesian teachers and teacher selection (:mod:`.bayesian_teachers`, :mod:`.teacher_selection`)
    ``MCDropoutTeacher(model, passes=8, seed=None)`` (the mean probability of
    dropout-active passes); ``EnsembleTeacher(models, weights=None)`` and
    ``checkpoint_average(model, checkpoints)`` (the mean probability of a deep
    ensemble or of checkpoints); ``WeightedMultiTeacher(models, weights=None)``
    (fixed per-teacher weights, equal by default);
    ``ReinforcedTeacherSelector(models, reward_inputs, reward_labels, ...)``
    (per-sample teacher choices by a policy trained with REINFORCE).

Teacher training (:mod:`.teacher_training`)
    ``train_teacher(model, loader, loss="ce"|"mse", *, optimizer, epochs, ...)``.

Metrics (:mod:`.metrics`)
    ``accuracy``, ``nll``, ``expected_calibration_error`` (15 equal-width
    bins), ``agreement``, ``reliability_diagram`` (PNG, needs matplotlib),
    ``ClassificationMetrics`` (an accumulator that reduces across ranks).

Checkpoints (:mod:`.checkpoint`)
    ``save_checkpoint`` (atomic: temporary file, fsync, ``os.replace``; the
    payload's sha256 in a header) and ``load_checkpoint`` (checksum checked,
    then ``torch.load(weights_only=True)``; ``CheckpointCorruptedError``, naming
    the file, for a damaged one); ``fit`` writes ``<checkpoint_dir>/last.pt``
    after every epoch, keeping the one before as ``previous.pt``, and
    ``resume=True`` continues from the newest good one
    (``load_latest_checkpoint``), bit-identically to an uninterrupted run with
    the same seeds (``seed_everything(seed)`` seeds torch, ``random`` and numpy).

Distributed (:mod:`.distributed`)
    ``init_distributed()`` (from ``torchrun``'s environment: gloo on CPU, nccl
    on GPU), ``make_train_loader(dataset, batch_size, *, seed)`` (a
    ``DistributedSampler`` whose order is a function of ``seed + epoch``, also
    in one process: the data order survives a resume).
"""

from .checkpoint import (
    CHECKPOINT_NAME,
    PREVIOUS_CHECKPOINT_NAME,
    CheckpointCorruptedError,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
    seed_everything,
)
from .distiller import Distiller, accumulate_metrics
from .distributed import DistributedContext, init_distributed, make_train_loader
from .mean_teacher import MeanTeacher, ema_decay, sigmoid_rampup
from .metrics import (
    ClassificationMetrics,
    accuracy,
    agreement,
    expected_calibration_error,
    nll,
    reliability_diagram,
)
from .objectives import HARD_LOSSES, LOSS_NAMES, DistillObjective, resolve_loss
from .bayesian_teachers import EnsembleTeacher, MCDropoutTeacher, checkpoint_average
from .stochastic import StochasticTeacher
from .teacher_selection import ReinforcedTeacherSelector, WeightedMultiTeacher
from .teacher_training import train_teacher
from .teachers import FrozenTeacher, MultiTeacher, TeacherSchedule, TeacherSignal, TeacherTarget, WarmupTeacher

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointCorruptedError",
    "ClassificationMetrics",
    "DistillObjective",
    "Distiller",
    "DistributedContext",
    "EnsembleTeacher",
    "FrozenTeacher",
    "HARD_LOSSES",
    "LOSS_NAMES",
    "MCDropoutTeacher",
    "MeanTeacher",
    "MultiTeacher",
    "PREVIOUS_CHECKPOINT_NAME",
    "ReinforcedTeacherSelector",
    "StochasticTeacher",
    "TeacherSchedule",
    "TeacherSignal",
    "TeacherTarget",
    "WarmupTeacher",
    "WeightedMultiTeacher",
    "accumulate_metrics",
    "accuracy",
    "agreement",
    "checkpoint_average",
    "ema_decay",
    "expected_calibration_error",
    "init_distributed",
    "load_checkpoint",
    "load_latest_checkpoint",
    "make_train_loader",
    "nll",
    "reliability_diagram",
    "resolve_loss",
    "save_checkpoint",
    "seed_everything",
    "sigmoid_rampup",
    "train_teacher",
]
