"""DIST, Pearson + Spearman matching and DKD: references against the published definitions,
fused kernels against the references.

Tolerances are those of the divergence kernels (conftest): values 1e-5 relative
(float32 accumulation), gradients within 1e-5 of their largest entry, 16-bit
gradients compared after one rounding to their dtype."""

import math

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.reference.correlation import (correlation_loss_reference, dist_loss_reference, exact_ranks, pearson,
                                          soft_ranks)
from kdfast.reference.dkd import dkd_loss_reference
from conftest import FUSED_BACKENDS, KERNELS, kernel_backend, kernel_device, logits

# DIST, DKD and the correlation loss have C++ and Triton kernels
fused_kernels = pytest.mark.parametrize("kernel", KERNELS or [pytest.param(
    "none", marks=pytest.mark.skip(reason="no fused backend here"))])
dkd_kernels = fused_kernels
fused_ops = pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in FUSED_BACKENDS] or [
    pytest.param("none", marks=pytest.mark.skip(reason="no fused backend here"))])


# ---------------------------------------------------------------- published definitions, ported
def torchdistill_dist(student_logits, teacher_logits, beta=1.0, gamma=1.0, tau=1.0, eps=1e-8):
    """torchdistill ``DISTLoss.forward`` (losses/mid_level.py), transcribed."""
    def pearson_correlation(y_s, y_t):
        return F.cosine_similarity(y_s - y_s.mean(1).unsqueeze(1), y_t - y_t.mean(1).unsqueeze(1), eps=eps)

    def inter_class_relation(y_s, y_t):
        return 1 - pearson_correlation(y_s, y_t).mean()

    y_s = (student_logits / tau).softmax(dim=1)
    y_t = (teacher_logits / tau).softmax(dim=1)
    inter = tau**2 * inter_class_relation(y_s, y_t)
    intra = tau**2 * inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))
    return beta * inter + gamma * intra


def mdistiller_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller ``dkd_loss`` (mdistiller/distillers/DKD.py), transcribed."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def cat_mask(t, mask1, mask2):
        return torch.cat([(t * mask1).sum(dim=1, keepdims=True), (t * mask2).sum(1, keepdims=True)], dim=1)

    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


# ---------------------------------------------------------------- DIST reference
@pytest.mark.parametrize("N,V", [(6, 10), (1, 5), (40, 3)])
def test_dist_reference_is_torchdistill(N, V):
    s, t = logits((N, V), torch.float64, seed=1), logits((N, V), torch.float64, seed=2)
    got = dist_loss_reference(s, t, temperature=2.0, beta=0.7, gamma=1.3)
    torch.testing.assert_close(got, torchdistill_dist(s, t, beta=0.7, gamma=1.3, tau=2.0), rtol=1e-14, atol=1e-14)


def test_dist_reference_matches_installed_torchdistill():
    mid_level = pytest.importorskip("torchdistill.losses.mid_level", reason="torchdistill is not installed "
                                    "(pip install --no-deps torchdistill)")
    s, t = logits((16, 100), torch.float64, seed=3), logits((16, 100), torch.float64, seed=4)
    loss = mid_level.DISTLoss("s", "out", "t", "out", beta=2.0, gamma=0.5, tau=4.0)
    expected = loss({"s": {"out": s}}, {"t": {"out": t}})
    torch.testing.assert_close(dist_loss_reference(s, t, 4.0, 2.0, 0.5), expected, rtol=1e-14, atol=1e-14)


def test_dist_reference_gradcheck():
    s = logits((4, 7), torch.float64, seed=1).requires_grad_()
    t = logits((4, 7), torch.float64, seed=2)
    assert torch.autograd.gradcheck(lambda x: dist_loss_reference(x, t, 1.5, 0.8, 1.2), (s,))


