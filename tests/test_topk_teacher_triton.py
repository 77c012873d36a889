"""The top-k teacher's rows checked in one Triton pass (kdfast/ops/triton/topk_teacher.py).

Its outputs against the PyTorch functions of kdfast.llm.topk that define them
(neutral_ignored_rows, teacher_bucket, log1mexp): float64 to rounding (rtol
1e-12), float32 to float32 rounding (rtol 1e-6); every check against the
PyTorch form's error message; the kernel's own statuses (the PyTorch checks
silenced); the PyTorch form above the kernel's largest k; no PyTorch pass over
the teacher on valid inputs.  Interpreted on CPU tensors without a GPU.
"""

import math

import pytest
import torch

from kdfast.llm import topk as topk_module
from kdfast.llm.topk import (log1mexp, mass_tolerance, neutral_ignored_rows, sum_rounding, teacher_bucket,
                             topk_distill_loss)

from conftest import KERNELS, kernel_device, logits

pytestmark = pytest.mark.skipif("triton" not in KERNELS, reason="the triton backend cannot run here")

DEVICE = kernel_device("triton")
N, V = 6, 29
TAILS = ["renormalize", "bucket"]


def teacher(k, dtype=torch.float32, seed=3, n=N, vocab=V):
    """(indices, log-probs in ``dtype``): a teacher's top-k in a shuffled order."""
    lp, idx = torch.log_softmax(logits((n, vocab), torch.float64, seed=seed), -1).topk(k, -1)
    perm = torch.argsort(torch.rand(idx.shape, generator=torch.Generator().manual_seed(seed)), -1)
    return idx.gather(-1, perm), lp.gather(-1, perm).to(dtype)


def rows(idx, lp, rest=None, valid=None, bucket=True, f64=False, vocab=V):
    """The op's (indices, teacher) on the CPU, its inputs moved to the device."""
    from kdfast.ops.triton.topk_teacher import triton_topk_teacher

    acc = torch.float64 if f64 or lp.dtype == torch.float64 else torch.float32
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    got = triton_topk_teacher(on(idx), on(lp), on(rest), on(valid), vocab, mass_tolerance(lp.dtype, idx.shape[1]),
                              sum_rounding(acc, idx.shape[1]), bucket, f64)
    indices, ordered, teacher_rows = (t.cpu() for t in got)
    # the sort that found the repeats comes back: the bucket's student sweep reads the support in order
    assert torch.equal(ordered, indices.sort(-1).values)
    return indices, teacher_rows


def want_rows(idx, lp, rest=None, valid=None, bucket=True, f64=False, vocab=V):
    """The same from kdfast.llm.topk's PyTorch functions."""
    acc = torch.float64 if f64 or lp.dtype == torch.float64 else torch.float32
    idx, lp = idx.long(), lp.to(acc)
    rest = None if rest is None else rest.reshape(-1, 1).to(acc)
    if valid is not None:
        idx, lp, rest = neutral_ignored_rows(valid, idx, lp, rest)
    return idx, torch.cat([lp, teacher_bucket(lp, vocab, rest)], -1) if bucket else lp


def assert_rows(got, want, bucket=True):
    """The indices and the log-probs exactly (a rounding to the teacher's dtype); the bucket's mass
    1 - sum p to the rounding of a sum of k terms: its log is as ill-conditioned as the remainder is small."""
    assert torch.equal(got[0], want[0]) and got[1].dtype == want[1].dtype
    k = got[0].shape[1]
    assert torch.equal(got[1][:, :k], want[1][:, :k])
    if got[1].shape[1] > k:
        eps = torch.finfo(want[1].dtype).eps
        torch.testing.assert_close(got[1][:, k].exp(), want[1][:, k].exp(), rtol=4 * eps, atol=4 * k * eps)
        assert torch.equal(got[1][:, k] == -math.inf, want[1][:, k] == -math.inf)


# ----------------------------------------------------------------- the rows
@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 5, 16, 17, V])
def test_rows_are_the_pytorch_functions(k, dtype, bucket):
    idx, lp = teacher(k, dtype)
    assert_rows(rows(idx, lp, bucket=bucket), want_rows(idx, lp, bucket=bucket))
    assert_rows(rows(idx.int(), lp, bucket=bucket, f64=True), want_rows(idx, lp, bucket=bucket, f64=True))


@pytest.mark.parametrize("tail_dtype", [torch.float16, torch.float64])
def test_ignored_rows_are_neutral_and_a_given_tail_is_the_bucket(tail_dtype):
    idx, lp = teacher(4)
    rest = (log1mexp(torch.logsumexp(lp.double(), -1)) - 0.01).to(tail_dtype)
    valid = torch.tensor([True, False, True, True, False, True])
    # ignored rows may hold anything
    idx[1] = torch.tensor([-7, 3, 3, 99])
    lp[4] = torch.tensor([float("nan"), 2.0, math.inf, -1.0])
    rest[4] = math.inf
    for bucket in (False, True):
        got = rows(idx, lp, rest if bucket else None, valid, bucket)
        assert_rows(got, want_rows(idx, lp, rest if bucket else None, valid, bucket))
        assert torch.equal(got[0][1], torch.arange(4)) and torch.all(got[1][1, :4] == -math.log(4))


