"""The C++ op that writes the student gradient over the student logits (``kdfast::distill_forward_inplace``).

It runs the same row kernel as ``kdfast::distill_forward`` with the gradient
pointer aimed at the logits, so its loss and gradient must be *bit-identical*
to that op's (whose agreement with the reference the other test files prove):
any read of a logit after its gradient was stored would show up here.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kdfast
from conftest import cpu_capabilities, cpu_capability, logits
from kdfast.config import make_config
from kdfast.ops.fused_op import loss_arguments
from kdfast.registry import divergence_cases

pytestmark = pytest.mark.skipif("cpu" not in kdfast.available_backends(), reason="the C++ extension is not built")

# every divergence of the registry, two at other temperatures
_TEMPERATURES = {"kl": dict(temperature=2.0), "skew_reverse_kl": dict(student_temperature=3.0)}
DIVERGENCES = [dict(divergence=d, **params, **_TEMPERATURES.get(d, {})) for d, params in divergence_cases(all_cases=False)]


def in_place_loss(student, teacher, **options):
    """(loss, gradient) of the in-place op on a copy of ``student``."""
    from kdfast.ops.cpu import distill_loss_and_grad_cpu_

    overwritten = student.clone()
    loss = distill_loss_and_grad_cpu_(overwritten, teacher, make_config(overwritten, teacher, **options))
    return loss, overwritten


def autograd_loss(student, teacher, **options):
    s = student.clone().requires_grad_()
    loss = kdfast.distill_loss(s, teacher, backend="cpu", **options)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    return loss.detach(), grad


def assert_bit_identical(student, teacher, **options):
    loss, grad = in_place_loss(student, teacher, **options)
    want_loss, want_grad = autograd_loss(student, teacher, **options)
    assert torch.equal(loss, want_loss)
    assert grad.dtype == student.dtype and torch.equal(grad, want_grad)


@pytest.mark.parametrize("capability", cpu_capabilities())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("options", DIVERGENCES, ids=lambda o: o["divergence"])
def test_gradient_written_over_the_logits_is_the_op_gradient(options, dtype, capability):
    # V = 37: a vector tail on every SIMD width; labels with ignored rows and a hard-label term.
    student, teacher = logits((6, 37), dtype, seed=1), logits((6, 37), dtype, seed=2)
    labels = torch.tensor([3, -100, 0, 36, 5, -100])
    with cpu_capability(capability):
        assert_bit_identical(student, teacher, labels=labels, hard_weight=0.4, **options)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("weighting", [None, "wttm", "entropy", "tensor"])
def test_reductions_and_weightings(reduction, weighting):
    student, teacher = logits((5, 70), seed=3), logits((5, 70), seed=4)
    weights = torch.linspace(0.5, 1.5, 5) if weighting == "tensor" else weighting
    normalizer = 9.0 if reduction == "batchmean" else None
    assert_bit_identical(student, teacher, weighting=weights, reduction=reduction, normalizer=normalizer,
                         temperature=2.0, student_temperature=1.5, labels=torch.tensor([1, 2, 3, 4, 5]),
                         hard_weight=0.3)


def test_mixed_dtypes_masked_logits_and_large_logits():
    student = logits((4, 129), torch.bfloat16, seed=5, scale=1e3)
    teacher = logits((4, 129), torch.float32, seed=6)
    teacher[:, ::3] = float("-inf")
    student[1, 5:] = float("-inf")
    assert_bit_identical(student, teacher, divergence="jsd", beta=0.5)


def test_every_row_ignored_zeroes_the_logits():
    student, teacher = logits((3, 20), seed=7), logits((3, 20), seed=8)
    loss, grad = in_place_loss(student, teacher, labels=torch.full((3,), -100), hard_weight=1.0)
    assert float(loss) == 0.0 and torch.all(grad == 0)


def test_needs_contiguous_rows():
    from kdfast.ops.cpu import distill_loss_and_grad_cpu_

    student, teacher = logits((20, 6), seed=9).t(), logits((6, 20), seed=10)
    with pytest.raises(ValueError, match="contiguous"):
        distill_loss_and_grad_cpu_(student, teacher, make_config(student, teacher))


def test_opcheck_declares_the_mutation():
    s, t = logits((3, 20), seed=1), logits((3, 20), seed=2)
    cfg = make_config(s, t, divergence="jsd", temperature=2.0, weighting="entropy", labels=torch.tensor([1, -100, 4]),
                      hard_weight=0.5)
    args = (s, t, *loss_arguments(cfg))
    torch.library.opcheck(torch.ops.kdfast.distill_forward_inplace.default, args)


# ----------------------------------------------------------------- its use by the fused linear loss
class _OpsCalled(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def _fused_linear_ops(**options):
    from kdfast.llm.fused_linear import fused_linear_distill_loss

    g = torch.Generator().manual_seed(0)
    hs = torch.randn(24, 8, generator=g, requires_grad=True)
    ws = torch.randn(40, 8, generator=g, requires_grad=True)
    ht, wt = torch.randn(24, 8, generator=g), torch.randn(40, 8, generator=g)
    with _OpsCalled() as seen:
        loss = fused_linear_distill_loss(hs, ws, ht, wt, chunk_size=8, **options)
        torch.autograd.grad(loss, (hs, ws))
    return seen.names


def test_the_fused_linear_loss_writes_its_chunk_gradients_in_place():
    assert "kdfast::distill_forward_inplace" in _fused_linear_ops()
    assert "kdfast::distill_forward" not in _fused_linear_ops()


@pytest.mark.parametrize("options", [dict(softcap=5.0), dict(backend="torch")])
def test_softcap_and_other_backends_keep_a_separate_gradient(options):
    assert "kdfast::distill_forward_inplace" not in _fused_linear_ops(**options)
