"""The loss options, written once, and their validation, shared by every backend.

:class:`LossConfig` is the table of the keyword options of the distillation
losses (each field: a name, a default and one paragraph of documentation) and,
once :func:`make_config` has checked a call's options, their validated,
canonical values: what every layer below receives.  :func:`takes_loss_options`
gives each public loss its keyword signature and the "Options" section of its
docstring from the same table.  Errors follow docs/contract.md: ``ValueError``
for bad values and shapes (naming the parameter and its value, or both shapes),
``TypeError`` for dtypes and for keywords a function does not take.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import textwrap
from dataclasses import Field, dataclass, field, fields, replace
from typing import Callable, Iterable, Optional, Tuple, Union

import torch

from .registry import DIVERGENCE_NAMES, RENYI_KL_WINDOW, divergence_spec  # noqa: F401 (re-exported)

DIVERGENCES = DIVERGENCE_NAMES
WEIGHTINGS = (None, "wttm", "entropy")
REDUCTIONS = ("batchmean", "sum", "none")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------- the table of the options
def _option(default, doc: str, opt_in: bool = False):
    """A field of :class:`LossConfig`: a keyword option of the losses with its default and its documentation.

    ``opt_in`` options are not in :data:`LOSS_OPTIONS` (the options every loss
    takes): only the losses that name them in ``takes_loss_options(include=...)``
    take them, so that a loss whose kernels do not implement one refuses it
    instead of ignoring it.
    """
    return field(default=default, metadata={"doc": " ".join(doc.split()), "opt_in": opt_in})


def _divergence_list() -> str:
    """The divergences of the registry with their parameters' defaults, for the documentation."""
    def entry(name: str) -> str:
        params = ", ".join(f"``{p}={v:g}``" for p, v in divergence_spec(name).defaults().items())
        return f'``"{name}"``' + (f" ({params})" if params else "")

    return ", ".join(entry(name) for name in DIVERGENCE_NAMES)


def _users_of(param: str) -> str:
    """The divergences that take the parameter ``param``, for the documentation."""
    return ", ".join(f"``{name}``" for name in DIVERGENCE_NAMES if param in divergence_spec(name).defaults())