def test_the_bucket_near_an_empty_and_a_full_top_k():
    """log(1 - mass) from the kernel's expm1 / log1p (Kahan's forms) on both of log1mexp's branches."""
    x = torch.tensor([-1e-300, -1e-15, -3e-9, -1e-4, -0.3, -math.log(2.0), -0.7, -5.0, -40.0, -800.0, -math.inf],
                     dtype=torch.float64)
    idx = torch.zeros((x.numel(), 1), dtype=torch.long)
    for dtype, rtol in ((torch.float64, 1e-13), (torch.float32, 2e-6)):
        lp = x.to(dtype)[:, None]
        got = rows(idx, lp, vocab=2)[1][:, 1]
        top = lp.to(torch.float64 if dtype == torch.float64 else torch.float32)
        want = log1mexp(top.double()).squeeze(-1)
        want = want.masked_fill(-top.double().squeeze(-1) <= sum_rounding(top.dtype, 1), -math.inf)
        # the last row has no mass at all: an undefined teacher, checked by other tests; here only its bucket
        torch.testing.assert_close(got[:-1].double(), want[:-1], rtol=rtol, atol=0.0)


def test_k_equal_to_v_empties_the_bucket_even_with_a_tail():
    idx, lp = teacher(V)
    got = rows(idx, lp, torch.full((N,), -40.0))  # a tail within the mass tolerance
    assert torch.all(got[1][:, -1] == -math.inf)


def test_zero_rows():
    idx, lp = teacher(3, n=0)
    got = rows(idx, lp)
    assert got[0].shape == (0, 3) and got[1].shape == (0, 4)


# ----------------------------------------------------------------- the checks
def bad_inputs(tail):
    """(name, the bad row, idx, lp, rest, the PyTorch form's message) for each check the rows must pass."""
    idx, lp = teacher(4)
    rest = log1mexp(torch.logsumexp(lp.double(), -1)).float() - 0.01

    def at(t, i, value):
        t = t.clone()
        t[i] = torch.as_tensor(value, dtype=t.dtype)
        return t

    cases = [
        ("negative index", 2, at(idx, 2, [0, -1, 2, 3]), lp, None, r"value -1 at row 2 is outside \[0, 29\)"),
        ("index V", 3, at(idx, 3, [0, 1, V, 3]), lp, None, r"topk_indices value 29 at row 3 is outside \[0, 29\)"),
        ("repeat", 1, at(idx, 1, [5, 7, 5, 2]), lp, None, "topk_indices row 1 repeats index 5"),
        ("nan", 3, idx, at(lp, 3, [-1.0, float("nan"), -2.0, -3.0]), None, "must be finite or -inf, row 3 has nan"),
        ("+inf", 0, idx, at(lp, 0, [-1.0, math.inf, -2.0, -3.0]), None, "finite or -inf, row 0 has inf"),
        ("positive", 5, idx, at(lp, 5, [-1.0, 0.5, -2.0, -3.0]), None, "must be <= 0, row 5 has 0.5"),
        ("mass", 2, idx, at(lp, 2, [-0.1, -0.2, -2.0, -3.0]), None, r"row 2 holds probability mass 1\.9"),
    ]
    if tail == "renormalize":
        cases.append(("no mass", 1, idx, at(lp, 1, [-math.inf] * 4), None, "topk_logprobs row 1 is all -inf"))
    else:
        cases += [
            ("tail nan", 4, idx, lp, at(rest, 4, float("nan")), "tail_logprobs must be finite or -inf, row 4 has nan"),
            ("tail positive", 2, idx, lp, at(rest, 2, 0.25), "tail_logprobs are log-probabilities and must be <= 0"),
            ("tail mass", 0, idx, lp, at(rest, 0, -0.01), r"topk_logprobs row 0 \(with tail_logprobs\) holds"),
            ("no mass", 1, idx, at(lp, 1, [-math.inf] * 4), at(rest, 1, -math.inf),
             r"topk_logprobs row 1 \(with its tail\) is all -inf"),
        ]
    return cases


@pytest.mark.parametrize("tail", TAILS)
def test_bad_rows_raise_the_pytorch_forms_errors(tail):
    s = logits((N, V), torch.float32, seed=4).to(DEVICE)
    for _, _, idx, lp, rest, pattern in bad_inputs(tail):
        with pytest.raises(ValueError, match=pattern):
            topk_distill_loss(s, idx.to(DEVICE), lp.to(DEVICE), tail=tail,
                              tail_logprobs=None if rest is None else rest.to(DEVICE), backend="triton")


STATUS_OF = {"negative index": "an index outside", "index V": "an index outside", "repeat": "repeated",
             "nan": "NaN, \\+inf or > 0", "+inf": "NaN, \\+inf or > 0", "positive": "NaN, \\+inf or > 0",
             "mass": "probability mass > 1", "no mass": "no probability mass", "tail nan": "NaN, \\+inf or > 0",
             "tail positive": "NaN, \\+inf or > 0", "tail mass": "probability mass > 1"}


