"""The benchmarked losses: for each, its inputs, the baselines a user would otherwise run, and kdfast's methods.

A *case* is one loss at one shape and dtype.  Preparing it gives the inputs,
the tensors that get a gradient, and the *methods*: zero-argument callables
that each compute the same loss value from those inputs.

Baselines (see :mod:`kdfast.bench.baselines` for the plain forms):

* ``eager``: the loss as people write it in plain PyTorch (``F.kl_div`` of
  ``log_softmax``'s and friends; for fused linear: materialise both logits,
  then that loss);
* ``compile``: the same plain code under ``torch.compile``;
* ``liger``: Liger-Kernel's loss where it has one and it is importable
  (``LigerKLDIVLoss`` / ``LigerJSD`` / ``LigerTVDLoss`` on CUDA; the chunked
  ``LigerFusedLinearJSDLoss`` with ``beta = 0``, which is KL, on any device).

kdfast's methods: ``kdfast`` is the loss on the fused backend of the device
(the C++ kernels on CPU, Triton on CUDA); ``kdfast[<backend>]`` the same loss
on another backend asked for (``kdfast[torch]`` is the validating reference).

The loss families and the losses they hold:

* ``distill``: every divergence of ``distill_loss`` with Hinton's ``T**2``
  scale (``kd_loss``'s convention) and the parameters of :data:`PARAMS`, and
  the weightings ``wttm`` (``wttm_loss``) and ``entropy`` (KL weighted by the
  teacher's confidence);
* ``dist``, ``dkd``, ``correlation``: the losses of ``kdfast.correlation_losses``
  (DKD with labels ``arange(N) % V``);
* ``grouped_kd``: ``kdfast.grouped_kd_loss`` at its defaults but the settings'
  temperature (labels ``arange(N) % V``); its plain form is the authors'
  released code with a per-row group (:func:`.baselines.grouped_kd_plain`);
* ``ltkd``: ``kdfast.ltkd_loss`` (long-tailed KD, :mod:`kdfast.longtail`) with three
  class groups (head / medium / tail = the first, middle and last third of the
  classes), the batch-rebalanced target and the settings' temperature; its
  plain form is the same loss on the PyTorch backend (the per-group
  decomposition a user would write, :func:`.baselines.ltkd_plain`);
* ``label_revision``: ``kd_loss`` (KL, ``T**2``) with ``label_revision=0.9``
  (Label Revision, :mod:`kdfast.label_revision`; labels ``arange(N) % V``, so
  most rows of the random teacher are revised), next to ``kl`` (KD); its plain
  form is the PyTorch pre-pass (:func:`.baselines.label_revision_plain`);
* ``topk``: ``topk_distill_loss`` (``kdfast[torch]`` is its PyTorch form, the
  implementation before the fused kernels) against the teacher's top-k
  log-probabilities (float32, int64 indices, as an offline-distillation cache
  stores them), one case per tail (``settings.tails``: ``renormalize``, whose
  plain form gathers the k logits, and ``bucket``, whose plain form takes the
  full ``log_softmax`` and the remaining mass as a k+1-th outcome) and per k
  (``settings.topk``);
* ``fused_linear``: ``fused_linear_distill_loss`` (KL, T = 1) of two LM heads of
  hidden size ``settings.hidden``, gradients of the student's hidden states and
  weight;
* ``fused_linear_topk``: ``fused_linear_topk_distill_loss`` (KL, T = 1) of the
  student's head against the top-k of a random teacher head, per tail and k as
  ``topk``; its baselines materialise the student's ``(N, V)`` logits and run
  the PyTorch top-k loss (``topk_distill_loss(..., backend="torch")``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

import kdfast
from kdfast.config import DIVERGENCES
from kdfast.llm.topk import TAILS
from kdfast.ops.backends import available_backends
from kdfast.ops.triton import interpreter_requested

from .baselines import (grouped_kd_plain, label_revision_plain, ltkd_plain, plain_loss, plain_other_loss,
                        plain_topk_loss)

WEIGHTINGS = ("wttm", "entropy")
CORRELATION_LOSSES = ("dist", "dkd", "correlation")
TOPK_FAMILIES = ("topk", "fused_linear_topk")  # the losses of a teacher's top-k: a case per tail and k
LOSSES = (*DIVERGENCES, *WEIGHTINGS, "label_revision", *CORRELATION_LOSSES, "grouped_kd", "ltkd", "topk", "fused_linear",
          "fused_linear_topk")
LABEL_REVISION_ETA = 0.9
BASELINES = ("eager", "compile", "liger")
PARAMS = {"jsd": {"beta": 0.5}, "renyi": {"alpha": 0.5}, "ab": {"alpha": 0.5, "beta": 0.5}, "skew_kl": {"skew": 0.1},
          "skew_reverse_kl": {"skew": 0.1}}
# torch.compile keeps this many graphs per function; a matrix of losses x shapes x dtypes
# recompiles one plain function more often than dynamo's default (8) allows, after which it
# would silently run eager.
RECOMPILE_LIMIT = 256
# Rows of the teacher head whose logits are formed at once when drawing its top-k (the fused linear
# top-k case): a whole (N, V) teacher is not needed, only its top-k.
TEACHER_ROWS_PER_CHUNK = 1024


def family_of(loss: str) -> str:
    """The family of a benchmarked loss (``distill``, ``dist``, ``dkd``, ``correlation``, ``grouped_kd``,
    ``ltkd``, ``label_revision``, ``topk``, ``fused_linear``, ``fused_linear_topk``)."""
    if loss in DIVERGENCES or loss in WEIGHTINGS:
        return "distill"
    if loss in CORRELATION_LOSSES or loss in ("grouped_kd", "ltkd", "label_revision", "topk", "fused_linear",
                                              "fused_linear_topk"):
        return loss
    raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")


@dataclass(frozen=True)
class Case:
    """One loss at one shape (``N`` rows, vocabulary ``V``) and dtype of the logits (or hidden states).

    A top-k loss's case also has its teacher's ``tail`` and ``topk`` (k); None
    for the other losses, and until :meth:`complete` takes them from the settings.
    """

    loss: str
    N: int
    V: int
    dtype: str
    tail: Optional[str] = None
    topk: Optional[int] = None

    @property
    def shape(self) -> str:
        return f"{self.N}x{self.V}"

    @property
    def family(self) -> str:
        return family_of(self.loss)

    def key(self) -> dict:
        """The fields that name the case in its records (``tail`` and ``topk`` only where they are set)."""
        key = {"loss": self.loss, "family": self.family, "shape": self.shape, "N": self.N, "V": self.V,
               "dtype": self.dtype}
        key.update({name: value for name, value in (("tail", self.tail), ("topk", self.topk)) if value is not None})
        return key

    def complete(self, settings: "Settings") -> "Case":
        """The case with its top-k teacher settled (the first tail and k of ``settings`` where not given;
        k at most V, as a teacher has no more entries); other losses' cases unchanged."""
        if self.family not in TOPK_FAMILIES:
            return self
        return replace(self, tail=self.tail or settings.tails[0], topk=min(self.topk or settings.topk[0], self.V))


