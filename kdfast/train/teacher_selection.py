"""Multi-teacher selection: per-sample teacher weights that are fixed, or chosen by a policy trained with REINFORCE.

Every signal here gives one distillation target per teacher with per-row
weights, ``sum_k w_ik D(p_ik || q_i)``, like :class:`~kdfast.train.MultiTeacher`
(whose weights are a softmax of minus the teachers' entropies), so the loss
must accept per-row weights (a row-wise kdfast loss such as ``"kd"``).

* :class:`WeightedMultiTeacher`: fixed weights per teacher, equal by default
  (the usual multi-teacher baseline, ``1/K`` each).
* :class:`ReinforcedTeacherSelector`: "Reinforced Multi-Teacher Selection for
  Knowledge Distillation" (Yuan et al., AAAI 2021, arXiv:2012.06048).  What we
  followed of the paper: per training instance and teacher, a state built from
  the teacher's prediction (its probability vector, its loss) and the
  instance; a logistic policy ``pi(a=1 | s) = sigmoid(W F(s) + b)`` that
  decides, per instance, whether each teacher is selected (a Bernoulli draw
  per teacher); the student distils the selected teachers; the policy is
  trained by policy gradient (REINFORCE) with a reward from the student's
  performance, and the paper notes that a weaker teacher can give the better
  student, which is why the choice is learned.  Our choices where the paper
  differs or we could not read its details:

  - State features (per row ``i`` and teacher ``k``; the trainer gives the
    signal no labels, so no teacher cross-entropy): teacher ``k``'s
    confidence (max probability) and entropy / log V, the student's current
    distillation loss against it, ``KL(p_k || q) / log V`` (as
    ``log(1 + .)``), whether its top-1 agrees with the student's, the share of
    the other teachers whose top-1 agrees with its, the student's own
    confidence and entropy / log V, and a one-hot of ``k`` (so the policy can
    learn that a teacher is better in general).  No instance embedding.
  - Policy: ``hidden = 0`` is the paper's logistic policy; the default
    ``hidden = 16`` puts one tanh layer in front (one small network shared by
    the teachers).  The last layer starts at 0, so every teacher is first
    selected with probability 1/2.
  - Weights: a row's selected teachers share it equally, ``w_ik = a_ik /
    sum_j a_ij``; a row with no teacher selected gets no distillation term.
  - Reward: after every optimizer step, the reduction of the student's
    cross-entropy on a held-out labelled set (``reward_inputs``,
    ``reward_labels``, e.g. a validation split; evaluated in eval mode) that
    this step caused, ``r_t = L_{t-1} - L_t``.  The advantage is ``r_t``
    minus an exponential moving average of past rewards (the baseline),
    divided by the moving root-mean-square of that difference, so that the
    shrinking loss reductions of late training still give steps of one scale.
  - Update: after every optimizer step, one Adam step (``lr``) on
    ``-A_t * mean_{i,k} log pi(a_ik | s_ik)`` over the step's rows; policy and
    student are trained together from the start (no separate pre-training
    stages).

  ``reference_logits`` (agreement, calibration) is the log of the mixture of
  the teachers' probabilities weighted by the policy's selection
  probabilities (normalised per row), with the attached student's prediction
  in the features.
"""

from __future__ import annotations

import math
from typing import List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .teachers import MultiTeacher, TeacherTarget, _frozen_forward, log_mixture

__all__ = ["ReinforcedTeacherSelector", "SelectionPolicy", "WeightedMultiTeacher", "selection_features",
           "FEATURE_NAMES"]

FEATURE_NAMES = ("teacher_confidence", "teacher_entropy", "student_gap", "agrees_with_student",
                 "teacher_consensus", "student_confidence", "student_entropy")