def test_dist_of_a_batch_of_one_has_a_constant_intra_term():
    s, t = logits((1, 9), torch.float64, seed=1), logits((1, 9), torch.float64, seed=2)
    intra_only = dist_loss_reference(s.requires_grad_(), t, temperature=3.0, beta=0.0, gamma=1.0)
    assert float(intra_only.detach()) == pytest.approx(9.0)
    (grad,) = torch.autograd.grad(intra_only, s)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_pearson_of_a_constant_vector_is_zero_not_nan():
    assert float(pearson(torch.ones(5), torch.arange(5.0))) == 0.0


# ---------------------------------------------------------------- DIST fused kernels
DIST_SHAPES = [(5, 1029), (1, 7), (33, 300), (3, 1), (3, 256), (7, 513)]


def _dist_loss_and_grad(s, t, backend, **kw):
    device = kernel_device(backend)
    x = s.detach().to(device).clone().requires_grad_()
    loss = kdfast.dist_loss(x, t.to(device), backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach().cpu(), grad.cpu()


def assert_dist_matches(s, t, kernel, **kw):
    with kernel_backend(kernel) as backend:
        loss, grad = _dist_loss_and_grad(s, t, backend, **kw)
    ref_loss, ref_grad = _dist_loss_and_grad(s.double(), t.double(), "torch", **kw)
    f64 = s.dtype == torch.float64
    # float32 accumulation: 1e-5 relative on the value; the gradient within 1e-5 of its largest
    # entry (bf16/fp16: one rounding of the stored gradient, 2^-8 / 2^-11, on top)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-12 if f64 else 1e-5, atol=1e-12 if f64 else 1e-6)
    assert grad.dtype == s.dtype
    scale = float(ref_grad.abs().max()) or 1.0
    rtol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[s.dtype]
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=(1e-12 if f64 else 1e-5) * scale)


@fused_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,V", DIST_SHAPES, ids=str)
def test_dist_kernel_matches_reference(N, V, dtype, kernel):
    s, t = logits((N, V), dtype, seed=N + V), logits((N, V), dtype, seed=N + V + 1)
    assert_dist_matches(s, t, kernel, temperature=2.0, beta=0.7, gamma=1.3)


@pytest.mark.skipif("triton" not in KERNELS, reason="no Triton backend")
def test_dist_triton_column_moments_summed_over_row_chunks():
    """The Triton column stage splits the rows into chunks (a program per block of columns and chunk)
    and sums their moments in chunk order: a batch of several chunks, the last one short, matches the
    reference, and the same call twice gives the same bits."""
    from kdfast.ops.triton.dist import column_chunks

    N, V = 150, 40
    chunks, rows = column_chunks(N, V)
    assert chunks == 3 and rows == 50 and column_chunks(N - 2, V) == (3, 50)  # 148 rows: a short last chunk
    for n in (N, N - 2):
        s, t = logits((n, V), seed=n), logits((n, V), seed=n + 1)
        assert_dist_matches(s, t, "triton", temperature=2.0, beta=0.7, gamma=1.3)
        with kernel_backend("triton") as backend:
            first, again = _dist_loss_and_grad(s, t, backend), _dist_loss_and_grad(s, t, backend)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@fused_kernels
def test_dist_kernel_two_rows(kernel):
    """With two rows every column Pearson is +-1 and its gradient is 0 in exact arithmetic: a
    cancellation of two terms of size tau^2 gamma / (V |c_j|), large where the two students are
    close in a column.  Allowed: 10x the float32 reference's own error, or 1e-5 of the largest
    gradient entry, whichever is larger."""
    for seed in (7, 263):
        s, t = logits((2, 256), seed=seed), logits((2, 256), seed=seed + 1)
        with kernel_backend(kernel) as backend:
            _, grad = _dist_loss_and_grad(s, t, backend, temperature=2.0)
        _, ref = _dist_loss_and_grad(s.double(), t.double(), "torch", temperature=2.0)
        _, ref32 = _dist_loss_and_grad(s, t, "torch", temperature=2.0)
        allowed = max(10 * float((ref32.double() - ref).abs().max()), 1e-5 * float(ref.abs().max()))
        assert float((grad.double() - ref).abs().max()) <= allowed


