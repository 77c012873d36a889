"""The fused LTKD kernels (C++ at every SIMD level this CPU runs, Triton on the GPU or interpreted) against the
PyTorch reference of :func:`kdfast.ltkd_loss`.

The oracle is the reference in float64 on the very same input values.
Tolerances: float64 1e-10 relative (values and gradients); float32 1e-5
relative on values, gradients within 1e-5 of the largest entry; bf16 inputs
(exact in float32) give float32-accurate values, and their bf16 gradients
are compared within 2^-7 relative plus 2^-8 of the largest entry (one
rounding to bf16's 8 significant bits).  Triton runs small tiles in the
interpreter (16 entries), so V = 37 spans three tiles and a partial one.
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
from kdfast.longtail import LTKDLoss, ltkd_loss
from kdfast.ops.ltkd_fused import MAX_FUSED_GROUPS

from conftest import KERNELS, kernel_backend, kernel_device, kernels

torch.set_num_threads(1)

INF = math.inf
# 37 classes (a multiple of neither 8 nor 16) in 3 groups of uneven sizes, interleaved
GROUPS = [(5 * c) % 7 % 3 for c in range(37)]
V = len(GROUPS)
PRIOR = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
REBALANCES = {"batch": True, "prior": PRIOR, "none": False}
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def rand(*shape, seed=0, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def run(kernel, s, t, groups=GROUPS, upstream=True, **kw):
    """(loss, d loss / d student) on a kernel of ``KERNELS`` or ``"torch"``, back on the CPU; a non-unit upstream
    gradient by default (so a per-row loss's gradient is checked row by row)."""
    device = kernel_device(kernel)
    x = s.detach().to(device).clone().requires_grad_(True)
    if isinstance(kw.get("rebalance"), torch.Tensor):
        kw["rebalance"] = kw["rebalance"].to(device)
    with kernel_backend(kernel) as backend:
        loss = ltkd_loss(x, t.to(device), groups, backend=backend, **kw)
        seed = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=device).reshape(loss.shape)
        (grad,) = torch.autograd.grad(loss, x, seed if upstream else None)
    return loss.detach().cpu(), grad.cpu()


def oracle(s, t, groups=GROUPS, **kw):
    """The reference in float64 on the same values."""
    return run("torch", s.double(), t.double(), groups, **kw)


def assert_matches(got, want, dtype):
    loss, grad = got
    ref_loss, ref_grad = want
    finite = torch.isfinite(ref_loss)
    assert torch.equal(finite, torch.isfinite(loss)), (loss, ref_loss)
    assert torch.equal(ref_loss[~finite].isnan(), loss[~finite].isnan())
    value_tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double()[finite], ref_loss[finite], **value_tol)
    scale = float(ref_grad[torch.isfinite(ref_grad)].abs().max()) if torch.isfinite(ref_grad).any() else 1.0
    grad_tol = {torch.float64: dict(rtol=1e-10, atol=1e-12 * scale),
                torch.float32: dict(rtol=1e-5, atol=1e-5 * scale),
                torch.bfloat16: dict(rtol=2**-7, atol=2**-8 * scale)}[dtype]
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad, equal_nan=True, **grad_tol)


# ----------------------------------------------------------------- value and gradient
@kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rebalance", list(REBALANCES))
@pytest.mark.parametrize("intra_weighting", ["uniform", "teacher"])
def test_matches_the_reference(kernel, dtype, rebalance, intra_weighting):
    s, t = rand(6, V, seed=1, dtype=dtype), rand(6, V, seed=2, dtype=dtype)
    kw = dict(temperature=2.0, inter_weight=0.7, intra_weight=1.3, rebalance=REBALANCES[rebalance],
              intra_weighting=intra_weighting, reduction="none")
    assert_matches(run(kernel, s, t, **kw), oracle(s, t, **kw), dtype)


@kernels
@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_mixed_dtypes(kernel, teacher_dtype):
    # a float64 teacher makes the whole loss float64 (the student is upcast), as in the reference
    s, t = rand(4, V, seed=36, dtype=torch.float32), rand(4, V, seed=37, dtype=teacher_dtype)
    got = run(kernel, s, t, reduction="none")
    want_dtype = torch.float64 if teacher_dtype == torch.float64 else torch.float32
    assert got[0].dtype == want_dtype
    assert_matches((got[0], got[1].to(torch.float32)), oracle(s, t, reduction="none"), torch.float32)