@dataclass(frozen=True)
class Settings:
    """What every case of a run shares (the JSON's ``settings`` hold these and the lists of cases)."""

    device: str = "cpu"
    temperature: float = 2.0
    topk: Tuple[int, ...] = (64,)  # the teacher's entries per row of the top-k losses: a case per k
    tails: Tuple[str, ...] = ("renormalize",)  # the top-k losses' tails: a case per tail
    hidden: int = 576
    baselines: Tuple[str, ...] = ("eager", "compile", "liger")
    backends: Tuple[str, ...] = ()  # kdfast's backends; empty: the device's fused one
    compile_backend: str = "inductor"

    def __post_init__(self):
        # one k or one tail (an earlier result's settings, where topk was a number; a caller's
        # Settings(topk=64)) is a list of one
        if isinstance(self.topk, int):
            object.__setattr__(self, "topk", (self.topk,))
        if isinstance(self.tails, str):
            object.__setattr__(self, "tails", (self.tails,))
        bad_tails = [tail for tail in self.tails if tail not in TAILS]
        if bad_tails or not self.tails:
            raise ValueError(f"unknown tail {bad_tails[0] if bad_tails else None!r}; choose from {', '.join(TAILS)}")
        if not self.topk or any(not isinstance(k, int) or k < 1 for k in self.topk):
            raise ValueError(f"--topk takes whole numbers of at least 1; got {list(self.topk)}")

    @classmethod
    def from_json(cls, values: dict) -> "Settings":
        """The settings of a JSON ``settings`` object (lists back to tuples; keys that are not fields ignored)."""
        fields = cls.__dataclass_fields__
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields})


