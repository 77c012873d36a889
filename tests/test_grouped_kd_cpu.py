"""The fused C++ Grouped KD kernel (csrc/kernels/grouped_kd_kernel.h, op ``kdfast::grouped_kd_forward``)
against the reference (``kdfast/reference/grouped_kd.py``), at every SIMD level this CPU runs.

Tolerances: float64 inputs take the kernel's float64 path and match the
float64 reference to rtol 1e-10 / atol 1e-12 (value and gradient).  float32,
bfloat16 and float16 inputs are compared with the float64 reference on the
same values: values to conftest's rtol 1e-5 / atol 1e-6; gradients with
conftest's ``GRAD_TOL`` (float32: rtol 1e-5, atol 1e-5 of the largest entry
+ 1e-7; bfloat16 and float16 after one rounding of the float64 gradient to
their dtype, rtol 2^-7 and 2^-10: the looser tolerance of 8 and 11
significant bits).  Test data keep every class away from the threshold's
rounding (random logits; integer logits for the ties), where backends may
legitimately disagree on a class's side.
"""

from __future__ import annotations

import math

import pytest
import torch

import kdfast
from kdfast.grouped_kd import grouped_kd_loss, primary_group

from conftest import GRAD_TOL, KERNELS, VALUE_ATOL, VALUE_RTOL, kernel_backend
from test_grouped_kd import labels_for, rand

torch.set_num_threads(1)
INF = math.inf
CPU_KERNELS = [k for k in KERNELS if k.startswith("cpu-")]
pytestmark = pytest.mark.skipif(not CPU_KERNELS, reason="the C++ extension is not built")
cpu_kernels = pytest.mark.parametrize("kernel", CPU_KERNELS)


def run(kernel, s, t, labels, upstream=True, **kw):
    """(loss, d loss / d student) of ``kernel`` ("cpu-<SIMD level>" or "torch"); a non-unit upstream gradient."""
    x = s.detach().clone().requires_grad_(True)
    with kernel_backend(kernel) as backend:
        loss = grouped_kd_loss(x, t, labels, backend=backend, **kw)
        seed = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        (grad,) = torch.autograd.grad(loss, x, seed if upstream else None)
    return loss.detach(), grad


def check(kernel, s, t, labels, **kw):
    """The kernel against the float64 reference on the same values, at the tolerances of the module docstring."""
    loss, grad = run(kernel, s, t, labels, **kw)
    want, want_grad = run("torch", s.double(), t.double(), labels, **kw)
    assert grad.dtype == s.dtype and grad.shape == s.shape
    assert loss.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    if s.dtype == torch.float64:
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
        return loss, grad
    torch.testing.assert_close(loss.double(), want, rtol=VALUE_RTOL, atol=VALUE_ATOL)
    tol = GRAD_TOL[s.dtype]
    expected = want_grad if s.dtype == torch.float32 else want_grad.to(s.dtype).double()
    scale = float(want_grad[torch.isfinite(want_grad)].abs().max()) if want_grad.numel() else 0.0
    torch.testing.assert_close(grad.double(), expected, rtol=tol["rtol"], atol=tol["atol"] * scale + tol["atol_abs"])
    return loss, grad


# ----------------------------------------------------------------- the formula
@cpu_kernels
@pytest.mark.parametrize("V", [1, 2, 7, 33, 1000])
@pytest.mark.parametrize("mass", [0.5, 0.93, 1.0])
@pytest.mark.parametrize("with_labels", [True, False])
def test_float64_is_the_reference(kernel, V, mass, with_labels):
    s, t = rand(5, V, seed=V), rand(5, V, seed=V + 1)
    labels = labels_for(5, V, seed=2, ignored=(3,)) if with_labels else None
    check(kernel, s, t, labels, primary_mass=mass)


@cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [7, 33, 1000])
def test_float32_bfloat16_float16_against_the_float64_reference(kernel, dtype, V):
    s, t = rand(6, V, seed=3, dtype=dtype), rand(6, V, seed=4, dtype=dtype)
    labels = labels_for(6, V, seed=5, ignored=(1,))
    for mass in (0.5, 0.93, 1.0):
        check(kernel, s, t, labels, primary_mass=mass)


@cpu_kernels
def test_mixed_16_bit_and_float32_inputs(kernel):
    s, t = rand(4, 40, seed=6, dtype=torch.float32), rand(4, 40, seed=7, dtype=torch.bfloat16)
    loss, grad = run(kernel, s, t, labels_for(4, 40))
    want, want_grad = run("torch", s.double(), t.double(), labels_for(4, 40))
    assert grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, rtol=VALUE_RTOL, atol=VALUE_ATOL)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-5 * float(want_grad.abs().max()))


