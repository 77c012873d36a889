"""The bf16 row maxima of the C++ kernels, taken on the raw bits.

The first sweep of a bf16 row compares the logits' bit patterns as int16
(largest pattern if it is >= 0, else the smallest) instead of converting them
to float.  Every later sweep converts the same values to float, so a bf16 call
must be *bit-identical* to the float32 call on the same values upcast: any
maximum other than the float one would shift every exponent and show up here.
The rows below are built to hit the cases of the bit ordering: all negative,
signed zeros, -inf, huge logits, the maximum in the vector tail, NaN.
"""

from __future__ import annotations

import pytest
import torch

import kdfast
from conftest import cpu_capabilities, cpu_capability

pytestmark = pytest.mark.skipif("cpu" not in kdfast.available_backends(), reason="the C++ extension is not built")


def patterned_rows(vocab: int, seed: int) -> torch.Tensor:
    """Rows that exercise the int16 ordering of bf16 bits, as bf16."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(8, vocab, generator=g, dtype=torch.float64)
    rows = [
        normal[0] * 3,  # mixed signs
        -(normal[1].abs() + 0.5),  # all negative: the max is the smallest pattern
        torch.where(normal[2] > 0, torch.tensor(-0.0, dtype=torch.float64), -(normal[2].abs() + 1)),  # -0.0 is the max
        torch.cat([-(normal[3, :-1].abs() + 1), torch.zeros(1, dtype=torch.float64)]),  # +0.0 last, rest negative
        normal[4] * 1e4,  # huge logits
        torch.cat([normal[5, :-1], torch.tensor([50.0], dtype=torch.float64)]),  # the max in the vector tail
        torch.where(normal[6] > 0.5, torch.tensor(float("-inf"), dtype=torch.float64), -(normal[6].abs() + 2)),
        -(normal[7].abs() + 3) * 1e3,  # large negative only
    ]
    out = torch.stack(rows)
    out[6, 0] = -7.0  # never all -inf
    return out.to(torch.bfloat16)


def assert_identical(a, b):
    """Bit-identical, NaN where NaN (reverse KL of a q > 0 where p = 0 is inf, its gradient NaN)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def as_stored_bf16(grad: torch.Tensor, capability: str) -> torch.Tensor:
    """A float32 gradient as the kernels store it in bf16: rounded to nearest even, and at the
    avx512_bf16 level (vcvtneps2bf16) with subnormals (|g| < 2^-126) flushed to zero."""
    if capability == "avx512_bf16":
        grad = torch.where(grad.abs() < 2.0**-126, torch.zeros_like(grad), grad)
    return grad.to(torch.bfloat16)


def loss_and_grad(student, teacher, **options):
    """(per-row loss, gradient) with an upstream gradient of 1, so that backward returns the
    kernel's gradient as stored (conftest's varying upstream would round a bf16 gradient twice)."""
    student = student.detach().clone().requires_grad_()
    loss = kdfast.distill_loss(student, teacher, backend="cpu", reduction="none", **options)
    loss.sum().backward()
    return loss.detach(), student.grad


@pytest.mark.parametrize("capability", cpu_capabilities())
@pytest.mark.parametrize("vocab", [1, 7, 16, 17, 37, 200])
@pytest.mark.parametrize("options", [dict(divergence="kl", temperature=2.0),
                                     dict(divergence="reverse_kl", labels=True, hard_weight=0.5)],
                         ids=["kl", "reverse_kl+ce"])
def test_bf16_rows_are_bit_identical_to_their_float32_upcast(options, vocab, capability):
    teacher, student = patterned_rows(vocab, seed=1), patterned_rows(vocab, seed=2).roll(3, dims=0)
    options = dict(options)
    if options.pop("labels", False):
        options["labels"] = torch.arange(8) % vocab
    with cpu_capability(capability):
        loss16, grad16 = loss_and_grad(student, teacher, **options)
        loss32, grad32 = loss_and_grad(student.float(), teacher.float(), **options)
    assert_identical(loss16, loss32)
    assert_identical(grad16, as_stored_bf16(grad32, capability))


@pytest.mark.parametrize("capability", cpu_capabilities())
def test_dist_loss_of_bf16_rows_is_bit_identical_to_its_float32_upcast(capability):
    teacher = patterned_rows(37, seed=3)[[0, 1, 2, 3, 5]]  # DIST needs finite logits
    student = patterned_rows(37, seed=4)[[5, 0, 1, 2, 3]]
    with cpu_capability(capability):
        loss16 = kdfast.dist_loss(student, teacher, temperature=2.0, backend="cpu")
        loss32 = kdfast.dist_loss(student.float(), teacher.float(), temperature=2.0, backend="cpu")
    assert_identical(loss16.float(), loss32)


@pytest.mark.parametrize("capability", cpu_capabilities())
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_nan_logits_behave_as_in_float32(sign, capability):
    """A raw-bits max that lands on a NaN is redone on float lanes, which skip NaNs."""
    nan = sign * float("nan")
    student = patterned_rows(37, seed=5)
    teacher = patterned_rows(37, seed=6)
    teacher[0, 4] = nan  # among finite logits: the loss of that row is NaN
    with cpu_capability(capability):
        loss16, _ = loss_and_grad(student, teacher)
        loss32, _ = loss_and_grad(student.float(), teacher.float())
    assert torch.isnan(loss16[0]) and torch.isnan(loss32[0])
    assert_identical(loss16[1:], loss32[1:])

    # NaN and -inf only: no finite maximum, but not "all -inf" either: a NaN row in both dtypes
    teacher[0] = float("-inf")
    teacher[0, 4] = nan
    for t in (teacher, teacher.float()):
        with cpu_capability(capability):
            loss, grad = loss_and_grad(student.to(t.dtype), t)
        assert torch.isnan(loss[0]) and torch.isnan(grad[0]).all() and not torch.isnan(loss[1:]).any()
