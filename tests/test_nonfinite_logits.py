"""Huge finite logits and non-finite ones (issue 14, defects 2 and 4).

* Huge finite logits (|z| / T up to ~1e38, temperatures down to 1e-30) are
  ordinary input: every backend matches the float64 reference.
* The contract for NaN and +inf: a row with a NaN or a +inf logit in either
  model has no distribution, so its loss is NaN and every entry of its
  gradient is NaN (NaN in, NaN out, as PyTorch's own losses; AMP's GradScaler
  relies on it to skip a step).  Other rows are unaffected.  A row that is
  all -inf (no NaN) stays an error; an ignored row stays 0.
"""

import math

import pytest
import torch

import kdfast
from kdfast.registry import divergence_cases
from conftest import KERNELS, kernel_backend, kernel_device, logits

BACKENDS = ["torch"] + KERNELS
DIVS = divergence_cases()
DIV_IDS = [f"{d}-{'-'.join(map(str, p.values()))}" if p else d for d, p in DIVS]


def run(kernel, s, t, **kw):
    """(per-row loss, gradient) of distill_loss on a kernel; upstream gradient 1 per row."""
    device = kernel_device(kernel)
    s = s.detach().to(device).clone().requires_grad_(True)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with kernel_backend(kernel) as backend:
        loss = kdfast.distill_loss(s, t.to(device), backend=backend, reduction="none", **kw)
        loss.sum().backward()
    return loss.detach().cpu().double(), s.grad.cpu().double()


def oracle(s, t, **kw):
    return run("torch", s.double(), t.double(), **kw)


def assert_close_to_oracle(kernel, s, t, rtol=2e-5, **kw):
    loss, grad = run(kernel, s, t, **kw)
    ref_loss, ref_grad = oracle(s, t, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (loss, grad)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=1e-5 * max(1.0, float(ref_grad.abs().max())))


# ----------------------------------------------------------------- huge finite logits
@pytest.mark.parametrize("kernel", BACKENDS)
def test_a_logit_gap_of_5e9_is_the_gap_not_minus_inf(kernel):
    loss, grad = run(kernel, torch.tensor([[5e9, 0.0]]), torch.zeros(1, 2))
    assert float(loss) == pytest.approx(2.5e9 - math.log(2), rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[0.5, -0.5]], dtype=torch.float64))


@pytest.mark.parametrize("kernel", BACKENDS)
def test_a_uniform_teacher_at_1e10_is_uniform(kernel):
    loss, grad = run(kernel, torch.zeros(1, 2), torch.tensor([[1e10, 1e10]]))
    assert float(loss) == 0.0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("kernel", BACKENDS)
@pytest.mark.parametrize("temperature", [1e-30, 1e-6, 1e6])
def test_extreme_temperatures(kernel, temperature):
    s, t = logits((3, 13), seed=1), logits((3, 13), seed=2)
    assert_close_to_oracle(kernel, s, t, temperature=temperature)


@pytest.mark.parametrize("divergence,params", DIVS, ids=DIV_IDS)
@pytest.mark.parametrize("kernel", BACKENDS)
@pytest.mark.parametrize("t_scale,s_scale", [(1e30, 1.0), (1e30, 1e9), (1e9, 1e30), (2e9, 2e9)])
def test_huge_finite_logits_match_the_float64_reference(kernel, divergence, params, t_scale, s_scale):
    s, t = logits((3, 19), seed=3) * s_scale, logits((3, 19), seed=4) * t_scale
    assert_close_to_oracle(kernel, s, t, divergence=divergence, **params)


@pytest.mark.parametrize("kernel", BACKENDS)
def test_skew_kl_of_a_huge_teacher_is_not_silently_zero(kernel):
    s, t = logits((2, 5), seed=0, scale=1.0), logits((2, 5), seed=1, scale=1.0) * 1e30
    loss, grad = run(kernel, s, t, divergence="skew_kl", skew=0.1)
    assert float(loss.sum()) > 0.5 and float(grad.abs().sum()) > 0.1
    assert_close_to_oracle(kernel, s, t, divergence="skew_kl", skew=0.1)


