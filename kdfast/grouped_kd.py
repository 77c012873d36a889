"""Grouped Knowledge Distillation (GKD; Zhao, Zhu, Guo, Zhang & Lei, "Grouped Knowledge Distillation for Deep
Face Recognition", AAAI 2023, arXiv:2304.04462).

The paper's definition.  The teacher's softened prediction is split, by its
cumulative probability, into a *Primary Group* (the few classes that hold
most of the mass) and a *Secondary Group* (the long tail of near-zero
probabilities).  By the chain rule of the KL divergence, Hinton's KD term
regroups exactly into three parts (as DKD's target / non-target split, with
the two groups in place of the target and the rest)::

    KL(p || q) = Binary-KD + P_t * Primary-KD + (1 - P_t) * Secondary-KD

* **Binary-KD**: the KL between the teacher's and the student's probabilities
  of the two groups, ``[P_t, 1 - P_t]`` and ``[Q_s, 1 - Q_s]`` ("ensures the
  consistency of knowledge distribution between teacher and student");
* **Primary-KD**: the KL between the distributions *inside* the primary group,
  ``p_j / P_t`` and ``q_j / Q_s`` ("distilling the primary knowledge");
* **Secondary-KD**: the same inside the secondary group ("refines minor
  knowledge but increases the difficulty of distillation").

The paper finds Primary-KD and Binary-KD indispensable and Secondary-KD "the
culprit restricting KD at the bottleneck", and proposes GKD =
``binary_weight * Binary-KD + primary_weight * Primary-KD`` (Secondary-KD
omitted, the primary term not weighted by ``P_t``), times ``T^2``, next to the
cross-entropy.

What was followed, and where a choice was made.  Only the paper's abstract
was available to us, and the authors' released loss (github.com/WisonZ/GKD:
``distillation/gkd.py`` and ``gkd_adaptive.py``), which fixes what the abstract
leaves open.  From the released code: Binary-KD is over the two *groups*
(primary vs secondary mass), not over target vs rest (that is DKD's TCKD);
the row's ground-truth class is always put in the primary group; both KLs are
at the distillation temperature ``T = 4``; the weights are ``alpha = 1`` on
Binary-KD and ``beta = 4`` on Primary-KD in the threshold ("adaptive") variant
(``beta = 8`` in the fixed-size one), secondary weight 0; the threshold is a
cumulative probability of ``0.93`` of the softmax at temperature 1.  The
choices made here:

* **per row, by the teacher.**  The released adaptive code turns the
  threshold into one group *size* per batch (the number of classes, in steps
  of 100, whose batch-summed probability reaches 0.93) and then takes each
  row's top classes by the *student's* logits (``gkd_loss_student_base``; a
  teacher-ranked ``gkd_loss`` is also there).  Here each row has its own
  group: the teacher's top classes whose cumulative probability reaches
  ``primary_mass``, which is the abstract's "according to the cumulative
  probability of the softened prediction" applied per sample, does not
  depend on the batch, and makes the loss a per-row pass over the logits
  (fused on the C++ and Triton backends).
* **the group's temperature** is ``group_temperature = 1`` (the released
  code's softmax); ``group_temperature=temperature`` reads "softened" as the
  distillation temperature instead (larger groups).
* **ties** at the threshold are all in the group: with ``e_j = exp(z_t,j / T_g)``
  and ``F(v) = sum_{z_t,k >= v} e_k``, the threshold logit is the largest teacher
  logit ``z*`` with ``F(z*) >= primary_mass * F(-inf)``, and the group is
  ``{j : z_t,j >= z*}`` plus the label, so it does not depend on the order of
  equal logits.  ``primary_mass = 1`` puts every class of finite teacher logit
  in the group (GKD is then ``primary_weight`` x KD when no teacher logit is
  ``-inf``).  A class whose cumulative mass lies within rounding of the
  threshold may fall on either side on different backends (the reference
  sorts and sums in order; the kernels sum tiles).
* ``labels`` may be None (no class forced in: e.g. unlabelled rows or LLM
  tokens without targets).

Numerics follow docs/contract.md, section 7 (as DKD's): every
log-probability is a difference of log-sum-exps, masked (``-inf``) logits are
legal and ``0 log 0 = 0``; a student that masks a class the teacher holds
makes the loss ``+inf``; a row with a NaN or ``+inf`` logit is NaN (value and
gradient); an all ``-inf`` row is a ValueError; rows whose label is
``ignore_index`` contribute 0 and get a zero gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import (REDUCTIONS, check_label_tensor, check_logits, check_row_tensor, finite_float,
                     float32_coefficient, integer, positive_float32)
from .modules import OptionsModule
from .ops.backends import pick
from .reference.grouped_kd import grouped_kd_loss_reference, primary_group

__all__ = ["GroupedKDLoss", "grouped_kd_loss", "primary_group"]

# The released code's settings (module docstring).
DEFAULT_TEMPERATURE = 4.0
DEFAULT_PRIMARY_MASS = 0.93
DEFAULT_PRIMARY_WEIGHT = 4.0
DEFAULT_BINARY_WEIGHT = 1.0
DEFAULT_GROUP_TEMPERATURE = 1.0


def check_primary_mass(primary_mass) -> float:
    """``primary_mass`` as a float in (0, 1]; ValueError (TypeError for a non-number) otherwise."""
    m = finite_float("primary_mass", primary_mass)
    if not 0.0 < m <= 1.0:
        raise ValueError(f"primary_mass must be in (0, 1] (the teacher's cumulative probability that the primary "
                         f"group reaches), got primary_mass={primary_mass}")
    return m


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def grouped_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor], *,
                    temperature: float = DEFAULT_TEMPERATURE, primary_mass: float = DEFAULT_PRIMARY_MASS,
                    primary_weight: float = DEFAULT_PRIMARY_WEIGHT, binary_weight: float = DEFAULT_BINARY_WEIGHT,
                    group_temperature: float = DEFAULT_GROUP_TEMPERATURE, ignore_index: int = -100,
                    reduction: str = "batchmean", backend: str = "auto") -> torch.Tensor:
    """Grouped KD (Zhao et al., AAAI 2023): Primary-KD + Binary-KD, Secondary-KD omitted.

    Per row, with ``p = softmax(z_t / T)``, ``q = softmax(z_s / T)`` and the
    primary group ``P`` (the teacher's top classes whose cumulative
    probability at ``group_temperature`` reaches ``primary_mass``, ties at the
    threshold included, plus the row's label)::

        P_t = sum_{j in P} p_j,  Q_s = sum_{j in P} q_j
        Binary-KD  = KL([P_t, 1 - P_t] || [Q_s, 1 - Q_s])
        Primary-KD = KL(p_P / P_t || q_P / Q_s)
        loss_i     = T^2 (binary_weight * Binary-KD + primary_weight * Primary-KD)

    The paper's definition and the choices made where it is open are in the
    module docstring (:mod:`kdfast.grouped_kd`).

    Args:
        student_logits, teacher_logits: ``(..., V)`` logits of the same shape
            (float32, bfloat16, float16 or float64); leading dims are
            flattened into ``N`` rows.  Only the student gets a gradient.
        labels: ``N`` integer class indices (any shape), each in ``[0, V)`` or
            ``ignore_index``; the label joins its row's primary group.  None:
            no class is forced in and every row counts.
        temperature: ``T`` of both softmaxes, > 0 (default 4, the paper's).
        primary_mass: the cumulative teacher probability the primary group
            reaches, in (0, 1] (default 0.93, the released code's).
        primary_weight, binary_weight: the weights of Primary-KD and
            Binary-KD (defaults 4 and 1, the released adaptive variant's).
        group_temperature: the temperature of the teacher softmax the group is
            chosen on, > 0 (default 1, the released code's).
        ignore_index: rows with this label contribute 0 and get no gradient.
        reduction: ``"batchmean"`` (sum over the rows whose label is not
            ``ignore_index``, divided by their number; 0 when there is none),
            ``"sum"`` or ``"none"`` (``(N,)``, 0 on ignored rows).
        backend: ``"auto"`` (Triton on CUDA tensors, the C++ kernel on CPU
            tensors when the extension is built, else the PyTorch reference),
            ``"torch"``, ``"cpu"`` or ``"triton"``.

    Returns float32 (float64 when either input is float64).  Errors: TypeError
    for wrong types; ValueError for mismatched shapes or devices, labels
    without ``N`` entries or out of range, ``temperature``/``group_temperature``
    <= 0, ``primary_mass`` outside (0, 1], non-finite weights, an unknown
    reduction, an all ``-inf`` valid row; RuntimeError for a backward with
    ``create_graph=True`` through a fused kernel (C++ or Triton).
    """
    check_logits(student_logits, teacher_logits)
    tau = positive_float32("temperature", temperature)
    group_tau = positive_float32("group_temperature", group_temperature)
    mass = check_primary_mass(primary_mass)
    pw = float32_coefficient("primary_weight", primary_weight)
    bw = float32_coefficient("binary_weight", binary_weight)
    ignore = integer("ignore_index", ignore_index)
    check_reduction(reduction)
    if labels is not None:
        check_label_tensor(labels)
        check_row_tensor("labels", labels, student_logits)
    impl = pick("grouped_kd", backend, student_logits.device)
    return impl(student_logits, teacher_logits, labels, tau, mass, pw, bw, group_tau, ignore, reduction)


class GroupedKDLoss(OptionsModule):
    """Grouped KD as a module: ``GroupedKDLoss(temperature=4.0, ...)(student_logits, teacher_logits, labels)``.

    The options are :func:`grouped_kd_loss`'s keywords, checked here, once.
    """

    loss_fn = staticmethod(grouped_kd_loss)
    call_time_error = "{name} is passed at call time: module(student_logits, teacher_logits, labels)"
    option_checks = {
        "temperature": lambda v: positive_float32("temperature", v),
        "group_temperature": lambda v: positive_float32("group_temperature", v),
        "primary_mass": check_primary_mass,
        "primary_weight": lambda v: float32_coefficient("primary_weight", v),
        "binary_weight": lambda v: float32_coefficient("binary_weight", v),
        "ignore_index": lambda v: integer("ignore_index", v),
        "reduction": check_reduction,
    }

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.loss_fn(student_logits, teacher_logits, labels, **self.options)