@fused_kernels
def test_dist_kernel_edge_inputs(kernel):
    s, t = logits((6, 300), seed=1), logits((6, 300), seed=2)
    s[:, 290:] = t[:, 290:] = float("-inf")       # masked classes: probability 0, still classes
    s[1] = 0.0                                     # a constant (uniform) student row
    t[2] = t[3]                                    # repeated teacher rows
    assert_dist_matches(s, t, kernel, temperature=4.0)
    big = (torch.randint(0, 2, (4, 37), generator=torch.Generator().manual_seed(0)) * 2 - 1).float() * 1e4
    assert_dist_matches(big, big.flip(0) + logits((4, 37), seed=3), kernel)
    base_s, base_t = logits((5, 2, 70), seed=4), logits((5, 2, 70), seed=5)
    assert_dist_matches(base_s[:, 0, ::2], base_t[:, 1, ::2], kernel)   # non-contiguous
    assert_dist_matches(base_s, base_t, kernel)                        # 3-d: 10 rows


@fused_kernels
def test_dist_kernel_is_deterministic_across_runs_and_thread_counts(kernel):
    s, t = logits((9, 700), seed=1), logits((9, 700), seed=2)
    with kernel_backend(kernel) as backend:
        first = _dist_loss_and_grad(s, t, backend, temperature=2.0)
        again = _dist_loss_and_grad(s, t, backend, temperature=2.0)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = _dist_loss_and_grad(s, t, backend, temperature=2.0)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(first[0], single[0]) and torch.equal(first[1], single[1])


@pytest.mark.parametrize("backend", ["torch"] + FUSED_BACKENDS)
def test_dist_errors(backend):
    device = kernel_device(backend)
    s, t = logits((3, 8), seed=1).to(device), logits((3, 8), seed=2).to(device)
    with pytest.raises(ValueError, match="temperature"):
        kdfast.dist_loss(s, t, temperature=0.0, backend=backend)
    with pytest.raises(ValueError, match=r"\(3, 8\).*\(3, 9\)"):
        kdfast.dist_loss(s, logits((3, 9)).to(device), backend=backend)
    with pytest.raises(TypeError, match="float32"):
        kdfast.dist_loss(s.long(), t, backend=backend)
    with pytest.raises(ValueError, match="at least one row"):  # no batch to correlate: not a NaN
        kdfast.dist_loss(s[:0], t[:0], backend=backend)
    if backend != "torch":
        t[1] = float("-inf")
        with pytest.raises(ValueError, match="teacher_logits row 1 is all -inf"):
            kdfast.dist_loss(s, t, backend=backend)


@fused_ops
def test_dist_op_registration_and_fullgraph_compile(backend):
    device = kernel_device(backend)
    s = logits((3, 20), seed=1).to(device).requires_grad_()
    t = logits((3, 20), seed=2).to(device)
    op = torch.ops.kdfast.dist_forward if backend == "cpu" else torch.ops.kdfast.dist_forward_triton
    torch.library.opcheck(op.default, (s, t, 2.0, 1.0, 1.0, True))
    torch._dynamo.reset()
    step = torch.compile(lambda x, y: kdfast.dist_loss(x, y, 2.0, backend=backend), fullgraph=True,
                         backend="aot_eager")
    a, b = s.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    step(a, t).backward()
    kdfast.dist_loss(b, t, 2.0, backend=backend).backward()
    torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------- DKD
@pytest.mark.parametrize("N,V", [(8, 10), (3, 2), (16, 100)])
def test_dkd_reference_is_mdistiller(N, V):
    s, t = logits((N, V), torch.float64, seed=1), logits((N, V), torch.float64, seed=2)
    y = torch.arange(N) % V
    got = dkd_loss_reference(s, t, y, temperature=4.0, alpha=1.0, beta=8.0)
    torch.testing.assert_close(got, mdistiller_dkd(s, t, y, 1.0, 8.0, 4.0), rtol=1e-12, atol=1e-12)


