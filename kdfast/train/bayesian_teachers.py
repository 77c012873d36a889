"""Bayesian teachers: distil a mean of predictive *distributions*, an estimate of the Bayes class probabilities.

"SGD-Based Knowledge Distillation with Bayesian Teachers: Theory and
Guidelines" (Morad, Shlezinger & Eldar, ICLR 2026, arXiv:2601.01484) views the
teacher as an estimate of the Bayes class probabilities (BCPs) ``p(y | x)``
(Menon et al., "A statistical perspective on distillation", ICML 2021, make
the same point): a student trained by SGD on exact BCPs has less gradient
noise than one trained on one-hot labels, and the noisier the teacher's
estimate, the larger the remaining noise term.  The paper's guideline is to
use Bayesian deep-learning models as teachers, since they typically estimate
the BCPs better; it reports higher student accuracy and less noisy
convergence than with deterministic teachers.  What we could read of the paper
(its abstract and summaries) does not name the Bayesian models it used, so the
signals here are the two standard approximate posteriors' predictive means:

* :class:`MCDropoutTeacher`: Monte-Carlo dropout (Gal & Ghahramani, 2016): the
  teacher runs ``passes`` forward passes with its dropout layers active (every
  other layer, e.g. BatchNorm, in eval mode) and the target is the mean of the
  passes' *probabilities*, ``p = 1/M sum_m softmax(z_m)``.
* :class:`EnsembleTeacher`: the mean probability of several teachers: a deep
  ensemble (Lakshminarayanan et al., 2017: independently initialised and
  trained members) or, with :func:`checkpoint_average`, the checkpoints of one
  teacher's training run (a snapshot ensemble without the cyclic schedule).

Both give the loss ``log p`` as the teacher logits (``softmax(log p) = p``), so
any kdfast loss applies its temperature to the averaged distribution.
Averaging probabilities, not logits, is the point: the softmax of the mean
logit is the normalised geometric mean of the members' distributions (usually
sharper), not the posterior predictive.

The third "better BCP estimate" teacher compared in the experiment
(``kdfast distill-teachers``), the MSE-trained teacher (Hamidi et al., ECCV
2024), needs no signal of its own: train it with
``train_teacher(model, loader, loss="mse", ...)`` and distil it as a frozen
teacher.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Iterator, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .stochastic import dropout_only
from .teachers import CheckpointSource, TeacherSignal, TeacherTarget, _frozen_forward, log_mixture

__all__ = ["EnsembleTeacher", "MCDropoutTeacher", "checkpoint_average", "mean_probability_logits"]


def mean_probability_logits(logits: Sequence[torch.Tensor], weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """``log(sum_k w_k softmax(z_k))`` (float32): logits whose softmax is the (weighted) mean of the members'
    probabilities; ``weights`` default to ``1/K`` each and are normalised to sum to 1."""
    logits = list(logits)
    if not logits:
        raise ValueError("mean_probability_logits needs at least one set of logits")
    shape = logits[0].shape
    for z in logits[1:]:
        if z.shape != shape:
            raise ValueError(f"all members' logits must have one shape, got {tuple(shape)} and {tuple(z.shape)}")
    rows = logits[0].numel() // shape[-1]
    w = _normalised_weights(weights, len(logits), device=logits[0].device)
    return log_mixture(logits, w[None, :].expand(rows, -1))


def _normalised_weights(weights: Optional[Sequence[float]], count: int, device=None) -> torch.Tensor:
    if weights is None:
        return torch.full((count,), 1.0 / count, device=device)
    w = torch.as_tensor(weights, dtype=torch.float32, device=device).flatten()
    if w.numel() != count:
        raise ValueError(f"got {w.numel()} weights for {count} members")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"member weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return w / w.sum()


@contextlib.contextmanager
def _isolated_rng(generator: Optional[torch.Generator], device: torch.device) -> Iterator[None]:
    """Inside: the global RNG of ``device`` is seeded from ``generator`` and restored afterwards, so the draws
    are a function of ``generator`` alone and nobody else's random stream moves.  ``generator=None``: the
    global RNG is used as it is (and advanced)."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    cuda = device.type == "cuda"
    index = device.index if device.index is not None else (torch.cuda.current_device() if cuda else None)
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _first_tensor(inputs) -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        return inputs
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (list, tuple)) else ()
    for value in values:
        try:
            return _first_tensor(value)
        except TypeError:
            continue
    raise TypeError(f"the teacher's inputs hold no tensor: {type(inputs).__name__}")