@pytest.mark.parametrize("kernel", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_largest_finite_logits_of_a_dtype(kernel, dtype):
    big = torch.finfo(dtype).max
    s = torch.tensor([[big, -big, 0.0], [0.0, big, big]], dtype=dtype)
    t = torch.tensor([[-big, big, 0.0], [big, 0.0, -big]], dtype=dtype)
    loss, grad = run(kernel, s, t, divergence="jsd", beta=0.5)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    ref_loss, _ = oracle(s, t, divergence="jsd", beta=0.5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", BACKENDS)
def test_fused_linear_with_huge_weights(kernel):
    device = kernel_device(kernel)
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(6, 8, generator=g), torch.randn(11, 8, generator=g) * 1e10
    th, tw = torch.randn(6, 8, generator=g), torch.randn(11, 8, generator=g) * 1e10
    hh = h.to(device).clone().requires_grad_(True)
    with kernel_backend(kernel) as backend:
        loss = kdfast.fused_linear_distill_loss(hh, w.to(device), th.to(device), tw.to(device), backend=backend)
        loss.backward()
    ref = kdfast.distill_loss((h.double() @ w.double().T), (th.double() @ tw.double().T), backend="torch")
    value = float(loss.detach())
    assert math.isfinite(value) and torch.isfinite(hh.grad).all()
    assert value == pytest.approx(float(ref), rel=1e-4)


# ----------------------------------------------------------------- NaN and +inf: NaN in, NaN out
BAD = {"nan": math.nan, "posinf": math.inf}


@pytest.mark.parametrize("which", ["teacher", "student"])
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("divergence,params", DIVS, ids=DIV_IDS)
@pytest.mark.parametrize("kernel", BACKENDS)
def test_a_nan_or_posinf_logit_makes_its_row_nan_and_only_its_row(kernel, divergence, params, bad, which):
    s, t = logits((4, 11), seed=5), logits((4, 11), seed=6)
    poisoned = (t if which == "teacher" else s).clone()
    poisoned[1, 3] = BAD[bad]
    s2, t2 = (s, poisoned) if which == "teacher" else (poisoned, t)
    loss, grad = run(kernel, s2, t2, divergence=divergence, **params)
    assert math.isnan(loss[1]) and torch.isnan(grad[1]).all()
    clean_loss, clean_grad = run(kernel, s, t, divergence=divergence, **params)
    keep = [0, 2, 3]
    assert torch.equal(loss[keep], clean_loss[keep]) and torch.equal(grad[keep], clean_grad[keep])


@pytest.mark.parametrize("weighting", ["wttm", "entropy"])
@pytest.mark.parametrize("kernel", BACKENDS)
def test_nan_rows_with_weightings_and_the_hard_label_term(kernel, weighting):
    s, t = logits((3, 9), seed=7), logits((3, 9), seed=8)
    t[0, 0] = math.nan
    labels = torch.tensor([1, 2, 3])
    loss, grad = run(kernel, s, t, weighting=weighting, labels=labels, hard_weight=0.5, student_temperature=2.0)
    assert math.isnan(loss[0]) and torch.isnan(grad[0]).all()
    assert torch.isfinite(loss[1:]).all() and torch.isfinite(grad[1:]).all()


@pytest.mark.parametrize("kernel", BACKENDS)
def test_an_all_nan_row_is_nan_not_an_all_minus_inf_error(kernel):
    s, t = logits((2, 7), seed=9), logits((2, 7), seed=10)
    t[0] = math.nan
    s[1, :] = -math.inf
    s[1, 2] = math.nan   # NaN among -inf entries: still NaN, not "all -inf"
    loss, grad = run(kernel, s, t)
    assert torch.isnan(loss).all() and torch.isnan(grad).all()


@pytest.mark.parametrize("kernel", BACKENDS)
def test_an_all_minus_inf_row_is_still_an_error_whatever_the_other_model(kernel):
    s, t = logits((2, 7), seed=9), logits((2, 7), seed=10)
    t[0] = -math.inf
    s[0, 1] = math.nan
    with pytest.raises(ValueError, match="row 0 is all -inf"):
        run(kernel, s, t)


@pytest.mark.parametrize("kernel", BACKENDS)
def test_an_ignored_row_with_nan_stays_zero(kernel):
    s, t = logits((3, 7), seed=11), logits((3, 7), seed=12)
    t[1] = math.nan
    loss, grad = run(kernel, s, t, labels=torch.tensor([0, -100, 2]), hard_weight=0.0)
    assert loss[1] == 0 and torch.equal(grad[1], torch.zeros_like(grad[1]))
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("kernel", BACKENDS)
def test_reduced_losses_are_nan(kernel):
    s, t = logits((3, 7), seed=13), logits((3, 7), seed=14)
    t[2, 0] = math.nan
    device = kernel_device(kernel)
    with kernel_backend(kernel) as backend:
        for reduction in ("batchmean", "sum"):
            assert math.isnan(float(kdfast.distill_loss(s.to(device), t.to(device), backend=backend,
                                                        reduction=reduction)))


# ----------------------------------------------------------------- the other loss families
def _family_loss(kernel, name, s, t):
    """(loss, gradient) of a correlation-family loss on a kernel."""
    device = kernel_device(kernel)
    s = s.detach().to(device).clone().requires_grad_(True)
    t = t.to(device)
    labels = torch.arange(s.shape[0], device=device) % s.shape[-1]
    with kernel_backend(kernel) as backend:
        if name == "dkd":
            loss = kdfast.dkd_loss(s, t, labels, 2.0, backend=backend)
        elif name == "dist":
            loss = kdfast.dist_loss(s, t, 2.0, backend=backend)
        else:
            loss = kdfast.correlation_loss(s, t, 1.0, backend=backend)
        loss.backward()
    return loss.detach().cpu().double(), s.grad.cpu().double()


@pytest.mark.parametrize("which", ["teacher", "student"])
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("name", ["dkd", "correlation", "dist"])
@pytest.mark.parametrize("kernel", BACKENDS)
def test_the_other_families_are_nan_in_nan_out(kernel, name, bad, which):
    """DKD and correlation: the poisoned row's gradient is NaN, the others' are not; DIST couples every row
    through its column correlations, so its whole gradient is NaN."""
    s, t = logits((4, 9), seed=15), logits((4, 9), seed=16)
    (t if which == "teacher" else s)[2, 4] = BAD[bad]
    loss, grad = _family_loss(kernel, name, s, t)
    assert math.isnan(loss)
    assert torch.isnan(grad[2]).all()
    if name == "dist":
        assert torch.isnan(grad).all()
    else:
        assert torch.isfinite(grad[[0, 1, 3]]).all()


@pytest.mark.parametrize("t_scale,s_scale", [(1e30, 1.0), (2e9, 2e9)])
@pytest.mark.parametrize("name", ["dkd", "correlation", "dist"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_the_other_families_take_huge_finite_logits(kernel, name, t_scale, s_scale):
    s, t = logits((4, 9), seed=17) * s_scale, logits((4, 9), seed=18) * t_scale
    loss, grad = _family_loss(kernel, name, s, t)
    ref_loss, ref_grad = _family_loss("torch", name, s.double(), t.double())
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=2e-5, atol=1e-5 * max(1.0, float(ref_grad.abs().max())))


@pytest.mark.parametrize("kernel", BACKENDS)
def test_fused_linear_agrees_nan_in_nan_out(kernel):
    """A NaN in one token's teacher hidden state: its row is NaN, so the loss and the weight gradient are;
    the other tokens' hidden-state gradients are not."""
    device = kernel_device(kernel)
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(5, 8, generator=g), torch.randn(13, 8, generator=g)
    th, tw = torch.randn(5, 8, generator=g), torch.randn(13, 8, generator=g)
    th[3, 2] = math.nan
    hh, ww = h.to(device).clone().requires_grad_(True), w.to(device).clone().requires_grad_(True)
    with kernel_backend(kernel) as backend:
        loss = kdfast.fused_linear_distill_loss(hh, ww, th.to(device), tw.to(device), backend=backend, chunk_size=2)
        loss.backward()
    assert math.isnan(float(loss.detach()))
    assert torch.isnan(hh.grad[3]).all() and torch.isfinite(hh.grad[[0, 1, 2, 4]]).all()
    assert torch.isnan(ww.grad).all()