@dataclass
class Prepared:
    """A case ready to run: its methods (name -> ``fn() -> loss``), what gets a gradient, the least traffic."""

    methods: Dict[str, Callable[[], torch.Tensor]]
    wrt: Tuple[torch.Tensor, ...]
    bytes_moved: Optional[int]
    unavailable: Dict[str, str] = field(default_factory=dict)  # method -> why it is not offered here


def fused_backend(device: torch.device) -> str:
    """kdfast's fused backend for tensors on ``device``."""
    return "cpu" if device.type == "cpu" else "triton"


def implementation_family(family: str) -> str:
    """The ``available_backends`` family of a benchmark family (top-k and fused linear run distill's kernels)."""
    return family if family in CORRELATION_LOSSES or family in ("grouped_kd", "ltkd") else "distill"


def default_backend(family: str, device: torch.device) -> str:
    """The backend of the plain ``kdfast`` method: the device's fused one where it runs, else ``torch``."""
    fused = fused_backend(device)
    return fused if _check_backend(fused, family, device) is None else "torch"


def kdfast_method_name(backend: str, family: str, device: torch.device) -> str:
    return "kdfast" if backend == default_backend(family, device) else f"kdfast[{backend}]"


def compile_plain(fn, backend: str = "inductor"):
    """``torch.compile`` of a plain loss, static shapes, with room for every case's recompilation."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
    return torch.compile(fn, dynamic=False, backend=backend)


def loss_options(loss: str, temperature: float) -> dict:
    """The ``distill_loss`` keyword arguments of a benchmarked loss of the ``distill`` family.

    A divergence gets Hinton's ``T**2`` scale (what people multiply by after
    dividing the logits by T) and its parameters of :data:`PARAMS`; ``wttm`` is
    ``kdfast.wttm_loss`` (KL, teacher at T, student at 1, weighted); ``entropy``
    is KL at T weighted by the teacher's confidence.
    """
    if loss == "wttm":
        return dict(divergence="kl", temperature=temperature, student_temperature=1.0, weighting="wttm")
    if loss == "entropy":
        return dict(divergence="kl", temperature=temperature, scale=temperature**2, weighting="entropy")
    return dict(divergence=loss, temperature=temperature, scale=temperature**2, **PARAMS.get(loss, {}))


def make_logits(N: int, V: int, dtype, device, seed: int = 0):
    """Student (requires grad) and teacher logits of one case, N(0, 4) entries, drawn on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    s = (torch.randn(N, V, generator=g, device=device) * 2).to(dtype).requires_grad_()
    t = (torch.randn(N, V, generator=g, device=device) * 2).to(dtype)
    return s, t


def labels_for(s: torch.Tensor) -> torch.Tensor:
    """Deterministic labels of DKD's rows (every class is a target somewhere)."""
    return torch.arange(s.shape[0], device=s.device) % s.shape[-1]


def logits_bytes(N: int, V: int, s: torch.Tensor, t: torch.Tensor) -> int:
    """The least traffic of one forward+backward: read both logits once, write the gradient once."""
    return N * V * (2 * s.element_size() + t.element_size())


def cases_of(loss: str, N: int, V: int, dtype: str, settings: Settings) -> List[Case]:
    """The cases of one loss, shape and dtype: one per tail and k of ``settings`` for the top-k losses
    (in that order; ks above V are the same case, once), else one."""
    if family_of(loss) not in TOPK_FAMILIES:
        return [Case(loss, N, V, dtype)]
    cases = (Case(loss, N, V, dtype, tail, k).complete(settings) for tail in settings.tails for k in settings.topk)
    return list(dict.fromkeys(cases))


