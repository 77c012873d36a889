"""KL over small vocabularies (V <= 32): the C++ kernel's lane-per-row blocks (csrc/kernels/narrow_rows.h).

At the AVX2 and AVX-512 levels, KL rows of at most 32 classes go through
blocks of 8 / 16 rows, one row per lane; the rows left over at the end of a
thread's chunk, blocks holding a row the block path does not take (an ignored
label, an all ``-inf`` row, a NaN or ``+inf`` logit) and the ``default`` level
go through the row skeleton.  N = 37 leaves a partial block at every width.
Everything is checked against the float64 oracle with the suite's tolerances
(conftest.assert_matches_oracle).
"""

import math

import pytest
import torch

import kdfast
from conftest import assert_matches_oracle, kernel_backend, kernels, logits

N = 37
VOCABS = [2, 7, 10, 16, 31, 32, 33]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS)
def test_soft_kl_matches_reference(vocab, dtype, kernel):
    student, teacher = logits((N, vocab), dtype, seed=1), logits((N, vocab), dtype, seed=2)
    assert_matches_oracle(student, teacher, kernel, divergence="kl", temperature=4.0)


@kernels
@pytest.mark.parametrize("student_temperature", [None, 1.0], ids=["tau_s=T", "tau_s=1"])
@pytest.mark.parametrize("vocab", [3, 10, 32])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_hard_labels_and_given_weights(reduction, vocab, student_temperature, kernel):
    """KD's usual classification loss: CE on the labels plus the soft term, per-row weights."""
    student, teacher = logits((N, vocab), seed=3), logits((N, vocab), seed=4)
    labels = torch.arange(N) % vocab
    kw = dict(divergence="kl", temperature=2.0, labels=labels, hard_weight=0.3, soft_weight=0.7,
              weighting=torch.linspace(0.1, 2.0, N), reduction=reduction)
    if student_temperature is not None:
        kw["student_temperature"] = student_temperature
    assert_matches_oracle(student, teacher, kernel, **kw)


@kernels
def test_ignored_label_inside_a_block(kernel):
    """An ignored row sends its block to the row skeleton: loss and gradient 0 there, the rest unchanged."""
    student, teacher = logits((N, 10), seed=5), logits((N, 10), seed=6)
    labels = torch.arange(N) % 10
    labels[[3, 20, 36]] = -100
    assert_matches_oracle(student, teacher, kernel, divergence="kl", temperature=2.0, labels=labels,
                          hard_weight=0.5, reduction="none")


@kernels
def test_masked_classes_and_large_logits(kernel):
    """-inf entries (not whole rows) stay in the block path; logits of 1e30 take the exact shift."""
    student, teacher = logits((N, 10), seed=7), logits((N, 10), seed=8)
    teacher[::3, 4] = -math.inf
    student[1::5, 7] = -math.inf
    teacher[::5, 7] = -math.inf  # where the student is masked, the teacher is too: the loss stays finite
    student[2] *= 1e29
    teacher[2] *= 1e29
    teacher[9] += 1e30
    assert_matches_oracle(student, teacher, kernel, divergence="kl", temperature=2.0, reduction="none")


@kernels
def test_non_contiguous_rows(kernel):
    base_s, base_t = logits((N, 24), seed=9), logits((24, N), seed=10)
    student, teacher = base_s[:, 2:22:2], base_t.t()[:, 3:13]  # element strides 2 and N: neither contiguous
    assert not student.is_contiguous() and not teacher.is_contiguous()
    assert_matches_oracle(student, teacher, kernel, divergence="kl", temperature=3.0)


@kernels
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "+inf"])
def test_nonfinite_row_inside_a_block(bad, kernel):
    """NaN in, NaN out for that row only: its block's other rows keep their values and gradients."""
    student, teacher = logits((N, 10), seed=11), logits((N, 10), seed=12)
    student[5, 2] = bad
    s = student.clone().requires_grad_(True)
    with kernel_backend(kernel) as backend:
        loss = kdfast.distill_loss(s, teacher, divergence="kl", temperature=2.0, reduction="none", backend=backend)
        loss.sum().backward()
    ok = torch.arange(N) != 5
    assert torch.isnan(loss[5]) and torch.isnan(s.grad[5]).all()
    ref = kdfast.distill_loss(student[ok], teacher[ok], divergence="kl", temperature=2.0, reduction="none",
                              backend="torch")
    torch.testing.assert_close(loss[ok].double(), ref.double(), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(s.grad[ok]).all()


@kernels
def test_all_neg_inf_row_inside_a_block_raises(kernel):
    student, teacher = logits((N, 10), seed=13), logits((N, 10), seed=14)
    teacher[17] = -math.inf
    with kernel_backend(kernel) as backend, pytest.raises(ValueError, match="-inf"):
        kdfast.distill_loss(student, teacher, divergence="kl", backend=backend)


@kernels
def test_forward_only_matches_forward_with_gradient(kernel):
    """Without a gradient the block path writes only the losses (no_grad: the op is asked for no gradient)."""
    student, teacher = logits((N, 10), seed=15), logits((N, 10), seed=16)
    with kernel_backend(kernel) as backend:
        with torch.no_grad():
            plain = kdfast.distill_loss(student, teacher, divergence="kl", reduction="none", backend=backend)
        with_grad = kdfast.distill_loss(student.clone().requires_grad_(True), teacher, divergence="kl",
                                        reduction="none", backend=backend)
    torch.testing.assert_close(plain, with_grad.detach(), rtol=0, atol=0)


def test_many_rows_across_threads():
    """Blocks and leftovers split across threads: bit-identical losses for 1 and 2 threads."""
    student, teacher = logits((1000, 10), seed=17), logits((1000, 10), seed=18)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(kdfast.distill_loss(student, teacher, divergence="kl", reduction="none"))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    ref = kdfast.distill_loss(student, teacher, divergence="kl", reduction="none", backend="torch")
    torch.testing.assert_close(results[0].double(), ref.double(), rtol=1e-5, atol=1e-6)