@cpu_kernels
@pytest.mark.parametrize("options", [dict(reduction="sum"), dict(reduction="none"),
                                     dict(temperature=1.5, group_temperature=4.0, primary_weight=2.0,
                                          binary_weight=0.5),
                                     dict(ignore_index=3, primary_mass=0.99, group_temperature=0.25),
                                     dict(primary_mass=1e-6, temperature=8.0)])
def test_reductions_and_options(kernel, options):
    s, t = rand(6, 37, seed=8), rand(6, 37, seed=9)
    check(kernel, s, t, torch.tensor([1, 3, 36, 0, 3, 20]), **options)


@cpu_kernels
@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("group_tau", [0.25, 1.0, 4.0])
def test_long_rows_every_bracket_of_the_threshold_search(kernel, scale, group_tau):
    # flat rows to peaked ones: z* falls in each bracket of the first sweep's pivots and below them all, with
    # from one to thousands of logits in the bracket (narrowing passes over the copies, or none)
    s, t = rand(5, 4000, seed=10, scale=3.0), rand(5, 4000, seed=11, scale=scale)
    t[1] = t[1] + torch.linspace(0, 8 * scale, 4000, dtype=torch.float64)  # a skewed row
    t[2, :50] += 5 * scale  # a block of confident classes
    t[3] = torch.round(t[3] * 2) / 2  # clusters of equal logits, which no pivot separates
    t[4] = t[4] * 1e-3  # one class 15 group temperatures above a near-flat rest, which holds 0.12 % of the mass
    t[4, 7] = 15 * group_tau
    labels = labels_for(5, 4000, seed=12)
    for mass in (0.3, 0.93, 0.999):
        check(kernel, s, t, labels, primary_mass=mass, group_temperature=group_tau)
    # float32 without the clustered row: thousands of equal exponentials summed in float lanes (flushed to
    # double every 1024 entries, row_kernel.h) err by up to 1e-4 there at the scalar level, as in the KD and
    # DKD kernels
    rows = [0, 1, 2, 4]
    check(kernel, s[rows].float(), t[rows].float(), labels[rows], primary_mass=0.93, group_temperature=group_tau)


@cpu_kernels
def test_ties_at_the_threshold_are_all_in_or_all_out(kernel):
    # integer logits in a narrow range: many exact ties, several straddling the threshold
    g = torch.Generator().manual_seed(13)
    t = torch.randint(-2, 3, (8, 40), generator=g).double()
    s = rand(8, 40, seed=14)
    for mass in (0.2, 0.5, 0.8, 0.95):
        check(kernel, s, t, labels_for(8, 40, seed=15), primary_mass=mass)
        check(kernel, s, t, None, primary_mass=mass)
        check(kernel, s.float(), t.float(), None, primary_mass=mass)
    # the tie decides: one class of logit 2, three tied at 1, one at -1; the mass is reached inside the tie
    t5 = torch.tensor([[2.0, 1.0, 1.0, 1.0, -1.0], [1.0, 1.0, 2.0, -1.0, 1.0]], dtype=torch.float64)
    p = torch.softmax(t5[0], -1)
    mass = float(p[0] + p[1]) * 0.999
    s5 = rand(2, 5, seed=16)
    loss, _ = check(kernel, s5, t5, None, primary_mass=mass, reduction="none")
    # the group is {2, 1, 1, 1} in any order: row 0 with its classes permuted (teacher and student alike)
    loss_perm, _ = run(kernel, s5[:, [3, 4, 1, 0, 2]][[0, 0]], t5[:, [3, 4, 1, 0, 2]][[0, 0]], None,
                       primary_mass=mass, reduction="none")
    torch.testing.assert_close(loss_perm[0], loss[0], rtol=1e-12, atol=0)
    t[0] = 1.0  # a uniform teacher: one distinct value, the whole row is primary
    check(kernel, s, t, labels_for(8, 40, seed=15), primary_mass=0.5)


# ----------------------------------------------------------------- rows and masks
@cpu_kernels
def test_ignored_rows_and_no_valid_row(kernel):
    s, t = rand(4, 37, seed=17), rand(4, 37, seed=18)
    s[1] = math.nan  # ignored rows may hold anything
    t[2] = -INF
    labels = torch.tensor([3, -100, -100, 0])
    loss, grad = run(kernel, s, t, labels, upstream=False)
    want = grouped_kd_loss(s[[0, 3]], t[[0, 3]], labels[[0, 3]], backend="torch")
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    assert bool((grad[1:3] == 0).all()) and bool(torch.isfinite(grad).all())
    per_row, _ = run(kernel, s, t, labels, reduction="none")
    assert bool((per_row[1:3] == 0).all())
    loss, grad = run(kernel, s, t, torch.full((4,), -100), upstream=False)
    assert float(loss) == 0.0 and bool((grad == 0).all())


@cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_row_and_no_row(kernel, dtype):
    s, t = rand(1, 33, seed=19, dtype=dtype), rand(1, 33, seed=20, dtype=dtype)
    check(kernel, s, t, torch.tensor([5]))
    check(kernel, s, t, None, reduction="none")
    empty = torch.zeros(0, 4, dtype=dtype)
    loss, grad = run(kernel, empty, empty, torch.zeros(0, dtype=torch.long))
    assert float(loss) == 0.0 and grad.shape == (0, 4)


@cpu_kernels
def test_minus_inf_logits(kernel):
    s, t = rand(6, 37, seed=21), rand(6, 37, seed=22)
    t[0, :30] = -INF  # masked classes, outside the group
    s[0, :30] = -INF
    t[1, 5] = -INF  # the label's teacher logit masked: it joins the group with probability 0
    t[2, 30:] -= 20.0  # far below the group: in the rest
    s[2, 30:] = -INF  # which the student masks in part
    t[4, 3] = -INF  # masked on both sides, and the label
    s[4, 3] = -INF
    labels = torch.tensor([31, 5, 1, 2, 3, 4])
    for mass in (0.7, 1.0):
        check(kernel, s, t, labels, primary_mass=mass)
        check(kernel, s.float(), t.float(), labels, primary_mass=mass)
    # the student masks the teacher's top class: +inf, as the reference; the other rows unchanged
    s[3, int(t[3].argmax())] = -INF
    got, grad = run(kernel, s, t, labels, reduction="none")
    want, _ = run("torch", s, t, labels, reduction="none")
    assert got[3] == INF and want[3] == INF
    keep = [0, 1, 2, 4, 5]
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-10, atol=1e-12)
    assert bool(torch.isfinite(grad).all())


@cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_very_large_logits(kernel, dtype):
    # 1e30-scale rows: every class but the top one has probability exp(-1e29); each group keeps its own
    # maximum, so the log-masses of the rest stay finite (Binary-KD ~1e29, not +inf).  The reference runs on
    # rows shifted to a maximum of 0 (the loss and the gradient do not change): unshifted, it loses the
    # log(5) of the tie below next to logsumexps of 1e29 (1 ulp = 1e13) and gets Primary-KD 5x too large.
    s, t = rand(4, 33, seed=23, scale=1e30), rand(4, 33, seed=24, scale=1e30)
    s[1] = t[1] * 0.5  # the student's top class is the teacher's
    t[2, :5] = 3e30  # a tie at the top
    s, t = s.to(dtype), t.to(dtype)
    labels = labels_for(4, 33, seed=25)
    s0, t0 = (x.double() - x.double().amax(-1, keepdim=True) for x in (s, t))
    for mass in (0.5, 1.0):
        loss, grad = run(kernel, s, t, labels, primary_mass=mass, reduction="none")
        want, want_grad = run("torch", s0, t0, labels, primary_mass=mass, reduction="none")
        assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())
        torch.testing.assert_close(loss.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=0)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6 * float(want_grad.abs().max()))


@cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gap", [60.0, 150.0, 400.0, 4000.0])
def test_groups_far_below_the_row_maximum(kernel, dtype, gap):
    # the student's (or the teacher's rest's) classes lie `gap` below the row's maximum: at T = 4 their
    # exponentials against the row's maximum are exp(-15) to exp(-1000), past float's range from 150 on,
    # where the kernel shifts each group by its own maximum
    s, t = rand(4, 33, seed=45), rand(4, 33, seed=46)
    labels = labels_for(4, 33, seed=47)
    group = primary_group(t, labels, 1.0, 0.8)
    s[0] = torch.where(group[0], s[0] - gap, s[0])  # the student's mass is outside the teacher's group
    s[1] = torch.where(group[1], s[1], s[1] - gap)  # ... or inside it alone
    t[2] = torch.where(group[2], t[2], t[2] - gap)  # the teacher's rest far below its group
    s[3] = torch.where(group[3], s[3] - gap, s[3])
    t[3] = torch.where(group[3], t[3], t[3] - gap)
    check(kernel, s.to(dtype), t.to(dtype), labels, primary_mass=0.8, reduction="none")


@cpu_kernels
def test_non_contiguous_inputs(kernel):
    base_s, base_t = rand(37, 12, seed=26), rand(37, 12, seed=27)
    s, t = base_s.T, base_t.T  # (12, 37), column stride 12
    assert not s.is_contiguous()
    labels = labels_for(12, 37, seed=28, ignored=(4,))
    check(kernel, s, t, labels)
    wide_s, wide_t = rand(6, 80, seed=29), rand(6, 80, seed=30)
    check(kernel, wide_s[:, 3:40], wide_t[:, 10:47], labels[:6])  # row stride 80, unit column stride
    check(kernel, rand(2, 3, 33, seed=31).float(), rand(2, 3, 33, seed=32).float(), labels_for(6, 33).reshape(2, 3))


