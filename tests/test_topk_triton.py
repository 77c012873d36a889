"""topk_distill_loss(tail="bucket") on the Triton op (kdfast/ops/triton/topk_bucket.py) against the PyTorch form.

Without a GPU the kernels run through Triton's interpreter on CPU tensors
(conftest.py sets ``TRITON_INTERPRET=1``), so the shapes are tiny; the
interpreter's tile is 16 entries, so V = 37 spans three tiles, the last one
partial.  float64 students run the whole op in float64 and are compared to
the float64 PyTorch form to float64 rounding (rtol 1e-10, atol 1e-12);
float32 and 16-bit students are compared to the float64 PyTorch form on the
same values with conftest's tolerances (float32: values rtol 1e-5 / atol 1e-6,
gradients rtol 1e-5, atol 1e-5 of the largest entry + 1e-7; 16-bit gradients
after one rounding to their dtype).
"""

import math

import pytest
import torch

import kdfast
from kdfast.llm.topk import log1mexp, topk_distill_loss

from conftest import GRAD_TOL, KERNELS, VALUE_ATOL, VALUE_RTOL, kernel_device, logits

pytestmark = pytest.mark.skipif("triton" not in KERNELS, reason="the triton backend cannot run here")

ALL_DIVERGENCES = list(kdfast.DIVERGENCES)
N, V = 5, 37
DEVICE = kernel_device("triton")


def top_k(teacher_logits, k):
    """(indices, log-probs at temperature 1) of the teacher's top-k, in a shuffled order (a cache's need not sort)."""
    logprobs, indices = torch.log_softmax(teacher_logits, -1).topk(k, -1)
    perm = torch.argsort(torch.rand(indices.shape, generator=torch.Generator().manual_seed(1)), -1)
    return indices.gather(-1, perm), logprobs.gather(-1, perm)


def teacher(k, seed=2, shape=(N, V), dtype=torch.float64):
    """A teacher's top-k (indices, log-probs in ``dtype``) for rows of ``shape``."""
    idx, lp = top_k(logits(shape, torch.float64, seed=seed), k)
    return idx, lp.to(dtype)


def run(backend, student, idx, lp, upstream=True, **kw):
    """(loss, d loss / d student) on the CPU; the backward has a non-unit upstream gradient."""
    device = DEVICE if backend in ("triton", "auto") else torch.device("cpu")
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    s = student.detach().to(device).requires_grad_(True)
    loss = topk_distill_loss(s, idx.to(device), lp.to(device), tail="bucket", backend=backend, **kw)
    seed = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=device).reshape(loss.shape)
    (grad,) = torch.autograd.grad(loss, s, seed if upstream else None)
    return loss.detach().cpu(), grad.cpu()


def check_float64(student, idx, lp, **kw):
    """The Triton op in float64 is the float64 PyTorch form to rounding; returns (loss, grad)."""
    got = run("triton", student, idx, lp, **kw)
    want = run("torch", student, idx, lp, **kw)
    assert got[1].dtype == student.dtype and got[1].shape == student.shape
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
    return got


def check_against_float64(student, idx, lp, value_rtol=VALUE_RTOL, **kw):
    """A float32/bfloat16/float16 student against the float64 PyTorch form on the same values."""
    loss, grad = run("triton", student, idx, lp, **kw)
    ref_loss, ref_grad = run("torch", student.double(), idx, lp, **kw)  # float64 throughout
    assert loss.dtype == torch.float32 and grad.dtype == student.dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=value_rtol, atol=VALUE_ATOL)
    tol = GRAD_TOL[student.dtype]
    expected = ref_grad.to(student.dtype).double() if student.dtype != torch.float32 else ref_grad
    scale = float(ref_grad.abs().max()) or 1.0
    torch.testing.assert_close(grad.double(), expected, rtol=tol["rtol"], atol=tol["atol"] * scale + tol["atol_abs"])


# ----------------------------------------------------------------- every divergence, k = 1, 3, V
@pytest.mark.parametrize("k", [1, 3, V])
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
def test_every_divergence_is_the_pytorch_form_in_float64(divergence, k):
    s = logits((N, V), torch.float64, seed=3)
    idx, lp = teacher(k)
    check_float64(s, idx, lp, divergence=divergence, temperature=2.0, student_temperature=1.5, scale=3.0,
                  reduction="none")