class WeightedMultiTeacher(MultiTeacher):
    """Several frozen teachers with fixed weights: ``sum_k w_k D(p_ik || q_i)`` for every row.

    ``weights``: one non-negative weight per teacher, normalised to sum to 1;
    None (default) is ``1/K`` each, the equal-weight baseline of multi-teacher
    distillation.  ``reference_logits`` is the log of the weighted mixture of
    the teachers' probabilities.
    """

    def __init__(self, models: Sequence[nn.Module], weights: Optional[Sequence[float]] = None):
        super().__init__(models)
        K = len(self.teachers)
        w = torch.full((K,), 1.0 / K) if weights is None else torch.as_tensor(weights, dtype=torch.float32).flatten()
        if w.numel() != K:
            raise ValueError(f"got {w.numel()} weights for {K} teachers")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"teacher weights must be finite, >= 0 and not all 0, got {w.tolist()}")
        self.weights = (w / w.sum()).tolist()

    def _logits_and_weights(self, inputs):
        logits = [t.reference_logits(inputs) for t in self.teachers]
        rows = logits[0].numel() // logits[0].shape[-1]
        weights = torch.tensor(self.weights, device=logits[0].device)[None, :].expand(rows, -1)
        return logits, weights


def _normalised_entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1) / math.log(logp.shape[-1])


def selection_features(teacher_logits: Sequence[torch.Tensor], student_logits: torch.Tensor) -> torch.Tensor:
    """The policy's state of every (row, teacher): shape ``(N, K, len(FEATURE_NAMES))``, float32, >= 0 (all in
    [0, 1] but ``student_gap``, ``log(1 + KL / log V)``, which is unbounded).

    See :data:`FEATURE_NAMES` and the module docstring (the teacher one-hot is
    added by :class:`SelectionPolicy`).  ``V = 1`` is an error (no entropy scale).
    """
    V = student_logits.shape[-1]
    if V < 2:
        raise ValueError("teacher selection needs at least 2 classes")
    K = len(teacher_logits)
    log_q = torch.log_softmax(student_logits.detach().reshape(-1, V).float(), -1)
    log_p = torch.stack([torch.log_softmax(z.detach().reshape(-1, V).float(), -1) for z in teacher_logits], 1)
    if log_p.shape[0] != log_q.shape[0]:
        raise ValueError(f"the teachers give {log_p.shape[0]} rows, the student {log_q.shape[0]}")
    p = log_p.exp()  # (N, K, V)
    top = log_p.argmax(-1)  # (N, K)
    student_top = log_q.argmax(-1)
    kl = (p * (log_p - log_q[:, None, :])).sum(-1).clamp(min=0.0)
    same = (top[:, :, None] == top[:, None, :]).float()  # (N, K, K)
    consensus = (same.sum(-1) - 1.0) / max(K - 1, 1)
    q_conf = log_q.max(-1).values.exp()[:, None].expand(-1, K)
    q_entropy = _normalised_entropy(log_q)[:, None].expand(-1, K)
    return torch.stack([p.max(-1).values, _normalised_entropy(log_p), torch.log1p(kl / math.log(V)),
                        (top == student_top[:, None]).float(), consensus, q_conf, q_entropy], dim=-1)