def test_dkd_reference_gradcheck():
    s = logits((5, 6), torch.float64, seed=1).requires_grad_()
    t = logits((5, 6), torch.float64, seed=2)
    y = torch.tensor([0, 5, -100, 2, 3])
    assert torch.autograd.gradcheck(lambda x: dkd_loss_reference(x, t, y, 2.0, 0.7, 3.0), (s,))


def test_dkd_is_safe_where_mdistiller_is_not():
    """A teacher certain of the target (its other classes masked), and logit gaps beyond mdistiller's -1000 mask."""
    s = logits((3, 5), torch.float64, seed=1)
    t = torch.full((3, 5), -math.inf, dtype=torch.float64)
    y = torch.tensor([0, 3, 4])
    t[torch.arange(3), y] = 1.0
    x = s.clone().requires_grad_()
    loss = kdfast.dkd_loss(x, t, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # with p_t = 1: TCKD = -log q_t, NCKD = 0 (no teacher mass outside the target)
    expected = 16.0 * -torch.log_softmax(s / 4.0, -1)[torch.arange(3), y].sum() / 3
    torch.testing.assert_close(loss, expected)
    huge = logits((2, 4), torch.float64, seed=2) * 1e4
    assert torch.isfinite(kdfast.dkd_loss(huge, huge.flip(1), torch.tensor([1, 2])))


def test_dkd_two_classes_have_no_non_target_term():
    s, t = logits((6, 2), torch.float64, seed=1), logits((6, 2), torch.float64, seed=2)
    y = torch.tensor([0, 1, 1, 0, 0, 1])
    only_nckd = kdfast.dkd_loss(s, t, y, alpha=0.0, beta=1.0)
    assert abs(float(only_nckd)) < 1e-15


def test_dkd_ignore_index_rows_count_nowhere():
    s, t = logits((4, 7), torch.float64, seed=1), logits((4, 7), torch.float64, seed=2)
    y = torch.tensor([1, -100, 6, -100])
    t[1] = float("-inf")  # garbage in an ignored row must not matter
    full = kdfast.dkd_loss(s, t, y)
    kept = kdfast.dkd_loss(s[[0, 2]], t[[0, 2]], y[[0, 2]])
    torch.testing.assert_close(full, kept)
    assert float(kdfast.dkd_loss(s, t, torch.full((4,), -100))) == 0.0


def _dkd_loss_and_grad(s, t, y, backend, **kw):
    device = kernel_device(backend)
    x = s.detach().to(device).clone().requires_grad_()
    loss = kdfast.dkd_loss(x, t.to(device), y.to(device), backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach().cpu(), grad.cpu()


@dkd_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,V", [(5, 1029), (3, 2), (8, 10), (4, 17), (1, 300)], ids=str)
def test_dkd_kernel_matches_reference(N, V, dtype, kernel):
    s, t = logits((N, V), dtype, seed=N + V), logits((N, V), dtype, seed=N + V + 1)
    y = torch.arange(N) * 7 % V
    if N > 1:
        y[1] = -100
    kw = dict(temperature=2.0, alpha=0.7, beta=3.0)
    with kernel_backend(kernel) as backend:
        loss, grad = _dkd_loss_and_grad(s, t, y, backend, **kw)
    ref_loss, ref_grad = _dkd_loss_and_grad(s.double(), t.double(), y, "torch", **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    f64 = dtype == torch.float64
    # same tolerances as the divergence kernels (conftest): 1e-5 on values, gradient within 1e-5 of its
    # largest entry, 16-bit gradients after one rounding to their dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-12 if f64 else 1e-5, atol=1e-12 if f64 else 1e-6)
    assert grad.dtype == dtype
    rtol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    expected = ref_grad.to(dtype).double() if dtype in (torch.bfloat16, torch.float16) else ref_grad
    scale = float(ref_grad.abs().max()) or 1.0
    torch.testing.assert_close(grad.double(), expected, rtol=rtol, atol=(1e-12 if f64 else 1e-5) * scale)


@dkd_kernels
def test_dkd_kernel_edge_inputs(kernel):
    """Certain teachers (p_t = 1), masked classes, huge logits, no valid row, non-contiguous rows."""
    s = logits((4, 40), torch.float32, seed=1)
    t = logits((4, 40), torch.float32, seed=2)
    y = torch.tensor([4, 0, 38, 16])            # even: the strided case below keeps them
    t[0] = float("-inf")
    t[0, 4] = 2.0                               # the teacher is certain of the target
    s[1, 20:] = t[1, 20:] = float("-inf")       # masked classes
    t[2] = t[2] * 1e3                           # gaps far beyond mdistiller's -1000 mask
    with kernel_backend(kernel) as backend:
        loss, grad = _dkd_loss_and_grad(s, t, y, backend)
        none_valid = _dkd_loss_and_grad(s, t, torch.full((4,), -100), backend)
        strided = _dkd_loss_and_grad(s[:, ::2], t[:, ::2], y // 2, backend)
    ref_loss, ref_grad = _dkd_loss_and_grad(s.double(), t.double(), y, "torch")
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5 * float(ref_grad.abs().max()))
    assert float(none_valid[0]) == 0.0 and torch.equal(none_valid[1], torch.zeros_like(none_valid[1]))
    ref_strided = _dkd_loss_and_grad(s[:, ::2].double(), t[:, ::2].double(), y // 2, "torch")
    torch.testing.assert_close(strided[0].double(), ref_strided[0], rtol=1e-5, atol=1e-6)


@fused_ops
def test_dkd_op_registration_and_fullgraph_compile(backend):
    device = kernel_device(backend)
    s = logits((3, 20), seed=1).to(device).requires_grad_()
    t, y = logits((3, 20), seed=2).to(device), torch.tensor([1, -100, 19], device=device)
    op = torch.ops.kdfast.dkd_forward if backend == "cpu" else torch.ops.kdfast.dkd_forward_triton
    torch.library.opcheck(op.default, (s, t, y, 4.0, 1.0, 8.0, -100, True))
    torch._dynamo.reset()
    step = torch.compile(lambda x: kdfast.dkd_loss(x, t, y, backend=backend), fullgraph=True, backend="aot_eager")
    a, b = s.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    step(a).backward()
    kdfast.dkd_loss(b, t, y, backend=backend).backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", ["torch"] + FUSED_BACKENDS)
def test_dkd_errors(backend):
    device = kernel_device(backend)
    s, t = logits((3, 5), seed=1).to(device), logits((3, 5), seed=2).to(device)
    with pytest.raises(ValueError, match="at least 2 classes"):
        kdfast.dkd_loss(s[:, :1], t[:, :1], torch.zeros(3, dtype=torch.long, device=device), backend=backend)
    with pytest.raises(ValueError, match="label 5 at row 1"):
        kdfast.dkd_loss(s, t, torch.tensor([0, 5, 1], device=device), backend=backend)
    with pytest.raises(TypeError, match="integer"):
        kdfast.dkd_loss(s, t, torch.zeros(3, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"labels shape \(4,\)"):
        kdfast.dkd_loss(s, t, torch.zeros(4, dtype=torch.long, device=device), backend=backend)
    t[2] = float("-inf")
    with pytest.raises(ValueError, match="teacher_logits row 2 is all -inf"):
        kdfast.dkd_loss(s, t, torch.tensor([0, 1, 2], device=device), backend=backend)


# ---------------------------------------------------------------- Pearson + Spearman
def test_exact_ranks_average_ties():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 5.0]])
    assert exact_ranks(x).tolist() == [[3.5, 1.0, 3.5, 2.0, 5.0]]


def test_soft_ranks_approach_exact_ranks():
    x = logits((2, 12), torch.float64, seed=1)
    torch.testing.assert_close(soft_ranks(x, 1e-4), exact_ranks(x), rtol=0, atol=1e-6)


def test_correlation_loss_of_identical_logits_is_zero_for_sharp_ranks():
    t = logits((4, 30), torch.float64, seed=2)
    loss = kdfast.correlation_loss(t, t, rank_strength=1e-6)
    assert abs(float(loss)) < 1e-9


def test_correlation_reference_gradcheck_and_weighting():
    s = logits((3, 6), torch.float64, seed=1).requires_grad_()
    t = logits((3, 6), torch.float64, seed=2)
    assert torch.autograd.gradcheck(lambda x: correlation_loss_reference(x, t, 2.0, 0.6, 1.4, 0.5), (s,))
    w = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    weighted = kdfast.correlation_loss(s, t, weighting=w)
    rho_p = pearson(torch.softmax(s, -1), torch.softmax(t, -1))
    rho_s = pearson(soft_ranks(s, 1.0), exact_ranks(t))
    torch.testing.assert_close(weighted, (w * (1 - rho_p) + (1 - w) * (1 - rho_s)).mean())
    kdfast.correlation_loss(s, t, weighting="entropy").backward()
    assert torch.isfinite(s.grad).all()


def test_correlation_loss_errors():
    s, t = logits((2, 5), seed=1), logits((2, 5), seed=2)
    with pytest.raises(ValueError, match="V <= 4096"):
        kdfast.correlation_loss(logits((1, 5000)), logits((1, 5000), seed=1))
    with pytest.raises(ValueError, match="rank_strength"):
        kdfast.correlation_loss(s, t, rank_strength=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        kdfast.correlation_loss(s, t, weighting=torch.tensor([0.5, 2.0]))
    with pytest.raises(ValueError, match="0.*got rank_strength=-1"):
        kdfast.correlation_loss(s, t, rank_strength=-1)


correlation_kernels = fused_kernels


def _correlation_loss_and_grad(s, t, backend, **kw):
    x = s.detach().to(kernel_device(backend)).requires_grad_()
    kw = {k: v.to(x.device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}  # e.g. a weighting tensor
    loss = kdfast.correlation_loss(x, t.to(x.device), backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach().cpu(), grad.cpu()


def assert_correlation_matches(s, t, kernel, **kw):
    """Value 1e-5 relative, gradient within 1e-5 of its largest entry (16-bit: after one rounding)."""
    with kernel_backend(kernel) as backend:
        loss, grad = _correlation_loss_and_grad(s, t, backend, **kw)
    ref_kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref_loss, ref_grad = _correlation_loss_and_grad(s.double(), t.double(), "torch", **ref_kw)
    f64 = s.dtype == torch.float64
    assert loss.dtype == (torch.float64 if f64 else torch.float32) and grad.dtype == s.dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-12 if f64 else 1e-5, atol=1e-12 if f64 else 1e-6)
    rtol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[s.dtype]
    expected = ref_grad.to(s.dtype).double() if s.dtype in (torch.bfloat16, torch.float16) else ref_grad
    scale = float(ref_grad.abs().max()) or 1.0
    torch.testing.assert_close(grad.double(), expected, rtol=rtol, atol=(1e-12 if f64 else 1e-5) * scale)


@correlation_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,V", [(4, 10), (3, 37), (2, 300), (1, 1), (5, 17)], ids=str)
def test_correlation_kernel_matches_reference(N, V, dtype, kernel):
    s, t = logits((N, V), dtype, seed=N + V), logits((N, V), dtype, seed=N + V + 1)
    assert_correlation_matches(s, t, kernel, temperature=2.0, pearson_weight=0.7, spearman_weight=1.3,
                               rank_strength=0.5)
    w = torch.rand(N, generator=torch.Generator().manual_seed(N))
    assert_correlation_matches(s, t, kernel, weighting=w)


@correlation_kernels
def test_correlation_kernel_edge_inputs(kernel):
    """Masked classes (-inf: probability 0, lowest rank, tied among themselves), a constant student
    row, tied teacher logits, huge logits, sharp ranks, non-contiguous and 3-d inputs, entropy weights."""
    s, t = logits((6, 40), seed=1), logits((6, 40), seed=2)
    s[:, 33:] = t[:, 33:] = float("-inf")
    s[1] = 0.0
    t[2, ::2] = 1.0
    t[3] *= 3e3
    assert_correlation_matches(s, t, kernel, temperature=3.0)
    assert_correlation_matches(s, t, kernel, rank_strength=1e-3, weighting="entropy")
    base_s, base_t = logits((5, 2, 70), seed=4), logits((5, 2, 70), seed=5)
    assert_correlation_matches(base_s[:, 0, ::2], base_t[:, 1, ::2], kernel)   # non-contiguous
    assert_correlation_matches(base_s, base_t, kernel)                        # 3-d: 10 rows


def test_correlation_reference_masked_classes_tie_without_nan():
    s = logits((2, 8), torch.float64, seed=1).requires_grad_()
    t = logits((2, 8), torch.float64, seed=2)
    masked = s.detach().clone()
    masked[:, 5:] = float("-inf")
    x = masked.requires_grad_()
    loss = correlation_loss_reference(x, t.masked_fill(masked.isinf(), float("-inf")))
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and bool((grad[:, 5:] == 0).all())
    ranks = soft_ranks(x.detach(), 1.0)
    torch.testing.assert_close(ranks[:, 5:], torch.full((2, 3), 2.0, dtype=torch.float64))  # 3 tied lowest: 1, 2, 3


@correlation_kernels
def test_correlation_kernel_is_deterministic_across_runs_and_thread_counts(kernel):
    s, t = logits((7, 90), seed=1), logits((7, 90), seed=2)
    with kernel_backend(kernel) as backend:
        first = _correlation_loss_and_grad(s, t, backend)
        assert all(torch.equal(a, b) for a, b in zip(first, _correlation_loss_and_grad(s, t, backend)))
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = _correlation_loss_and_grad(s, t, backend)
        finally:
            torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, single))


@fused_ops
def test_correlation_op_registration_and_fullgraph_compile(backend):
    device = kernel_device(backend)
    s = logits((3, 20), seed=1).to(device).requires_grad_()
    t, w = logits((3, 20), seed=2).to(device), torch.tensor([0.2, 0.5, 1.0], device=device)
    op = torch.ops.kdfast.correlation_forward if backend == "cpu" else torch.ops.kdfast.correlation_forward_triton
    torch.library.opcheck(op.default, (s, t, w, 2.0, 1.0, 1.0, 0.5, True))
    torch.library.opcheck(op.default, (s, t, None, 2.0, 1.0, 1.0, 0.5, True))
    torch._dynamo.reset()
    step = torch.compile(lambda x: kdfast.correlation_loss(x, t, weighting=w, backend=backend), fullgraph=True,
                         backend="aot_eager")
    a, b = s.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    step(a).backward()
    kdfast.correlation_loss(b, t, weighting=w, backend=backend).backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", ["torch"] + FUSED_BACKENDS)
def test_correlation_rows_must_be_defined(backend):
    device = kernel_device(backend)
    s, t = logits((3, 5), seed=1).to(device), logits((3, 5), seed=2).to(device)
    t[2] = float("-inf")
    with pytest.raises(ValueError, match="teacher_logits row 2 is all -inf"):
        kdfast.correlation_loss(s, t, backend=backend)
    with pytest.raises(ValueError, match="student_logits row 0 is all -inf"):
        kdfast.correlation_loss(t.flip(0), s, backend=backend)
