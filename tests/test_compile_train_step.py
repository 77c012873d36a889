"""torch.compile of a training step that calls the fused linear loss: one graph break, at the loss.

The chunk loop (``kdfast.llm.chunking.chunked_linear_loss``) is marked
``torch.compiler.disable``: a compiled step breaks its graph there, the loss runs
eagerly (its kernels are already fused), and the trunk before it and its
backward are compiled.  ``fullgraph=True`` is refused at that call.  Without
``normalizer=`` the ``"batchmean"`` count of the valid rows is read from the
labels (``.item()``): a second break.  The README ("FSDP2, DDP and
torch.compile") states these counts; the tests hold them.
"""

import pytest
import torch
import torch._dynamo
from torch import nn

from kdfast import fused_linear_distill_loss, fused_linear_topk_distill_loss

B, T, F, H, H_T, V = 2, 6, 8, 12, 10, 37
OPTIONS = dict(divergence="kl", temperature=2.0, hard_weight=0.5, soft_weight=0.5, chunk_size=4)
# What the README says: one graph break per loss call with normalizer=, two without.
BREAKS_WITH_NORMALIZER = 1
BREAKS_WITHOUT_NORMALIZER = 2


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(F, H), nn.Tanh(), nn.Linear(H, H))
        self.lm_head = nn.Linear(H, V)


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, F, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2] = -100
    teacher_hidden = torch.randn(B, T, H_T, generator=g)
    teacher_weight = torch.randn(V, H_T, generator=g)
    normalizer = float((labels[:, 1:] != -100).sum())
    return x, labels, teacher_hidden, teacher_weight, normalizer


def loss_of(model, x, labels, teacher_hidden, teacher_weight, normalizer=None):
    hidden = model.trunk(x)
    return fused_linear_distill_loss(hidden, model.lm_head.weight, teacher_hidden, teacher_weight, labels,
                                     student_bias=model.lm_head.bias, shift=True, normalizer=normalizer, **OPTIONS)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _loss_and_grads(fn, model, *args):
    model.zero_grad(set_to_none=True)
    loss = fn(model, *args)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_fullgraph_is_refused_at_the_loss():
    model, args = Student(), batch()
    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    with pytest.raises(torch._dynamo.exc.Unsupported, match="disable"):
        compiled(model, *args)


@pytest.mark.parametrize("with_normalizer", [True, False])
def test_graph_breaks_are_the_documented_ones(with_normalizer):
    model, (x, labels, teacher_hidden, teacher_weight, normalizer) = Student(), batch()
    explanation = torch._dynamo.explain(loss_of)(model, x, labels, teacher_hidden, teacher_weight,
                                                 normalizer if with_normalizer else None)
    reasons = [reason.reason for reason in explanation.break_reasons]
    if with_normalizer:
        assert explanation.graph_break_count == BREAKS_WITH_NORMALIZER
        assert reasons and all("torch.compiler.disable" in reason for reason in reasons), reasons
    else:
        # The valid rows of "batchmean" are counted from the labels' values: a data-dependent .item().
        assert explanation.graph_break_count == BREAKS_WITHOUT_NORMALIZER
        assert any("item()" in reason for reason in reasons), reasons


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_forward_gives_the_eager_loss_and_gradients(backend):
    model, args = Student(), batch()
    want_loss, want_grads = _loss_and_grads(loss_of, model, *args)
    got_loss, got_grads = _loss_and_grads(torch.compile(loss_of, backend=backend), model, *args)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
    # inductor fuses the trunk's backward differently: float32 rounding (3.7e-9 here)
    torch.testing.assert_close(got_grads, want_grads, rtol=1e-5, atol=1e-7)


def test_compiled_training_step_with_backward_and_optimizer_inside():
    args = batch()

    def run(compile_step: bool):
        model = Student()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)

        def step():
            loss = loss_of(model, *args)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return loss.detach()

        step_fn = torch.compile(step, backend="aot_eager") if compile_step else step
        losses = [step_fn() for _ in range(3)]
        return torch.stack(losses), dict(model.named_parameters())

    want_losses, want_params = run(False)
    got_losses, got_params = run(True)
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_params, want_params, rtol=1e-6, atol=1e-7)
    assert not torch.equal(want_losses[0], want_losses[-1])  # the steps did train


def test_compiled_topk_fused_loss_gives_the_eager_loss_and_gradients():
    model, (x, labels, teacher_hidden, teacher_weight, normalizer) = Student(), batch()
    with torch.no_grad():
        teacher_logprobs = torch.log_softmax(teacher_hidden @ teacher_weight.T, dim=-1)
    topk_logprobs, topk_indices = teacher_logprobs.topk(5, dim=-1)

    def topk_loss_of(model):
        return fused_linear_topk_distill_loss(model.trunk(x), model.lm_head.weight, topk_indices, topk_logprobs,
                                              labels, student_bias=model.lm_head.bias, shift=True,
                                              normalizer=normalizer, **OPTIONS)

    want_loss, want_grads = _loss_and_grads(topk_loss_of, model)
    got_loss, got_grads = _loss_and_grads(torch.compile(topk_loss_of, backend="aot_eager"), model)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grads, want_grads, rtol=1e-6, atol=1e-7)
