"""Autograd behaviours every backend shares with the reference (issue 14, defects 1, 3 and 5).

The fused kernels compute the gradient in the forward and hand it out in
backward.  These tests pin what a user may do with it: take it twice through
a retained graph without two results sharing storage, modify it in place
between backward passes, differentiate an empty batch, and get a clear error
(not a silently wrong Hessian) for a double backward.
"""

import pytest
import torch

import kdfast
from conftest import KERNELS, kernel_backend, kernel_device, logits

BACKENDS = ["torch"] + KERNELS
N, V = 6, 37


def _losses(device):
    """name -> loss(student, teacher) for each fused loss family, with labels where it takes them."""
    def labels(s):
        return torch.arange(s.shape[0], device=device) % s.shape[-1]

    return {
        "kd": lambda s, t, b: kdfast.kd_loss(s, t, temperature=2.0, backend=b),
        "jsd_hard": lambda s, t, b: kdfast.distill_loss(s, t, divergence="jsd", labels=labels(s), hard_weight=0.5,
                                                        backend=b),
        "dist": lambda s, t, b: kdfast.dist_loss(s, t, 2.0, backend=b),
        "dkd": lambda s, t, b: kdfast.dkd_loss(s, t, labels(s), 2.0, backend=b),
        "correlation": lambda s, t, b: kdfast.correlation_loss(s, t, 1.0, backend=b),
    }


LOSSES = ["kd", "jsd_hard", "dist", "dkd", "correlation"]