@dataclass(frozen=True)
class LossConfig:
    """The keyword options of the distillation losses (docs/contract.md, section 4).

    The fields are the table of the options: each has the option's default and
    its documentation (``metadata["doc"]``), from which :func:`takes_loss_options`
    writes the public functions' signatures and docstrings.  An instance made
    by :func:`make_config` holds validated, canonical values (the divergence's
    parameters and ``student_temperature`` resolved, numbers as floats; the
    ``backend`` as requested, which :func:`kdfast.ops.backends.resolve_backend`
    checks for the tensors' device), and is what the backends, the chunk loops
    and the vocabulary-parallel loss receive.
    """

    divergence: str = _option("kl", f"""
        the divergence ``D(p || q)``: {_divergence_list()}.  A parameter left None
        takes the default shown; one the divergence does not take is an error.  The
        formulas: docs/contract.md, section 2 (and :mod:`kdfast.registry`).  ``renyi``
        within {RENYI_KL_WINDOW:g} of ``alpha = 1`` is computed as ``kl`` (``RENYI_KL_WINDOW``
        in :mod:`kdfast.registry` says why).""")
    temperature: float = _option(1.0, "the teacher's temperature ``tau``: ``p = softmax(z_t / tau)``.")
    student_temperature: Optional[float] = _option(None, """
        the student's temperature ``tau_s``: ``q = softmax(z_s / tau_s)``; None: ``tau``.""")
    alpha: Optional[float] = _option(None, f"a parameter of {_users_of('alpha')}; None: its default.")
    beta: Optional[float] = _option(None, f"a parameter of {_users_of('beta')}; None: its default.")
    skew: Optional[float] = _option(None, f"a parameter of {_users_of('skew')}; None: its default.")
    weighting: Union[None, str, torch.Tensor] = _option(None, """
        the per-row weight ``w`` of the divergence: None, ``"wttm"``
        (``U_{1/tau}(softmax(z_t))``), ``"entropy"`` (``1 - H(softmax(z_t)) / log V``)
        or a floating tensor of N weights (finite, >= 0; treated as a constant).""")
    labels: Optional[torch.Tensor] = _option(None, """
        N integer labels (any shape): rows whose label is ``ignore_index`` count in
        neither term; with ``hard_weight != 0`` they give the hard-label
        cross-entropy (the student at temperature 1).""")
    ignore_index: int = _option(-100, "the label of the rows that do not count.")
    hard_weight: float = _option(0.0, "the weight of the cross-entropy term (not 0 needs ``labels``).")
    soft_weight: float = _option(1.0, "the weight of the divergence term.")
    scale: float = _option(1.0, "one more factor of the divergence term (``kd_loss`` fixes it to ``T^2``).")
    reduction: str = _option("batchmean", """
        ``"batchmean"`` (the sum over the valid rows / their number, or / ``normalizer``),
        ``"sum"``, or ``"none"`` (a ``(N,)`` tensor, zero on ignored rows).""")
    normalizer: Optional[float] = _option(None, """
        the denominator of ``"batchmean"`` instead of the number of valid rows (e.g. a
        global token count, so that gradient accumulation matches one big batch).""")
    backend: str = _option("auto", """
        ``"auto"`` (the fused kernel for the tensors' device, else the reference;
        ``KDFAST_BACKEND`` overrides), ``"cpu"``, ``"triton"`` or ``"torch"``.""")
    label_revision: Optional[float] = _option(None, """
        Label Revision (Lan et al., 2024) with ``eta`` in (0, 1): on each valid row
        whose teacher is wrong (its label logit below the row's maximum) the teacher
        distribution at ``tau`` becomes ``beta p + (1 - beta) y``, ``y`` the one-hot
        label, ``beta = eta / (1 + p_max - p_label)``, which makes the label the top
        class; right rows are untouched.  Needs ``labels``.  None: off.  Backends
        torch and triton (``backend="cpu"`` refuses it; ``"auto"`` on CPU runs the
        reference).  Details: :mod:`kdfast.label_revision`.""", opt_in=True)

    @property
    def weighting_name(self) -> str:
        """'none', 'wttm', 'entropy' or 'given' (a tensor of weights)."""
        if self.weighting is None:
            return "none"
        return self.weighting if isinstance(self.weighting, str) else "given"

    def select_rows(self, rows: slice) -> "LossConfig":
        """This configuration for a slice of its N rows: that slice of the per-row tensors (labels, a weighting tensor).

        The reduction and the normaliser stay: a caller that splits a
        ``"batchmean"`` loss into slices sets the whole call's normaliser first.
        """
        weighting = _flat_rows(self.weighting, rows) if isinstance(self.weighting, torch.Tensor) else self.weighting
        return replace(self, labels=_flat_rows(self.labels, rows), weighting=weighting)


def _flat_rows(t: Optional[torch.Tensor], rows: slice) -> Optional[torch.Tensor]:
    return None if t is None else t.reshape(-1)[rows]


# The options every loss takes; OPT_IN_OPTIONS only those that name them (takes_loss_options(include=...)).
LOSS_OPTIONS: Tuple[Field, ...] = tuple(f for f in fields(LossConfig) if not f.metadata["opt_in"])
OPT_IN_OPTIONS: Tuple[Field, ...] = tuple(f for f in fields(LossConfig) if f.metadata["opt_in"])


# ----------------------------------------------------------------- the public functions' keywords
OPTIONS_HEADING = "Options (keyword arguments; docs/contract.md, section 4):"


def option_doc(option: Field) -> str:
    """The entry of one option in the "Options" section of a docstring."""
    return textwrap.fill(f"{option.name}={option.default!r}: {option.metadata['doc']}", width=100,
                         initial_indent="    ", subsequent_indent="        ", break_long_words=False,
                         break_on_hyphens=False)


def options_doc(options: Iterable[Field]) -> str:
    """The "Options" section of a docstring: one entry per option."""
    return "\n".join([OPTIONS_HEADING, *(option_doc(option) for option in options)])