class SelectionPolicy(nn.Module):
    """``logit(pi(select | s))`` of every (row, teacher) from :func:`selection_features` and the teacher's one-hot.

    ``hidden = 0``: logistic regression, ``sigmoid(W F(s) + b)`` (Yuan et al.);
    ``hidden > 0``: one tanh layer first.  The output layer starts at zero.
    """

    def __init__(self, teachers: int, hidden: int = 16):
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ValueError(f"hidden must be an int >= 0, got hidden={hidden!r}")
        self.teachers = teachers
        inputs = len(FEATURE_NAMES) + teachers
        self.body = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh()) if hidden else nn.Identity()
        self.head = nn.Linear(hidden or inputs, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        N, K, _ = features.shape
        if K != self.teachers:
            raise ValueError(f"the policy was built for {self.teachers} teachers, got features of {K}")
        identity = torch.eye(K, device=features.device, dtype=features.dtype)[None].expand(N, -1, -1)
        return self.head(self.body(torch.cat([features, identity], -1))).squeeze(-1)


class ReinforcedTeacherSelector(MultiTeacher):
    """Per-sample teacher selection by a policy trained with REINFORCE; see the module docstring.

    Args:
        models: the teachers (>= 2, frozen, eval mode).
        reward_inputs, reward_labels: the held-out labelled set whose
            cross-entropy reduction is the reward (inputs as the student takes
            them; labels ``ignore_index`` are skipped).
        hidden: width of the policy's hidden layer (0: logistic policy).
        lr: the policy's Adam learning rate.
        baseline_momentum: the EMA factor of the reward baseline and scale.
        seed: seeds the policy's initial weights and the selection draws (a
            generator of its own, saved by ``state_dict``: the student's
            random stream is not touched).
        ignore_index: the label of rows without one in ``reward_labels``.

    Exactly one student (the reward follows it) and one process (no DDP:
    the policy is not synchronised across ranks).  After ``fit`` the
    per-epoch mean selection probability of each teacher is in
    :attr:`history` (and :meth:`selection_rates` gives the running one).
    """

    depends_on_student = True

    def __init__(self, models: Sequence[nn.Module], reward_inputs, reward_labels: torch.Tensor, *, hidden: int = 16,
                 lr: float = 1e-2, baseline_momentum: float = 0.9, seed: int = 0, ignore_index: int = -100):
        super().__init__(models)
        if not isinstance(reward_labels, torch.Tensor) or reward_labels.dtype not in (torch.int64, torch.int32):
            raise TypeError("reward_labels must be an integer tensor of class indices")
        if int((reward_labels != ignore_index).sum()) == 0:
            raise ValueError("reward_labels holds no labelled row: the reward would always be 0")
        if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got lr={lr!r}")
        if not (isinstance(baseline_momentum, (int, float)) and 0.0 <= baseline_momentum < 1.0):
            raise ValueError(f"baseline_momentum must be in [0, 1), got baseline_momentum={baseline_momentum!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got seed={seed!r}")
        self.reward_inputs = reward_inputs
        self.reward_labels = reward_labels.long()
        self.ignore_index = int(ignore_index)
        self.lr = float(lr)
        self.baseline_momentum = float(baseline_momentum)
        self.seed = seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.policy = SelectionPolicy(len(self.teachers), hidden)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.student: Optional[nn.Module] = None
        self.device = torch.device("cpu")
        self._episode: List[tuple] = []  # (features, actions) of the micro-batches of the current step
        self.last_loss: Optional[float] = None
        self.baseline: Optional[float] = None
        self.scale = 0.0  # EMA of (r - baseline)^2
        self.updates = 0
        self.rewards: List[float] = []
        self.history: List[List[float]] = []
        self._probability_sum = torch.zeros(len(self.teachers), dtype=torch.float64)
        self._rows = 0

    # ------------------------------------------------------------------ wiring
    def attach(self, students) -> None:
        if len(students) != 1:
            raise ValueError(f"ReinforcedTeacherSelector follows one student's reward, got {len(students)} students")
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ValueError("ReinforcedTeacherSelector keeps its policy and reward in one process; under DDP the "
                             "ranks' policies would drift apart: train it in a single process")
        self.student = students[0]

    def to(self, device):
        super().to(device)
        self.device = torch.device(device)
        self.policy.to(self.device)
        self.reward_labels = self.reward_labels.to(self.device)
        self.reward_inputs = _move(self.reward_inputs, self.device)
        # The optimizer's state follows its parameters (it is empty before the first step).
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    state[key] = value.to(self.device)
        return self

    def _require_student(self) -> nn.Module:
        if self.student is None:
            raise RuntimeError("ReinforcedTeacherSelector is not attached to a student: pass it to a Distiller first")
        return self.student

    # ------------------------------------------------------------------ the policy
    def selection_probabilities(self, teacher_logits: Sequence[torch.Tensor], student_logits: torch.Tensor):
        """``(features, probabilities)``: the state ``(N, K, F)`` and ``pi(select)`` ``(N, K)`` (no gradient)."""
        features = selection_features(teacher_logits, student_logits).to(self.device)
        with torch.no_grad():
            return features, torch.sigmoid(self.policy(features))

    def sample(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Bernoulli draws ``(N, K)`` in {0, 1} from the selector's own generator."""
        u = torch.rand(probabilities.shape, generator=self.generator).to(probabilities.device)
        return (u < probabilities).float()

    @staticmethod
    def weights_from_choices(actions: torch.Tensor) -> torch.Tensor:
        """``w_ik = a_ik / sum_j a_ij`` (rows without a selected teacher: all 0)."""
        return actions / actions.sum(-1, keepdim=True).clamp(min=1.0)

    def targets(self, inputs, student_logits):
        if self.last_loss is None:  # the held-out loss before the first update
            self.last_loss = self.reward_loss()
        logits = [t.reference_logits(inputs) for t in self.teachers]
        features, probabilities = self.selection_probabilities(logits, student_logits)
        actions = self.sample(probabilities)
        self._episode.append((features, actions))
        self._probability_sum += probabilities.sum(0).double().cpu()
        self._rows += probabilities.shape[0]
        weights = self.weights_from_choices(actions).to(logits[0].device)
        return [TeacherTarget(z, weights[:, k]) for k, z in enumerate(logits)]

    def reference_logits(self, inputs):
        logits = [t.reference_logits(inputs) for t in self.teachers]
        student = _frozen_forward_restoring(self._require_student(), inputs)
        _, probabilities = self.selection_probabilities(logits, student)
        weights = probabilities / probabilities.sum(-1, keepdim=True).clamp(min=1e-12)
        return log_mixture(logits, weights.to(logits[0].device))

    # ------------------------------------------------------------------ the reward and the update
    @torch.no_grad()
    def reward_loss(self) -> float:
        """The attached student's mean cross-entropy on the reward set (eval mode; its mode is restored)."""
        logits = _frozen_forward_restoring(self._require_student(), self.reward_inputs)
        V = logits.shape[-1]
        return float(F.cross_entropy(logits.reshape(-1, V).float(), self.reward_labels.reshape(-1),
                                     ignore_index=self.ignore_index))

    def reinforce(self, reward: float) -> float:
        """One REINFORCE step on the stored choices with ``reward``; returns the advantage used.

        The advantage is ``(reward - baseline) / rms`` with the EMAs of the
        steps before (the first step only initialises them: advantage 0).
        """
        episode, self._episode = self._episode, []
        m = self.baseline_momentum
        if self.baseline is None:
            self.baseline, advantage = reward, 0.0
        else:
            delta = reward - self.baseline
            advantage = delta / math.sqrt(self.scale) if self.scale > 0 else 0.0
            self.scale = m * self.scale + (1 - m) * delta * delta
            self.baseline = m * self.baseline + (1 - m) * reward
        if episode and advantage != 0.0:
            features = torch.cat([f for f, _ in episode])
            actions = torch.cat([a for _, a in episode]).to(features.device)
            logits = self.policy(features)
            log_prob = -F.binary_cross_entropy_with_logits(logits, actions, reduction="mean")
            self.optimizer.zero_grad(set_to_none=True)
            (-advantage * log_prob).backward()
            self.optimizer.step()
            self.updates += 1
        return advantage

    def after_optimizer_step(self, step: int, epoch: int) -> None:
        loss = self.reward_loss()
        reward = self.last_loss - loss if self.last_loss is not None else 0.0
        self.last_loss = loss
        self.rewards.append(reward)
        self.reinforce(reward)

    def on_epoch_start(self, epoch: int) -> None:
        if self._rows:
            self.history.append(self.selection_rates())
        self._probability_sum.zero_()
        self._rows = 0

    def selection_rates(self) -> List[float]:
        """The mean selection probability of each teacher over the rows seen since the epoch began."""
        return (self._probability_sum / max(self._rows, 1)).tolist()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "last_loss": self.last_loss, "baseline": self.baseline,
                "scale": self.scale, "updates": self.updates, "rewards": list(self.rewards),
                "history": [list(h) for h in self.history],
                "probability_sum": self._probability_sum.clone(), "rows": self._rows}

    def load_state_dict(self, state: Mapping) -> None:
        missing = {"policy", "optimizer", "generator"} - set(state)
        if missing:
            raise ValueError(f"not a ReinforcedTeacherSelector state: missing {sorted(missing)}")
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.last_loss = state["last_loss"]
        self.baseline = state["baseline"]
        self.scale = float(state["scale"])
        self.updates = int(state["updates"])
        self.rewards = list(state["rewards"])
        self.history = [list(h) for h in state["history"]]
        self._probability_sum = torch.as_tensor(state["probability_sum"], dtype=torch.float64).clone()
        self._rows = int(state["rows"])
        self._episode = []


def _frozen_forward_restoring(model: nn.Module, inputs) -> torch.Tensor:
    """``model(inputs)`` in eval mode without gradient, every submodule's previous mode restored."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        return _frozen_forward(model, inputs)
    finally:
        for module, mode in modes:
            module.training = mode


def _move(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value
