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

from .methods import METHOD_NAMES, TEACHER_KINDS, get_method
from .mnist5k import NUM_CLASSES, TOTAL_IMAGES

DEFAULT_OUT = os.path.join("runs", "distill-default")
# Fields that do not change what is computed: a resumed run may differ in them.
RUN_ONLY_FIELDS = ("out", "workers", "threads", "plot", "resume", "overwrite")


@dataclass
class ExperimentConfig:
    """Every knob of the experiment; see ``kdfast distill --help`` for each one's meaning."""

    images: int = 5000
    test_images: int = 1000
    labelled: int = 500
    unlabeled: bool = False
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    methods: List[str] = field(default_factory=lambda: list(METHOD_NAMES))
    teachers: List[str] = field(default_factory=lambda: list(TEACHER_KINDS))
    teacher_hidden: List[int] = field(default_factory=lambda: [256, 256])
    student_hidden: List[int] = field(default_factory=lambda: [32])
    student_dropout: float = 0.1
    teacher_epochs: int = 15
    epochs: int = 40
    batch_size: int = 100
    teacher_batch_size: int = 128
    lr: float = 3e-3
    teacher_lr: float = 1e-3
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

    def validate(self) -> "ExperimentConfig":
        """Raise ValueError/TypeError naming the first bad field; return self."""
        for name in ("images", "test_images", "labelled", "teacher_epochs", "epochs", "batch_size",
                     "teacher_batch_size"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("lr", "teacher_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {name}={value!r}")
        if isinstance(self.student_dropout, bool) or not isinstance(self.student_dropout, (int, float)) \
                or not 0 <= self.student_dropout < 1:
            raise ValueError(f"student_dropout must be a number in [0, 1), "
                             f"got student_dropout={self.student_dropout!r}")
        for name in ("unlabeled", "plot", "resume", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {name}={getattr(self, name)!r}")
        _check_int("workers", self.workers, minimum=1)
        _check_int("threads", self.threads, minimum=1)
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"out must be a non-empty path, got out={self.out!r}")
        _check_list("seeds", self.seeds, lambda s: _check_int("seeds", s, minimum=0))
        _check_list("teacher_hidden", self.teacher_hidden, lambda w: _check_int("teacher_hidden", w, minimum=1),
                    unique=False)
        _check_list("student_hidden", self.student_hidden, lambda w: _check_int("student_hidden", w, minimum=1),
                    unique=False)
        _check_list("methods", self.methods, get_method)
        for kind in _check_list("teachers", self.teachers, str):
            if kind not in TEACHER_KINDS:
                raise ValueError(f"unknown teacher kind {kind!r}; known: {', '.join(TEACHER_KINDS)}")
        for name in ("images", "test_images", "labelled"):  # every class gets the same share
            if getattr(self, name) % NUM_CLASSES:
                raise ValueError(f"{name} must be a positive multiple of {NUM_CLASSES}, "
                                 f"got {name}={getattr(self, name)}")
        if self.images > TOTAL_IMAGES:
            raise ValueError(f"images={self.images} exceeds the {TOTAL_IMAGES} images of MNIST-5k")
        if self.test_images >= self.images:
            raise ValueError(f"test_images={self.test_images} must be smaller than images={self.images}")
        if self.labelled > self.images - self.test_images:
            raise ValueError(f"labelled={self.labelled} exceeds the {self.images - self.test_images} training "
                             f"images (images={self.images} minus test_images={self.test_images})")
        if any(get_method(m).uses_teacher for m in self.methods) and not self.teachers:
            raise ValueError("the methods include some that distil a pre-trained teacher, but teachers is empty")
        return self

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


def _check_list(name: str, values, check, *, unique: bool = True) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list, got {name}={values!r}")
    if not values and name not in ("teachers",):
        raise ValueError(f"{name} must not be empty")
    if unique and len(set(map(repr, values))) != len(values):
        raise ValueError(f"{name} has repeated entries: {list(values)}")
    for value in values:
        check(value)
    return list(values)