@kernels
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_reductions(kernel, reduction):
    s, t = rand(2, 3, V, seed=3, dtype=torch.float32), rand(2, 3, V, seed=4, dtype=torch.float32)
    got = run(kernel, s, t, reduction=reduction)
    assert got[0].shape == (() if reduction != "none" else (6,)) and got[0].dtype == torch.float32
    assert_matches(got, oracle(s, t, reduction=reduction), torch.float32)
    empty = torch.zeros(0, V)
    with kernel_backend(kernel) as backend:
        value = ltkd_loss(empty.to(kernel_device(kernel)), empty.to(kernel_device(kernel)), GROUPS,
                          reduction=reduction, backend=backend)
    assert value.shape == ((0,) if reduction == "none" else ()) and float(value.sum()) == 0.0


@kernels
@pytest.mark.parametrize("inter_weight, intra_weight", [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_either_term_alone(kernel, inter_weight, intra_weight):
    s, t = rand(4, V, seed=5), rand(4, V, seed=6)
    kw = dict(inter_weight=inter_weight, intra_weight=intra_weight, reduction="none")
    assert_matches(run(kernel, s, t, **kw), oracle(s, t, **kw), torch.float64)


@kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_teacher_weights_without_rebalancing_are_plain_kd(kernel, dtype):
    s, t = rand(5, V, seed=7, dtype=dtype), rand(5, V, seed=8, dtype=dtype)
    got = run(kernel, s, t, temperature=3.0, rebalance=False, intra_weighting="teacher", upstream=False)
    x = s.double().clone().requires_grad_()
    kd = kdfast.kd_loss(x, t.double(), temperature=3.0, backend="torch")
    (kd_grad,) = torch.autograd.grad(kd, x)
    assert_matches(got, (kd.detach(), kd_grad), dtype)


@kernels
def test_random_group_maps_masks_and_scales(kernel):
    """Seeded random cases: V from 1 to 70, 1 to 6 groups (some empty, some without teacher mass), masked
    classes (the student masks a subset of the teacher's: finite losses), scales 0.1 to 30."""
    g = torch.Generator().manual_seed(40)
    for case in range(12):
        n_classes = int(torch.randint(1, 71, (), generator=g))
        count = int(torch.randint(1, 7, (), generator=g))
        groups = torch.randint(0, count, (n_classes,), generator=g).tolist()
        scale = float(10 ** torch.empty(()).uniform_(-1.0, 1.5, generator=g))
        s, t = rand(5, n_classes, seed=100 + case, scale=scale), rand(5, n_classes, seed=200 + case, scale=scale)
        t[torch.rand(5, n_classes, generator=g) < 0.3] = -INF
        s[torch.isneginf(t) & (torch.rand(5, n_classes, generator=g) < 0.5)] = -INF
        t[:, 0] = torch.where(torch.isneginf(t).all(-1), 0.0, t[:, 0])  # no all -inf row
        s[:, 0] = torch.where(torch.isneginf(s).all(-1), 0.0, s[:, 0])
        rebalance = [True, False, torch.rand(count, generator=g, dtype=torch.float64) + 0.1][case % 3]
        kw = dict(num_groups=count, temperature=[1.0, 2.0, 4.0][case % 3], rebalance=rebalance,
                  intra_weighting=["uniform", "teacher"][case % 2], reduction="none")
        got = run(kernel, s, t, groups, **kw)
        assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
        assert_matches(got, oracle(s, t, groups, **kw), torch.float64)


# ----------------------------------------------------------------- shapes and layouts
@kernels
def test_one_row_one_group_and_the_most_groups(kernel):
    s, t = rand(1, V, seed=9), rand(1, V, seed=10)
    for groups in ([0] * V, [c % MAX_FUSED_GROUPS for c in range(V)], GROUPS):
        for rebalance in (True, False):
            kw = dict(groups=groups, rebalance=rebalance, reduction="none")
            assert_matches(run(kernel, s, t, **kw), oracle(s, t, **kw), torch.float64)


@kernels
def test_more_groups_than_the_kernels_take_fall_back_to_the_reference(kernel):
    groups = [c % (MAX_FUSED_GROUPS + 1) for c in range(V)]
    s, t = rand(3, V, seed=11), rand(3, V, seed=12)
    assert_matches(run(kernel, s, t, groups), oracle(s, t, groups), torch.float64)


@kernels
def test_empty_groups_contribute_nothing(kernel):
    # ids 1 and 4 have no class: the loss is that of the 3 groups renumbered
    groups = [{0: 0, 1: 2, 2: 3}[g] for g in GROUPS]
    s, t = rand(4, V, seed=13), rand(4, V, seed=14)
    prior = torch.tensor([0.6, 1.0, 0.3, 0.1, 2.0], dtype=torch.float64)  # any value on the empty groups
    for rebalance in (True, prior):
        got = run(kernel, s, t, groups, rebalance=rebalance, num_groups=5, reduction="none")
        want = oracle(s, t, rebalance=PRIOR if rebalance is prior else True, reduction="none")
        assert_matches(got, want, torch.float64)


@kernels
def test_non_contiguous_and_expanded_inputs(kernel):
    s, t = rand(5, 2 * V, seed=15, dtype=torch.float32), rand(2 * V, 5, seed=16, dtype=torch.float32)
    strided, transposed = s[:, ::2], t.t()[:, :V]
    assert not strided.is_contiguous() and not transposed.is_contiguous()
    assert_matches(run(kernel, strided, transposed), oracle(strided, transposed), torch.float32)
    row = rand(1, V, seed=17, dtype=torch.float32).expand(4, V)
    assert_matches(run(kernel, row, transposed[:4], reduction="none"),
                   oracle(row, transposed[:4], reduction="none"), torch.float32)


@kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_large_logits_and_a_group_far_below_the_row_maximum(kernel, dtype):
    s, t = rand(4, V, seed=18), rand(4, V, seed=19)
    tail = torch.tensor([g == 2 for g in GROUPS])
    s[0] += 1e4
    t[0] -= 3e4  # every logit large: only differences count
    s[1, tail] -= 400.0
    t[1, tail] -= 500.0  # the tail group ~1e-50 of the mass at tau = 2: its within-group KL still counts in full
    s[2] *= 50.0
    t[2] *= 50.0
    s, t = s.to(dtype), t.to(dtype)
    for rebalance in (True, False):
        kw = dict(temperature=2.0, rebalance=rebalance, reduction="none")
        assert_matches(run(kernel, s, t, **kw), oracle(s, t, **kw), dtype)


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k.startswith("cpu-")] or
                         [pytest.param("none", marks=pytest.mark.skip(reason="the C++ extension is not built"))])
