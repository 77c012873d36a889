"""topk_distill_loss: the sparse (top-k) teacher against dense computations of the same distributions."""

import math

import pytest
import torch

import kdfast
from kdfast.llm.topk import TAILS, TopKDistillLoss, log1mexp, teacher_log_probs, topk_distill_loss

from conftest import logits

ALL_DIVERGENCES = list(kdfast.DIVERGENCES)
N, V, K = 6, 13, 4


def dense_teacher(seed=2, shape=(N, V), dtype=torch.float64):
    return logits(shape, dtype=dtype, seed=seed)


def top_k(teacher_logits, k):
    """(indices, log-probs at temperature 1, support mask) of the teacher's top-k, as a cache stores them."""
    logprobs, indices = torch.log_softmax(teacher_logits, -1).topk(k, -1)
    support = torch.zeros_like(teacher_logits, dtype=torch.bool).scatter(-1, indices, True)
    return indices, logprobs, support


def off_support(x, support):
    return torch.where(support, x, torch.full_like(x, -math.inf))


def value_and_grad(fn, student):
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s)
    (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)).sum().backward()
    return loss.detach(), s.grad


def assert_same(a, b, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(a[1], b[1], rtol=rtol, atol=atol)


# ----------------------------------------------------------------- renormalize
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
@pytest.mark.parametrize("temperature,student_temperature", [(1.0, None), (2.5, None), (0.7, 1.0)])
def test_renormalize_is_dense_loss_of_both_models_restricted_to_the_support(divergence, temperature,
                                                                            student_temperature):
    s, t = logits((N, V), torch.float64, seed=1), dense_teacher()
    idx, lp, support = top_k(t, K)
    kw = dict(divergence=divergence, temperature=temperature, student_temperature=student_temperature,
              reduction="none")
    got = value_and_grad(lambda x: topk_distill_loss(x, idx, lp, **kw), s)
    want = value_and_grad(lambda x: kdfast.distill_loss(off_support(x, support), off_support(t, support),
                                                        backend="torch", **kw), s)
    assert_same(got, want)
    assert bool((got[1][~support] == 0).all()), "logits off the support get no gradient when renormalising"


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
def test_k_equal_to_V_is_the_dense_loss(tail, divergence):
    s, t = logits((2, 3, V), torch.float64, seed=3), dense_teacher(seed=4, shape=(2, 3, V))
    idx, lp, _ = top_k(t, V)
    perm = torch.argsort(torch.rand(idx.shape, generator=torch.Generator().manual_seed(0)), -1)
    idx, lp = idx.gather(-1, perm), lp.gather(-1, perm)  # any order of the k entries
    kw = dict(divergence=divergence, temperature=1.7)
    got = value_and_grad(lambda x: topk_distill_loss(x, idx, lp, tail=tail, **kw), s)
    want = value_and_grad(lambda x: kdfast.distill_loss(x, t, backend="torch", **kw), s)
    assert_same(got, want)


# ----------------------------------------------------------------- bucket
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_bucket_kl_with_all_teacher_mass_on_top_k_is_dense_kl_of_the_full_student(temperature):
    s, t = logits((N, V), torch.float64, seed=5), dense_teacher(seed=6)
    idx, _, support = top_k(t, K)
    t_on_k = off_support(t, support)  # a teacher whose whole mass is on its top-k
    lp = torch.log_softmax(t_on_k, -1).gather(-1, idx)
    # 1 - sum(exp(lp)) is ~1e-16 of rounding, which tempering raises to
    # ~1e-16^(1/tau): at tau != 1 the exact empty remainder is passed.
    empty = torch.full((N,), -math.inf, dtype=torch.float64) if temperature != 1.0 else None
    got = value_and_grad(lambda x: topk_distill_loss(x, idx, lp, tail="bucket", tail_logprobs=empty,
                                                     temperature=temperature), s)
    want = value_and_grad(lambda x: kdfast.distill_loss(x, t_on_k, temperature=temperature, backend="torch"), s)
    assert_same(got, want)
    assert bool((got[1][~support] != 0).all()), "with a bucket every student logit gets a gradient"


def test_given_tail_logprobs_replace_the_remainder_of_the_top_k():
    s, t = logits((N, V), torch.float64, seed=40), dense_teacher(seed=41)
    idx, lp, support = top_k(t, K)
    exact_tail = torch.logsumexp(off_support(torch.log_softmax(t, -1), ~support), -1)
    kw = dict(tail="bucket", divergence="jsd", temperature=2.0, reduction="none")
    derived = topk_distill_loss(s, idx, lp, **kw)
    torch.testing.assert_close(topk_distill_loss(s, idx, lp, tail_logprobs=exact_tail, **kw), derived)
    # float16 log-probs: the float32 remainder is what keeps the loss at its float64 value.
    truth = topk_distill_loss(s, idx, lp, tail_logprobs=exact_tail, **kw)
    with_tail = topk_distill_loss(s, idx, lp.half(), tail_logprobs=exact_tail.float(), **kw)
    without = topk_distill_loss(s, idx, lp.half(), **kw)
    assert float((with_tail - truth).abs().max()) < float((without - truth).abs().max())


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "tvd", "renyi", "skew_kl", "skew_reverse_kl"])
def test_bucket_is_dense_divergence_when_the_teacher_tail_has_the_students_shape(divergence):
    # Coarsening the tail into one bucket loses nothing for these divergences
    # when p and q are proportional inside it: build such a dense teacher.
    s, t = logits((N, V), torch.float64, seed=7), dense_teacher(seed=8)
    idx, lp, support = top_k(t, K)
    logq = torch.log_softmax(s, -1)
    log_q_tail = torch.logsumexp(off_support(logq, ~support), -1, keepdim=True)
    log_p_tail = log1mexp(torch.logsumexp(lp, -1, keepdim=True))
    logp = torch.where(support, torch.log_softmax(t, -1), logq - log_q_tail + log_p_tail)
    got = topk_distill_loss(s, idx, lp, tail="bucket", divergence=divergence, reduction="none")
    want = kdfast.distill_loss(s, logp, divergence=divergence, reduction="none", backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_bucket_rows_conserve_mass():
    s, t = logits((N, V), torch.float64, seed=9), dense_teacher(seed=10)
    idx, lp, support = top_k(t, K)
    teacher = teacher_log_probs(lp, "bucket", 1.0, V).exp()
    torch.testing.assert_close(teacher.sum(-1), torch.ones(N, dtype=torch.float64))
    torch.testing.assert_close(teacher[:, -1], 1 - lp.exp().sum(-1))
    # The student's bucket is its exact mass off the support.
    from kdfast.llm.topk import bucketed_student_log_probs
    student = bucketed_student_log_probs(s, idx, 1.0).exp()
    torch.testing.assert_close(student.sum(-1), torch.ones(N, dtype=torch.float64))
    torch.testing.assert_close(student[:, -1], torch.softmax(s, -1)[~support].reshape(N, V - K).sum(-1))


def test_bucket_keeps_a_tiny_student_tail_exactly():
    # Off-support logits 90 below the support: a tail mass of ~1e-39, far
    # below float32's resolution of 1 - sum(q_S); it must come out as its log.
    s = torch.zeros(2, V)
    s[:, K:] = -90.0
    idx = torch.arange(K).expand(2, K)
    from kdfast.llm.topk import bucketed_student_log_probs
    tail = bucketed_student_log_probs(s, idx, 1.0)[:, -1]
    expected = -90.0 + math.log(V - K) - math.log(K)
    torch.testing.assert_close(tail, torch.full((2,), expected), rtol=1e-6, atol=0)


@pytest.mark.parametrize("probabilities", [[1.0], [0.55, 0.45]])
def test_a_top_k_holding_all_the_mass_gives_an_empty_bucket_not_nan(probabilities):
    # [1.0]: exactly all the mass; [0.55, 0.45] in float16 rounds to a mass of 1.00017.
    lp = torch.log(torch.tensor([probabilities] * 2, dtype=torch.float64)).half()
    assert float(lp.double().exp().sum(-1)[0]) >= 1.0
    rows = teacher_log_probs(lp.double(), "bucket", 2.0, 5)
    assert bool(torch.isneginf(rows[:, -1]).all()) and not bool(rows.isnan().any())
    idx = torch.arange(lp.shape[-1]).expand(2, -1)
    for divergence in ("kl", "jsd"):
        s = logits((2, 5), torch.float64, seed=11).requires_grad_(True)
        loss = topk_distill_loss(s, idx, lp, tail="bucket", divergence=divergence)
        loss.backward()
        assert math.isfinite(float(loss.detach())) and bool(torch.isfinite(s.grad).all())


def test_bucket_reverse_kl_is_infinite_for_an_empty_teacher_tail_as_the_dense_loss():
    s, t = logits((1, V), torch.float64, seed=12), dense_teacher(seed=13, shape=(1, V))
    idx, _, support = top_k(t, K)
    t_on_k = off_support(t, support)
    lp = torch.log_softmax(t_on_k, -1).gather(-1, idx)
    got = topk_distill_loss(s, idx, lp, tail="bucket", divergence="reverse_kl")
    assert float(got) == math.inf == float(kdfast.distill_loss(s, t_on_k, divergence="reverse_kl", backend="torch"))


# ----------------------------------------------------------------- gradients, masking, reductions
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_gradcheck(tail, divergence):
    s = logits((4, 7), torch.float64, seed=14).requires_grad_(True)
    idx, lp, _ = top_k(dense_teacher(seed=15, shape=(4, 7)), 3)
    labels = torch.tensor([1, -100, 5, 0])
    assert torch.autograd.gradcheck(
        lambda x: topk_distill_loss(x, idx, lp, tail=tail, divergence=divergence, temperature=1.5,
                                    labels=labels, hard_weight=0.3), (s,))


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_ignored_rows_count_in_nothing_and_may_hold_garbage(tail):
    s, t = logits((N, V), torch.float64, seed=16), dense_teacher(seed=17)
    idx, lp, _ = top_k(t, K)
    labels = torch.tensor([3, -100, 0, -100, 7, 1])
    keep = labels != -100
    garbage_s, garbage_idx, garbage_lp = s.clone(), idx.clone(), lp.clone()
    garbage_s[1] = float("nan")
    garbage_s[3] = -math.inf
    garbage_idx[1] = torch.tensor([V + 5, -1, 0, 0])
    garbage_lp[3] = float("nan")
    kw = dict(tail=tail, hard_weight=0.5, divergence="jsd")
    got = value_and_grad(lambda x: topk_distill_loss(x, garbage_idx, garbage_lp, labels=labels, **kw), garbage_s)
    want = value_and_grad(lambda x: topk_distill_loss(x, idx[keep], lp[keep], labels=labels[keep], **kw), s[keep])
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    assert bool((got[1][~keep] == 0).all())
    # batchmean divides by the 4 valid rows: each row's gradient is that of the 4-row loss.
    torch.testing.assert_close(got[1][keep], want[1], rtol=1e-12, atol=1e-14)


def test_only_the_student_gets_a_gradient():
    s = logits((N, V), torch.float64, seed=35).requires_grad_(True)
    idx, lp, _ = top_k(dense_teacher(seed=36), K)
    lp = lp.clone().requires_grad_(True)
    tail = log1mexp(torch.logsumexp(lp.detach(), -1)).requires_grad_(True)
    topk_distill_loss(s, idx, lp, tail="bucket", tail_logprobs=tail).backward()
    assert s.grad is not None and lp.grad is None and tail.grad is None


def test_no_valid_row_gives_zero_and_zero_gradient():
    s = logits((3, V), torch.float64, seed=18).requires_grad_(True)
    idx, lp, _ = top_k(dense_teacher(seed=19, shape=(3, V)), K)
    loss = topk_distill_loss(s, idx, lp, tail="bucket", labels=torch.full((3,), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool((s.grad == 0).all())


def test_hard_label_term_is_distill_loss_cross_entropy_on_the_full_logits():
    s, t = logits((N, V), torch.float64, seed=20), dense_teacher(seed=21)
    idx, lp, _ = top_k(t, K)
    labels = torch.tensor([0, 12, 5, -100, 9, 2])  # labels off the top-k support too
    kw = dict(labels=labels, hard_weight=0.7, soft_weight=0.0)
    got = value_and_grad(lambda x: topk_distill_loss(x, idx, lp, **kw), s)
    want = value_and_grad(lambda x: kdfast.distill_loss(x, t, backend="torch", **kw), s)
    assert_same(got, want)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_reductions_and_normalizer(tail):
    s, t = logits((N, V), torch.float64, seed=22), dense_teacher(seed=23)
    idx, lp, _ = top_k(t, K)
    labels = torch.tensor([1, -100, 2, 3, -100, 4])
    kw = dict(tail=tail, labels=labels, hard_weight=0.2, soft_weight=0.9, scale=4.0)
    per_row = topk_distill_loss(s, idx, lp, reduction="none", **kw)
    assert per_row.shape == (N,) and bool((per_row[labels == -100] == 0).all()) and bool((per_row[labels != -100] > 0).all())
    torch.testing.assert_close(topk_distill_loss(s, idx, lp, reduction="sum", **kw), per_row.sum())
    torch.testing.assert_close(topk_distill_loss(s, idx, lp, **kw), per_row.sum() / 4)
    torch.testing.assert_close(topk_distill_loss(s, idx, lp, normalizer=10, **kw), per_row.sum() / 10)
    soft_only = topk_distill_loss(s, idx, lp, tail=tail, reduction="none")
    hard_only = topk_distill_loss(s, idx, lp, tail=tail, labels=labels.clamp(min=0), hard_weight=1.0, soft_weight=0.0,
                                  reduction="none")
    valid = labels != -100
    torch.testing.assert_close(per_row[valid], (0.9 * 4.0 * soft_only + 0.2 * hard_only)[valid])


# ----------------------------------------------------------------- dtypes
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("logprob_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_low_precision_inputs_accumulate_in_float32(student_dtype, logprob_dtype, tail):
    s, t = logits((N, V), student_dtype, seed=24), dense_teacher(seed=25)
    idx, lp, _ = top_k(t, K)
    got = value_and_grad(lambda x: topk_distill_loss(x, idx.int(), lp.to(logprob_dtype), tail=tail, temperature=2.0), s)
    assert got[0].dtype == torch.float32 and got[1].dtype == student_dtype
    # The same values in float64: the result differs only by float32 accumulation.
    want = value_and_grad(lambda x: topk_distill_loss(x, idx, lp.to(logprob_dtype).double(), tail=tail,
                                                      temperature=2.0), s.double())
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-6)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[student_dtype]
    torch.testing.assert_close(got[1].double(), want[1].to(student_dtype).double(), rtol=tol, atol=1e-5)


def test_int32_and_int64_indices_agree():
    s, t = logits((N, V), seed=26), dense_teacher(seed=27)
    idx, lp, _ = top_k(t, K)
    assert torch.equal(topk_distill_loss(s, idx.int(), lp.float(), tail="bucket"),
                       topk_distill_loss(s, idx, lp.float(), tail="bucket"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_renormalize_reads_only_the_k_gathered_logits(dtype):
    # A 2^40-column student as a stride-0 view: any (N, V) temporary (a float32
    # copy of bfloat16 logits included) would need terabytes, so the forward
    # pass can only gather.
    huge = torch.zeros(1, 1, dtype=dtype).expand(3, 2**40)
    idx = torch.tensor([[0, 5, 2**40 - 1]] * 3)
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.1]] * 3))
    loss = topk_distill_loss(huge, idx, lp)
    p = torch.tensor([5 / 9, 3 / 9, 1 / 9])
    torch.testing.assert_close(loss, (p * (p.log() - math.log(1 / 3))).sum())


# ----------------------------------------------------------------- errors
def call(**kw):
    s, t = logits((N, V), seed=28), dense_teacher(seed=29)
    idx, lp, _ = top_k(t, K)
    args = dict(student_logits=s, topk_indices=idx, topk_logprobs=lp.float())
    args.update(kw)
    return topk_distill_loss(args.pop("student_logits"), args.pop("topk_indices"), args.pop("topk_logprobs"), **args)


def with_row(tensor, row, values):
    out = tensor.clone()
    out[row] = torch.as_tensor(values, dtype=out.dtype)
    return out


IDX, LP, _ = top_k(dense_teacher(seed=29), K)


@pytest.mark.parametrize("kw,error,pattern", [
    (dict(topk_indices=IDX.float()), TypeError, "topk_indices must be int32 or int64, got torch.float32"),
    (dict(topk_indices=IDX.tolist()), TypeError, "topk_indices must be a torch.Tensor"),
    (dict(topk_logprobs=LP.long()), TypeError, "topk_logprobs must be float16"),
    (dict(student_logits=torch.zeros(N, V, dtype=torch.long)), TypeError, "student_logits must be float32"),
    (dict(topk_logprobs=LP[:, :3].float()), ValueError, r"topk_indices shape \(6, 4\) does not match topk_logprobs shape \(6, 3\)"),
    (dict(topk_indices=IDX[:5], topk_logprobs=LP[:5].float()), ValueError, r"\(5, 4\).*student_logits shape \(6, 13\)"),
    (dict(topk_indices=IDX[None], topk_logprobs=LP[None].float()), ValueError, r"\(1, 6, 4\).*\(6, 13\)"),
    (dict(topk_indices=torch.zeros(N, 0, dtype=torch.long), topk_logprobs=torch.zeros(N, 0)), ValueError, "k=0"),
    (dict(topk_indices=IDX.new_zeros(1, 1, 14)[0].expand(N, 14), topk_logprobs=torch.zeros(N, 14)), ValueError, "k=14"),
    (dict(topk_indices=with_row(IDX, 2, [0, 1, 13, 3])), ValueError, r"topk_indices value 13 at row 2 is outside \[0, 13\)"),
    (dict(topk_indices=with_row(IDX, 4, [0, -2, 1, 3])), ValueError, "topk_indices value -2 at row 4"),
    (dict(topk_indices=with_row(IDX, 1, [7, 2, 7, 3])), ValueError, "topk_indices row 1 repeats index 7"),
    (dict(topk_logprobs=with_row(LP.float(), 3, [-1.0, float("nan"), -2.0, -3.0])), ValueError, "row 3 has nan"),
    (dict(topk_logprobs=with_row(LP.float(), 0, [math.inf, -1.0, -2.0, -3.0])), ValueError, "finite or -inf, row 0 has inf"),
    (dict(topk_logprobs=with_row(LP.float(), 5, [0.5, -1.0, -2.0, -3.0])), ValueError, "must be <= 0, row 5 has 0.5"),
    (dict(topk_logprobs=with_row(LP.float(), 2, [-0.1, -0.2, -2.0, -3.0])), ValueError, "row 2 holds probability mass 1\\.90\\d* > 1"),
    (dict(topk_logprobs=with_row(LP.float(), 1, [-math.inf] * 4)), ValueError, "topk_logprobs row 1 is all -inf"),
    (dict(student_logits=with_row(logits((N, V), seed=28), 4, [-math.inf] * V)), ValueError, "student_logits row 4 is all -inf"),
    (dict(tail="spread"), ValueError, "tail must be one of"),
    (dict(tail_logprobs=torch.zeros(N) - 3), ValueError, "needs tail='bucket'"),
    (dict(tail="bucket", tail_logprobs=torch.zeros(N, 1) - 3), ValueError, r"tail_logprobs shape \(6, 1\)"),
    (dict(tail="bucket", tail_logprobs=torch.zeros(N, dtype=torch.long)), TypeError, "tail_logprobs must be float16"),
    (dict(tail="bucket", tail_logprobs=torch.full((N,), 0.5)), ValueError, "tail_logprobs are log-probabilities"),
    (dict(tail="bucket", tail_logprobs=torch.full((N,), -0.1)), ValueError, "with tail_logprobs.*mass"),
    (dict(divergence="wasserstein"), ValueError, "divergence must be one of"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(divergence="jsd", beta=2.0), ValueError, "beta=2.0"),
    (dict(hard_weight=1.0), ValueError, "needs labels"),
    (dict(labels=torch.tensor([0, 1, 2, 3, 4, 13])), ValueError, r"label 13 at row 5 is outside \[0, 13\)"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels shape"),
    (dict(reduction="mean"), ValueError, "reduction must be one of"),
    (dict(topk_indices=IDX.to("meta")), ValueError, "topk_indices is on meta"),
])
def test_bad_input_raises_a_clear_error(kw, error, pattern):
    with pytest.raises(error, match=pattern):
        call(**kw)


def test_student_all_minus_inf_on_the_support_is_an_error_when_renormalising_only():
    s = logits((N, V), seed=30)
    s[0, IDX[0]] = -math.inf
    with pytest.raises(ValueError, match="student_logits row 0 is all -inf on its top-k support"):
        topk_distill_loss(s, IDX, LP.float())
    assert float(topk_distill_loss(s, IDX, LP.float(), tail="bucket")) == math.inf  # a finite teacher vs q = 0 there


def test_float16_rounding_of_a_full_distribution_is_accepted():
    # k = V: the stored log-probs sum to 1 only up to float16 rounding.
    t = dense_teacher(seed=31, shape=(64, 50)) * 3
    idx, lp, _ = top_k(t, 50)
    lp16 = lp.half()
    assert float(lp16.double().exp().sum(-1).max()) > 1.0
    assert math.isfinite(float(topk_distill_loss(logits((64, 50), seed=32), idx, lp16, tail="bucket")))


# ----------------------------------------------------------------- module
def test_module_is_the_function_with_fixed_options():
    s, t = logits((N, V), seed=33), dense_teacher(seed=34)
    idx, lp, _ = top_k(t, K)
    labels = torch.tensor([1, 2, -100, 3, 4, 5])
    options = dict(tail="bucket", divergence="jsd", beta=0.3, temperature=2.0, hard_weight=0.5)
    module = TopKDistillLoss(**options)
    assert torch.equal(module(s, idx, lp, labels), topk_distill_loss(s, idx, lp, labels=labels, **options))
    tail = log1mexp(torch.logsumexp(lp, -1)) - 0.5  # a smaller remainder than 1 - sum
    assert torch.equal(module(s, idx, lp, labels, tail_logprobs=tail),
                       topk_distill_loss(s, idx, lp, labels=labels, tail_logprobs=tail, **options))
    assert "tail='bucket'" in repr(module)


@pytest.mark.parametrize("options,error,pattern", [
    (dict(tail="spread"), ValueError, "tail must be one of"),
    (dict(divergence="jsd", beta=3.0), ValueError, "beta=3.0"),
    (dict(temprature=2.0), TypeError, "temprature"),
    (dict(labels=torch.zeros(3)), TypeError, "labels are passed at call time"),
    (dict(tail_logprobs=torch.zeros(3)), TypeError, "tail_logprobs are passed at call time"),
])
def test_module_checks_its_options_when_built(options, error, pattern):
    with pytest.raises(error, match=pattern):
        TopKDistillLoss(**options)


# ----------------------------------------------------------------- the fused path (kdfast/ops/topk.py)
from conftest import kernel_backend, kernel_device, kernels  # noqa: E402

FUSED_CASES = [dict(divergence=d, temperature=2.0, scale=4.0) for d in ALL_DIVERGENCES] + [
    dict(divergence="jsd", beta=0.3, student_temperature=1.5),
    dict(divergence="kl", reduction="sum", normalizer=None),
    dict(divergence="reverse_kl", reduction="none"),
    dict(divergence="kl", reduction="batchmean", normalizer=5.0),
]


def _fused_and_torch(s, idx, lp, kernel, **kw):
    """(value, gradient) of topk_distill_loss on a fused kernel and on the PyTorch form, on the CPU."""
    device = kernel_device(kernel)
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with kernel_backend(kernel) as backend:
        got = value_and_grad(lambda x: topk_distill_loss(x, idx.to(device), lp.to(device), backend=backend,
                                                         **moved), s.to(device))
    want = value_and_grad(lambda x: topk_distill_loss(x, idx, lp, backend="torch", **kw), s)
    return tuple(x.cpu() for x in got), want


@kernels
@pytest.mark.parametrize("options", FUSED_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_renormalize_on_every_fused_kernel_is_the_pytorch_form(kernel, options):
    s = logits((9, 37), torch.float32, seed=5)  # V and k not multiples of a vector width
    idx, lp, _ = top_k(dense_teacher(seed=6, shape=(9, 37), dtype=torch.float32), 11)
    got, want = _fused_and_torch(s, idx, lp, kernel, **options)
    assert_same(got, want, rtol=2e-5, atol=2e-6)


@kernels
@pytest.mark.parametrize("student_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("logprob_dtype,index_dtype", [(torch.float16, torch.int32), (torch.bfloat16, torch.int64)])
def test_renormalize_16_bit_students_and_cache_dtypes(kernel, student_dtype, logprob_dtype, index_dtype):
    s = logits((7, 300), student_dtype, seed=7)
    idx, lp, _ = top_k(dense_teacher(seed=8, shape=(7, 300), dtype=torch.float32), 64)
    got, want = _fused_and_torch(s, idx.to(index_dtype), lp.to(logprob_dtype), kernel, divergence="jsd",
                                 temperature=2.0)
    assert got[1].dtype == student_dtype and got[1].shape == s.shape
    assert_same(got, want, rtol=1e-2, atol=1e-3)  # the gradient is rounded to the student's 16-bit dtype


@kernels
@pytest.mark.parametrize("hard_weight", [0.0, 0.7])
@pytest.mark.parametrize("ignore_index", [-100, 0, 3])
def test_renormalize_labels_ignored_rows_and_hard_term(kernel, hard_weight, ignore_index):
    s = logits((8, 40), torch.float32, seed=9)
    idx, lp, _ = top_k(dense_teacher(seed=10, shape=(8, 40), dtype=torch.float32), 5)
    labels = torch.tensor([1, ignore_index, 7, 3, ignore_index, 39, 0, 12])
    lp[1] = float("nan")  # an ignored row may hold anything
    for reduction in ("batchmean", "sum", "none"):
        got, want = _fused_and_torch(s, idx, lp, kernel, labels=labels, ignore_index=ignore_index,
                                     hard_weight=hard_weight, reduction=reduction, temperature=1.5)
        assert_same(got, want, rtol=2e-5, atol=2e-6)
        assert not got[1][1].any() and not got[1][4].any()  # ignored rows get no gradient


def test_renormalize_gradient_is_zero_off_the_support_and_never_reuses_a_live_buffer():
    shape = (1024, 8192)  # 32 MiB of float32: above the 8 MiB from which the C++ side recycles gradient buffers
    s = logits(shape, torch.float32, seed=11)
    idx, lp, support = top_k(dense_teacher(seed=12, shape=shape, dtype=torch.float32), 16)
    first = value_and_grad(lambda x: topk_distill_loss(x, idx, lp), s)[1]
    kept = first.clone()
    for seed in (13, 14):  # later calls may recycle freed buffers, never the one still held
        other = value_and_grad(lambda x: topk_distill_loss(x, idx, lp), logits(shape, seed=seed))[1]
        assert other.data_ptr() != first.data_ptr()
    assert torch.equal(first, kept)
    assert not first[~support].any() and first[support].abs().sum() > 0


# ----------------------------------------------------------------- the bucket tail on the C++ kernel
from conftest import KERNELS  # noqa: E402

CPU_KERNELS = [k for k in KERNELS if k.startswith("cpu-")] or [
    pytest.param("none", marks=pytest.mark.skip(reason="the C++ extension is not built"))]
cpu_kernels = pytest.mark.parametrize("kernel", CPU_KERNELS)

BUCKET_CASES = FUSED_CASES + [
    dict(divergence="kl", student_temperature=0.7, temperature=1.0),
    dict(divergence="skew_reverse_kl", skew=0.2, temperature=3.0),
]


@cpu_kernels
@pytest.mark.parametrize("options", BUCKET_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_bucket_on_the_cpu_kernel_is_the_pytorch_form(kernel, options):
    s = logits((9, 37), torch.float32, seed=5)
    idx, lp, _ = top_k(dense_teacher(seed=6, shape=(9, 37), dtype=torch.float32), 11)
    got, want = _fused_and_torch(s, idx, lp, kernel, tail="bucket", **options)
    assert_same(got, want, rtol=2e-5, atol=2e-6)


@cpu_kernels
@pytest.mark.parametrize("tail", TAILS)
def test_float64_cpu_kernel_matches_the_pytorch_form_to_float64_rounding(kernel, tail):
    s = logits((6, 53), torch.float64, seed=17)
    idx, lp, _ = top_k(dense_teacher(seed=18, shape=(6, 53)), 7)
    labels = torch.tensor([3, -100, 52, 0, 9, 17])
    got, want = _fused_and_torch(s, idx, lp, kernel, tail=tail, divergence="jsd", beta=0.4, temperature=1.7,
                                 student_temperature=1.3, labels=labels, hard_weight=0.3)
    assert_same(got, want, rtol=1e-11, atol=1e-13)


@cpu_kernels
@pytest.mark.parametrize("student_dtype", [torch.bfloat16, torch.float16])
def test_bucket_16_bit_students_and_cache_dtypes(kernel, student_dtype):
    s = logits((7, 300), student_dtype, seed=7)
    idx, lp, _ = top_k(dense_teacher(seed=8, shape=(7, 300), dtype=torch.float32), 64)
    got, want = _fused_and_torch(s, idx.int(), lp.half(), kernel, tail="bucket", divergence="jsd", temperature=2.0)
    assert got[1].dtype == student_dtype and got[1].shape == s.shape
    assert_same(got, want, rtol=1e-2, atol=1e-3)


@cpu_kernels
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("hard_weight", [0.0, 0.7])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_cpu_kernel_labels_ignored_rows_and_hard_term(kernel, tail, hard_weight, ignore_index):
    s = logits((8, 40), torch.float32, seed=9)
    idx, lp, _ = top_k(dense_teacher(seed=10, shape=(8, 40), dtype=torch.float32), 5)
    labels = torch.tensor([1, ignore_index, 7, 3, ignore_index, 39, 0, 12])
    labels[2] = idx[2, 1]  # a label on the support
    lp[1] = float("nan")  # an ignored row may hold anything, indices included
    idx[4] = -7
    for reduction in ("batchmean", "sum", "none"):
        got, want = _fused_and_torch(s, torch.where(labels[:, None] == ignore_index, 0, idx), lp, kernel, tail=tail,
                                     labels=labels, ignore_index=ignore_index, hard_weight=hard_weight,
                                     reduction=reduction, temperature=1.5, student_temperature=1.2)
        assert_same(got, want, rtol=2e-5, atol=2e-6)
        fused = value_and_grad(lambda x: topk_distill_loss(x, idx, lp, tail=tail, labels=labels, backend="cpu",
                                                           ignore_index=ignore_index, hard_weight=hard_weight,
                                                           reduction=reduction), s)
        assert not fused[1][1].any() and not fused[1][4].any()  # ignored rows: no gradient, indices never read


@cpu_kernels
def test_bucket_tail_logprobs_k_equal_v_and_minus_inf_off_the_support(kernel):
    s = logits((5, 16), torch.float32, seed=19)
    idx, lp, _ = top_k(dense_teacher(seed=20, shape=(5, 16), dtype=torch.float32), 4)
    rest = log1mexp(torch.logsumexp(lp.double(), -1)).float() - 0.01  # a cache's float32 remainder
    got, want = _fused_and_torch(s, idx, lp, kernel, tail="bucket", tail_logprobs=rest, temperature=2.0)
    assert_same(got, want, rtol=2e-5, atol=2e-6)
    full_idx, full_lp, _ = top_k(dense_teacher(seed=21, shape=(5, 16), dtype=torch.float32), 16)  # k == V
    got, want = _fused_and_torch(s, full_idx, full_lp, kernel, tail="bucket", divergence="jsd")
    assert_same(got, want, rtol=2e-5, atol=2e-6)
    masked = s.clone()
    masked[1] = torch.where(torch.zeros(16, dtype=torch.bool).scatter(0, idx[1], True), masked[1], -math.inf)
    got, want = _fused_and_torch(masked, idx, lp, kernel, tail="bucket", labels=torch.tensor([0, int(idx[1, 2]), 3, 4, 5]),
                                 hard_weight=0.5)
    assert_same(got, want, rtol=2e-5, atol=2e-6)
    assert torch.isfinite(got[1]).all() and not got[1][1][masked[1] == -math.inf].any()


@cpu_kernels
def test_bucket_reverse_kl_is_inf_when_the_teacher_tail_is_empty(kernel):
    s = logits((3, 12), torch.float32, seed=22)
    idx, lp, _ = top_k(dense_teacher(seed=23, shape=(3, 12), dtype=torch.float32), 4)
    empty = torch.full((3,), -math.inf)
    with kernel_backend(kernel) as backend:
        got = topk_distill_loss(s, idx, lp, tail="bucket", tail_logprobs=empty, divergence="reverse_kl",
                                backend=backend)
    want = topk_distill_loss(s, idx, lp, tail="bucket", tail_logprobs=empty, divergence="reverse_kl", backend="torch")
    assert got == want == math.inf


@cpu_kernels
@pytest.mark.parametrize("tail", TAILS)
def test_cpu_kernel_on_a_long_row_and_a_strided_student(kernel, tail):
    big = logits((4, 5000), torch.float32, seed=24) * 4
    s = big[:, :4099]  # rows of stride 5000, V = 4099 (not a multiple of any vector width)
    idx, lp, _ = top_k(dense_teacher(seed=25, shape=(4, 4099), dtype=torch.float32), 64)
    labels = torch.tensor([5, 4098, int(idx[2, 0]), 77])
    got, want = _fused_and_torch(s, idx, lp, kernel, tail=tail, labels=labels, hard_weight=0.5, temperature=2.0)
    assert_same(got, want, rtol=5e-5, atol=1e-6)


@cpu_kernels
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_supports_that_share_words_and_change_from_row_to_row(kernel, tail, student_dtype):
    """The kernel marks each row's support (and label) in a bitmap of 64-entry words that the next row
    reuses: supports packed into one word, at the row's start and its tail vector, next to the label,
    and each row's unlike the one before, where a mark left behind would corrupt the next row."""
    n_rows, vocab, k = 12, 203, 17  # 203 = 3 words + 11: a partial word and a tail vector
    s = logits((n_rows, vocab), student_dtype, seed=31)
    idx, lp, _ = top_k(dense_teacher(seed=32, shape=(n_rows, vocab), dtype=torch.float32), k)
    runs = {0: range(0, k), 1: range(vocab - k, vocab), 2: range(60, 60 + k), 3: range(0, 2 * k, 2)}
    for row, entries in runs.items():  # rows 4.. keep the teacher's own (scattered) top-k
        idx[row] = torch.tensor(list(entries))
    labels = torch.tensor([k, vocab - k - 1, 59, 1, 202, 0, 64, 127, 128, 5, 191, 100])
    tolerance = dict(rtol=2e-5, atol=2e-6) if student_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for hard_weight in (0.0, 0.6):
        got, want = _fused_and_torch(s, idx, lp, kernel, tail=tail, labels=labels, hard_weight=hard_weight,
                                     temperature=2.0)
        assert_same(got, want, **tolerance)


@cpu_kernels
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cpu_kernel_rows_whose_max_off_the_support_rises_often_late_or_from_minus_inf(kernel, tail, student_dtype,
                                                                                       temperature):
    """The kernel finds the max off the support in the same sweep as the exponentials, rescaling what it has
    summed (and the gradient of what it has kept) each time the max rises: rows where it rises in every
    block, across the 1024-entry flush, only in the tail vector, after blocks of -inf, or by far late."""
    n_rows, vocab, k = 6, 1100, 9  # 1100: blocks of 64 up to 1088, then a tail vector (and at AVX2 one more)
    s = logits((n_rows, vocab), torch.float32, seed=33)
    idx, lp, _ = top_k(dense_teacher(seed=34, shape=(n_rows, vocab), dtype=torch.float32), k)
    s[0] = torch.linspace(-20.0, 30.0, vocab)  # rises in every block, the remainder and the tail
    s[1] = torch.linspace(30.0, -20.0, vocab)  # once, at the first entry
    s[2, :128] = -math.inf  # two words of -inf first: the max starts from nothing
    s[3] = -math.inf
    s[3, -1] = 4.0  # the only finite entry off the support, in the tail vector
    idx[3] = torch.arange(1, k + 1)
    s[3, 1:k + 1] = torch.randn(k, generator=torch.Generator().manual_seed(35))
    s[4, 1000] = 60.0  # a late spike: everything kept before it scaled by 2^-80 and more
    s[5, :1024] -= 40.0  # the rise right after the flush
    s = s.to(student_dtype)
    labels = torch.tensor([vocab - 1, 0, 500, vocab - 1, 999, 1030])
    tolerance = dict(rtol=2e-5, atol=2e-6) if student_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for hard_weight in (0.0, 0.6):
        got, want = _fused_and_torch(s, idx, lp, kernel, tail=tail, labels=labels, hard_weight=hard_weight,
                                     temperature=temperature)
        assert_same(got, want, **tolerance)
        assert torch.isfinite(got[1]).all()


def test_cpu_kernel_reports_an_out_of_range_index_before_a_repeat_in_the_same_row():
    if not any(isinstance(k, str) for k in CPU_KERNELS):
        pytest.skip("the C++ extension is not built")
    s = logits((2, 20), torch.float32)
    idx, lp, _ = top_k(dense_teacher(shape=(2, 20), dtype=torch.float32), 4)
    with pytest.raises(ValueError, match=r"topk_indices value 25 at row 1 is outside \[0, 20\)"):
        topk_distill_loss(s, with_row(idx, 1, [3, 3, 1, 25]), lp, backend="cpu")


@cpu_kernels
@pytest.mark.parametrize("tail", TAILS)
def test_cpu_kernel_checks_indices_in_its_pass(kernel, tail):
    s = logits((3, 20), torch.float32)
    idx, lp, _ = top_k(dense_teacher(shape=(3, 20), dtype=torch.float32), 4)
    with kernel_backend(kernel) as backend:
        with pytest.raises(ValueError, match=r"topk_indices value 20 at row 2 is outside \[0, 20\)"):
            topk_distill_loss(s, with_row(idx, 2, [0, 1, 2, 20]), lp, tail=tail, backend=backend)
        with pytest.raises(ValueError, match="topk_indices row 1 repeats index 3"):
            topk_distill_loss(s, with_row(idx, 1, [3, 1, 3, 2]), lp, tail=tail, backend=backend)
        dead = s.clone()
        dead[0] = -math.inf
        with pytest.raises(ValueError, match="student_logits row 0 is all -inf"):
            topk_distill_loss(dead, idx, lp, tail=tail, backend=backend)


@cpu_kernels
@pytest.mark.parametrize("tail", TAILS)
def test_cpu_kernel_checks_logprobs_in_its_pass(kernel, tail, monkeypatch):
    """The kernel reads each teacher row once and checks it there: no PyTorch pass over the log-probs runs."""
    import kdfast.llm.topk as topk_module

    def no_python_check(*args, **kwargs):
        raise AssertionError("a PyTorch pass checked the log-probs")

    s = logits((N, V), torch.float32, seed=28)
    lp = LP.float()
    labels = torch.tensor([1, 2, -100, 3, 4, 5])
    want = topk_distill_loss(s, IDX, lp, tail=tail, labels=labels, hard_weight=0.5, backend="torch")
    for name in ("check_topk_logprobs", "check_topk_values", "teacher_bucket"):
        monkeypatch.setattr(topk_module, name, no_python_check)
    cases = [
        (with_row(lp, 3, [-1.0, float("nan"), -2.0, -3.0]), None, "topk_logprobs must be finite or -inf, row 3 has nan"),
        (with_row(lp, 0, [-1.0, -2.0, math.inf, -3.0]), None, "finite or -inf, row 0 has inf"),
        (with_row(lp, 5, [-1.0, 0.5, -2.0, -3.0]), None, "topk_logprobs are log-probabilities and must be <= 0, row 5 has 0.5"),
        (with_row(lp, 2, [-0.1, -0.2, -2.0, -3.0]), None, r"topk_logprobs row 2 holds probability mass 1\.90869 > 1"),
    ]
    if tail == "renormalize":  # the bucket holds all the mass of such a row
        cases.append((with_row(lp, 1, [-math.inf] * 4), None, "topk_logprobs row 1 is all -inf"))
    if tail == "bucket":
        rest = log1mexp(torch.logsumexp(lp.double(), -1)).float() - 0.01  # a valid remainder
        cases += [
            (lp, with_row(rest, 4, float("nan")), "tail_logprobs must be finite or -inf, row 4 has nan"),
            (lp, with_row(rest, 2, 0.25), "tail_logprobs are log-probabilities and must be <= 0, row 2 has 0.25"),
            (lp, with_row(rest, 0, -0.01), r"topk_logprobs row 0 \(with tail_logprobs\) holds probability mass"),
        ]
    with kernel_backend(kernel) as backend:
        for bad_lp, rest, pattern in cases:
            with pytest.raises(ValueError, match=pattern):
                topk_distill_loss(s, IDX, bad_lp, tail=tail, tail_logprobs=rest, backend=backend)
        # an ignored row is never read: garbage there is no error
        garbage = with_row(lp, 2, [float("nan"), 7.0, math.inf, 0.5])
        loss = topk_distill_loss(s, IDX, garbage, tail=tail, labels=labels, hard_weight=0.5, backend=backend)
    torch.testing.assert_close(loss, want, rtol=2e-5, atol=2e-6)


@cpu_kernels
@pytest.mark.parametrize("logprob_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_kernel_reads_logprobs_and_tails_of_every_dtype(kernel, logprob_dtype, student_dtype):
    """The stored dtypes go to the kernel as they are (no converted copy): each is rounded as the PyTorch
    form rounds it, the bucket derived from them or read from a tail of another dtype."""
    s = logits((7, 300), student_dtype, seed=36)
    idx, lp, _ = top_k(dense_teacher(seed=37, shape=(7, 300)), 64)
    lp = lp.to(logprob_dtype)
    # a tail of yet another dtype, below the remainder by more than float16's rounding of it
    rest = (log1mexp(torch.logsumexp(lp.double(), -1)) - 0.01).to(torch.float16)
    tolerance = dict(rtol=1e-2, atol=1e-3) if student_dtype == torch.bfloat16 else dict(rtol=2e-5, atol=2e-6)
    for tail, tail_logprobs in (("renormalize", None), ("bucket", None), ("bucket", rest)):
        got, want = _fused_and_torch(s, idx, lp, kernel, tail=tail, tail_logprobs=tail_logprobs, temperature=2.0)
        assert_same(got, want, **tolerance)


@cpu_kernels
def test_cpu_kernel_nan_logits_give_nan(kernel):
    s = logits((3, 20), torch.float32, seed=26)
    idx, lp, support = top_k(dense_teacher(seed=27, shape=(3, 20), dtype=torch.float32), 4)
    off = int((~support[1]).nonzero()[0])
    s[1, off] = float("nan")
    with kernel_backend(kernel) as backend:
        loss, grad = value_and_grad(lambda x: topk_distill_loss(x, idx, lp, tail="bucket", backend=backend,
                                                                reduction="none"), s)
    want = topk_distill_loss(s, idx, lp, tail="bucket", backend="torch", reduction="none")
    assert torch.isnan(loss[1]) and torch.isnan(want[1]) and torch.isnan(grad[1]).all()
    torch.testing.assert_close(loss[[0, 2]], want[[0, 2]])


def test_bucket_backends_auto_torch_and_triton():
    s = logits((3, 20), torch.float32)
    idx, lp, _ = top_k(dense_teacher(shape=(3, 20), dtype=torch.float32), 4)
    want = topk_distill_loss(s, idx, lp, tail="bucket", backend="torch")
    torch.testing.assert_close(topk_distill_loss(s, idx, lp, tail="bucket"), want)  # auto: the device's kernel
    if "triton" in KERNELS:  # the Triton op: tests/test_topk_triton.py
        device = kernel_device("triton")
        got = topk_distill_loss(s.to(device), idx.to(device), lp.to(device), tail="bucket", backend="triton")
        torch.testing.assert_close(got.cpu(), want)


@pytest.mark.parametrize("tail", TAILS)
def test_cpu_kernel_under_torch_compile_fullgraph(tail):
    if not CPU_KERNELS or not isinstance(CPU_KERNELS[0], str):
        pytest.skip("the C++ extension is not built")
    s = logits((6, 30), torch.float32, seed=15)
    idx, lp, _ = top_k(dense_teacher(seed=16, shape=(6, 30), dtype=torch.float32), 5)
    labels = torch.tensor([1, 2, -100, 4, 5, 6])
    kw = dict(tail=tail, temperature=2.0, labels=labels, hard_weight=0.5)
    compiled = torch.compile(lambda x: topk_distill_loss(x, idx, lp, backend="cpu", **kw), fullgraph=True,
                             backend="aot_eager")
    got = value_and_grad(compiled, s)
    want = value_and_grad(lambda x: topk_distill_loss(x, idx, lp, backend="torch", **kw), s)
    assert_same(got, want, rtol=2e-5, atol=2e-6)


def test_k_of_one_with_ignore_index_zero_falls_back_to_the_pytorch_form():
    s = logits((4, 9), torch.float64)
    idx, lp, _ = top_k(dense_teacher(shape=(4, 9)), 1)
    labels = torch.tensor([0, 2, 0, 5])
    got = value_and_grad(lambda x: topk_distill_loss(x, idx, lp, labels=labels, ignore_index=0, hard_weight=0.5), s)
    want = value_and_grad(lambda x: topk_distill_loss(x, idx, lp, labels=labels, ignore_index=0, hard_weight=0.5,
                                                      backend="torch"), s)
    assert_same(got, want)


def test_renormalize_fused_path_refuses_what_the_pytorch_form_refuses():
    s = logits((3, 20), torch.float32)
    idx, lp, _ = top_k(dense_teacher(shape=(3, 20), dtype=torch.float32), 4)
    bad = idx.clone()
    bad[1, 2] = bad[1, 0]
    with pytest.raises(ValueError, match="row 1 repeats index"):
        topk_distill_loss(s, bad, lp)
    with pytest.raises(ValueError, match="must be <= 0"):
        topk_distill_loss(s, idx, lp.abs())
    dead = lp.clone()
    dead[2] = -math.inf
    with pytest.raises(ValueError, match="topk_logprobs row 2 is all -inf"):
        topk_distill_loss(s, idx, dead)
    with pytest.raises(ValueError, match="unknown backend|backend"):
        topk_distill_loss(s, idx, lp, backend="fortran")


def test_renormalize_under_torch_compile_fullgraph():
    s = logits((6, 30), torch.float32, seed=15)
    idx, lp, _ = top_k(dense_teacher(seed=16, shape=(6, 30), dtype=torch.float32), 5)
    compiled = torch.compile(lambda x: topk_distill_loss(x, idx, lp, temperature=2.0), fullgraph=True,
                             backend="aot_eager")
    got = value_and_grad(compiled, s)
    want = value_and_grad(lambda x: topk_distill_loss(x, idx, lp, temperature=2.0, backend="torch"), s)
    assert_same(got, want, rtol=2e-5, atol=2e-6)
