"""The settings of the distillation experiment: one dataclass, its defaults, its checks, and file loading.

The defaults are the embedded default experiment (``kdfast distill`` with no
arguments).  A config file (YAML or JSON) holds a mapping whose keys are the
field names below (``-`` and ``_`` are interchangeable, as in the command-line
flags); an unknown key is an error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from .methods import METHOD_NAMES, get_method
from .mnist5k import NUM_CLASSES, TOTAL_IMAGES
from .teachers import TRAINED_TEACHERS

DEFAULT_OUT = os.path.join("runs", "distill-default")
# Fields that do not change what is computed: a resumed run may differ in them.
RUN_ONLY_FIELDS = ("out", "workers", "threads", "plot", "resume", "overwrite")
# The runs of the teacher-condition and calibration claims, besides methods x teachers.
DEFAULT_EXTRA_RUNS = ["kd@mse", "kd@ce-more", "kd@mse-more", "kd@ce-overconfident", "kd-unscaled@ce-overconfident",
                      "ttm@ce-overconfident"]


@dataclass
class ExperimentConfig:
    """Every knob of the experiment; see ``kdfast distill --help`` for each one's meaning."""

    images: int = 5000
    test_images: int = 1000
    validation_images: int = 500
    labelled: int = 500
    unlabeled: bool = True
    teacher_labelled: Optional[int] = None  # None: the students' labelled images (equal label budget)
    teacher_more_labelled: Optional[int] = None  # the "*-more" teachers; None: every training image
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    methods: List[str] = field(default_factory=lambda: list(METHOD_NAMES))
    teachers: List[str] = field(default_factory=lambda: ["ce"])
    extra_runs: List[str] = field(default_factory=lambda: list(DEFAULT_EXTRA_RUNS))
    method_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    teacher_hidden: List[int] = field(default_factory=lambda: [256, 256])
    teacher_dropout: float = 0.1
    student_hidden: List[int] = field(default_factory=lambda: [32])
    student_channels: List[int] = field(default_factory=lambda: [8, 16])
    student_dropout: float = 0.1
    teacher_epochs: int = 20  # passes over the teacher's labels; chosen on the validation split
    teacher_more_epochs: int = 10  # the same for the '-more' teachers (7x the labels per pass)
    overconfident_teacher_epochs: int = 100
    schedule_checkpoints: int = 4
    epochs: int = 12
    batch_size: int = 100
    teacher_batch_size: int = 100
    lr: float = 3e-3
    teacher_lr: float = 1e-3
    sweep: bool = False
    sweep_temperatures: List[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 10.0])
    sweep_weight_scales: List[float] = field(default_factory=lambda: [0.25, 1.0, 4.0])
    out: str = DEFAULT_OUT
    workers: Optional[int] = None  # None: one per usable CPU core
    threads: int = 1
    plot: bool = True
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        if self.workers is None:
            from .environment import usable_cores

            self.workers = usable_cores()
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def train_images(self) -> int:
        """The training pool: all images but the held-out test and validation images."""
        return self.images - self.test_images - self.validation_images

    @property
    def teacher_label_count(self) -> int:
        """The labels of the ``ce``/``mse``/``ce-overconfident`` teachers (default: the students')."""
        return self.labelled if self.teacher_labelled is None else self.teacher_labelled

    @property
    def more_label_count(self) -> int:
        """The labels of the ``*-more`` teachers (default: every training image)."""
        return self.train_images if self.teacher_more_labelled is None else self.teacher_more_labelled

    def validate(self) -> "ExperimentConfig":
        """Raise ValueError/TypeError naming the first bad field; return self."""
        for name in ("images", "test_images", "labelled", "teacher_epochs", "teacher_more_epochs",
                     "overconfident_teacher_epochs",
                     "schedule_checkpoints", "epochs", "batch_size", "teacher_batch_size"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("validation_images", self.validation_images, minimum=0)
        for name in ("teacher_labelled", "teacher_more_labelled"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        for name in ("lr", "teacher_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {name}={value!r}")
        for name in ("student_dropout", "teacher_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a number in [0, 1), got {name}={value!r}")
        for name in ("unlabeled", "plot", "resume", "overwrite", "sweep"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {name}={getattr(self, name)!r}")
        _check_int("workers", self.workers, minimum=1)
        _check_int("threads", self.threads, minimum=1)
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"out must be a non-empty path, got out={self.out!r}")
        _check_list("seeds", self.seeds, lambda s: _check_int("seeds", s, minimum=0))
        for name in ("teacher_hidden", "student_hidden", "student_channels"):
            _check_list(name, getattr(self, name), lambda w, n=name: _check_int(n, w, minimum=1), unique=False)
        if len(self.student_channels) != 2:
            raise ValueError(f"student_channels must hold the CNN's 2 widths, got {self.student_channels}")
        for name in ("sweep_temperatures", "sweep_weight_scales"):
            _check_list(name, getattr(self, name), lambda v, n=name: _check_positive(n, v))
        self._validate_methods()
        self._validate_sizes()
        if self.sweep and self.validation_images == 0:
            raise ValueError("sweep selects on the validation images: validation_images must be > 0")
        return self

    def _validate_methods(self) -> None:
        from ..train import resolve_loss

        if not isinstance(self.method_options, dict):
            raise TypeError(f"method_options must be a mapping of method -> settings, got {self.method_options!r}")
        for name in self.method_options:
            get_method(name)  # an unknown method name
        _check_list("methods", self.methods, lambda m: get_method(m, self.method_options))
        for name in set(self.methods) | set(self.method_options):
            method = get_method(name, self.method_options)
            if method.loss is not None:
                resolve_loss(method.loss)  # a bad option value, with kdfast's own message
        for kind in _check_list("teachers", self.teachers, str):
            if kind not in TRAINED_TEACHERS:
                raise ValueError(f"unknown teacher kind {kind!r}; known: {', '.join(TRAINED_TEACHERS)}")
        for entry in _check_list("extra_runs", self.extra_runs, str, allow_empty=True):
            method, _, kind = entry.partition("@")
            if get_method(method).teacher != "kind" or kind not in TRAINED_TEACHERS:
                raise ValueError(f"extra_runs entries are 'method@teacher' for a method distilling one "
                                 f"pre-trained teacher and a teacher of {', '.join(TRAINED_TEACHERS)}; "
                                 f"got {entry!r}")
        if any(get_method(m).teacher == "kind" for m in self.methods) and not self.teachers:
            raise ValueError("the methods include some that distil a pre-trained teacher, but teachers is empty")

    def _validate_sizes(self) -> None:
        for name in ("images", "test_images", "validation_images", "labelled", "teacher_labelled",
                     "teacher_more_labelled"):  # every class gets the same share
            value = getattr(self, name)
            if value is not None and value % NUM_CLASSES:
                raise ValueError(f"{name} must be a positive multiple of {NUM_CLASSES}, got {name}={value}")
        if self.images > TOTAL_IMAGES:
            raise ValueError(f"images={self.images} exceeds the {TOTAL_IMAGES} images of MNIST-5k")
        if self.test_images >= self.images:
            raise ValueError(f"test_images={self.test_images} must be smaller than images={self.images}")
        if self.train_images <= 0:
            raise ValueError(f"test_images={self.test_images} and validation_images={self.validation_images} "
                             f"leave no training images of images={self.images}")
        for name in ("labelled", "teacher_labelled", "teacher_more_labelled"):
            value = getattr(self, name)
            if value is not None and value > self.train_images:
                raise ValueError(f"{name}={value} exceeds the {self.train_images} training images (images="
                                 f"{self.images} minus test_images={self.test_images} and validation_images="
                                 f"{self.validation_images})")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def result_fields(self) -> Dict[str, Any]:
        """The fields that decide the numbers (all but output location, processes, threads, plotting, resuming)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_ONLY_FIELDS}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "config") -> "ExperimentConfig":
        """A config from ``{field: value}`` over the defaults; unknown keys raise a ValueError naming them."""
        return cls(**normalise_keys(values, source=source))


def field_names() -> List[str]:
    return [f.name for f in dataclasses.fields(ExperimentConfig)]


def normalise_keys(values: Mapping[str, Any], *, source: str = "config") -> Dict[str, Any]:
    """``values`` with ``-`` in keys turned to ``_``; a ValueError names every unknown key."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{source} must hold a mapping of settings, got {type(values).__name__}")
    normalised = {str(k).replace("-", "_"): v for k, v in values.items()}
    known = set(field_names())
    unknown = sorted(k for k in values if str(k).replace("-", "_") not in known)
    if unknown:
        raise ValueError(f"unknown key(s) in {source}: {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    return normalised


def load_config_file(path: str) -> Dict[str, Any]:
    """The settings of a ``.yaml``/``.yml`` or ``.json`` file, keys normalised and checked."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".yaml", ".yml", ".json"):
        raise ValueError(f"config file {path!r} must end in .yaml, .yml or .json")
    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        raise ValueError(f"cannot read config file {path!r}: {err.strerror}") from None
    if extension == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path!r} is not valid JSON: {err}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ValueError(f"reading {path!r} needs PyYAML (pip install pyyaml), or use a .json file") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path!r} is not valid YAML: {err}") from None
    if values is None:  # an empty file: all defaults
        values = {}
    return normalise_keys(values, source=f"config file {path!r}")


def _check_int(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {name}={value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")
    return value


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must hold finite numbers > 0, got {value!r}")
    return float(value)


def _check_list(name: str, values, check, *, unique: bool = True, allow_empty: bool = False) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list, got {name}={values!r}")
    if not values and not allow_empty and name not in ("teachers",):
        raise ValueError(f"{name} must not be empty")
    if unique and len(set(map(repr, values))) != len(values):
        raise ValueError(f"{name} has repeated entries: {list(values)}")
    for value in values:
        check(value)
    return list(values)
