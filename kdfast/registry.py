"""The loss family's registry: one declarative table of the divergences and the weightings.

Everything else derives from this table:

* option validation and defaults (``kdfast.config.resolve_divergence``);
* the reference's dispatch (``kdfast.reference.divergence``: one formula per name);
* the fused ops' arguments: ``int divergence`` and ``int weighting`` are
  positions in these tables, ``float[] params`` is :func:`kernel_params`
  (the divergence's constants and mixture log-weights, :data:`KERNEL_PARAMS`);
* the Triton kernels' policy selection (the ``DIV`` and ``WEIGHTING``
  constexprs), whether the gradient sweep needs the row sum ``Sigma_g``, and
  whether a weighting needs the teacher at temperature 1;
* the C++ kernels keep one X-macro list per table (``csrc/kernels/divergence_list.h``,
  ``csrc/kernels/weighting_list.h``) that ``tests/test_registry.py`` compares with it;
* the test and benchmark case lists (:func:`divergence_cases`).

Adding a divergence: an entry here, its formula in ``kdfast/reference/distill.py``,
its policy in ``csrc/kernels/divergences.h`` (plus its line in
``divergence_list.h``) and in ``kdfast/ops/triton/divergences.py``, and its
formula in ``docs/contract.md``.  A weighting: the same four places
(``WEIGHT_FORMULAS``, ``csrc/kernels/weightings.h`` and ``weighting_list.h``,
``kdfast/ops/triton/weightings.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple


@dataclass(frozen=True)
class Param:
    """A real parameter of a divergence: its default and its valid interval."""

    name: str
    default: float
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False   # low itself excluded
    high_open: bool = False  # high itself excluded

    def check(self, divergence: str, value: float) -> None:
        """ValueError naming the divergence, the parameter and the value when it is outside the interval."""
        below = value <= self.low if self.low_open else value < self.low
        above = value >= self.high if self.high_open else value > self.high
        if below or above:
            raise ValueError(f"{divergence} needs {self.name} {self.interval()}, got {self.name}={value}")

    def interval(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


# Renyi's 1/(alpha - 1) log sum p^alpha q^(1-alpha) cancels: its float32 error
# grows as ~1e-8 / |alpha - 1| (3 % at alpha = 1 + 1e-7), while its limit KL
# differs from it by ~|alpha - 1| Var_p(log p/q) / 2.  The two meet near 1e-4
# (both ~1e-4 relative on 64x1000 rows of N(0, 9) logits), so inside that
# window the loss is KL on every backend.
RENYI_KL_WINDOW = 1e-4


@dataclass(frozen=True)
class DivergenceSpec:
    """One divergence ``D(p || q)`` of the teacher ``p`` and the student ``q`` (softmaxes at their temperatures).

    ``mixture_weight_p``: for divergences of a mixture ``m = w p + (1 - w) q``,
    ``w`` from the parameters.  ``separable``: the row value is a sum of
    per-entry terms (Renyi's is the log of one).  ``grad_sum``: ``Sigma_g =
    sum_j q_j dD/dq_j`` when it is a constant (then the kernels skip summing
    it), else None.  ``rename``: a boundary case computed as another
    divergence (its name), or None.  ``cases``: the parameter sets the tests
    and benchmarks run, the first the benchmarks' one.
    """

    name: str
    summary: str
    params: Tuple[Param, ...] = ()
    mixture_weight_p: Optional[Callable[[Dict[str, float]], float]] = None
    separable: bool = True
    grad_sum: Optional[float] = None
    rename: Callable[[Dict[str, float]], Optional[str]] = field(default=lambda params: None)
    cases: Tuple[Dict[str, float], ...] = ({},)

    def defaults(self) -> Dict[str, float]:
        return {p.name: p.default for p in self.params}


DIVERGENCE_TABLE: Tuple[DivergenceSpec, ...] = (
    DivergenceSpec("kl", "KL(p || q) = sum p (log p - log q)", grad_sum=-1.0),
    DivergenceSpec("reverse_kl", "KL(q || p)"),
    DivergenceSpec(
        "jsd", "beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q",
        params=(Param("beta", 0.5, 0.0, 1.0),),
        mixture_weight_p=lambda params: params["beta"],
        rename=lambda params: {0.0: "kl", 1.0: "reverse_kl"}.get(params["beta"]),
        cases=({"beta": 0.5},)),
    DivergenceSpec("tvd", "0.5 sum |p - q|"),
    DivergenceSpec(
        "renyi", "log(sum p^alpha q^(1 - alpha)) / (alpha - 1)",
        params=(Param("alpha", 0.5, 0.0, low_open=True),),
        separable=False, grad_sum=-1.0,
        rename=lambda params: "kl" if abs(params["alpha"] - 1.0) < RENYI_KL_WINDOW else None,
        cases=({"alpha": 0.5}, {"alpha": 2.0})),
    DivergenceSpec(
        "ab", "-1/(alpha beta) sum [p^alpha q^beta - alpha/(alpha+beta) p^(alpha+beta) - beta/(alpha+beta) q^(alpha+beta)]",
        params=(Param("alpha", 0.5, 0.0, low_open=True), Param("beta", 0.5, 0.0, low_open=True)),
        cases=({"alpha": 0.8, "beta": 0.3},)),
    DivergenceSpec(
        "skew_kl", "KL(p || skew p + (1 - skew) q)",
        params=(Param("skew", 0.1, 0.0, 1.0),),
        mixture_weight_p=lambda params: params["skew"],
        rename=lambda params: "kl" if params["skew"] == 0.0 else None,
        cases=({"skew": 0.1},)),
    DivergenceSpec(
        "skew_reverse_kl", "KL(q || (1 - skew) p + skew q)",
        params=(Param("skew", 0.1, 0.0, 1.0),),
        mixture_weight_p=lambda params: 1.0 - params["skew"],
        rename=lambda params: "reverse_kl" if params["skew"] == 0.0 else None,
        cases=({"skew": 0.25},)),
    DivergenceSpec("hellinger", "squared Hellinger distance sum (sqrt p - sqrt q)^2"),
)

DIVERGENCE_SPECS: Dict[str, DivergenceSpec] = {spec.name: spec for spec in DIVERGENCE_TABLE}
DIVERGENCE_NAMES: Tuple[str, ...] = tuple(DIVERGENCE_SPECS)

# The op's ``params`` vector: the divergence's constants in this order, whatever the divergence (unused ones
# are 0).  The C++ kernels read it through their X-macro list (``KDFAST_FOR_EACH_KERNEL_PARAM``), the Triton
# ones by these positions; a new parameter name is one entry here and one there, not a new op argument.
KERNEL_PARAMS: Tuple[str, ...] = ("alpha", "beta", "skew", "log_w_p", "log_w_q")


@dataclass(frozen=True)
class WeightingSpec:
    """One per-row weight ``w`` of the divergence term (``w * D(p || q)``).

    ``needs_teacher_t1``: the weight is a function of the teacher's softmax at
    temperature 1 (its log-normaliser and entropy), which the kernels then
    gather in one more sweep over the teacher row.  ``given``: the weights are
    a tensor passed by the caller.  The formulas are in docs/contract.md and
    ``kdfast.reference.WEIGHT_FORMULAS``.
    """

    name: str
    summary: str
    needs_teacher_t1: bool = False
    given: bool = False


WEIGHTING_TABLE: Tuple[WeightingSpec, ...] = (
    WeightingSpec("none", "w = 1"),
    WeightingSpec("wttm", "w = U_{1/tau}(softmax(z_t)) = sum_j softmax(z_t)_j^(1/tau)", needs_teacher_t1=True),
    WeightingSpec("entropy", "w = 1 - H(softmax(z_t)) / log V", needs_teacher_t1=True),
    WeightingSpec("given", "w = the caller's tensor of row weights (a constant)", given=True),
)
WEIGHTING_SPECS: Dict[str, WeightingSpec] = {spec.name: spec for spec in WEIGHTING_TABLE}
# The names the kernels take (a tensor of weights is "given"), in the order of their indices.
WEIGHTING_NAMES: Tuple[str, ...] = tuple(WEIGHTING_SPECS)


def divergence_spec(name: str) -> DivergenceSpec:
    """The table entry of a divergence; ValueError listing the names for an unknown one."""
    try:
        return DIVERGENCE_SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"divergence must be one of {DIVERGENCE_NAMES}, got {name!r}") from None


def needs_grad_sum(name: str) -> bool:
    """Whether the gradient sweep needs the row sum ``Sigma_g`` (not a constant of the divergence)."""
    return divergence_spec(name).grad_sum is None


def mixture_log_weights(name: str, params: Dict[str, Optional[float]]) -> Tuple[float, float]:
    """``(log w_p, log w_q)`` of the mixture ``m = w_p p + w_q q`` (``-inf`` for a zero weight; 0s without one)."""
    spec = divergence_spec(name)
    if spec.mixture_weight_p is None:
        return 0.0, 0.0
    w_p = spec.mixture_weight_p({k: v for k, v in params.items() if v is not None})
    return (math.log(w_p) if w_p > 0 else -math.inf), (math.log1p(-w_p) if w_p < 1 else -math.inf)


def weighting_spec(name: str) -> WeightingSpec:
    """The table entry of a weighting name; ValueError listing the names for an unknown one."""
    try:
        return WEIGHTING_SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"weighting must be one of {WEIGHTING_NAMES}, got {name!r}") from None


def divergence_index(name: str) -> int:
    """The op argument ``divergence``: the position of ``name`` in the table (the C++ enum's value)."""
    divergence_spec(name)
    return DIVERGENCE_NAMES.index(name)


def weighting_index(name: str) -> int:
    """The op argument ``weighting``: the position of ``name`` in the weighting table (the C++ enum's value)."""
    weighting_spec(name)
    return WEIGHTING_NAMES.index(name)


def kernel_params(name: str, params: Dict[str, Optional[float]]) -> Tuple[float, ...]:
    """The op's ``params`` vector (:data:`KERNEL_PARAMS` order) for divergence ``name`` and its parameter values.

    Unused parameters are 0; the mixture's log-weights are computed here once
    (never again in a kernel).
    """
    log_w_p, log_w_q = mixture_log_weights(name, params)
    values = {k: float(v) for k, v in params.items() if v is not None}
    values.update(log_w_p=log_w_p, log_w_q=log_w_q)
    return tuple(values.get(k, 0.0) for k in KERNEL_PARAMS)


def divergence_cases(all_cases: bool = True):
    """``[(name, params), ...]`` of every divergence: all its cases, or only its first (the benchmarks' one)."""
    return [(spec.name, dict(case)) for spec in DIVERGENCE_TABLE for case in (spec.cases if all_cases else spec.cases[:1])]