def check_keywords(function: str, given: Iterable[str], accepted, fixed: Tuple[str, ...] = ()) -> None:
    """A TypeError, in Python's words, for the first name in ``given`` that ``function`` does not take.

    ``fixed`` are options a named form sets itself (``kd_loss`` fixes the
    divergence): naming one says so and where to choose it instead.
    """
    for name in given:
        if name in fixed:
            raise TypeError(f"{function}() fixes {name}; use distill_loss() to choose it")
        if name not in accepted:
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")


def takes_loss_options(*, exclude: Tuple[str, ...] = (), fixed: Tuple[str, ...] = (),
                       include: Tuple[str, ...] = ()) -> Callable:
    """Decorate a loss function whose ``**options`` are the loss options of :class:`LossConfig`.

    The function gets every option but ``exclude`` and ``fixed`` as a keyword
    parameter of its signature (``inspect.signature``, ``help()`` and IDEs show
    them with their defaults; an option the function names itself keeps its
    place), the "Options" section at the end of its docstring, and Python's
    TypeError for a keyword it does not take (before its body runs).
    ``fixed`` are the options a named form sets itself; ``include`` the opt-in
    options (:data:`OPT_IN_OPTIONS`, e.g. ``label_revision``) it takes.  The result records
    the options it takes and fixes (``loss_options``, ``fixed_options``) for
    the module forms' checks (:func:`check_call_options`).
    """

    def decorate(fn: Callable) -> Callable:
        own = inspect.signature(fn)
        unknown = set(include) - {option.name for option in OPT_IN_OPTIONS}
        if unknown:
            raise ValueError(f"include names no opt-in option: {sorted(unknown)}")
        options = [option for option in LOSS_OPTIONS if option.name not in exclude + fixed]
        options += [option for option in OPT_IN_OPTIONS if option.name in include]
        added = [inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=option.default,
                                   annotation=option.type)
                 for option in options if option.name not in own.parameters]
        signature = own.replace(parameters=[p for p in own.parameters.values() if p.kind != p.VAR_KEYWORD] + added)
        accepted = frozenset(signature.parameters)

        @functools.wraps(fn)
        def loss(*args, **kwargs):
            check_keywords(fn.__name__, kwargs, accepted, fixed)
            return fn(*args, **kwargs)

        loss.__signature__ = signature
        loss.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\n" + options_doc(options)
        loss.loss_options = tuple(option.name for option in options)
        loss.fixed_options = fixed
        return loss

    return decorate


def check_call_options(fn: Callable, options: dict) -> None:
    """Check the keyword options of a later call ``fn(..., **options)`` that need no tensor (a module's options).

    The names as ``fn`` would (Python's TypeError, or the one of an option it
    fixes), and the loss options among them as :func:`make_config` would.
    """
    check_keywords(fn.__name__, options, inspect.signature(fn).parameters, getattr(fn, "fixed_options", ()))
    check_options(LossConfig(**{name: options[name] for name in getattr(fn, "loss_options", ()) if name in options}))


# ----------------------------------------------------------------- numbers
# The kernels take their per-call coefficients in float32 lanes.
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)


def _is_scalar_tensor(value) -> bool:
    """A one-element real, non-bool tensor (a scalar a user may pass for a number)."""
    return (isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool
            and not value.is_complex())


def finite_float(name: str, value) -> float:
    """``value`` as a finite float; a bool, a string or a tensor of several values is a TypeError."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or _is_scalar_tensor(value)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return x


def integer(name: str, value) -> int:
    """``value`` as an int; a float (even 1.0), a bool or a string is a TypeError (no silent truncation)."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or
                                       (_is_scalar_tensor(value) and not value.is_floating_point())):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _in_float32_range(name: str, x: float, positive: bool = False) -> float:
    """Refuses a value the float32 kernels cannot hold (its magnitude past 3.4e38, or a positive one below 1.2e-38)."""
    if abs(x) > _FLOAT32_MAX or (positive and x < _FLOAT32_TINY):
        bound = f"in [{_FLOAT32_TINY:.3g}, {_FLOAT32_MAX:.3g}]" if positive else f"at most {_FLOAT32_MAX:.3g} in magnitude"
        raise ValueError(f"{name}={x!r} is outside float32's range: it must be {bound}")
    return x


