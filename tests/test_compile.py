"""torch.library registration: the fused op runs inside torch.compile without graph breaks."""

import pytest
import torch

import kdfast
from conftest import FUSED_BACKENDS, logits

pytestmark = pytest.mark.skipif("cpu" not in FUSED_BACKENDS, reason="the C++ extension is not built")


def test_opcheck_fake_kernel_and_autograd():
    s = logits((3, 20), seed=1).requires_grad_()
    t = logits((3, 20), seed=2)
    args = (s, t, torch.tensor([1, -100, 4]), None, "jsd", 2.0, 2.0, 0.0, 0.5, 0.0, "entropy", -100, 0.5, 1.0,
            "batchmean", None, True)
    torch.library.opcheck(torch.ops.kdfast.distill_forward.default, args)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_fullgraph_compile_forward_backward(reduction):
    torch._dynamo.reset()

    def step(student, teacher, labels):
        loss = kdfast.distill_loss(student, teacher, divergence="kl", temperature=2.0, labels=labels,
                                   hard_weight=0.5, reduction=reduction)
        return loss.sum() if reduction == "none" else loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s, t = logits((4, 33), seed=1), logits((4, 33), seed=2)
    labels = torch.tensor([0, 3, -100, 32])
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    eager = step(s1, t, labels)
    eager.backward()
    got = compiled(s2, t, labels)
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(s2.grad, s1.grad)


def test_inductor_compile_of_a_training_step():
    torch._dynamo.reset()
    model = torch.nn.Linear(8, 17)
    teacher = logits((6, 17), seed=3)
    x = logits((6, 8), seed=4)

    @torch.compile(fullgraph=True)
    def step(x):
        return kdfast.kd_loss(model(x), teacher, temperature=3.0)

    loss = step(x)
    loss.backward()
    ref = kdfast.kd_loss(model(x), teacher, temperature=3.0, backend="torch")
    torch.testing.assert_close(loss, ref)
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