@pytest.mark.parametrize("tail", TAILS)
def test_the_kernel_itself_finds_every_bad_row(tail, monkeypatch):
    """With the PyTorch checks silenced, the error comes from the kernel's statuses alone, naming the row."""
    for name in ("check_topk_values", "_check_defined"):
        monkeypatch.setattr(topk_module, name, lambda *args, **kwargs: None)
    for name, row, idx, lp, rest, _ in bad_inputs(tail):
        with pytest.raises(ValueError, match=rf"top-k teacher row {row} has .*{STATUS_OF[name]}"):
            rows(idx, lp, rest, bucket=tail == "bucket")


@pytest.mark.parametrize("tail", TAILS)
def test_valid_rows_run_no_pytorch_pass_over_the_teacher(tail, monkeypatch):
    s = logits((N, V), torch.float32, seed=5)
    idx, lp = teacher(4, torch.bfloat16)
    labels = torch.tensor([1, 2, -100, 3, 4, 5])
    want = topk_distill_loss(s, idx, lp, tail=tail, labels=labels, hard_weight=0.5, backend="torch")

    def no_pytorch_pass(*args, **kwargs):
        raise AssertionError("a PyTorch pass went over the teacher's rows")

    for name in ("check_topk_values", "check_topk_logprobs", "teacher_bucket", "neutral_ignored_rows"):
        monkeypatch.setattr(topk_module, name, no_pytorch_pass)
    got = topk_distill_loss(s.to(DEVICE), idx.to(DEVICE), lp.to(DEVICE), tail=tail, labels=labels.to(DEVICE),
                            hard_weight=0.5, backend="triton")
    torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("tail", TAILS)
def test_above_the_kernels_largest_k_the_pytorch_form_gives_the_same(tail, monkeypatch):
    from kdfast.ops.triton import topk_teacher

    idx, lp = teacher(5)
    valid = torch.tensor([True, True, False, True, True, True])
    bucket = tail == "bucket"
    want = rows(idx, lp, valid=valid, bucket=bucket)
    plain = rows(idx, lp, bucket=bucket)
    monkeypatch.setattr(topk_teacher, "MAX_KERNEL_K", 4)
    assert_rows(rows(idx, lp, valid=valid, bucket=bucket), want)
    # without ignored rows too: the outputs are copies, never the inputs (a custom op's may not alias them)
    assert_rows(rows(idx, lp, bucket=bucket), plain)
    s = logits((N, V), torch.float32, seed=6)
    got = topk_distill_loss(s.to(DEVICE), idx.to(DEVICE), lp.to(DEVICE), tail=tail, backend="triton")
    torch.testing.assert_close(got.cpu(), topk_distill_loss(s, idx, lp, tail=tail, backend="torch"),
                               rtol=2e-5, atol=2e-6)
    for _, _, bad_idx, bad_lp, rest, pattern in bad_inputs(tail):
        with pytest.raises(ValueError, match=pattern):
            rows(bad_idx, bad_lp, rest, bucket=bucket)


def test_refuses_what_it_cannot_read():
    from kdfast.ops.triton.topk_teacher import topk_teacher_rows

    idx, lp = teacher(4)
    args = (None, None, V, 1e-5, 1e-6, True, False)
    with pytest.raises(ValueError, match="int32/int64"):
        topk_teacher_rows(idx.float(), lp, *args)
    with pytest.raises(ValueError, match=r"topk_logprobs must be floating point of shape \(6, 4\)"):
        topk_teacher_rows(idx, lp[:, :3], *args)
    with pytest.raises(ValueError, match="tail_logprobs must be floating point with 6 entries"):
        topk_teacher_rows(idx, lp, torch.zeros(5), None, V, 1e-5, 1e-6, True, False)
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        topk_teacher_rows(idx, lp, None, torch.ones(6), V, 1e-5, 1e-6, True, False)
    with pytest.raises(ValueError, match=r"valid must be a bool tensor of shape \(6,\)"):
        topk_teacher_rows(idx, lp, None, torch.ones((6, 1), dtype=torch.bool), V, 1e-5, 1e-6, True, False)
    with pytest.raises(ValueError, match="1 <= k <= 3"):
        topk_teacher_rows(idx, lp, None, None, 3, 1e-5, 1e-6, True, False)


def test_op_registration_and_fake_kernel():
    from kdfast.ops.triton.topk_teacher import triton_topk_teacher

    idx, lp = teacher(4, torch.bfloat16)
    valid = torch.tensor([True, False, True, True, True, True]).to(DEVICE)
    for bucket, f64 in ((True, False), (False, True)):
        torch.library.opcheck(triton_topk_teacher,
                              (idx.to(DEVICE), lp.to(DEVICE), None, valid, V, 1e-3, 1e-6, bucket, f64),
                              test_utils=("test_schema", "test_faketensor"))
