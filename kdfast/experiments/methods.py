"""The methods the default experiment compares, each as a recipe for a :class:`kdfast.train.Distiller`.

Hyper-parameters come from the methods' papers (CIFAR settings, the closest
to a small classification task) and are not tuned on this data:

* KD (Hinton et al., 2015): ``T = 4``, the usual CIFAR value (mdistiller, CRD).
* TTM / WTTM (Zheng & Yang, ICLR 2024): teacher at ``T = 4``, student at 1.
* DIST (Huang et al., NeurIPS 2022): ``tau = 4``, ``beta = gamma = 2`` (their CIFAR-100 setting).
* DKD (Zhao et al., CVPR 2022): ``T = 4``, ``alpha = 1``, ``beta = 8`` (mdistiller's CIFAR default),
  without its 20-epoch warm-up (our runs are short).
* Entropy-weighted KD: KD at ``T = 4`` with the per-sample weight ``1 - H(p_teacher) / log V``.
* Dual student (Gore et al., 2025): two students, each distilling the teacher with the entropy
  weight and its peer's detached prediction (``kdfast.kd_loss`` at ``T = 1``); the first student
  is scored.
* Mean teacher (Tarvainen & Valpola, 2017): no pre-trained teacher; the teacher is the EMA of the
  student (decay 0.99: runs are a few hundred steps, too short for 0.999), KL consistency at
  ``T = 1`` ramped up over the first quarter of the epochs.  Its noise is the student's dropout
  (the EMA teacher runs in eval mode).

Every method keeps the cross-entropy on the labelled images with weight 1 and adds its
distillation term with weight 1: one rule for all, so differences come from the losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

from ..train import MeanTeacher

KD_TEMPERATURE = 4.0


@dataclass(frozen=True)
class Method:
    """How one method trains a student.

    ``loss``: the Distiller's loss spec (see :func:`kdfast.train.resolve_loss`),
    None for plain cross-entropy.  ``uses_teacher``: distils from a
    pre-trained teacher (so it runs once per teacher kind).  ``students``: 2
    for peer learning.  ``mean_teacher``: the teacher is the students' EMA.
    """

    name: str
    title: str
    loss: Optional[Mapping] = None
    uses_teacher: bool = True
    students: int = 1
    mean_teacher: bool = False
    distiller_options: Mapping = field(default_factory=dict)

    def teacher_signal(self, teacher, epochs: int):
        """The Distiller's ``teacher`` argument: the pre-trained model, an EMA teacher, or None."""
        if self.mean_teacher:
            return MeanTeacher(decay=0.99, consistency_weight=1.0, rampup_epochs=max(epochs // 4, 0))
        return teacher if self.uses_teacher else None


_KD = {"name": "kd", "temperature": KD_TEMPERATURE}
_ENTROPY_KD = {"name": "kd", "temperature": KD_TEMPERATURE, "weighting": "entropy"}

METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("ce", "CE only", uses_teacher=False),
    Method("kd", "KD", _KD),
    Method("ttm", "TTM", {"name": "ttm", "temperature": KD_TEMPERATURE}),
    Method("wttm", "WTTM", {"name": "wttm", "temperature": KD_TEMPERATURE}),
    Method("dist", "DIST", {"name": "dist", "temperature": KD_TEMPERATURE, "beta": 2.0, "gamma": 2.0}),
    Method("dkd", "DKD", {"name": "dkd", "temperature": KD_TEMPERATURE, "alpha": 1.0, "beta": 8.0}),
    Method("entropy-kd", "entropy-weighted KD", _ENTROPY_KD),
    Method("dual-student", "dual student", _ENTROPY_KD, students=2,
           distiller_options={"peer_weight": 1.0, "peer_temperature": 1.0}),
    Method("mean-teacher", "mean teacher", {"name": "distill"}, uses_teacher=False, mean_teacher=True),
)}
METHOD_NAMES: Tuple[str, ...] = tuple(METHODS)
TEACHER_KINDS: Tuple[str, ...] = ("mse", "ce")  # the teacher-training losses, see kdfast.train.train_teacher


def get_method(name: str) -> Method:
    """The method called ``name``; a ValueError lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHOD_NAMES)}") from None