class MCDropoutTeacher(TeacherSignal):
    """Monte-Carlo dropout: the mean of ``passes`` dropout-active passes' probabilities as the target.

    Per batch the teacher runs ``passes`` forward passes with only its dropout
    layers in training mode (BatchNorm and the rest stay in eval mode, so no
    running statistic moves), under ``torch.no_grad``; afterwards the whole
    model is in eval mode (as :class:`~kdfast.train.FrozenTeacher` leaves
    it).  The target logits are ``log(1/M sum_m softmax(z_m))``
    (:func:`mean_probability_logits`).

    ``seed``: None draws the dropout masks from the global RNG (as any dropout
    does); an int gives the passes a random stream of their own (a
    ``torch.Generator`` seeded with it, saved by ``state_dict`` so that a
    resumed run draws the same masks), which leaves the student's random
    stream (its own dropout, ...) exactly where it would be with a
    deterministic teacher.  ``reference_logits`` (the agreement metric, the
    teacher's calibration) is the same average over ``passes`` passes drawn
    from a fresh stream seeded with ``reference_seed`` at every call, so it is
    deterministic and does not move the training stream.

    A teacher without dropout layers is an error (every pass would be equal);
    dropout with ``p = 0`` is allowed and gives the deterministic teacher.
    """

    def __init__(self, model: nn.Module, passes: int = 8, seed: Optional[int] = None, reference_seed: int = 0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"the teacher must be an nn.Module, got {type(model).__name__}")
        if not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
            raise ValueError("MCDropoutTeacher needs a teacher with dropout layers (nn.Dropout and friends); "
                             "without them every pass is the same deterministic prediction")
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise ValueError(f"passes must be an int >= 1, got passes={passes!r}")
        for name, value in (("seed", seed), ("reference_seed", reference_seed)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be None or an int >= 0, got {name}={value!r}")
        self.model = model.requires_grad_(False).eval()  # a frozen teacher; its passes switch dropout on
        self.passes = passes
        self.seed = seed
        self.reference_seed = reference_seed
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def models(self) -> List[nn.Module]:
        return [self.model]

    def pass_logits(self, inputs, generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
        """The ``passes`` dropout-active forward passes (logits, no gradient); the model's modes are left as they were.

        ``generator``: the stream the masks come from (see the class docstring); None: the global RNG.
        """
        with dropout_only(self.model), torch.no_grad(), _isolated_rng(generator, _first_tensor(inputs).device):
            return [self.model(inputs) for _ in range(self.passes)]

    def targets(self, inputs, student_logits):
        return [TeacherTarget(mean_probability_logits(self.pass_logits(inputs, self.generator)))]

    def reference_logits(self, inputs):
        generator = torch.Generator().manual_seed(self.reference_seed)
        return mean_probability_logits(self.pass_logits(inputs, generator))

    def state_dict(self) -> dict:
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        if self.generator is None:
            if state:
                raise ValueError("this MCDropoutTeacher has no seed (it uses the global RNG), but the state holds "
                                 "a generator: construct it with the seed of the saved run")
            return
        if "generator" not in state:
            raise ValueError("the state holds no generator: it was saved by an MCDropoutTeacher without a seed")
        self.generator.set_state(state["generator"])


class EnsembleTeacher(TeacherSignal):
    """Several frozen teachers (eval mode) as one: the target is the mean of their probabilities.

    ``models``: the members (a deep ensemble, or a teacher's checkpoints, see
    :func:`checkpoint_average`); ``weights``: optional non-negative member
    weights (normalised), default equal.  One target,
    ``log(sum_k w_k softmax(z_k))`` (:func:`mean_probability_logits`), which
    is also ``reference_logits``.  Unlike :class:`~kdfast.train.MultiTeacher`
    (one distillation term per teacher, weighted per sample), the student
    distils one distribution, the ensemble's predictive distribution.
    """

    def __init__(self, models: Sequence[nn.Module], weights: Optional[Sequence[float]] = None):
        models = list(models)
        if not models:
            raise ValueError("EnsembleTeacher needs at least one member")
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise TypeError(f"ensemble member {i} must be an nn.Module, got {type(m).__name__}")
        if len({id(m) for m in models}) != len(models):
            raise ValueError("the ensemble members must be distinct modules (the same module twice is one member "
                             "with twice the weight: pass weights instead)")
        self.members = [m.requires_grad_(False) for m in models]
        self.weights = _normalised_weights(weights, len(models)).tolist()

    def models(self) -> List[nn.Module]:
        return list(self.members)

    def member_logits(self, inputs) -> List[torch.Tensor]:
        """Every member's eval-mode logits (no gradient)."""
        return [_frozen_forward(m, inputs) for m in self.members]

    def reference_logits(self, inputs):
        return mean_probability_logits(self.member_logits(inputs), self.weights)

    def targets(self, inputs, student_logits):
        return [TeacherTarget(self.reference_logits(inputs))]


def checkpoint_average(model: nn.Module, checkpoints: Sequence[CheckpointSource],
                       weights: Optional[Sequence[float]] = None) -> EnsembleTeacher:
    """An :class:`EnsembleTeacher` of ``model``'s architecture at each checkpoint (the mean of their probabilities).

    ``checkpoints``: state_dicts of ``model`` or paths to them (loaded with
    ``torch.load(weights_only=True)``), e.g. the ones kept along one teacher's
    training run.  Each member is a deep copy of ``model`` with that state
    loaded; ``model`` itself is not changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("checkpoint_average needs at least one checkpoint")
    members = []
    for i, source in enumerate(checkpoints):
        if isinstance(source, (str, os.PathLike)):
            source = torch.load(source, map_location="cpu", weights_only=True)
        if not isinstance(source, Mapping):
            raise TypeError(f"checkpoint {i} must be a state_dict or a path, got {type(source).__name__}")
        member = copy.deepcopy(model)
        member.load_state_dict(source)
        members.append(member)
    return EnsembleTeacher(members, weights)