@cpu_kernels
def test_nan_and_plus_inf_rows_are_nan_alone(kernel):
    s, t = rand(5, 37, seed=33), rand(5, 37, seed=34)
    t[1, 2] = math.nan  # teacher NaN (in the threshold search)
    s[2, 7] = math.nan  # student NaN
    t[3, 0] = INF
    labels = labels_for(5, 37, seed=35)
    for mass in (0.93, 1.0):
        for dtype in (torch.float64, torch.float32):
            loss, grad = run(kernel, s.to(dtype), t.to(dtype), labels, primary_mass=mass, reduction="none")
            assert bool(torch.isnan(loss[1:4]).all()) and bool(torch.isnan(grad[1:4]).all())
            assert bool(torch.isfinite(loss[[0, 4]]).all()) and bool(torch.isfinite(grad[[0, 4]]).all())


@cpu_kernels
def test_all_minus_inf_rows_raise(kernel):
    s, t = rand(3, 9, seed=36), rand(3, 9, seed=37)
    y = torch.tensor([0, 1, 2])
    dead = t.clone()
    dead[2] = -INF
    with kernel_backend(kernel) as backend:
        with pytest.raises(ValueError, match="teacher_logits row 2 is all -inf"):
            grouped_kd_loss(s, dead, y, backend=backend)
        with pytest.raises(ValueError, match="student_logits row 1 is all -inf"):
            grouped_kd_loss(torch.where(torch.arange(3)[:, None] == 1, -INF, s), t, y, backend=backend)
        grouped_kd_loss(s, dead, torch.tensor([0, 1, -100]), backend=backend)  # an ignored dead row is fine
        with pytest.raises(ValueError, match=r"label 9 at row 0 is outside \[0, 9\)"):
            grouped_kd_loss(s, t, torch.tensor([9, 1, 2]), backend=backend)


# ----------------------------------------------------------------- the op
def test_auto_on_cpu_tensors_is_the_cpu_kernel():
    from kdfast.ops.backends import resolve_backend

    assert "cpu" in kdfast.available_backends("grouped_kd")
    assert resolve_backend("auto", torch.device("cpu"), "grouped_kd") == "cpu"
    s, t = rand(4, 37, seed=38, dtype=torch.float32), rand(4, 37, seed=39, dtype=torch.float32)
    got, want = run("auto", s, t, labels_for(4, 37)), run("cpu", s, t, labels_for(4, 37))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_without_a_gradient_retained_graph_and_no_double_backward():
    s, t = rand(4, 37, seed=40), rand(4, 37, seed=41)
    labels = labels_for(4, 37, seed=42)
    with torch.no_grad():
        torch.testing.assert_close(grouped_kd_loss(s, t, labels, backend="cpu"),
                                   grouped_kd_loss(s, t, labels, backend="torch"), rtol=1e-10, atol=1e-12)
    x = s.clone().requires_grad_(True)
    loss = grouped_kd_loss(x, t, labels, backend="cpu")
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2) and g1.data_ptr() != g2.data_ptr()
    small_t, small_labels = t[:, :9], labels_for(4, 9, seed=42, ignored=(2,))
    small_s = s[:, :9].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: grouped_kd_loss(z, small_t, small_labels, backend="cpu", primary_mass=0.6), (small_s,))
    loss = grouped_kd_loss(x, t, labels, backend="cpu")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_opcheck_and_fullgraph_compile():
    s, t = rand(5, 37, seed=43, dtype=torch.float32), rand(5, 37, seed=44, dtype=torch.float32)
    labels = torch.tensor([1, 2, -100, 4, 5])
    op = torch.ops.kdfast.grouped_kd_forward.default
    x = s.clone().requires_grad_(True)
    for args in ((x, t, labels, 4.0, 0.93, 4.0, 1.0, 1.0, -100, "batchmean", True),
                 (x, t, None, 2.0, 1.0, 1.0, 1.0, 2.0, -100, "none", True),
                 (s, t, labels, 2.0, 0.5, 1.0, 1.0, 2.0, -100, "sum", False)):
        torch.library.opcheck(op, args)
    torch._dynamo.reset()
    kw = dict(temperature=2.0, primary_mass=0.8)
    compiled = torch.compile(lambda z: grouped_kd_loss(z, t, labels, backend="cpu", **kw), fullgraph=True,
                             backend="aot_eager")
    a = s.clone().requires_grad_(True)
    compiled(a).backward()
    want_loss, want_grad = run("torch", s.double(), t.double(), labels, upstream=False, **kw)
    torch.testing.assert_close(compiled(s).double(), want_loss, rtol=VALUE_RTOL, atol=VALUE_ATOL)
    torch.testing.assert_close(a.grad.double(), want_grad, rtol=1e-5, atol=1e-5 * float(want_grad.abs().max()))