@pytest.mark.parametrize("options", [
    dict(divergence="jsd", beta=0.3), dict(divergence="renyi", alpha=2.0), dict(divergence="ab", alpha=0.7, beta=0.2),
    dict(divergence="skew_kl", skew=0.3, temperature=0.7), dict(divergence="skew_reverse_kl", skew=0.2),
    dict(divergence="kl", student_temperature=0.6), dict(divergence="kl", soft_weight=0.25, scale=4.0),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_divergence_parameters_and_temperatures(options):
    s = logits((N, V), torch.float64, seed=4)
    idx, lp = teacher(5, seed=5)
    check_float64(s, idx, lp, **options)


@pytest.mark.parametrize("k", [3, V])
@pytest.mark.parametrize("divergence", ["kl", "jsd", "tvd"])
def test_given_tail_logprobs(divergence, k):
    s = logits((N, V), torch.float64, seed=6)
    idx, lp = teacher(k, seed=7)
    rest = log1mexp(torch.logsumexp(lp, -1)) - 0.3  # a cache's remainder, smaller than 1 - sum
    check_float64(s, idx, lp, tail_logprobs=rest, divergence=divergence, temperature=1.7)


# ----------------------------------------------------------------- labels, ignored rows, the hard term, reductions
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("ignore_index", [-100, 0])
@pytest.mark.parametrize("hard_weight", [0.0, 0.7])
@pytest.mark.parametrize("reduction,normalizer", [("batchmean", None), ("batchmean", 7.0), ("sum", None),
                                                  ("none", None)])
def test_labels_ignored_rows_hard_term_and_reductions(reduction, normalizer, hard_weight, ignore_index, k):
    s = logits((N, V), torch.float64, seed=8)
    idx, lp = teacher(k, seed=9)
    labels = torch.tensor([4, ignore_index, 36, int(idx[3, 0]), 1])  # row 3: the label on the support
    # the ignored row may hold anything: NaN logits, indices out of range, NaN log-probs and tail
    s[1] = float("nan")
    idx[1] = torch.tensor([V + 5, -1, 0])[:k]
    lp[1] = float("nan")
    rest = log1mexp(torch.logsumexp(lp, -1)) - 0.1
    loss, grad = check_float64(s, idx, lp, labels=labels, ignore_index=ignore_index, hard_weight=hard_weight,
                               reduction=reduction, normalizer=normalizer, temperature=1.5, student_temperature=1.2,
                               tail_logprobs=rest, divergence="jsd")
    assert torch.isfinite(loss).all() and not grad[1].any()  # the ignored row: no gradient, nothing read


def test_no_valid_row_gives_zero_and_zero_gradient():
    s = logits((3, V), torch.float64, seed=10)
    idx, lp = teacher(4, seed=11, shape=(3, V))
    loss, grad = check_float64(s, idx, lp, labels=torch.full((3,), -100), hard_weight=0.5)
    assert float(loss) == 0.0 and not grad.any()


def test_zero_rows_and_a_one_entry_vocabulary():
    for reduction in ("batchmean", "none"):
        check_float64(torch.zeros(0, V, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.long),
                      torch.zeros(0, 3, dtype=torch.float64), reduction=reduction)
    one = logits((4, 1), torch.float64, seed=40)  # k = V = 1: nothing off the support, a loss of 0
    loss, grad = check_float64(one, torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, 1, dtype=torch.float64),
                               labels=torch.tensor([0, -100, 0, 0]), hard_weight=0.5, divergence="jsd")
    assert float(loss) == 0.0 and not grad.any()


# ----------------------------------------------------------------- dtypes, layouts, indices
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [3, V])
def test_float32_and_16_bit_students_against_the_float64_form(student_dtype, k):
    s = logits((N, V), student_dtype, seed=12)
    idx, lp = teacher(k, seed=13, dtype=torch.float32)
    labels = torch.tensor([3, -100, 0, 20, int(idx[4, 1])])
    check_against_float64(s, idx, lp, divergence="jsd", temperature=2.0, student_temperature=1.3, labels=labels,
                          hard_weight=0.4)


