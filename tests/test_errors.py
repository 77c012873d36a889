"""Bad input raises the errors of docs/contract.md, with the offending names and values, on every backend."""

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
    from kdfast.ops.backends import resolve_backend

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


@backends
@pytest.mark.parametrize(
    "kw,pattern",
    [
        (dict(temperature=True), "temperature must be a real number, got True"),
        (dict(temperature="2"), "temperature must be a real number, got '2'"),
        (dict(student_temperature=False), "student_temperature must be a real number"),
        (dict(scale="1"), "scale must be a real number"),
        (dict(temperature=torch.ones(2)), "temperature must be a real number"),
        (dict(labels=torch.tensor([0, 1, 2, 3]), ignore_index=1.5), "ignore_index must be an integer, got 1.5"),
        (dict(labels=torch.tensor([0, 1, 2, 3]), ignore_index=True), "ignore_index must be an integer"),
        (dict(labels=torch.tensor([0, 1, 2, 3]), ignore_index=-100.0), "ignore_index must be an integer"),
    ],
)
def test_a_bool_a_string_or_a_fraction_is_not_silently_converted(backend, kw, pattern):
    with pytest.raises(TypeError, match=pattern):
        call(backend, **kw)


@backends
@pytest.mark.parametrize(
    "kw,pattern",
    [
        (dict(scale=1e39), "scale=1e\\+39 is outside float32's range"),
        (dict(soft_weight=-1e39), "soft_weight=-1e\\+39 is outside float32's range"),
        (dict(soft_weight=1e20, scale=1e20), "soft_weight \\* scale"),
        (dict(normalizer=1e-45), "normalizer=1e-45 is outside float32's range"),
        (dict(normalizer=1e-30, scale=1e10), "soft_weight \\* scale / normalizer"),
        (dict(temperature=1e-40), "temperature=1e-40 is outside float32's range"),
        (dict(weighting=torch.tensor([1.0, -1.0, 1.0, 1.0])), "finite and >= 0, got -1.0 at row 1"),
        (dict(weighting=torch.tensor([1.0, 1.0, float("nan"), 1.0])), "finite and >= 0, got nan at row 2"),
        (dict(weighting=torch.tensor([1.0, 1.0, 1.0, float("inf")])), "finite and >= 0, got inf at row 3"),
    ],
)
def test_values_the_kernels_cannot_represent_or_use(backend, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(backend, **kw)


@backends
def test_a_one_element_tensor_is_a_number(backend):
    expected = call(backend, temperature=2.0, labels=torch.tensor([0, 1, -100, 3]), hard_weight=0.5)
    got = call(backend, temperature=torch.tensor(2.0), labels=torch.tensor([0, 1, -100, 3]), hard_weight=0.5,
               ignore_index=torch.tensor(-100))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", ["torch"] + [b for b in FUSED_BACKENDS])
def test_dist_refuses_an_all_minus_inf_row_on_every_backend(backend):
    t = logits((3, 10), seed=2)
    t[1] = float("-inf")
    device = kernel_device(backend)
    with pytest.raises(ValueError, match="teacher_logits row 1 is all -inf"):
        kdfast.dist_loss(logits((3, 10), seed=1).to(device), t.to(device), backend=backend)


@pytest.mark.parametrize("backend", ["torch"] + [b for b in FUSED_BACKENDS])
@pytest.mark.parametrize("loss,kw,pattern", [
    ("dist", dict(temperature=1e-40), "temperature=1e-40 is outside float32's range"),
    ("dist", dict(beta=1e39), "beta=1e\\+39 is outside float32's range"),
    ("dkd", dict(alpha=-1e39), "alpha=-1e\\+39 is outside float32's range"),
    ("correlation", dict(pearson_weight=1e39), "pearson_weight=1e\\+39 is outside float32's range"),
    ("dist", dict(temperature=True), "temperature must be a real number"),
])
def test_the_other_families_check_their_numbers_as_distill_loss(backend, loss, kw, pattern):
    device = kernel_device(backend)
    s, t = logits((4, 10), seed=1).to(device), logits((4, 10), seed=2).to(device)
    fn = {"dist": lambda: kdfast.dist_loss(s, t, backend=backend, **kw),
          "dkd": lambda: kdfast.dkd_loss(s, t, torch.arange(4, device=device), backend=backend, **kw),
          "correlation": lambda: kdfast.correlation_loss(s, t, backend=backend, **kw)}[loss]
    with pytest.raises((ValueError, TypeError), match=pattern):
        fn()