def test_long_rows_keep_float32_accuracy(kernel):
    groups = [(c * 7) % 5 % 3 for c in range(5000)]  # partial sums flushed every 1024 entries
    s, t = rand(3, 5000, seed=20, dtype=torch.float32), rand(3, 5000, seed=21, dtype=torch.float32)
    assert_matches(run(kernel, s, t, groups, reduction="none"), oracle(s, t, groups, reduction="none"),
                   torch.float32)


@pytest.mark.skipif("cpu" not in kdfast.available_backends("ltkd"), reason="the C++ extension is not built")
def test_the_cpu_kernel_is_bitwise_the_same_on_any_number_of_threads():
    s, t = rand(64, V, seed=38, dtype=torch.float32), rand(64, V, seed=39, dtype=torch.float32)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            results.append(run("cpu", s, t))
        finally:
            torch.set_num_threads(1)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ----------------------------------------------------------------- numerics contract (docs/contract.md, section 7)
@kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_masked_classes_and_whole_groups(kernel, dtype):
    s, t = rand(5, V, seed=22), rand(5, V, seed=23)
    group1 = torch.tensor([g == 1 for g in GROUPS])
    s[:, [0, 5]] = t[:, [0, 5]] = -INF  # masked in both
    t[1, group1] = -INF  # the teacher has no mass on group 1: no intra term there (uniform weights skip it)
    s[2, group1] = t[2, group1] = -INF  # a whole group masked in both
    t[3, group1] = -INF
    s[3, int(group1.nonzero()[-1])] = -INF  # the student masks a class where the teacher has no mass: finite
    s, t = s.to(dtype), t.to(dtype)
    for rebalance in (True, PRIOR, False):
        for weighting in ("uniform", "teacher"):
            kw = dict(rebalance=rebalance, intra_weighting=weighting, reduction="none")
            got = run(kernel, s, t, **kw)
            assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
            assert torch.all(got[1][:, [0, 5]] == 0)
            assert_matches(got, oracle(s, t, **kw), dtype)


@kernels
def test_a_student_masking_a_class_the_teacher_holds_is_infinite_not_nan(kernel):
    s, t = rand(3, V, seed=24), rand(3, V, seed=25)
    s[0, 4] = -INF
    s[1, [g == 2 for g in GROUPS]] = -INF  # a whole group the teacher holds
    for rebalance in (True, False):
        loss, grad = run(kernel, s, t, rebalance=rebalance, reduction="none")
        want = oracle(s, t, rebalance=rebalance, reduction="none")
        assert loss[0] == INF and loss[1] == INF
        torch.testing.assert_close(loss[2:], want[0][2:], rtol=1e-10, atol=1e-12)
        assert torch.isfinite(grad).all()  # so a per-row upstream gradient of 0 leaves the others untouched
        torch.testing.assert_close(grad[2:], want[1][2:], rtol=1e-10, atol=1e-12)