def test_float16_log_probs_and_int32_indices_with_a_float32_tail():
    s = logits((N, V), torch.float32, seed=14)
    idx, lp = teacher(6, seed=15)
    rest = log1mexp(torch.logsumexp(lp, -1)).float()
    got = run("triton", s, idx.int(), lp.half(), tail_logprobs=rest, temperature=2.0)
    want = run("triton", s, idx, lp.half(), tail_logprobs=rest, temperature=2.0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # int32 and int64 indices agree bit for bit
    check_against_float64(s, idx.int(), lp.half(), tail_logprobs=rest, temperature=2.0)


@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float64_log_probs_run_in_float64_for_any_student(student_dtype):
    s = logits((N, V), student_dtype, seed=16)
    idx, lp = teacher(4, seed=17)
    kw = dict(divergence="jsd", labels=torch.tensor([3, -100, 0, 20, int(idx[4, 1])]), hard_weight=0.4)
    loss, grad = run("triton", s, idx, lp, **kw)
    want = run("torch", s, idx, lp, **kw)
    assert loss.dtype == want[0].dtype == torch.float64 and grad.dtype == student_dtype
    torch.testing.assert_close(loss, want[0], rtol=1e-10, atol=1e-12)
    # the gradient, computed in float64, is rounded to the student's dtype (16-bit: through float32 first)
    tol = GRAD_TOL[student_dtype]
    scale = float(want[1].double().abs().max())
    torch.testing.assert_close(grad.double(), want[1].double(), rtol=tol["rtol"],
                               atol=1e-9 if student_dtype == torch.float32 else tol["atol"] * scale + tol["atol_abs"])


def test_non_contiguous_students():
    idx, lp = teacher(4, seed=18)
    labels = torch.tensor([1, 2, -100, 4, 36])
    kw = dict(labels=labels, hard_weight=0.5, temperature=2.0, divergence="hellinger")
    transposed = logits((V, N), torch.float64, seed=19).t()  # rows of vocabulary stride N
    assert transposed.stride(-1) != 1
    check_float64(transposed, idx, lp, **kw)
    sliced = logits((N, 2 * V + 3), torch.float64, seed=20)[:, 3:2 * V + 3:2]  # row stride 2V + 3, stride 2
    check_float64(sliced, idx, lp, **kw)
    leading = logits((1, V, N), torch.float64, seed=21).transpose(1, 2)  # (1, N, V), leading dims kept
    check_float64(leading, idx[None], lp[None], **dict(kw, labels=labels[None]))


def test_3d_inputs_and_int32_indices():
    s = logits((2, 3, V), torch.float64, seed=22)
    idx, lp = teacher(5, seed=23, shape=(2, 3, V))
    check_float64(s, idx.int(), lp, labels=torch.tensor([[1, -100, 3], [0, 36, 5]]), hard_weight=0.3,
                  reduction="none")


# ----------------------------------------------------------------- -inf, large logits, NaN, the infinite reverse_kl
def test_minus_inf_logits_on_and_off_the_support():
    s = logits((N, V), torch.float64, seed=24)
    idx, lp = teacher(4, seed=25)
    support = torch.zeros(N, V, dtype=torch.bool).scatter(-1, idx, True)
    s[0, idx[0, 1]] = -math.inf  # one support entry
    s[1, (~support[1]).nonzero()[:5, 0]] = -math.inf  # some entries off the support
    s[2] = torch.where(support[2], s[2], -math.inf)  # everything off the support: an empty student bucket
    s[4, idx[4, 0]] = -math.inf  # a support entry that is the label (an infinite cross-entropy)
    s[4, (~support[4]).nonzero()[-3:, 0]] = -math.inf
    labels = torch.tensor([1, 2, int(idx[2, 0]), 7, int(idx[4, 0])])
    off_dead = ~support & (s == -math.inf)
    off_dead[torch.arange(N), labels] = False  # the cross-entropy's -1 at the label stays
    for divergence in ("kl", "jsd", "tvd"):
        loss, grad = check_float64(s, idx, lp, divergence=divergence, labels=labels, hard_weight=0.5,
                                   reduction="none", student_temperature=1.3)
        assert torch.isfinite(grad).all() and not grad[off_dead].any()


@pytest.mark.parametrize("divergence", ["kl", "jsd", "tvd"])
def test_minus_inf_on_the_whole_support_is_the_cpu_kernel(divergence):
    # q = 0 on every support entry: the PyTorch form's gradient there is NaN
    # (autograd through log_softmax of -inf entries); the Triton op gives the
    # limit, exactly as the C++ kernel does.  Values agree with both.
    s = logits((N, V), torch.float64, seed=24)
    idx, lp = teacher(4, seed=25)
    support = torch.zeros(N, V, dtype=torch.bool).scatter(-1, idx, True)
    s[3] = torch.where(support[3], -math.inf, s[3])
    kw = dict(divergence=divergence, labels=torch.tensor([1, 2, 3, 7, 0]), hard_weight=0.5, reduction="none")
    loss, grad = run("triton", s, idx, lp, **kw)
    want = run("torch", s, idx, lp, **kw)
    torch.testing.assert_close(loss, want[0], rtol=1e-10, atol=1e-12)
    keep = torch.ones(N, V, dtype=torch.bool)
    keep[3] = ~support[3]
    torch.testing.assert_close(grad[keep], want[1][keep], rtol=1e-10, atol=1e-12)
    assert torch.isnan(want[1][3][support[3]]).all() and torch.isfinite(grad).all()
    if "cpu" in kdfast.available_backends():
        torch.testing.assert_close(grad, run("cpu", s, idx, lp, **kw)[1], rtol=1e-10, atol=1e-12)


def test_all_minus_inf_off_the_support_with_k_equal_v_minus_one():
    s = logits((N, V), torch.float64, seed=26)
    idx, lp = teacher(V - 1, seed=27)
    s[torch.arange(N), torch.ones(N, V, dtype=torch.bool).scatter(-1, idx, False).nonzero()[:, 1]] = -math.inf
    check_float64(s, idx, lp, divergence="jsd")


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_very_large_logits_keep_the_precision_of_their_differences(sign):
    # 1e4 + O(1) in float32: a logsumexp of size 1e4 rounds to ~5e-4; the op
    # works relative to the row's maximum, so float32 precision is kept.
    s = (sign * 1e4 + logits((N, V), torch.float64, seed=28)).float()
    s[0, :3] = -1e4 * sign  # entries 2e4 away: probability 0 (and one may be on the support)
    idx, lp = teacher(4, seed=29, dtype=torch.float32)
    labels = torch.tensor([0, 5, 9, int(idx[3, 2]), 36])
    check_against_float64(s, idx, lp, divergence="kl", labels=labels, hard_weight=0.5, temperature=1.5)
    check_float64(s.double(), idx, lp.double(), divergence="reverse_kl", labels=labels, hard_weight=0.5,
                  student_temperature=0.8)


def test_empty_teacher_bucket_reverse_kl_is_infinite_as_in_the_pytorch_form():
    s = logits((3, V), torch.float64, seed=30)
    idx, lp = teacher(4, seed=31, shape=(3, V))
    empty = torch.full((3,), -math.inf, dtype=torch.float64)
    for reduction in ("batchmean", "none"):
        got = run("triton", s, idx, lp, tail_logprobs=empty, divergence="reverse_kl", reduction=reduction)
        want = run("torch", s, idx, lp, tail_logprobs=empty, divergence="reverse_kl", reduction=reduction)
        assert bool((got[0] == math.inf).all()) and torch.equal(got[0], want[0])
        # the gradient of an infinite loss: the PyTorch form's own, -inf on the support and NaN off it
        torch.testing.assert_close(got[1], want[1], equal_nan=True)
    # the same teacher is finite for kl (p log p/q never sees the empty bucket)
    check_float64(s, idx, lp, tail_logprobs=empty, divergence="kl")


def test_nan_logit_in_a_valid_row_gives_nan_there_only():
    s = logits((3, V), torch.float32, seed=32)
    idx, lp = teacher(4, seed=33, shape=(3, V), dtype=torch.float32)
    off = int(torch.ones(V, dtype=torch.bool).scatter(0, idx[1], False).nonzero()[0])
    s[1, off] = float("nan")
    loss, grad = run("triton", s, idx, lp, reduction="none")
    want = run("torch", s, idx, lp, reduction="none")
    assert torch.isnan(loss[1]) and torch.isnan(want[0][1]) and torch.isnan(grad[1]).all()
    torch.testing.assert_close(loss[[0, 2]], want[0][[0, 2]])
    torch.testing.assert_close(grad[[0, 2]], want[1][[0, 2]])


# ----------------------------------------------------------------- errors, autograd, compile
def test_refuses_what_the_pytorch_form_refuses():
    s = logits((3, V), torch.float32)
    idx, lp = teacher(4, shape=(3, V), dtype=torch.float32)
    bad = idx.clone()
    bad[1, 2] = bad[1, 0]
    kw = dict(tail="bucket", backend="triton")
    with pytest.raises(ValueError, match="topk_indices row 1 repeats index"):
        topk_distill_loss(s.to(DEVICE), bad.to(DEVICE), lp.to(DEVICE), **kw)
    out = idx.clone()
    out[2, 1] = V
    with pytest.raises(ValueError, match=rf"topk_indices value {V} at row 2 is outside \[0, {V}\)"):
        topk_distill_loss(s.to(DEVICE), out.to(DEVICE), lp.to(DEVICE), **kw)
    with pytest.raises(ValueError, match="must be <= 0"):
        topk_distill_loss(s.to(DEVICE), idx.to(DEVICE), lp.abs().to(DEVICE), **kw)
    dead = s.clone()
    dead[2] = -math.inf
    with pytest.raises(ValueError, match="student_logits row 2 is all -inf: the student distribution is undefined"):
        topk_distill_loss(dead.to(DEVICE), idx.to(DEVICE), lp.to(DEVICE), **kw)
    # a teacher with no mass at all: the C++ op's error (the PyTorch form returns a meaningless value)
    with pytest.raises(ValueError, match=r"topk_logprobs row 0 \(with its tail\) is all -inf"):
        topk_distill_loss(s.to(DEVICE), idx.to(DEVICE), torch.full_like(lp, -math.inf).to(DEVICE),
                          tail_logprobs=torch.full((3,), -math.inf).to(DEVICE), **kw)


def test_without_a_gradient_and_with_a_retained_graph():
    s = logits((N, V), torch.float32, seed=34)
    idx, lp = teacher(3, seed=35, dtype=torch.float32)
    with torch.no_grad():
        plain = topk_distill_loss(s.to(DEVICE), idx.to(DEVICE), lp.to(DEVICE), tail="bucket", backend="triton")
    x = s.to(DEVICE).requires_grad_(True)
    loss = topk_distill_loss(x, idx.to(DEVICE), lp.to(DEVICE), tail="bucket", backend="triton")
    assert torch.equal(plain, loss.detach())
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(2.0 * loss, x)
    torch.testing.assert_close(second, 2.0 * first)
    with pytest.raises(RuntimeError, match="double backward"):
        y = s.to(DEVICE).requires_grad_(True)
        torch.autograd.grad(topk_distill_loss(y, idx.to(DEVICE), lp.to(DEVICE), tail="bucket", backend="triton"), y,
                            create_graph=True)


def test_auto_on_a_cuda_device_runs_the_op():
    if DEVICE.type != "cuda":
        pytest.skip("'auto' picks Triton on CUDA tensors only")
    s = logits((N, V), torch.float32, seed=36)
    idx, lp = teacher(3, seed=37, dtype=torch.float32)
    got = run("auto", s, idx, lp)
    want = run("triton", s, idx, lp)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_under_torch_compile_fullgraph(reduction):
    s = logits((6, 30), torch.float32, seed=15)
    idx, lp = teacher(5, seed=16, shape=(6, 30), dtype=torch.float32)
    labels = torch.tensor([1, 2, -100, 4, 5, 6]).to(DEVICE)
    kw = dict(temperature=2.0, labels=labels, hard_weight=0.5, reduction=reduction)
    i, t = idx.to(DEVICE), lp.to(DEVICE)
    compiled = torch.compile(lambda x: topk_distill_loss(x, i, t, tail="bucket", backend="triton", **kw),
                             fullgraph=True, backend="aot_eager")
    x = s.to(DEVICE).requires_grad_(True)
    loss = compiled(x)
    seed = torch.linspace(0.5, 1.5, loss.numel(), device=DEVICE).reshape(loss.shape)
    (grad,) = torch.autograd.grad(loss, x, seed)
    want = run("torch", s, idx, lp, **dict(kw, labels=labels.cpu()))
    torch.testing.assert_close(loss.detach().cpu(), want[0], rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad.cpu(), want[1], rtol=2e-5, atol=2e-6)


def test_fake_kernel_and_op_registration():
    from kdfast.ops.triton import topk_bucket

    s = logits((N, V), torch.float32, seed=38).to(DEVICE)
    idx, lp = teacher(3, seed=39, dtype=torch.float32)
    teacher_rows = torch.cat([lp, log1mexp(torch.logsumexp(lp, -1, keepdim=True))], -1).to(DEVICE)
    args = (s, idx.to(DEVICE), idx.sort(-1).values.to(DEVICE), teacher_rows, None, 0, [0.0] * len(kdfast.registry.KERNEL_PARAMS), 1.0, 1.0, -100,
            0.0, 1.0)
    torch.library.opcheck(topk_bucket.triton_topk_bucket_forward, args + ("batchmean", None, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(topk_bucket.triton_topk_bucket_forward, args + ("none", None, False),
                          test_utils=("test_schema", "test_faketensor"))
    # without the ordered indices the op sorts them itself
    torch.library.opcheck(topk_bucket.triton_topk_bucket_forward, (args[:2] + (None,) + args[3:]) + ("sum", None, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_fused_linear_top_k_bucket_chunks_on_triton():
    from kdfast.llm.fused_linear import fused_linear_topk_distill_loss

    g = torch.Generator().manual_seed(41)
    hidden, weight = torch.randn(10, 8, generator=g, dtype=torch.float64), torch.randn(V, 8, generator=g,
                                                                                      dtype=torch.float64)
    idx, lp = teacher(4, seed=42, shape=(10, V))
    labels = torch.randint(0, V, (10,), generator=g)
    labels[3] = -100
    rest = log1mexp(torch.logsumexp(lp, -1)) - 0.05
    results = []
    for backend in ("triton", "torch"):
        device = DEVICE if backend == "triton" else torch.device("cpu")
        h, w = hidden.to(device).requires_grad_(True), weight.to(device).requires_grad_(True)
        loss = fused_linear_topk_distill_loss(h, w, idx.to(device), lp.to(device), labels.to(device), tail="bucket",
                                              tail_logprobs=rest.to(device), chunk_size=3, backend=backend,
                                              hard_weight=0.3, temperature=2.0, divergence="jsd")
        results.append([x.cpu() for x in (loss.detach(), *torch.autograd.grad(loss, (h, w)))])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_fused_linear_top_k_checks_the_teacher_once_and_names_the_call_row(tail, monkeypatch):
    """The chunks share one teacher-rows pass of the whole call: one kernel launch (one host sync), and a
    bad row in a later chunk is reported as the call's row, before any chunk runs."""
    from kdfast.llm.fused_linear import fused_linear_topk_distill_loss
    from kdfast.ops import topk as ops_topk

    g = torch.Generator().manual_seed(43)
    hidden, weight = torch.randn(10, 8, generator=g), torch.randn(V, 8, generator=g)
    idx, lp = teacher(4, seed=44, shape=(10, V), dtype=torch.float32)
    labels = torch.randint(0, V, (10,), generator=g)
    labels[2] = -100
    calls = []
    real = ops_topk.triton_teacher_rows
    monkeypatch.setattr(ops_topk, "triton_teacher_rows", lambda *a, **kw: calls.append(real(*a, **kw)) or calls[-1])
    monkeypatch.setattr("kdfast.llm.fused_linear.triton_teacher_rows", ops_topk.triton_teacher_rows)
    results = []
    for backend in ("triton", "torch"):
        device = DEVICE if backend == "triton" else torch.device("cpu")
        h, w = hidden.to(device).requires_grad_(True), weight.to(device).requires_grad_(True)
        loss = fused_linear_topk_distill_loss(h, w, idx.to(device), lp.to(device), labels.to(device), tail=tail,
                                              chunk_size=3, backend=backend, hard_weight=0.3, temperature=2.0)
        results.append([x.cpu() for x in (loss.detach(), *torch.autograd.grad(loss, (h, w)))])
    assert len(calls) == 1  # four chunks, one pass
    # held for the whole call: the sorted copy only where the bucket's sweep reads it
    assert (calls[0].ordered is None) == (tail == "renormalize")
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    bad = idx.clone()
    bad[8, 1] = bad[8, 0]  # row 8: the third chunk's
    with pytest.raises(ValueError, match="row 8"):
        fused_linear_topk_distill_loss(hidden.to(DEVICE), weight.to(DEVICE), bad.to(DEVICE), lp.to(DEVICE),
                                       labels.to(DEVICE), tail=tail, chunk_size=3, backend="triton")


def test_student_all_minus_inf_on_the_support_names_its_row_and_ignored_rows_do_not_count():
    """The renormalised tail finds such a row through the dense kernel's one status read, then names it in
    the top-k form; an ignored row may be all -inf there."""
    idx, lp = teacher(3, seed=45, dtype=torch.float32)
    s = logits((N, V), torch.float32, seed=46)
    s[3, idx[3]] = -math.inf
    with pytest.raises(ValueError, match="student_logits row 3 is all -inf on its top-k support"):
        topk_distill_loss(s.to(DEVICE), idx.to(DEVICE), lp.to(DEVICE), backend="triton")
    labels = torch.tensor([1, 2, 0, -100, 4])
    got = topk_distill_loss(s.to(DEVICE), idx.to(DEVICE), lp.to(DEVICE), labels=labels.to(DEVICE), backend="triton")
    want = topk_distill_loss(s, idx, lp, labels=labels, backend="torch")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