def prepare(case: Case, settings: Settings) -> Prepared:
    """The inputs and methods of ``case`` (see the module doc); baselines not available here are listed."""
    case = case.complete(settings)
    device = torch.device(settings.device)
    dtype = getattr(torch, case.dtype)
    prepared = _PREPARE[case.family](case, settings, device, dtype)
    baselines, kdfast_methods = prepared.pop("baselines"), prepared.pop("kdfast")
    methods, unavailable = {}, {}
    for name in settings.baselines:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
        if baselines.get(name) is None:
            unavailable[name] = baselines.get(f"{name}_why", f"no {name} form of {case.loss} here")
        else:
            methods[name] = baselines[name]
    backends = settings.backends or (default_backend(case.family, device),)
    for backend in backends:
        name = kdfast_method_name(backend, case.family, device)
        fn = kdfast_methods(backend)
        if isinstance(fn, str):
            unavailable[name] = fn
        else:
            methods[name] = fn
    return Prepared(methods=methods, unavailable=unavailable, **prepared)


def _check_backend(backend: str, family: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run ``family`` here, or None."""
    if backend == "torch":
        return None
    if backend == "triton":
        if device.type != "cuda" and not interpreter_requested():
            return "the Triton backend needs a CUDA device (or TRITON_INTERPRET=1)"
        return None
    available = available_backends(implementation_family(family))
    if backend not in available:
        return f"backend {backend!r} is not available for {implementation_family(family)} here (available: {available})"
    return None


def _prepare_distill(case, settings, device, dtype) -> dict:
    s, t = make_logits(case.N, case.V, dtype, device)
    kw = loss_options(case.loss, settings.temperature)
    compiled = compile_plain(plain_loss, settings.compile_backend)

    def kdfast_method(backend):
        why = _check_backend(backend, "distill", device)
        return why or (lambda: kdfast.distill_loss(s, t, backend=backend, **kw))

    liger, why = _liger_distill(case.loss, settings.temperature, device)
    return {"baselines": {"eager": lambda: plain_loss(s, t, **kw), "compile": lambda: compiled(s, t, **kw),
                          "liger": (lambda: liger(s, t)) if liger else None, "liger_why": why},
            "kdfast": kdfast_method, "wrt": (s,), "bytes_moved": logits_bytes(case.N, case.V, s, t)}


def _prepare_label_revision(case, settings, device, dtype) -> dict:
    s, t = make_logits(case.N, case.V, dtype, device)
    T, eta = settings.temperature, LABEL_REVISION_ETA
    labels = labels_for(s)
    compiled = compile_plain(label_revision_plain, settings.compile_backend)

    def kdfast_method(backend):
        why = _check_backend(backend, "label_revision", device)
        return why or (lambda: kdfast.kd_loss(s, t, T, labels=labels, label_revision=eta, backend=backend))

    return {"baselines": {"eager": lambda: label_revision_plain(s, t, labels, T, eta),
                          "compile": lambda: compiled(s, t, labels, T, eta),
                          "liger_why": "Liger-Kernel has no label revision"},
            "kdfast": kdfast_method, "wrt": (s,), "bytes_moved": logits_bytes(case.N, case.V, s, t)}


def _liger_distill(loss: str, temperature: float, device):
    """Liger-Kernel's loss of this divergence on the same inputs and value, or (None, why not)."""
    if loss not in ("kl", "jsd", "tvd"):
        return None, f"Liger-Kernel has no {loss} loss"
    if device.type != "cuda":
        return None, "Liger-Kernel's divergence kernels run on CUDA only"
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss, LigerTVDLoss
    except ImportError:
        return None, "Liger-Kernel is not installed (pip install --no-deps liger-kernel)"
    scale = temperature**2
    if loss == "kl":
        kl_loss = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return (lambda s, t: kl_loss(torch.log_softmax(s / temperature, -1),
                                     torch.log_softmax(t / temperature, -1)) * scale), None
    if loss == "jsd":
        jsd_loss = LigerJSD(beta=PARAMS["jsd"]["beta"])  # (student log q, teacher log p), mean over rows
        return (lambda s, t: jsd_loss(torch.log_softmax(s / temperature, -1),
                                      torch.log_softmax(t / temperature, -1)) * scale), None
    tvd_loss = LigerTVDLoss(reduction="batchmean")  # (student p, teacher q): the gradient is the first's
    return (lambda s, t: tvd_loss(torch.softmax(s / temperature, -1),
                                  torch.softmax(t / temperature, -1)) * scale), None


def _prepare_correlation_family(case, settings, device, dtype) -> dict:
    from kdfast import correlation_losses as cl

    s, t = make_logits(case.N, case.V, dtype, device)
    T = settings.temperature
    labels = labels_for(s)
    # the extra positional arguments of each plain form after (student, teacher): kdfast's defaults
    extra = {"dist": (T, 1.0, 1.0), "dkd": (labels, T, 1.0, 8.0), "correlation": (T, 1.0, 1.0, 1.0, None)}[case.loss]
    public = {"dist": lambda b: cl.dist_loss(s, t, T, backend=b),
              "dkd": lambda b: cl.dkd_loss(s, t, labels, T, backend=b),
              "correlation": lambda b: cl.correlation_loss(s, t, T, backend=b)}[case.loss]
    plain = plain_other_loss(case.loss)
    compiled = compile_plain(plain, settings.compile_backend)

    def kdfast_method(backend):
        why = _check_backend(backend, case.loss, device)
        return why or (lambda: public(backend))

    return {"baselines": {"eager": lambda: plain(s, t, *extra), "compile": lambda: compiled(s, t, *extra),
                          "liger_why": f"Liger-Kernel has no {case.loss} loss"},
            "kdfast": kdfast_method, "wrt": (s,), "bytes_moved": logits_bytes(case.N, case.V, s, t)}


def _prepare_grouped_kd(case, settings, device, dtype) -> dict:
    s, t = make_logits(case.N, case.V, dtype, device)
    T = settings.temperature
    labels = labels_for(s)
    compiled = compile_plain(grouped_kd_plain, settings.compile_backend)

    def kdfast_method(backend):
        why = _check_backend(backend, "grouped_kd", device)
        return why or (lambda: kdfast.grouped_kd_loss(s, t, labels, temperature=T, backend=backend))

    return {"baselines": {"eager": lambda: grouped_kd_plain(s, t, labels, T),
                          "compile": lambda: compiled(s, t, labels, T),
                          "liger_why": "Liger-Kernel has no grouped KD loss"},
            "kdfast": kdfast_method, "wrt": (s,), "bytes_moved": logits_bytes(case.N, case.V, s, t)}


def _prepare_ltkd(case, settings, device, dtype) -> dict:
    s, t = make_logits(case.N, case.V, dtype, device)
    T = settings.temperature
    groups = torch.arange(case.V, device=device) * 3 // case.V
    compiled = compile_plain(ltkd_plain, settings.compile_backend)

    def kdfast_method(backend):
        why = _check_backend(backend, "ltkd", device)
        return why or (lambda: kdfast.ltkd_loss(s, t, groups, temperature=T, backend=backend))

    return {"baselines": {"eager": lambda: ltkd_plain(s, t, groups, T), "compile": lambda: compiled(s, t, groups, T),
                          "liger_why": "Liger-Kernel has no long-tailed KD loss"},
            "kdfast": kdfast_method, "wrt": (s,), "bytes_moved": logits_bytes(case.N, case.V, s, t)}


def topk_inputs(N: int, V: int, k: int, dtype, device, seed: int = 0):
    """Student logits and a teacher's top-k (int64 indices, float32 log-probabilities at T = 1) of one case."""
    s, t = make_logits(N, V, dtype, device, seed)
    logprobs, indices = torch.log_softmax(t.float(), -1).topk(min(k, V), -1)
    return s, indices, logprobs


def topk_bytes(tail: str, s: torch.Tensor, idx: torch.Tensor, lp: torch.Tensor) -> int:
    """The least traffic of one top-k forward+backward: the teacher's top-k (indices and log-probs) read
    once, the dense gradient written once, and the student's logits read once: all of them for the
    bucket (its remaining mass), only the k on the support when renormalising (nothing else is read)."""
    N, V = s.shape
    read = N * V if tail == "bucket" else idx.numel()
    return (read + N * V) * s.element_size() + idx.numel() * (idx.element_size() + lp.element_size())


def _topk_refusal(tail: str, backend: str, device: torch.device) -> Optional[str]:
    """Why ``topk_distill_loss`` refuses ``tail`` on ``backend`` (a fused kernel it has not yet), or None.

    Asked of the loss itself, on a 1 x 4 input, rather than known here: the
    benchmark offers a tail's fused kernel from the day it lands.
    """
    if backend == "torch":
        return None
    s = torch.zeros(1, 4, device=device)
    idx, lp = torch.tensor([[0, 1]], device=device), torch.full((1, 2), -2.0, device=device)
    try:
        kdfast.topk_distill_loss(s, idx, lp, tail=tail, backend=backend)
    except ValueError as error:
        return str(error)
    except Exception:  # noqa: BLE001 - not a refusal: the method's own first call reports it
        return None
    return None


def _prepare_topk(case, settings, device, dtype) -> dict:
    s, idx, lp = topk_inputs(case.N, case.V, case.topk, dtype, device)
    T = settings.temperature
    kw = dict(tail=case.tail, temperature=T, scale=T**2)
    compiled = compile_plain(plain_topk_loss, settings.compile_backend)

    def kdfast_method(backend):
        why = _check_backend(backend, "topk", device) or _topk_refusal(case.tail, backend, device)
        return why or (lambda: kdfast.topk_distill_loss(s, idx, lp, backend=backend, **kw))

    return {"baselines": {"eager": lambda: plain_topk_loss(s, idx, lp, **kw),
                          "compile": lambda: compiled(s, idx, lp, **kw),
                          "liger_why": "Liger-Kernel has no top-k teacher loss"},
            "kdfast": kdfast_method, "wrt": (s,), "bytes_moved": topk_bytes(case.tail, s, idx, lp)}


def fused_linear_inputs(N: int, H: int, V: int, dtype, device, seed: int = 0, teacher_hidden: Optional[int] = None) -> dict:
    """Hidden states and LM-head weights of a student and a teacher (no biases, as in most LLMs), and labels.

    Drawn on the device (a CPU takes seconds for the 10^9 normals of a GPU
    shape); the teacher's hidden size is ``teacher_hidden`` (default ``H``).
    """
    H_t = teacher_hidden or H
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g, device=device) * scale).to(dtype)

    return dict(student_hidden=randn(N, H).requires_grad_(),
                student_weight=randn(V, H, scale=H ** -0.5).requires_grad_(),
                teacher_hidden=randn(N, H_t), teacher_weight=randn(V, H_t, scale=H_t ** -0.5),
                labels=torch.randint(0, V, (N,), generator=g, device=device))


