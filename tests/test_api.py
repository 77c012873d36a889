"""The public API: wrappers, modules, backend choice, the extension fallback."""

import os
import subprocess
import sys

import pytest
import torch

import kdfast
from conftest import FUSED_BACKENDS, logits


def test_available_backends():
    names = kdfast.available_backends()
    assert names[0] == "torch"
    assert set(names) <= {"torch", "cpu", "triton"}
    assert ("cpu" in names) == kdfast.cpu_extension_available()
    assert ("triton" in names) == (kdfast.ops.triton.unavailable_reason() is None)


def test_named_losses_are_thin_wrappers():
    s, t = logits((6, 30), seed=1), logits((6, 30), seed=2)
    T = 3.0
    torch.testing.assert_close(kdfast.kd_loss(s, t, temperature=T),
                               kdfast.distill_loss(s, t, temperature=T, scale=T * T))
    torch.testing.assert_close(kdfast.ttm_loss(s, t, temperature=T),
                               kdfast.distill_loss(s, t, temperature=T, student_temperature=1.0))
    torch.testing.assert_close(kdfast.wttm_loss(s, t, temperature=T),
                               kdfast.distill_loss(s, t, temperature=T, student_temperature=1.0, weighting="wttm"))


@pytest.mark.parametrize("module,fn", [
    (kdfast.KDLoss(temperature=2.0), lambda s, t, y: kdfast.kd_loss(s, t, temperature=2.0, labels=y)),
    (kdfast.TTMLoss(temperature=2.0), lambda s, t, y: kdfast.ttm_loss(s, t, temperature=2.0, labels=y)),
    (kdfast.WTTMLoss(temperature=2.0), lambda s, t, y: kdfast.wttm_loss(s, t, temperature=2.0, labels=y)),
    (kdfast.DistillLoss(divergence="jsd", beta=0.2, hard_weight=0.5),
     lambda s, t, y: kdfast.distill_loss(s, t, divergence="jsd", beta=0.2, hard_weight=0.5, labels=y)),
])
def test_modules_match_functions(module, fn):
    s, t = logits((4, 12), seed=1), logits((4, 12), seed=2)
    y = torch.tensor([1, 2, -100, 3])
    torch.testing.assert_close(module(s, t, y), fn(s, t, y))
    assert isinstance(module, torch.nn.Module) and "temperature" in repr(module) or "divergence" in repr(module)


def test_module_rejects_labels_at_construction():
    with pytest.raises(TypeError, match="call time"):
        kdfast.DistillLoss(labels=torch.zeros(2))


@pytest.mark.skipif("cpu" not in FUSED_BACKENDS, reason="the C++ extension is not built")
def test_auto_picks_the_cpu_kernel_and_env_overrides(monkeypatch):
    from kdfast.ops.backends import resolve_backend

    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "cpu"
    assert resolve_backend("auto", torch.device("meta")) == "torch"
    monkeypatch.setenv("KDFAST_BACKEND", "torch")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("cpu", cpu) == "cpu"  # an explicit choice wins over the environment


@pytest.mark.skipif("cpu" not in FUSED_BACKENDS, reason="the C++ extension is not built")
def test_cpu_capability_is_reported():
    assert kdfast.cpu_capability() in ("default", "avx2", "avx512", "avx512_bf16")


def test_missing_extension_falls_back_with_one_warning():
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import kdfast, torch\n"
        "    s = torch.randn(3, 7); t = torch.randn(3, 7)\n"
        "    a = kdfast.kd_loss(s, t, temperature=2.0); b = kdfast.kd_loss(s, t, temperature=2.0)\n"
        "msgs = [str(x.message) for x in w if 'kdfast' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'falls back to the pure-PyTorch reference' in msgs[0], msgs\n"
        "assert kdfast.available_backends() == ['torch']\n"
        "print('ok')\n"
    )
    env = dict(os.environ, KDFAST_DISABLE_EXTENSION="1", TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_loss_dtype_and_no_grad_mode():
    s, t = logits((3, 9), torch.bfloat16), logits((3, 9), torch.bfloat16, seed=1)
    assert kdfast.distill_loss(s, t).dtype == torch.float32
    assert kdfast.distill_loss(s.double(), t.double()).dtype == torch.float64
    with torch.no_grad():
        loss = kdfast.distill_loss(s.requires_grad_(), t)
    assert not loss.requires_grad


def test_teacher_gets_no_gradient():
    s = logits((3, 9)).requires_grad_()
    t = logits((3, 9), seed=1).requires_grad_()
    kdfast.distill_loss(s, t).backward()
    assert t.grad is None and s.grad is not None


def test_backward_twice_with_retain_graph():
    s = logits((3, 9)).requires_grad_()
    loss = kdfast.distill_loss(s, logits((3, 9), seed=1))
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * first)


@pytest.mark.skipif("cpu" not in FUSED_BACKENDS, reason="the C++ extension is not built")
def test_backward_allocates_no_second_buffer():
    """Backward of a scalar loss returns the forward's gradient buffer: no zeros, no copy, no multiply."""
    s = logits((64, 1000)).requires_grad_()
    loss = kdfast.distill_loss(s, logits((64, 1000), seed=1), backend="cpu")
    with torch.profiler.profile(profile_memory=True) as prof:
        torch.autograd.grad(loss, s)
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())
    assert allocated < 64 * 1000 * 4 // 4, allocated


def test_a_triton_older_than_3_6_is_reported_unavailable(monkeypatch):
    import importlib.util
    from importlib import metadata

    from kdfast.ops import triton as _triton

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(metadata, "version", lambda name: "3.5.1")
    assert "triton 3.5.1 is older than 3.6" in _triton.unavailable_reason()
    monkeypatch.setattr(metadata, "version", lambda name: "3.6.0+git1234")
    assert "older" not in (_triton.unavailable_reason() or "")


def test_a_kernel_not_written_is_not_implemented(monkeypatch):
    from kdfast.ops import backends

    # every family has every kernel at present: a stand-in entry
    monkeypatch.setitem(backends.NOT_WRITTEN, "grouped_kd", ("cpu",))
    with pytest.raises(NotImplementedError, match=r"no 'cpu' kernel yet; its backends are \['torch', 'triton'\]"):
        backends.resolve_backend("cpu", torch.device("cpu"), "grouped_kd")


@pytest.mark.parametrize("family", ["distill", "dist", "dkd", "correlation", "grouped_kd", "ltkd"])
def test_one_resolver_for_every_loss_family(family, monkeypatch):
    from kdfast.ops import backends

    monkeypatch.delenv("KDFAST_BACKEND", raising=False)
    assert backends.available_backends(family)[0] == "torch"
    assert backends.resolve_backend("auto", torch.device("meta"), family) == "torch"
    assert backends.pick(family, "torch", torch.device("cpu")) is backends.FAMILIES[family]
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        backends.resolve_backend("gpu", torch.device("cpu"), family)
    if "cpu" in backends.available_backends(family):
        assert backends.resolve_backend("auto", torch.device("cpu"), family) == "cpu"
        with pytest.raises(ValueError, match="takes CPU tensors"):
            backends.resolve_backend("cpu", torch.device("meta"), family)
        monkeypatch.setenv("KDFAST_BACKEND", "torch")
        assert backends.resolve_backend("auto", torch.device("cpu"), family) == "torch"