def float32_coefficient(name: str, value) -> float:
    """A finite real that the float32 kernels can hold (a weight or a scale of a loss term)."""
    return _in_float32_range(name, finite_float(name, value))


def positive_float32(name: str, value) -> float:
    """A finite real > 0 that the float32 kernels can hold (a temperature, a normaliser)."""
    x = finite_float(name, value)
    if x <= 0:
        raise ValueError(f"{name} must be > 0, got {name}={value}")
    return _in_float32_range(name, x, positive=True)


# ----------------------------------------------------------------- tensors
def check_tensor(name: str, value) -> None:
    """TypeError unless ``value`` is a tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_logit_dtype(name: str, t: torch.Tensor) -> None:
    """TypeError unless ``t`` has a dtype the losses take for logits (and hidden states)."""
    if t.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def check_same_device(name: str, t: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    """ValueError naming both devices unless ``t`` is on ``other``'s."""
    if t.device != other.device:
        raise ValueError(f"{name} is on {t.device} but {other_name} is on {other.device}")


def check_logits(student_logits, teacher_logits) -> None:
    """Types, dtypes, shapes and devices of the two logits tensors."""
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        check_tensor(name, t)
        check_logit_dtype(name, t)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits shape {tuple(student_logits.shape)} does not match "
            f"teacher_logits shape {tuple(teacher_logits.shape)}"
        )
    check_same_device("student_logits", student_logits, "teacher_logits", teacher_logits)
    if student_logits.dim() == 0 or student_logits.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty last (vocabulary) dimension, got shape {tuple(student_logits.shape)}")


def check_label_tensor(labels) -> None:
    """TypeError unless ``labels`` is an integer (not bool) tensor; its rows are :func:`check_row_tensor`'s."""
    check_tensor("labels", labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")


def check_row_tensor(name: str, t: torch.Tensor, student_logits: torch.Tensor) -> None:
    """ValueError unless ``t`` has one entry per row of the logits (any shape), on their device."""
    rows = student_logits.numel() // student_logits.shape[-1]
    if t.numel() != rows:
        raise ValueError(
            f"{name} shape {tuple(t.shape)} does not match the {rows} rows of logits shape "
            f"{tuple(student_logits.shape)}"
        )
    if t.device != student_logits.device:
        raise ValueError(f"{name} is on {t.device} but the logits are on {student_logits.device}")


def check_row_weights(weights: torch.Tensor) -> None:
    """Row weights scale a divergence: a negative or non-finite one is a mistake (read only in eager mode)."""
    if torch.compiler.is_compiling() or weights.numel() == 0:
        return
    bad = ~torch.isfinite(weights) | (weights < 0)
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0, 0])
        raise ValueError(f"weighting tensor entries must be finite and >= 0, got {float(weights.reshape(-1)[i])} "
                         f"at row {i}")


# ----------------------------------------------------------------- the options
def resolve_divergence(divergence: str, alpha=None, beta=None, skew=None):
    """Check a divergence and its parameters against the registry; return ``(name, alpha, beta, skew)``.

    Defaults and valid ranges are the table's (``kdfast.registry``): ``jsd``
    beta=0.5 (Liger-Kernel's), ``renyi`` alpha=0.5, ``ab`` alpha=beta=0.5,
    ``skew_*`` skew=0.1 (DistiLLM's).  The boundary cases of docs/contract.md
    (section 2) are renamed: ``jsd`` beta=0 is ``kl`` and beta=1 is
    ``reverse_kl``; ``skew_kl`` and ``skew_reverse_kl`` at skew=0 are ``kl`` and
    ``reverse_kl``; ``renyi`` with ``|alpha - 1| < RENYI_KL_WINDOW`` is ``kl``
    (see there why not only alpha = 1).  Giving a parameter that the
    divergence does not use is an error (it is almost always a mistake).
    """
    spec = divergence_spec(divergence)
    params = spec.defaults()
    for name, value in (("alpha", alpha), ("beta", beta), ("skew", skew)):
        if value is None:
            continue
        if name not in params:
            raise ValueError(f"divergence {divergence!r} takes no parameter {name} (got {name}={value!r})")
        params[name] = finite_float(name, value)
    for param in spec.params:
        param.check(divergence, params[param.name])
    renamed = spec.rename(params)
    if renamed is not None:
        return renamed, None, None, None
    return divergence, params.get("alpha"), params.get("beta"), params.get("skew")


