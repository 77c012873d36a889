"""Grouped KD (kdfast.grouped_kd): the reference formula, its Triton kernel, the trainer objective, the module.

The reference (``kdfast/reference/grouped_kd.py``) is checked against explicit
loops over the classes, the KL chain rule, DKD and KD; the Triton kernel
(``kdfast/ops/triton/grouped_kd.py``) against the reference.  Without a GPU
the kernel runs through Triton's interpreter on CPU tensors (conftest.py
sets ``TRITON_INTERPRET=1``) with 16-entry tiles, so V = 37 spans three tiles,
the last one partial.  Tolerances: float64 inputs run the whole kernel in
float64 and match the float64 reference to rtol 1e-10 / atol 1e-12; float32
and bfloat16 inputs are compared with the float64 reference on the same
values with conftest's tolerances (values rtol 1e-5 / atol 1e-6; gradients
rtol 1e-5 and atol 1e-5 of the largest entry + 1e-7 in float32, bfloat16
after one rounding of the float64 gradient to bfloat16).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdfast
from kdfast.grouped_kd import GroupedKDLoss, grouped_kd_loss, primary_group
from kdfast.reference.grouped_kd import grouped_kd_per_row

from conftest import GRAD_TOL, KERNELS, VALUE_ATOL, VALUE_RTOL, kernel_device

torch.set_num_threads(1)
INF = math.inf
triton_only = pytest.mark.skipif("triton" not in KERNELS, reason="the triton backend cannot run here")
DEVICE = kernel_device("triton")


def rand(*shape, seed=0, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def labels_for(n, V, seed=0, ignored=()):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (n,), generator=g)
    for i in ignored:
        y[i] = -100
    return y


def run(backend, s, t, labels, upstream=True, **kw):
    """(loss, d loss / d student) on ``backend``, back on the CPU; a non-unit upstream gradient by default."""
    device = DEVICE if backend == "triton" else torch.device("cpu")
    x = s.detach().to(device).clone().requires_grad_(True)
    y = labels.to(device) if labels is not None else None
    loss = grouped_kd_loss(x, t.to(device), y, backend=backend, **kw)
    seed = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=device).reshape(loss.shape)
    (grad,) = torch.autograd.grad(loss, x, seed if upstream else None)
    return loss.detach().cpu(), grad.cpu()


# ----------------------------------------------------------------- explicit forms
def brute_group(zt_row, label, group_tau, mass):
    """The primary group of one row by the definition: sort, take the prefix reaching the mass, add ties, label."""
    p = torch.softmax(zt_row / group_tau, -1)
    order = torch.argsort(zt_row, descending=True)
    total, members = 0.0, set()
    for j in order.tolist():
        members.add(j)
        total += float(p[j])
        if total >= mass * float(p.sum()) - 1e-12:
            threshold = float(zt_row[j])
            break
    members |= {j for j in range(len(zt_row)) if float(zt_row[j]) >= threshold}
    if label is not None:
        members.add(int(label))
    return members


def brute_grouped_kd(zs, zt, labels, T=4.0, mass=0.93, pw=4.0, bw=1.0, group_tau=1.0):
    """Grouped KD per row with explicit loops over the classes (finite logits)."""
    rows = []
    for i in range(zs.shape[0]):
        group = brute_group(zt[i], None if labels is None else labels[i], group_tau, mass)
        p, q = torch.softmax(zt[i] / T, -1), torch.softmax(zs[i] / T, -1)
        Pt = sum(p[j] for j in group)
        Qs = sum(q[j] for j in group)
        binary = Pt * torch.log(Pt / Qs)
        if len(group) < zs.shape[1]:
            binary = binary + (1 - Pt) * torch.log((1 - Pt) / (1 - Qs))
        primary = sum((p[j] / Pt) * torch.log((p[j] / Pt) / (q[j] / Qs)) for j in group)
        rows.append(T * T * (bw * binary + pw * primary))
    return torch.stack(rows)


@pytest.mark.parametrize("mass", [0.3, 0.5, 0.93, 0.999])
@pytest.mark.parametrize("group_tau", [1.0, 4.0])
def test_primary_group_is_the_top_set_reaching_the_mass(mass, group_tau):
    zt = rand(8, 12, seed=1)
    labels = labels_for(8, 12, seed=2)
    got = primary_group(zt, labels, group_tau, mass)
    for i in range(8):
        assert set(got[i].nonzero().flatten().tolist()) == brute_group(zt[i], labels[i], group_tau, mass)
    # the teacher's top class is always in; without labels nothing is forced in
    assert bool(got.gather(1, zt.argmax(-1, keepdim=True)).all())
    no_label = primary_group(zt, None, group_tau, mass)
    assert bool((got | ~no_label).all()) and int(no_label.sum()) <= int(got.sum())


def test_ties_at_the_threshold_are_all_in_whatever_their_order():
    # masses at T_g = 1: one class of logit 2, three tied at 1, one at -1
    zt = torch.tensor([[2.0, 1.0, 1.0, 1.0, -1.0]], dtype=torch.float64)
    p = torch.softmax(zt, -1)[0]
    mass = float(p[0] + p[1]) * 0.999  # reached inside the tie: the whole tie joins
    want = torch.tensor([[True, True, True, True, False]])
    assert torch.equal(primary_group(zt, None, 1.0, mass), want)
    perm = torch.tensor([3, 4, 1, 0, 2])
    assert torch.equal(primary_group(zt[:, perm], None, 1.0, mass), want[:, perm])
    # below the top class's own mass: the top class alone (and a forced label)
    assert torch.equal(primary_group(zt, None, 1.0, float(p[0]) * 0.5), torch.tensor([[1, 0, 0, 0, 0]]).bool())
    assert torch.equal(primary_group(zt, torch.tensor([4]), 1.0, float(p[0]) * 0.5),
                       torch.tensor([[1, 0, 0, 0, 1]]).bool())
    # primary_mass = 1: every class of finite teacher logit, and the label even if masked
    zt_masked = torch.tensor([[2.0, -INF, 1.0, -INF]], dtype=torch.float64)
    assert torch.equal(primary_group(zt_masked, torch.tensor([3]), 1.0, 1.0), torch.tensor([[1, 0, 1, 1]]).bool())


@pytest.mark.parametrize("options", [{}, dict(temperature=2.0, primary_mass=0.5, primary_weight=1.5, binary_weight=0.7),
                                     dict(group_temperature=4.0, primary_mass=0.8), dict(primary_mass=0.999)])
@pytest.mark.parametrize("with_labels", [True, False])
def test_the_loss_matches_explicit_loops(options, with_labels):
    zs, zt = rand(6, 9, seed=3), rand(6, 9, seed=4)
    labels = labels_for(6, 9, seed=5) if with_labels else None
    got = grouped_kd_loss(zs, zt, labels, reduction="none", backend="torch", **options)
    keys = dict(temperature="T", primary_mass="mass", primary_weight="pw", binary_weight="bw",
                group_temperature="group_tau")
    want = brute_grouped_kd(zs, zt, labels, **{keys[k]: v for k, v in options.items()})
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_binary_and_primary_are_the_kd_decomposition_with_secondary_left_out():
    zs, zt = rand(7, 11, seed=6), rand(7, 11, seed=7)
    labels = labels_for(7, 11, seed=8)
    T = 3.0
    group = primary_group(zt, labels, 1.0, 0.8)
    assert bool((group.sum(-1) < 11).all())  # every row has a secondary group here
    binary = grouped_kd_per_row(zs, zt, group, T, 0.0, 1.0) / T**2
    primary = grouped_kd_per_row(zs, zt, group, T, 1.0, 0.0) / T**2
    secondary = grouped_kd_per_row(zs, zt, ~group, T, 1.0, 0.0) / T**2  # the rest's within-group KL
    P = torch.where(group, torch.softmax(zt / T, -1), 0.0).sum(-1)
    kd = kdfast.kd_loss(zs, zt, temperature=T, reduction="none") / T**2
    torch.testing.assert_close(binary + P * primary + (1 - P) * secondary, kd, rtol=1e-10, atol=1e-12)
    assert bool((secondary > 0).all())  # GKD leaves out a nonzero term


def test_the_whole_mass_is_primary_weight_times_kd():
    zs, zt = rand(5, 8, seed=9), rand(5, 8, seed=10)
    got = grouped_kd_loss(zs, zt, labels_for(5, 8), primary_mass=1.0, primary_weight=2.5, temperature=2.0)
    torch.testing.assert_close(got, 2.5 * kdfast.kd_loss(zs, zt, temperature=2.0), rtol=1e-12, atol=1e-12)


def test_a_group_of_the_label_alone_is_dkd_target_term():
    # the teacher's top class is the label and the mass is below its probability: the group is {label},
    # Primary-KD is 0 and Binary-KD is DKD's TCKD
    zs, zt = rand(6, 10, seed=11), rand(6, 10, seed=12)
    labels = zt.argmax(-1)
    got = grouped_kd_loss(zs, zt, labels, primary_mass=1e-6, binary_weight=1.3, temperature=4.0)
    want = kdfast.dkd_loss(zs, zt, labels, temperature=4.0, alpha=1.3, beta=0.0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", [{}, dict(primary_mass=0.5, reduction="sum"),
                                     dict(primary_mass=1.0, reduction="none", group_temperature=3.0)])
def test_gradcheck_float64(options):
    zs = rand(5, 7, seed=13).requires_grad_(True)
    zt = rand(5, 7, seed=14)
    zt[1, 3] = -INF  # a masked teacher class
    labels = labels_for(5, 7, seed=15, ignored=(2,))
    assert torch.autograd.gradcheck(lambda x: grouped_kd_loss(x, zt, labels, backend="torch", **options), (zs,))
    assert torch.autograd.gradgradcheck(lambda x: grouped_kd_loss(x, zt, labels, backend="torch", **options), (zs,))


def test_gradcheck_through_the_module_without_labels():
    zs = rand(4, 6, seed=16).requires_grad_(True)
    zt = rand(4, 6, seed=17)
    module = GroupedKDLoss(temperature=2.0, primary_mass=0.7)
    assert torch.autograd.gradcheck(lambda x: module(x, zt), (zs,))
    torch.testing.assert_close(module(zs, zt), grouped_kd_loss(zs, zt, None, temperature=2.0, primary_mass=0.7))


# ----------------------------------------------------------------- rows, masks, reductions
def test_ignored_rows_are_zero_with_zero_gradient_whatever_they_hold():
    zs, zt = rand(4, 6, seed=18), rand(4, 6, seed=19)
    zs[1] = torch.tensor([math.nan, 1.0, INF, 0.0, 2.0, 3.0], dtype=torch.float64)
    zt[2] = -INF
    labels = torch.tensor([3, -100, -100, 0])
    loss, grad = run("torch", zs, zt, labels, upstream=False)
    keep = torch.tensor([0, 3])
    want = grouped_kd_loss(zs[keep], zt[keep], labels[keep])  # mean over the two valid rows
    torch.testing.assert_close(loss, want)
    assert torch.isfinite(loss) and bool((grad[1:3] == 0).all()) and bool((grad[keep] != 0).any())
    per_row = grouped_kd_loss(zs, zt, labels, reduction="none")
    assert per_row.shape == (4,) and bool((per_row[1:3] == 0).all())
    torch.testing.assert_close(grouped_kd_loss(zs, zt, labels, reduction="sum"), per_row.sum())
    # no valid row: 0 and a zero gradient, never 0/0
    loss, grad = run("torch", zs, zt, torch.full((4,), -100), upstream=False)
    assert float(loss) == 0.0 and bool((grad == 0).all())
    # another ignore_index
    torch.testing.assert_close(grouped_kd_loss(zs[keep], zt[keep], torch.tensor([3, 7]), ignore_index=7),
                               grouped_kd_loss(zs[:1], zt[:1], labels[:1]))


def test_masked_classes_equal_dropped_classes_and_stay_finite():
    zs, zt = rand(5, 8, seed=20), rand(5, 8, seed=21)
    keep = torch.tensor([0, 1, 3, 4, 6, 7])
    zs_m, zt_m = zs.clone(), zt.clone()
    zs_m[:, [2, 5]] = -INF
    zt_m[:, [2, 5]] = -INF
    labels = zt_m.argmax(-1)
    remap = torch.full((8,), -1)
    remap[keep] = torch.arange(6)
    loss, grad = run("torch", zs_m, zt_m, labels, primary_mass=0.6)
    want, want_grad = run("torch", zs[:, keep], zt[:, keep], remap[labels], primary_mass=0.6)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad[:, keep], want_grad, rtol=1e-12, atol=1e-12)
    assert bool((grad[:, [2, 5]] == 0).all()) and bool(torch.isfinite(grad).all())


def test_a_student_masking_what_the_teacher_holds_is_infinite_not_nan():
    zs, zt = rand(2, 5, seed=22), rand(2, 5, seed=23)
    zs[0, int(zt[0].argmax())] = -INF  # in the primary group
    per_row = grouped_kd_loss(zs, zt, None, reduction="none")
    assert math.isinf(float(per_row[0])) and float(per_row[0]) > 0 and math.isfinite(float(per_row[1]))


def test_a_nan_row_is_nan_and_leaves_the_other_rows_alone():
    zs, zt = rand(3, 6, seed=24), rand(3, 6, seed=25)
    zt[1, 2] = math.nan
    labels = labels_for(3, 6)
    x = zs.clone().requires_grad_(True)
    per_row = grouped_kd_loss(x, zt, labels, reduction="none")
    per_row.sum().backward()
    per_row = per_row.detach()
    assert math.isnan(float(per_row[1])) and bool(torch.isfinite(per_row[[0, 2]]).all())
    assert bool(torch.isnan(x.grad[1]).all()) and bool(torch.isfinite(x.grad[[0, 2]]).all())


def test_shapes_dtypes_and_reductions():
    zs, zt = rand(2, 3, 7, seed=26, dtype=torch.float32), rand(2, 3, 7, seed=27, dtype=torch.float32)
    labels = labels_for(6, 7).reshape(2, 3)
    flat = grouped_kd_loss(zs.reshape(6, 7), zt.reshape(6, 7), labels.reshape(6))
    torch.testing.assert_close(grouped_kd_loss(zs, zt, labels), flat)
    assert flat.dtype == torch.float32 and flat.shape == ()
    assert grouped_kd_loss(zs.bfloat16(), zt.bfloat16(), labels).dtype == torch.float32
    assert grouped_kd_loss(zs.double(), zt, labels).dtype == torch.float64
    assert grouped_kd_loss(zs, zt, labels, reduction="none").shape == (6,)
    one = torch.zeros(3, 1)
    assert float(grouped_kd_loss(one, one, torch.zeros(3, dtype=torch.long))) == 0.0  # V = 1: nothing to learn
    empty = torch.zeros(0, 4)
    assert float(grouped_kd_loss(empty, empty, torch.zeros(0, dtype=torch.long))) == 0.0


def test_invalid_arguments_are_clear_errors():
    zs, zt = rand(3, 5, seed=28), rand(3, 5, seed=29)
    y = torch.tensor([0, 1, 2])
    cases = [
        (ValueError, "does not match", dict(teacher_logits=rand(3, 4))),
        (ValueError, r"label 5 at row 1 is outside \[0, 5\)", dict(labels=torch.tensor([0, 5, 1]))),
        (ValueError, "labels shape", dict(labels=torch.tensor([0, 1]))),
        (TypeError, "labels must be an integer tensor", dict(labels=torch.tensor([0.0, 1.0, 2.0]))),
        (ValueError, r"primary_mass must be in \(0, 1\]", dict(primary_mass=0.0)),
        (ValueError, r"primary_mass must be in \(0, 1\]", dict(primary_mass=1.5)),
        (ValueError, "primary_mass must be finite", dict(primary_mass=math.nan)),
        (ValueError, "temperature must be > 0", dict(temperature=0.0)),
        (ValueError, "temperature must be > 0", dict(temperature=-1.0)),
        (ValueError, "group_temperature must be > 0", dict(group_temperature=0.0)),
        (ValueError, "primary_weight must be finite", dict(primary_weight=math.inf)),
        (ValueError, "reduction must be one of", dict(reduction="mean")),
        (TypeError, "ignore_index must be an integer", dict(ignore_index=1.5)),
        (ValueError, "backend must be 'auto' or one of", dict(backend="cuda")),
    ]
    for error, message, change in cases:
        args = dict(student_logits=zs, teacher_logits=zt, labels=y)
        args.update({k: v for k, v in change.items() if k in args})
        options = {k: v for k, v in change.items() if k not in args}
        with pytest.raises(error, match=message):
            grouped_kd_loss(args["student_logits"], args["teacher_logits"], args["labels"], **options)
    dead = zt.clone()
    dead[2] = -INF
    with pytest.raises(ValueError, match="teacher_logits row 2 is all -inf"):
        grouped_kd_loss(zs, dead, y)
    grouped_kd_loss(zs, dead, torch.tensor([0, 1, -100]))  # an ignored dead row is fine
    with pytest.raises(ValueError, match=r"primary_mass must be in \(0, 1\]"):
        GroupedKDLoss(primary_mass=2.0)
    with pytest.raises(TypeError, match="labels is passed at call time"):
        GroupedKDLoss(labels=y)
    with pytest.raises(TypeError, match="unexpected keyword argument 'alpha'"):
        GroupedKDLoss(alpha=1.0)


def test_exports_and_backends():
    from kdfast.ops.backends import resolve_backend

    assert kdfast.grouped_kd_loss is grouped_kd_loss and kdfast.GroupedKDLoss is GroupedKDLoss
    assert {"grouped_kd_loss", "GroupedKDLoss"} <= set(kdfast.__all__)
    assert "torch" in kdfast.available_backends("grouped_kd")
    # "auto" on CPU tensors is the C++ kernel where the extension is built (tests/test_grouped_kd_cpu.py), else the
    # reference
    cpu_built = "cpu" in kdfast.available_backends()
    assert ("cpu" in kdfast.available_backends("grouped_kd")) == cpu_built
    assert resolve_backend("auto", torch.device("cpu"), "grouped_kd") == ("cpu" if cpu_built else "torch")


# ----------------------------------------------------------------- the trainer
def test_the_trainer_objective_is_labelled_like_dkd():
    from kdfast.train import LOSS_NAMES, Distiller, resolve_loss

    assert "grouped_kd" in LOSS_NAMES
    objective = resolve_loss({"name": "grouped_kd", "temperature": 2.0, "primary_mass": 0.8})
    assert objective.needs_labels and not objective.accepts_weights
    zs, zt = rand(6, 10, seed=30, dtype=torch.float32), rand(6, 10, seed=31, dtype=torch.float32)
    labels = torch.tensor([1, -100, 3, 4, -100, 9])
    got = objective(zs, zt, labels, normalizer=10.0)
    want = grouped_kd_loss(zs, zt, labels, temperature=2.0, primary_mass=0.8) * 4 / 10.0
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"primary_mass must be in \(0, 1\]"):
        resolve_loss({"name": "grouped_kd", "primary_mass": 0})
    with pytest.raises(ValueError, match="needs labels"):
        objective(zs, zt, None, normalizer=1.0)

    torch.manual_seed(0)
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.randn(32, 8), torch.randint(0, 10, (32,))
    teacher, student = torch.nn.Linear(8, 10), torch.nn.Linear(8, 10)
    before = student.weight.detach().clone()
    distiller = Distiller(student, teacher, "grouped_kd", optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
                          device="cpu")
    records = distiller.fit(DataLoader(TensorDataset(x, y), batch_size=16), 1, progress=False)
    assert math.isfinite(records[-1]["losses"]["soft"]) and records[-1]["losses"]["soft"] > 0
    assert not torch.equal(before, student.weight)


def test_the_benchmark_plain_form_is_the_authors_code_and_the_same_loss():
    from kdfast.bench.baselines import grouped_kd_plain
    from kdfast.bench.families import Case, Settings, default_backend, prepare

    s, t = rand(6, 40, seed=63), rand(6, 40, seed=64)
    labels = torch.arange(6) % 40
    for options in ({}, dict(primary_mass=0.5, primary_weight=2.0, binary_weight=0.5, group_temperature=4.0)):
        x = s.clone().requires_grad_(True)
        got = grouped_kd_plain(x, t, labels, 2.0, **options)
        (got_grad,) = torch.autograd.grad(got, x)
        want, want_grad = run("torch", s, t, labels, upstream=False, temperature=2.0, **options)
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-10)
    backend = default_backend("grouped_kd", torch.device("cpu"))  # the C++ kernel where built, else the reference
    prepared = prepare(Case("grouped_kd", 4, 30, "float32"), Settings(baselines=("eager",), backends=(backend,)))
    values = {name: float(fn().detach()) for name, fn in prepared.methods.items()}
    assert set(values) == {"eager", "kdfast"} and values["eager"] == pytest.approx(values["kdfast"], rel=1e-5)


def test_the_distill_experiment_runs_grouped_kd_at_the_released_settings_next_to_kd_and_dkd():
    from kdfast.experiments import CLAIMS, ExperimentConfig, get_method, plan_stages
    from kdfast.train import resolve_loss

    method = get_method("grouped-kd")
    assert method.loss == {"name": "grouped_kd", "temperature": 4.0, "primary_mass": 0.93, "primary_weight": 4.0,
                           "binary_weight": 1.0, "group_temperature": 1.0}
    assert (method.hard_weight, method.soft_weight) == (1.0, 1.0)
    assert method.options["warmup_fraction"] == get_method("dkd").options["warmup_fraction"]
    assert resolve_loss(method.loss).needs_labels  # distils the labelled rows, as DKD
    claims = {c.name: c for c in CLAIMS}
    assert (claims["grouped-kd-vs-kd"].treatment, claims["grouped-kd-vs-kd"].baseline) == ("grouped-kd@ce", "kd@ce")
    assert (claims["grouped-kd-vs-dkd"].treatment, claims["grouped-kd-vs-dkd"].baseline) == ("grouped-kd@ce", "dkd@ce")
    assert "grouped-kd@ce" in {s.group for stage in plan_stages(ExperimentConfig()) for s in stage}
    with pytest.raises(ValueError, match=r"primary_mass must be in \(0, 1\]"):
        ExperimentConfig(method_options={"grouped-kd": {"primary_mass": 2.0}})  # checked when the run is set up


# ----------------------------------------------------------------- the Triton kernel
def check_float64(s, t, labels, **kw):
    got = run("triton", s, t, labels, **kw)
    want = run("torch", s, t, labels, **kw)
    assert got[1].dtype == s.dtype and got[1].shape == s.shape
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
    return got


@triton_only
@pytest.mark.parametrize("V", [1, 2, 10, 37])
@pytest.mark.parametrize("mass", [0.3, 0.93, 1.0])
@pytest.mark.parametrize("with_labels", [True, False])
def test_triton_is_the_reference_in_float64(V, mass, with_labels):
    s, t = rand(5, V, seed=32 + V), rand(5, V, seed=33 + V)
    labels = labels_for(5, V, seed=34, ignored=(3,)) if with_labels else None
    check_float64(s, t, labels, primary_mass=mass)


@triton_only
@pytest.mark.parametrize("options", [dict(temperature=1.5, group_temperature=4.0, primary_weight=2.0, binary_weight=0.5),
                                     dict(reduction="sum", primary_mass=0.6), dict(reduction="none"),
                                     dict(ignore_index=3, primary_mass=0.99, group_temperature=0.25)])
def test_triton_options_and_reductions(options):
    s, t = rand(6, 37, seed=35), rand(6, 37, seed=36)
    check_float64(s, t, torch.tensor([1, 3, 36, 0, 3, 20]), **options)


@triton_only
def test_triton_ties_at_the_threshold():
    # integer logits in a narrow range: many exact ties, several of them straddling the threshold
    g = torch.Generator().manual_seed(37)
    t = torch.randint(-2, 3, (8, 40), generator=g).double()
    s = rand(8, 40, seed=38)
    for mass in (0.2, 0.5, 0.8, 0.95):
        check_float64(s, t, labels_for(8, 40, seed=39), primary_mass=mass, group_temperature=1.0)
    t[0] = 1.0  # a uniform teacher: one distinct value, the whole row is primary
    check_float64(s, t, labels_for(8, 40, seed=39), primary_mass=0.5)


@triton_only
def test_triton_long_rows_converge_to_the_reference_group():
    # a row of many distinct values (the search narrows the bracket over several sweeps), clustered values,
    # and logits far apart in scale
    s = rand(3, 700, seed=40)
    t = rand(3, 700, seed=41)
    t[1] = torch.round(t[1] * 4) / 4  # clusters of equal values
    t[2, :350] = t[2, :350] * 1e-6  # a dense cluster near 0 next to spread-out values
    check_float64(s, t, labels_for(3, 700, seed=42), primary_mass=0.9, group_temperature=2.0)


@triton_only
def test_triton_minus_inf_and_nan():
    s, t = rand(6, 37, seed=43), rand(6, 37, seed=44)
    t[0, :30] = -INF  # masked teacher classes (not in the group)
    s[0, :30] = -INF
    t[1, 5] = -INF  # the label's teacher logit masked: it joins the group with probability 0
    t[2, 30:] -= 20.0  # far below the group: in the rest
    s[2, 30:] = -INF  # which the student masks in part
    labels = torch.tensor([31, 5, 1, 2, 3, 4])
    check_float64(s, t, labels, primary_mass=0.7)
    s[3, int(t[3].argmax())] = -INF  # the student masks the teacher's top class: +inf, as the reference
    got = run("triton", s, t, labels, reduction="none")
    want = run("torch", s, t, labels, reduction="none")
    assert math.isinf(float(got[0][3])) and math.isinf(float(want[0][3]))
    torch.testing.assert_close(got[0][[0, 1, 2, 4, 5]], want[0][[0, 1, 2, 4, 5]], rtol=1e-10, atol=1e-12)
    assert bool(torch.isfinite(got[1]).all())
    # NaN in, NaN out for that row only
    s2 = rand(4, 37, seed=45)
    s2[2, 7] = math.nan
    loss, grad = run("triton", s2, t[:4], labels[:4], reduction="none")
    assert math.isnan(float(loss[2])) and bool(torch.isnan(grad[2]).all())
    assert bool(torch.isfinite(loss[[0, 1]]).all())


@triton_only
def test_triton_ignored_rows_and_errors():
    s, t = rand(4, 37, seed=46), rand(4, 37, seed=47)
    s[1] = math.nan
    t[2] = -INF
    labels = torch.tensor([3, -100, -100, 0])
    loss, grad = run("triton", s, t, labels, upstream=False)
    torch.testing.assert_close(loss, grouped_kd_loss(s[[0, 3]], t[[0, 3]], labels[[0, 3]]), rtol=1e-10, atol=1e-12)
    assert math.isfinite(float(loss)) and bool((grad[1:3] == 0).all())
    loss, grad = run("triton", s, t, torch.full((4,), -100), upstream=False)
    assert float(loss) == 0.0 and bool((grad == 0).all())
    with pytest.raises(ValueError, match=r"label 40 at row 0 is outside \[0, 37\)"):
        run("triton", s, t, torch.tensor([40, -100, -100, 1]))
    with pytest.raises(ValueError, match="teacher_logits row 2 is all -inf"):
        run("triton", s.nan_to_num(0.0), t, torch.tensor([1, 2, 3, 4]))


@triton_only
def test_triton_non_contiguous_inputs():
    base_s, base_t = rand(37, 12, seed=48), rand(37, 12, seed=49)
    s, t = base_s.T, base_t.T  # (12, 37) with a column stride of 12
    assert not s.is_contiguous()
    labels = labels_for(12, 37, seed=50, ignored=(4,))
    check_float64(s, t, labels)
    wide_s, wide_t = rand(6, 80, seed=51), rand(6, 80, seed=52)
    check_float64(wide_s[:, 3:40], wide_t[:, 10:47], labels[:6])  # row stride 80, unit column stride


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_float32_and_bfloat16_against_the_float64_reference(dtype):
    s, t = rand(6, 37, seed=53, dtype=dtype), rand(6, 37, seed=54, dtype=dtype)
    labels = labels_for(6, 37, seed=55, ignored=(1,))
    for mass in (0.5, 0.93, 1.0):
        loss, grad = run("triton", s, t, labels, primary_mass=mass)
        ref_loss, ref_grad = run("torch", s.double(), t.double(), labels, primary_mass=mass)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(loss.double(), ref_loss, rtol=VALUE_RTOL, atol=VALUE_ATOL)
        tol = GRAD_TOL[dtype]
        expected = ref_grad.to(dtype).double() if dtype != torch.float32 else ref_grad
        scale = float(ref_grad.abs().max())
        torch.testing.assert_close(grad.double(), expected, rtol=tol["rtol"], atol=tol["atol"] * scale + tol["atol_abs"])


@triton_only
def test_triton_without_a_gradient_with_a_retained_graph_and_no_double_backward():
    s, t = rand(4, 37, seed=56), rand(4, 37, seed=57)
    labels = labels_for(4, 37, seed=58)
    with torch.no_grad():
        torch.testing.assert_close(grouped_kd_loss(s, t, labels, backend="triton"),
                                   grouped_kd_loss(s, t, labels, backend="torch"), rtol=1e-10, atol=1e-12)
    x = s.clone().requires_grad_(True)
    loss = grouped_kd_loss(x, t, labels, backend="triton")
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2) and g1.data_ptr() != g2.data_ptr()
    loss = grouped_kd_loss(x, t, labels, backend="triton")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


@triton_only
def test_triton_opcheck_and_compile():
    from kdfast.ops.triton import grouped_kd as op

    s, t = rand(5, 37, seed=59, dtype=torch.float32).to(DEVICE), rand(5, 37, seed=60, dtype=torch.float32).to(DEVICE)
    labels = torch.tensor([1, 2, -100, 4, 5], device=DEVICE)
    for args in ((s, t, labels, 4.0, 0.93, 4.0, 1.0, 1.0, -100, "batchmean", True),
                 (s, t, None, 2.0, 1.0, 1.0, 1.0, 2.0, -100, "none", False)):
        torch.library.opcheck(op.grouped_kd_forward_triton, args, test_utils=("test_schema", "test_faketensor"))
    kw = dict(temperature=2.0, primary_mass=0.8)
    compiled = torch.compile(lambda x: grouped_kd_loss(x, t, labels, backend="triton", **kw), fullgraph=True,
                             backend="aot_eager")
    x = s.clone().requires_grad_(True)
    loss = compiled(x)
    (grad,) = torch.autograd.grad(loss, x)
    want = run("torch", s.cpu(), t.cpu(), labels.cpu(), upstream=False, **kw)
    torch.testing.assert_close(loss.detach().cpu(), want[0], rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad.cpu(), want[1], rtol=2e-5, atol=2e-6)


@triton_only
def test_auto_on_a_cuda_device_runs_the_kernel():
    if DEVICE.type != "cuda":
        pytest.skip("'auto' picks Triton on CUDA tensors only")
    s, t = rand(4, 37, seed=61, dtype=torch.float32), rand(4, 37, seed=62, dtype=torch.float32)
    labels = labels_for(4, 37)
    got, want = run("auto", s, t, labels), run("triton", s, t, labels)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


_COMPILE_FOR_GPU = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kdfast.ops.triton import grouped_kd as gk

report = {}
for dtype, acc, labels, full, grad in (("bf16", "fp32", True, False, True), ("fp32", "fp32", False, False, False),
                                       ("fp64", "fp64", True, False, True), ("fp16", "fp32", True, True, True)):
    for config in gk._GPU_CONFIGS:
        sig = {"S_ptr": f"*{dtype}", "T_ptr": f"*{dtype}", "s_row_stride": "i32", "t_row_stride": "i32",
               "G_ptr": f"*{dtype}", "LABELS_ptr": "*i64", "PARAMS_ptr": "*fp64", "INV_DENOM_ptr": "*fp64",
               "ROW_LOSS_ptr": f"*{acc}", "STATUS_ptr": "*i32", "V": "i32", "ignore_index": "i32"}
        cx = dict(HAS_LABELS=labels, FULL_MASS=full, COMPUTE_GRAD=grad,
                  ACC=tl.float64 if acc == "fp64" else tl.float32, NPIV=gk.PIVOTS, **config.kwargs)
        sig.update({k: "constexpr" for k in cx})
        key = f"{dtype}-{labels}-{full}-{grad}-{config.kwargs['BLOCK']}"
        try:
            c = triton.compile(ASTSource(fn=gk.grouped_kd_rows_kernel, signature=sig, constexprs=cx),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps})
            report[key] = {"ok": bool(c.asm.get("cubin")), "spills": ".local" in c.asm["ptx"]}
        except Exception as exc:
            report[key] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
json.dump(report, sys.stdout)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_kernel_compiles_for_a_gpu_without_spills():
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([root] + [p for p in
                                                                                 [os.environ.get("PYTHONPATH")] if p]))
    out = subprocess.run([sys.executable, "-c", _COMPILE_FOR_GPU], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout)
    assert len(report) == 12
    for key, entry in report.items():
        assert entry["ok"], (key, entry.get("error"))
        assert not entry["spills"], f"{key}: registers spill to local memory"