def _inputs(kernel, shape=(N, V)):
    device = kernel_device(kernel)
    s = logits(shape, seed=1).to(device).requires_grad_(True)
    t = logits(shape, seed=2).to(device)
    return s, t


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("kernel", BACKENDS)
def test_retained_graph_gives_every_backward_its_own_gradient(kernel, loss_name):
    s, t = _inputs(kernel)
    with kernel_backend(kernel) as backend:
        loss = _losses(s.device)[loss_name](s, t, backend)
        g1, = torch.autograd.grad(loss, s, retain_graph=True)
        g2, = torch.autograd.grad(loss, s, retain_graph=True)
        assert g1.data_ptr() != g2.data_ptr()
        g1.mul_(0)  # the caller owns its result: this must not reach g2 nor the graph
        g3, = torch.autograd.grad(loss, s)
    assert torch.equal(g2, g3) and g3.abs().sum() > 0


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("kernel", BACKENDS)
def test_repeated_backward_accumulates_and_survives_in_place_changes(kernel, loss_name):
    s, t = _inputs(kernel)
    with kernel_backend(kernel) as backend:
        loss = _losses(s.device)[loss_name](s, t, backend)
        for _ in range(3):
            loss.backward(retain_graph=True)
        once = s.grad.clone() / 3
        s.grad.zero_()                                 # zero_grad(set_to_none=False)
        loss.backward(retain_graph=True)
        torch.nn.utils.clip_grad_norm_([s], 1e-3)      # clipping scales .grad in place
        s.grad.zero_()
        loss.backward()
    torch.testing.assert_close(s.grad, once, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_single_backward_still_hands_out_the_forwards_buffer(kernel):
    """The zero-copy fast path: a plain backward returns the very buffer the forward wrote."""
    s, t = _inputs(kernel)
    with kernel_backend(kernel) as backend:
        loss = kdfast.kd_loss(s, t, backend=backend)
        (saved,) = loss.grad_fn.saved_tensors
        g, = torch.autograd.grad(loss, s)
    assert g.data_ptr() == saved.data_ptr()


@pytest.mark.parametrize("loss_name", ["kd", "jsd_hard", "dkd", "correlation"])
@pytest.mark.parametrize("shape", [(0, V), (2, 0, V)], ids=["N=0", "B,0,V"])
@pytest.mark.parametrize("kernel", BACKENDS)
def test_an_empty_batch_has_zero_loss_and_an_empty_gradient(kernel, loss_name, shape):
    if loss_name in ("dkd", "jsd_hard") and len(shape) == 3:
        pytest.skip("labels are (N,): the 2-D case covers these")
    device = kernel_device(kernel)
    s = torch.zeros(shape, device=device, requires_grad=True)
    t = torch.zeros(shape, device=device)
    labels = torch.zeros(shape[:-1], dtype=torch.long, device=device).reshape(-1)
    fns = {
        "kd": lambda b: kdfast.kd_loss(s, t, backend=b),
        "jsd_hard": lambda b: kdfast.distill_loss(s, t, divergence="jsd", labels=labels, hard_weight=0.5, backend=b),
        "dkd": lambda b: kdfast.dkd_loss(s, t, labels, backend=b),
        "correlation": lambda b: kdfast.correlation_loss(s, t, backend=b),
    }
    with kernel_backend(kernel) as backend:
        loss = fns[loss_name](backend)
        loss.backward()
    assert float(loss.detach()) == 0.0
    assert s.grad.shape == s.shape


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_double_backward_is_a_clear_error_not_a_missing_term(kernel, loss_name):
    s, t = _inputs(kernel)
    with kernel_backend(kernel) as backend:
        loss = _losses(s.device)[loss_name](s, t, backend)
        with pytest.raises(RuntimeError, match="double backward.*backend='torch'"):
            torch.autograd.grad(loss, s, create_graph=True)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_the_reference_supports_double_backward(loss_name):
    """What the error message recommends works: a Hessian-vector product through the reference."""
    s, t = _inputs("torch", (3, 5))
    s, t = s.double().detach().requires_grad_(True), t.double()
    fn = _losses(s.device)[loss_name]
    v = torch.randn_like(s)
    assert torch.autograd.gradgradcheck(lambda x: fn(x, t, "torch"), (s,), (torch.ones(()).double(),))
    g, = torch.autograd.grad(fn(s, t, "torch"), s, create_graph=True)
    hv, = torch.autograd.grad((g * v).sum(), s)
    assert torch.isfinite(hv).all()


@pytest.mark.parametrize("kernel", BACKENDS)
def test_fused_linear_retained_graph_gives_each_backward_its_own_gradients(kernel):
    device = kernel_device(kernel)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(10, 8, generator=g).to(device).requires_grad_(True)
    w = torch.randn(V, 8, generator=g).to(device).requires_grad_(True)
    th, tw = torch.randn(10, 12, generator=g).to(device), torch.randn(V, 12, generator=g).to(device)
    with kernel_backend(kernel) as backend:
        loss = kdfast.fused_linear_distill_loss(h, w, th, tw, temperature=2.0, backend=backend, chunk_size=4)
        gh1, gw1 = torch.autograd.grad(loss, (h, w), retain_graph=True)
        gh2, gw2 = torch.autograd.grad(loss, (h, w), retain_graph=True)
        assert gh1.data_ptr() != gh2.data_ptr() and gw1.data_ptr() != gw2.data_ptr()
        gh1.zero_(), gw1.zero_()
        for _ in range(2):
            loss.backward(retain_graph=True)
        w.grad.zero_()
        loss.backward()
    torch.testing.assert_close(h.grad, 3 * gh2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, gw2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kernel", BACKENDS)
def test_fused_linear_double_backward_is_an_error(kernel):
    device = kernel_device(kernel)
    h = torch.randn(4, 8, device=device, requires_grad=True)
    w = torch.randn(V, 8, device=device, requires_grad=True)
    with kernel_backend(kernel) as backend:
        loss = kdfast.fused_linear_distill_loss(h, w, torch.randn(4, 8, device=device), torch.randn(V, 8, device=device),
                                                backend=backend)
        with pytest.raises(RuntimeError, match="double backward.*Materialise the logits"):
            torch.autograd.grad(loss, h, create_graph=True)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_the_cpu_ops_autograd_kernel_skips_torchs_per_call_fill_defaults(loss_name, monkeypatch):
    """The C++ ops' Autograd kernel is register_autograd's less its fill_defaults (46 us a call on a
    15-argument schema): a differentiable call must not reach it, and must still give the gradient."""
    if "cpu" not in kdfast.available_backends():
        pytest.skip("the C++ extension is not built")
    import torch._library.utils as library_utils

    def refuse(*args, **kwargs):
        raise AssertionError("fill_defaults ran")

    want = _inputs("torch")
    loss = _losses("cpu")[loss_name](want[0], want[1], "torch")
    (want_grad,) = torch.autograd.grad(loss, want[0])
    monkeypatch.setattr(library_utils, "fill_defaults", refuse)
    s, t = _inputs("cpu")
    loss = _losses("cpu")[loss_name](s, t, "cpu")
    (grad,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_the_autograd_kernel_refuses_a_schema_with_defaults():
    from kdfast.ops.fused_op import register_autograd_kernel

    lib = torch.library.Library("kdfast_test_defaults", "DEF")
    lib.define("op(Tensor x, float scale=1.0) -> Tensor")
    with pytest.raises(ValueError, match="positional arguments without defaults"):
        register_autograd_kernel("kdfast_test_defaults::op", lambda ctx, g: (g, None), lambda ctx, inputs, output: None)