def _check_weighting(weighting):
    """A weighting name, or a floating tensor of weights (detached: the weights are constants)."""
    if isinstance(weighting, torch.Tensor):
        if not weighting.is_floating_point():
            raise TypeError(f"a weighting tensor must be floating point, got {weighting.dtype}")
        return weighting.detach()
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be None, 'wttm', 'entropy' or a tensor of row weights, got {weighting!r}")
    return weighting


def check_options(given: LossConfig) -> LossConfig:
    """The options checked as far as they can be without the logits, in canonical form.

    Everything but the rows and devices of the per-row tensors (labels, a
    weighting tensor) and whether ``hard_weight`` has its labels: those are
    :func:`check_batch_options`'s.
    """
    divergence, alpha, beta, skew = resolve_divergence(given.divergence, given.alpha, given.beta, given.skew)
    tau = positive_float32("temperature", given.temperature)
    tau_s = tau if given.student_temperature is None else positive_float32("student_temperature",
                                                                           given.student_temperature)
    weighting = _check_weighting(given.weighting)
    if given.labels is not None:
        check_label_tensor(given.labels)
    hard_weight = float32_coefficient("hard_weight", given.hard_weight)
    if given.reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {given.reduction!r}")
    normalizer = given.normalizer
    if normalizer is not None:
        if given.reduction != "batchmean":
            raise ValueError(f"normalizer is only used with reduction='batchmean', got reduction={given.reduction!r}")
        normalizer = positive_float32("normalizer", normalizer)
    soft_weight = float32_coefficient("soft_weight", given.soft_weight)
    scale = float32_coefficient("scale", given.scale)
    _in_float32_range("soft_weight * scale", soft_weight * scale)
    if normalizer is not None:
        _in_float32_range("soft_weight * scale / normalizer", soft_weight * scale / normalizer)
        _in_float32_range("hard_weight / normalizer", hard_weight / normalizer)
    label_revision = given.label_revision
    if label_revision is not None:
        label_revision = finite_float("label_revision", label_revision)
        if not 0.0 < label_revision < 1.0:
            raise ValueError(f"label_revision (the eta of Label Revision) must be in (0, 1), got "
                             f"label_revision={given.label_revision!r}")
    return replace(given, divergence=divergence, temperature=tau, student_temperature=tau_s, alpha=alpha, beta=beta,
                   skew=skew, weighting=weighting, ignore_index=integer("ignore_index", given.ignore_index),
                   hard_weight=hard_weight, soft_weight=soft_weight, scale=scale, normalizer=normalizer,
                   label_revision=label_revision)


def check_batch_options(cfg: LossConfig, student_logits: torch.Tensor) -> None:
    """The per-row options against the logits: one label and weight per row; labels when ``hard_weight`` needs them."""
    if isinstance(cfg.weighting, torch.Tensor):
        check_row_tensor("weighting", cfg.weighting, student_logits)
        check_row_weights(cfg.weighting)
    if cfg.labels is not None:
        check_row_tensor("labels", cfg.labels, student_logits)
    if cfg.hard_weight != 0.0 and cfg.labels is None:
        raise ValueError(f"hard_weight={cfg.hard_weight} needs labels for the cross-entropy term")
    if cfg.label_revision is not None and cfg.labels is None:
        raise ValueError(f"label_revision={cfg.label_revision} needs labels: the revision mixes the teacher with "
                         f"the one-hot label")


def make_config(student_logits: torch.Tensor, teacher_logits: torch.Tensor, **options) -> LossConfig:
    """The loss options (the fields of :class:`LossConfig`) checked against the logits: a valid, canonical config.

    A keyword that is not an option is Python's TypeError (``LossConfig``'s).
    The public losses call this once per call, and pass the result down.
    """
    given = LossConfig(**options)
    check_logits(student_logits, teacher_logits)
    cfg = check_options(given)
    check_batch_options(cfg, student_logits)
    return cfg