def materialised_kl(student_hidden, student_weight, teacher_hidden, teacher_weight):
    """What a user writes without a fused linear loss: both ``(N, V)`` logits, then the plain KL (T = 1)."""
    student_logits = student_hidden @ student_weight.T
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight.T
    return plain_loss(student_logits, teacher_logits)


def _prepare_fused_linear(case, settings, device, dtype) -> dict:
    x = fused_linear_inputs(case.N, settings.hidden, case.V, dtype, device)
    heads = (x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"])
    compiled = compile_plain(materialised_kl, settings.compile_backend)
    liger, why = _liger_fused_linear(x)

    def kdfast_method(backend):
        why = _check_backend(backend, "fused_linear", device)
        return why or (lambda: kdfast.fused_linear_distill_loss(*heads, divergence="kl", backend=backend))

    return {"baselines": {"eager": lambda: materialised_kl(*heads), "compile": lambda: compiled(*heads),
                          "liger": liger, "liger_why": why},
            "kdfast": kdfast_method, "wrt": heads[:2], "bytes_moved": None}


def fused_linear_topk_inputs(N: int, H: int, V: int, k: int, dtype, device, seed: int = 0) -> dict:
    """The student's head of :func:`fused_linear_inputs` and a random teacher head's top-k.

    The teacher's ``log_softmax`` top-k (float32 log-probabilities, int64
    indices, as :func:`topk_inputs` and a cache have them), formed
    :data:`TEACHER_ROWS_PER_CHUNK` rows at a time: preparing a case should not
    need the ``(N, V)`` teacher logits that the loss itself avoids.
    """
    x = fused_linear_inputs(N, H, V, dtype, device, seed)
    indices, logprobs = [], []
    with torch.no_grad():
        for rows in torch.split(x["teacher_hidden"], TEACHER_ROWS_PER_CHUNK):
            top = torch.log_softmax((rows @ x["teacher_weight"].T).float(), -1).topk(min(k, V), -1)
            logprobs.append(top.values)
            indices.append(top.indices)
    return dict(student_hidden=x["student_hidden"], student_weight=x["student_weight"],
                topk_indices=torch.cat(indices), topk_logprobs=torch.cat(logprobs))


def materialised_topk(student_hidden, student_weight, topk_indices, topk_logprobs, tail="renormalize"):
    """What a user writes without a fused linear top-k loss: the ``(N, V)`` logits, then the PyTorch
    top-k loss (``topk_distill_loss(..., backend="torch")``, KL, T = 1)."""
    return kdfast.topk_distill_loss(student_hidden @ student_weight.T, topk_indices, topk_logprobs, tail=tail,
                                    backend="torch")


def _takes_backend(fn) -> bool:
    return "backend" in inspect.signature(fn).parameters


def _prepare_fused_linear_topk(case, settings, device, dtype) -> dict:
    x = fused_linear_topk_inputs(case.N, settings.hidden, case.V, case.topk, dtype, device)
    args = (x["student_hidden"], x["student_weight"], x["topk_indices"], x["topk_logprobs"])
    compiled = compile_plain(materialised_topk, settings.compile_backend)
    loss = kdfast.fused_linear_topk_distill_loss

    def kdfast_method(backend):
        why = _check_backend(backend, "fused_linear_topk", device)
        if why:
            return why
        if _takes_backend(loss):
            return lambda: loss(*args, tail=case.tail, backend=backend)
        # a loss without the option runs what it runs: offered once, as the device's kdfast
        if backend != default_backend("fused_linear_topk", device):
            return "fused_linear_topk_distill_loss takes no backend= (it runs the PyTorch top-k loss chunk by chunk)"
        return lambda: loss(*args, tail=case.tail)

    return {"baselines": {"eager": lambda: materialised_topk(*args, tail=case.tail),
                          "compile": lambda: compiled(*args, tail=case.tail),
                          "liger_why": "Liger-Kernel has no top-k teacher loss"},
            "kdfast": kdfast_method, "wrt": args[:2], "bytes_moved": None}


def _liger_fused_linear(x: dict):
    """Liger-Kernel's chunked fused linear JSD at ``beta = 0`` (KL(teacher || student), T = 1), or (None, why)."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None, "Liger-Kernel is not installed (pip install --no-deps liger-kernel)"
    liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=1.0)
    return (lambda: liger(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
                          x["labels"])), None


_PREPARE = {"distill": _prepare_distill, "dist": _prepare_correlation_family, "dkd": _prepare_correlation_family,
            "correlation": _prepare_correlation_family, "grouped_kd": _prepare_grouped_kd, "ltkd": _prepare_ltkd,
            "label_revision": _prepare_label_revision, "topk": _prepare_topk,
            "fused_linear": _prepare_fused_linear, "fused_linear_topk": _prepare_fused_linear_topk}
__all__ = ["BASELINES", "LOSSES", "TOPK_FAMILIES", "Case", "Settings", "Prepared", "prepare", "cases_of", "family_of",
           "loss_options"]
