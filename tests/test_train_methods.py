"""The KD methods of kdfast.train: teacher training, Mean Teacher, dual students, stochastic
self-distillation, multiple teachers, the teacher checkpoint schedule."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import kdfast
from kdfast.train import (Distiller, FrozenTeacher, MeanTeacher, MultiTeacher, StochasticTeacher, TeacherSchedule,
                          WarmupTeacher, ema_decay, make_train_loader, sigmoid_rampup, train_teacher)
from kdfast.train.stochastic import enable_dropout_only, pass_weights
from kdfast.train.teachers import confidence_weights, log_mixture


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(hidden=16, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 3))


def toy_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def sgd(*models, lr=0.2):
    return torch.optim.SGD([p for m in models for p in m.parameters()], lr=lr)


# ----------------------------------------------------------------- teacher training
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_train_teacher_learns_the_toy_task(loss):
    data = toy_data()
    model = mlp(32)
    loader = make_train_loader(data, 16, seed=0)
    history = train_teacher(model, loader, loss, optimizer=sgd(model, lr=0.5), epochs=4, eval_loader=loader,
                            progress=False)
    assert history[-1]["losses"]["hard"] < history[0]["losses"]["hard"]
    assert history[-1]["accuracy"] > 0.7  # three classes: chance is about 0.4 here
    assert set(history[-1]["losses"]) == {"total", "hard"}


# ----------------------------------------------------------------- Mean Teacher
def test_ema_decay_and_sigmoid_rampup():
    assert [ema_decay(t, 0.9) for t in range(4)] == [0.0, 0.5, pytest.approx(2 / 3), 0.75]
    assert ema_decay(100, 0.9) == 0.9
    assert sigmoid_rampup(0, 5) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(2.5, 5) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(7, 5) == 1.0 and sigmoid_rampup(0, 0) == 1.0


def test_mean_teacher_is_the_ramped_ema_of_the_student():
    student = mlp()
    signal = MeanTeacher(decay=0.9, consistency_weight=2.0, rampup_epochs=4)
    Distiller(student, signal, "kd", optimizer=sgd(student))
    before = [p.detach().clone() for p in student.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    signal.after_optimizer_step(step=1, epoch=0)  # first update: decay 0, the EMA is the student
    for e, s in zip(signal.model.parameters(), student.parameters()):
        assert torch.equal(e, s)
    with torch.no_grad():
        for p, b in zip(student.parameters(), before):
            p.copy_(b)
    signal.after_optimizer_step(step=2, epoch=0)  # decay min(1/2, 0.9): the mean of the two
    for e, b in zip(signal.model.parameters(), before):
        torch.testing.assert_close(e, b + 0.5)
    signal.on_epoch_start(2)
    x = torch.randn(4, 6)
    (target,) = signal.targets(x, student(x))
    assert target.scale == pytest.approx(2.0 * math.exp(-5 * 0.25))
    torch.testing.assert_close(target.logits, signal.model(x))


def test_mean_teacher_distils_unlabelled_rows_when_asked():
    data = toy_data()
    data.tensors[1][::2] = -100  # half the data unlabelled
    student = mlp()
    d = Distiller(student, MeanTeacher(0.9, rampup_epochs=0), {"name": "distill"}, optimizer=sgd(student),
                  distill_unlabeled=True)
    x, y = data.tensors
    counts = d._global_counts([(x, y)])
    assert counts.tolist() == [48.0, 96.0]
    with pytest.raises(ValueError, match="distill_unlabeled"):
        other = mlp()
        Distiller(other, MeanTeacher(), "dkd", optimizer=sgd(other), distill_unlabeled=True)
    with pytest.raises(ValueError, match="decay"):
        MeanTeacher(decay=1.0)


# ----------------------------------------------------------------- dual students
def test_peer_term_is_kd_against_the_detached_peers():
    s0, s1 = mlp(seed=0), mlp(24, seed=1)
    d = Distiller([s0, s1], mlp(seed=2), {"name": "distill", "weighting": "entropy"}, optimizer=sgd(s0, s1),
                  peer_temperature=2.0)
    g = torch.Generator().manual_seed(3)
    z0, z1 = (torch.randn(8, 3, generator=g).requires_grad_(True) for _ in range(2))
    labels = torch.arange(8) % 3
    terms = d._terms(torch.randn(8, 6), labels, [z0, z1], torch.tensor([8.0, 8.0]))
    terms["peer"].backward()
    # Each student's peer gradient is that of its own KD to the other one, the other held fixed.
    for z, other in ((z0, z1), (z1, z0)):
        expected, = torch.autograd.grad(kdfast.kd_loss(z, other.detach(), 2.0), z)
        torch.testing.assert_close(z.grad, expected)


def test_dual_students_train_and_report_each_student():
    data = toy_data()
    s0, s1 = mlp(seed=0), mlp(24, seed=1)
    teacher = mlp(32, seed=2)
    d = Distiller([s0, s1], teacher, {"name": "distill", "weighting": "entropy"}, optimizer=sgd(s0, s1))
    loader = make_train_loader(data, 16, seed=0)
    record = d.fit(loader, 1, eval_loader=loader, progress=False)[0]
    assert set(record["losses"]) == {"total", "hard", "soft", "peer"}
    assert set(record["students"]) == {"student0", "student1"}
    assert record["accuracy"] == record["students"]["student0"]["accuracy"]
    with pytest.raises(ValueError, match="distinct"):
        Distiller([s0, s0], teacher, optimizer=sgd(s0))


# ----------------------------------------------------------------- stochastic self-distillation
def test_pass_weights_drop_the_passes_below_the_quantile():
    scores = torch.tensor([[0.0, -1.0, -3.0, -0.5]])
    w = pass_weights(scores, drop_quantile=0.3, temperature=1.0)
    # The 0.3 quantile of (-3, -1, -0.5, 0) is -1.6: only the pass at -3 goes.
    kept = torch.tensor([0.0, -1.0, -0.5])
    expected = torch.softmax(kept, 0)
    torch.testing.assert_close(w, torch.tensor([[expected[0], expected[1], 0.0, expected[2]]]))
    assert float(pass_weights(scores, 0.0, 1.0).min()) > 0


def test_enable_dropout_only_keeps_batchnorm_in_eval():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    assert enable_dropout_only(model) == 1
    assert not model[1].training and model[2].training


def test_stochastic_teacher_leaves_its_teachers_modes_as_they_were():
    model = mlp(dropout=0.5).eval()
    StochasticTeacher(model, passes=2).targets(torch.randn(3, 6), torch.randn(3, 3))
    assert not any(m.training for m in model.modules())  # dropout was on only during the passes
    model.train()
    StochasticTeacher(model, passes=2).targets(torch.randn(3, 6), torch.randn(3, 3))
    assert all(m.training for m in model.modules())


def test_stochastic_teacher_distils_from_the_weighted_mixture():
    x = torch.randn(5, 6)
    student_logits = torch.randn(5, 3)
    # Dropout 0: every pass is the teacher itself, so the mixture is the teacher's distribution.
    exact = StochasticTeacher(mlp(dropout=0.0), passes=3)
    (target,) = exact.targets(x, student_logits)
    torch.testing.assert_close(torch.softmax(target.logits, -1), torch.softmax(exact.model(x), -1))
    # Dropout on: the target is a mixture of passes, not the deterministic prediction.
    noisy = StochasticTeacher(mlp(dropout=0.5), passes=4, similarity="cosine")
    (target,) = noisy.targets(x, student_logits)
    torch.testing.assert_close(torch.softmax(target.logits, -1).sum(-1), torch.ones(5))
    assert not torch.allclose(torch.softmax(target.logits, -1), torch.softmax(noisy.reference_logits(x), -1))
    with pytest.raises(ValueError, match="dropout"):
        StochasticTeacher(nn.Linear(6, 3))
    with pytest.raises(ValueError, match="passes"):
        StochasticTeacher(mlp(dropout=0.1), passes=1)
    with pytest.raises(ValueError, match="similarity"):
        StochasticTeacher(mlp(dropout=0.1), similarity="l2")


# ----------------------------------------------------------------- multiple teachers
def test_confidence_weights_are_a_softmax_of_minus_the_entropy():
    confident, unsure = torch.tensor([[8.0, 0.0, 0.0]]), torch.tensor([[0.1, 0.0, 0.0]])
    w = confidence_weights([confident, unsure], temperature=0.5)
    entropy = [torch.distributions.Categorical(logits=z).entropy() for z in (confident, unsure)]
    expected = torch.softmax(-torch.stack(entropy, -1) / 0.5, -1)
    torch.testing.assert_close(w, expected)
    assert float(w[0, 0]) > float(w[0, 1])
    with pytest.raises(ValueError, match="temperature"):
        confidence_weights([confident, unsure], temperature=0.0)


def test_log_mixture_is_the_weighted_mixture_of_probabilities():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    w = torch.softmax(torch.randn(4, 2), -1)
    mixture = w[:, :1] * torch.softmax(a, -1) + w[:, 1:] * torch.softmax(b, -1)
    torch.testing.assert_close(log_mixture([a, b], w).exp(), mixture)


def test_multi_teacher_gives_one_weighted_target_per_teacher():
    teachers = [mlp(seed=1), mlp(seed=2), mlp(seed=3)]
    signal = MultiTeacher(teachers)
    x = torch.randn(5, 6)
    targets = signal.targets(x, None)
    assert len(targets) == 3
    torch.testing.assert_close(sum(t.weights for t in targets), torch.ones(5))
    torch.testing.assert_close(targets[1].logits, teachers[1](x))
    student = mlp(seed=4)
    with pytest.raises(ValueError, match="per-row weights"):
        Distiller(student, teachers, "dist", optimizer=sgd(student))
    with pytest.raises(ValueError, match="at least 2"):
        MultiTeacher(teachers[:1])


# ----------------------------------------------------------------- online distillation: a checkpoint schedule
def test_teacher_schedule_loads_the_checkpoint_of_each_epoch(tmp_path):
    snapshots = [mlp(seed=k).state_dict() for k in range(3)]
    torch.save(snapshots[2], tmp_path / "late.pt")
    sources = [snapshots[0], snapshots[1], tmp_path / "late.pt"]
    teacher = mlp(seed=9)
    by_default = TeacherSchedule(teacher, sources)
    assert [by_default.index_for_epoch(e) for e in range(5)] == [0, 1, 2, 2, 2]
    stepped = TeacherSchedule(teacher, sources, {0: 0, 3: 1, 6: 2})
    assert [stepped.index_for_epoch(e) for e in (0, 2, 3, 5, 6, 9)] == [0, 0, 1, 1, 2, 2]
    assert TeacherSchedule(teacher, sources, lambda e: e // 2).index_for_epoch(3) == 1
    for epoch, index in ((0, 0), (2, 2)):
        by_default.on_epoch_start(epoch)
        for name, value in teacher.state_dict().items():
            assert torch.equal(value, snapshots[index][name])
    with pytest.raises(ValueError, match="epoch 0"):
        TeacherSchedule(teacher, sources, {1: 0})
    with pytest.raises(ValueError, match="outside"):
        TeacherSchedule(teacher, sources, {0: 3})
    with pytest.raises(ValueError, match="at least one"):
        TeacherSchedule(teacher, [])


def test_distiller_follows_the_schedule_during_fit():
    data = toy_data(48)
    snapshots = [mlp(seed=k).state_dict() for k in range(2)]
    teacher = mlp(seed=9)
    student = mlp(seed=5)
    seen = []
    d = Distiller(student, TeacherSchedule(teacher, snapshots), "kd", optimizer=sgd(student))
    d.fit(make_train_loader(data, 16, seed=0), 2, progress=False,
          on_epoch_end=lambda record: seen.append(teacher[0].weight.detach().clone()))
    assert torch.equal(seen[0], snapshots[0]["0.weight"]) and torch.equal(seen[1], snapshots[1]["0.weight"])


# ----------------------------------------------------------------- DKD's warm-up
def test_warmup_teacher_ramps_the_targets_linearly():
    teacher, student = mlp(seed=3), mlp(seed=4)
    signal = WarmupTeacher(FrozenTeacher(teacher), warmup_epochs=4)
    x = torch.randn(5, 6)
    scales = []
    for epoch in range(6):
        signal.on_epoch_start(epoch)
        (target,) = signal.targets(x, student(x))
        scales.append(target.scale)
    assert scales == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    torch.testing.assert_close(target.logits, teacher.eval()(x))
    torch.testing.assert_close(signal.reference_logits(x), teacher(x))
    assert signal.models() == [teacher] and not signal.depends_on_student
    assert WarmupTeacher(FrozenTeacher(teacher), 0).factor() == 1.0
    with pytest.raises(ValueError, match="warmup_epochs"):
        WarmupTeacher(FrozenTeacher(teacher), -1)
    with pytest.raises(TypeError, match="wraps a TeacherSignal"):
        WarmupTeacher(teacher, 2)


def test_warmup_passes_the_wrapped_signals_hooks_and_state_through():
    student = mlp(seed=1)
    signal = WarmupTeacher(MeanTeacher(decay=0.5, rampup_epochs=0), 2)
    d = Distiller(student, signal, "kd", optimizer=sgd(student))
    assert signal.signal.student is student  # attach reached the mean teacher
    d.fit(make_train_loader(toy_data(32), 16, seed=0), 1, progress=False)
    state = signal.state_dict()
    assert "ema" in state and d.step == 2
    signal.load_state_dict(state)


def test_train_teacher_calls_on_epoch_end():
    data = toy_data(32)
    model = mlp(seed=2)
    seen = []
    train_teacher(model, make_train_loader(data, 16, seed=0), "ce", optimizer=sgd(model), epochs=3,
                  progress=False, on_epoch_end=lambda record: seen.append(record["epoch"]))
    assert seen == [1, 2, 3]
