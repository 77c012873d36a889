"""torch.library registration: the fused ops run inside torch.compile without graph breaks."""

import pytest
import torch

import kdfast
from kdfast.config import make_config
from kdfast.ops.fused_op import loss_arguments
from conftest import FUSED_BACKENDS, kernel_device, logits

backends = pytest.mark.parametrize("backend", FUSED_BACKENDS or [pytest.param(
    "none", marks=pytest.mark.skip(reason="no fused backend here"))])


def _op(backend):
    return (torch.ops.kdfast.distill_forward if backend == "cpu" else torch.ops.kdfast.distill_forward_triton).default


@backends
def test_opcheck_fake_kernel_and_autograd(backend):
    device = kernel_device(backend)
    s = logits((3, 20), seed=1).to(device).requires_grad_()
    t = logits((3, 20), seed=2).to(device)
    labels = torch.tensor([1, -100, 4], device=device)
    cfg = make_config(s, t, divergence="jsd", temperature=2.0, weighting="entropy", labels=labels, hard_weight=0.5)
    args = (s, t, *loss_arguments(cfg), True)
    torch.library.opcheck(_op(backend), args)


@backends
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_fullgraph_compile_forward_backward(backend, reduction):
    torch._dynamo.reset()
    device = kernel_device(backend)

    def step(student, teacher, labels):
        loss = kdfast.distill_loss(student, teacher, divergence="kl", temperature=2.0, labels=labels,
                                   hard_weight=0.5, reduction=reduction, backend=backend)
        return loss.sum() if reduction == "none" else loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s, t = logits((4, 33), seed=1).to(device), logits((4, 33), seed=2).to(device)
    labels = torch.tensor([0, 3, -100, 32], device=device)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    eager = step(s1, t, labels)
    eager.backward()
    got = compiled(s2, t, labels)
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(s2.grad, s1.grad)


@backends
def test_inductor_compile_of_a_training_step(backend):
    torch._dynamo.reset()
    device = kernel_device(backend)
    model = torch.nn.Linear(8, 17).to(device)
    teacher = logits((6, 17), seed=3).to(device)
    x = logits((6, 8), seed=4).to(device)

    @torch.compile(fullgraph=True)
    def step(x):
        return kdfast.kd_loss(model(x), teacher, temperature=3.0, backend=backend)

    loss = step(x)
    loss.backward()
    ref = kdfast.kd_loss(model(x), teacher, temperature=3.0, backend="torch")
    torch.testing.assert_close(loss, ref)
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