@kernels
@pytest.mark.parametrize("where", ["teacher", "student"])
def test_a_nan_row_is_nan_and_stays_out_of_the_batch_prior(kernel, where):
    s, t = rand(4, V, seed=26), rand(4, V, seed=27)
    (t if where == "teacher" else s)[2, 7] = math.nan
    (t if where == "teacher" else s)[1, 3] = INF  # +inf is undefined too
    loss, grad = run(kernel, s, t, reduction="none")
    assert torch.isnan(loss[[1, 2]]).all() and torch.isnan(grad[[1, 2]]).all()
    assert torch.isfinite(grad[[0, 3]]).all()
    rest_loss, _ = run(kernel, s[[0, 3]], t[[0, 3]], reduction="none")
    torch.testing.assert_close(loss[[0, 3]], rest_loss, rtol=1e-10, atol=1e-12)
    assert torch.isnan(run(kernel, s, t)[0])


@kernels
@pytest.mark.parametrize("who", ["teacher", "student"])
def test_an_all_neg_inf_row_is_an_error(kernel, who):
    s, t = rand(3, V, seed=28), rand(3, V, seed=29)
    (t if who == "teacher" else s)[1] = -INF
    for rebalance in (True, False):
        with pytest.raises(ValueError, match=f"{who}_logits row 1 is all -inf"):
            run(kernel, s, t, rebalance=rebalance)


# ----------------------------------------------------------------- integration
@kernels
def test_the_module_takes_a_backend(kernel):
    s, t = rand(4, V, seed=30, dtype=torch.float32), rand(4, V, seed=31, dtype=torch.float32)
    device = kernel_device(kernel)
    with kernel_backend(kernel) as backend:
        module = LTKDLoss(GROUPS, temperature=2.0, rebalance=PRIOR, backend=backend).to(device)
        got = module(s.to(device), t.to(device))
        want = ltkd_loss(s.to(device), t.to(device), GROUPS, 2.0, rebalance=PRIOR.to(device), backend=backend)
    assert torch.equal(got, want)
    torch.testing.assert_close(got.cpu().double(), oracle(s, t, temperature=2.0, rebalance=PRIOR)[0], rtol=1e-5,
                               atol=1e-6)


def test_auto_picks_the_cpu_kernel_and_unknown_backends_are_errors():
    from kdfast.ops import backends

    s, t = rand(3, V, seed=32), rand(3, V, seed=33)
    expected = "cpu" if "cpu" in kdfast.available_backends("ltkd") else "torch"
    assert backends.resolve_backend("auto", torch.device("cpu"), "ltkd") == expected
    with pytest.raises(ValueError, match="backend must be"):
        ltkd_loss(s, t, GROUPS, backend="fortran")


@pytest.mark.parametrize("kernel", [k for k in ("cpu", "triton") if k in kdfast.available_backends("ltkd")] or
                         [pytest.param("none", marks=pytest.mark.skip(reason="no fused backend here"))])
@pytest.mark.parametrize("rebalance", ["batch", "prior"])
def test_ops_and_fullgraph_compile(kernel, rebalance):
    device = kernel_device(kernel)
    s, t = rand(4, V, seed=34, dtype=torch.float32).to(device), rand(4, V, seed=35, dtype=torch.float32).to(device)
    groups = torch.tensor(GROUPS, device=device)
    prior = PRIOR.log().to(device)
    if kernel == "cpu":
        forward, masses = torch.ops.kdfast.ltkd_forward, torch.ops.kdfast.ltkd_teacher_group_log_masses
    else:
        forward, masses = torch.ops.kdfast.ltkd_forward_triton, torch.ops.kdfast.ltkd_teacher_group_log_masses_triton
    x = s.clone().requires_grad_()
    for reduction in ("batchmean", "none"):
        torch.library.opcheck(forward.default, (x, t, groups, 3, prior, 2.0, 1.0, 1.0, False, reduction, True))
    torch.library.opcheck(masses.default, (s, t, groups, 3, 2.0))
    kw = dict(temperature=2.0, rebalance=True if rebalance == "batch" else PRIOR.to(device), num_groups=3,
              backend=kernel)
    torch._dynamo.reset()
    step = torch.compile(lambda z: ltkd_loss(z, t, groups, **kw), fullgraph=True, backend="aot_eager")
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    got = step(a)
    got.backward()
    want = ltkd_loss(b, t, groups, **kw)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_triton_kernels_compile_for_a_gpu_without_spills():
    """What the interpreter cannot show: the kernels compiled to a cubin for an H100 (sm_90), no GPU needed."""
    script = Path(__file__).with_name("compile_triton_for_gpu.py")
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([str(script.parent.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out = subprocess.run([sys.executable, str(script), "ltkd"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout)
    assert len(report) >= 4
    for variant, entry in report.items():
        assert entry["ok"], (variant, entry.get("error"))
        assert not entry["spills"], f"{variant}: registers spill to local memory"
