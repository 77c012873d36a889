"""Bad input raises the spec's errors, with the offending names and values, on every backend."""

import pytest
import torch

import kdfast
from conftest import FUSED_BACKENDS, kernel_device, logits

BACKENDS = ["torch"] + FUSED_BACKENDS
backends = pytest.mark.parametrize("backend", BACKENDS)


def call(backend, s=None, t=None, **kw):
    """distill_loss on the backend's device (inputs that are not float tensors are passed as they are)."""
    device = kernel_device(backend)
    s = logits((4, 10), seed=1) if s is None else s
    t = logits((4, 10), seed=2) if t is None else t
    s, t = (x.to(device) if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x for x in (s, t))
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return kdfast.distill_loss(s, t, backend=backend, **kw)


@backends
def test_shape_mismatch_names_both_shapes(backend):
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 11\)"):
        call(backend, t=logits((4, 11)))


@backends
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_unsupported_dtype(backend, dtype):
    with pytest.raises(TypeError, match="float32"):
        call(backend, s=torch.zeros(4, 10, dtype=dtype))


@backends
def test_not_a_tensor(backend):
    with pytest.raises(TypeError, match="torch.Tensor"):
        call(backend, s=[[0.0] * 10] * 4)


@backends
def test_device_mismatch(backend):
    with pytest.raises(ValueError, match="meta"):
        call(backend, t=torch.zeros(4, 10, device="meta"))


@backends
@pytest.mark.parametrize(
    "kw,pattern",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(student_temperature=0.0), "student_temperature"),
        (dict(divergence="renyi", alpha=0.0), "alpha=0.0"),
        (dict(divergence="renyi", alpha=-2.0), "alpha=-2.0"),
        (dict(divergence="ab", alpha=1.0, beta=0.0), "beta=0.0"),
        (dict(divergence="ab", alpha=-1.0, beta=1.0), "alpha=-1.0"),
        (dict(divergence="jsd", beta=1.5), "beta=1.5"),
        (dict(divergence="jsd", beta=-0.1), "beta=-0.1"),
        (dict(divergence="skew_kl", skew=1.2), "skew=1.2"),
        (dict(divergence="skew_reverse_kl", skew=-0.5), "skew=-0.5"),
        (dict(divergence="kl", alpha=0.5), "takes no parameter alpha"),
        (dict(divergence="tvd", skew=0.5), "takes no parameter skew"),
        (dict(divergence="cross_entropy"), "divergence must be one of"),
        (dict(weighting="uniform"), "weighting"),
        (dict(weighting=torch.ones(3)), r"weighting shape \(3,\)"),
        (dict(reduction="mean"), "reduction"),
        (dict(reduction="sum", normalizer=4), "normalizer"),
        (dict(normalizer=0), "normalizer must be > 0"),
        (dict(hard_weight=1.0), "needs labels"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), r"labels shape \(5,\)"),
        (dict(labels=torch.tensor([0, 1, 10, -100])), "label 10 at row 2"),
        (dict(labels=torch.tensor([0, 1, -3, -100])), "label -3 at row 2"),
    ],
)
def test_bad_values(backend, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(backend, **kw)


@backends
def test_float_labels_are_a_type_error(backend):
    with pytest.raises(TypeError, match="labels must be an integer"):
        call(backend, labels=torch.zeros(4))


@backends
@pytest.mark.parametrize("who", ["teacher", "student"])
def test_all_neg_inf_row_is_an_error(backend, who):
    s, t = logits((4, 10), seed=1), logits((4, 10), seed=2)
    (t if who == "teacher" else s)[2] = float("-inf")
    with pytest.raises(ValueError, match=f"{who}_logits row 2 is all -inf"):
        call(backend, s=s, t=t)
    # ...unless the row is ignored
    call(backend, s=s, t=t, labels=torch.tensor([0, 1, -100, 3]))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        call("cuda")


@pytest.mark.skipif("cpu" not in FUSED_BACKENDS, reason="the C++ extension is not built")
def test_cpu_backend_refuses_other_devices():
    with pytest.raises(ValueError, match="CPU tensors"):
        kdfast.distill_loss(torch.zeros(2, 3, device="meta"), torch.zeros(2, 3, device="meta"), backend="cpu")


@pytest.mark.skipif("triton" not in FUSED_BACKENDS, reason="triton cannot run here")
def test_triton_backend_refuses_cpu_tensors_unless_interpreted(monkeypatch):
    from kdfast.backends import resolve_backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA tensors"):
        resolve_backend("triton", torch.device("meta"))


def test_wrappers_fix_their_parameters():
    s, t = logits((2, 5)), logits((2, 5), seed=1)
    with pytest.raises(TypeError, match="fixes scale"):
        kdfast.kd_loss(s, t, scale=2.0)
    with pytest.raises(TypeError, match="fixes weighting"):
        kdfast.wttm_loss(s, t, weighting="entropy")
    with pytest.raises(ValueError, match="alpha"):
        kdfast.DistillLoss(divergence="renyi", alpha=-1)
