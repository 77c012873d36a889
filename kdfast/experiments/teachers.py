"""The teacher conditions of the experiment: which loss, which labels, which regularisation.

The default is the semi-supervised setting of the papers' claims: the
teachers learn from the *same* labelled images as the students (an equal
label budget), and the rest of the training images are an unlabelled
transfer set for distillation.  A second, clearly named condition gives the
teachers more labels (``*-more``: ``teacher_more_labelled`` of them, by
default every training image), and an over-confident teacher (CE, no
dropout, trained several times longer on the students' labels) serves the
calibration study.  ``self`` is the CE-only student of the same seed: the
teacher of self-distillation (same architecture as the student).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class TeacherKind:
    """One teacher condition.

    ``loss``: the teacher's training loss (``"ce"``, or ``"mse"`` between
    softmax and one-hot, Hamidi et al., ECCV 2024).  ``labels``: ``"students"``
    (the students' labelled images) or ``"more"`` (``teacher_more_labelled``
    images, a superset, trained ``teacher_more_epochs`` epochs).  ``dropout``:
    trained with ``teacher_dropout`` (else none).  ``overconfident``: trained
    ``overconfident_teacher_epochs`` epochs instead of ``teacher_epochs``.
    ``self_teacher``: not trained here; the CE-only student run of the same
    seed.
    """

    name: str
    loss: str = "ce"
    labels: str = "students"
    dropout: bool = True
    overconfident: bool = False
    self_teacher: bool = False

    def title(self, students_labels: int, more_labels: int) -> str:
        """E.g. ``"CE-trained, 500 labels"`` or ``"self: the CE-only student"``."""
        if self.self_teacher:
            return "self: the CE-only student"
        count = students_labels if self.labels == "students" else more_labels
        extra = ", over-confident: no dropout, trained longer" if self.overconfident else ""
        return f"{self.loss.upper()}-trained, {count:,} labels{extra}"


TEACHER_KINDS: Dict[str, TeacherKind] = {k.name: k for k in (
    TeacherKind("ce", "ce"),
    TeacherKind("mse", "mse"),
    TeacherKind("ce-more", "ce", labels="more"),
    TeacherKind("mse-more", "mse", labels="more"),
    TeacherKind("ce-overconfident", "ce", dropout=False, overconfident=True),
    TeacherKind("self", self_teacher=True),
)}
TEACHER_NAMES: Tuple[str, ...] = tuple(TEACHER_KINDS)
# The kinds a user may name in ``teachers``/``extra_runs`` (``self`` belongs to the self-distillation methods).
TRAINED_TEACHERS: Tuple[str, ...] = tuple(k for k in TEACHER_NAMES if k != "self")


def get_teacher_kind(name: str) -> TeacherKind:
    """The teacher condition called ``name``; a ValueError lists the known ones."""
    try:
        return TEACHER_KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown teacher kind {name!r}; known: {', '.join(TEACHER_NAMES)}") from None
