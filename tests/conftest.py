"""Shared helpers of the test-suite.

The oracle is the reference backend evaluated in float64 on the very same
input values; fused backends are compared against it with the tolerances
below (stated once, used everywhere).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import settings

# CI runs the same examples every time (reproducible); HYPOTHESIS_PROFILE=explore draws new ones.
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

# Without a GPU the Triton kernels run through Triton's CPU interpreter; it is
# chosen when the kernels are decorated, so before kdfast is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kdfast  # noqa: E402
from kdfast.ops.extension import _C  # noqa: E402

from triton_interpreter import speed_up_interpreter  # noqa: E402

FUSED_BACKENDS = [b for b in kdfast.available_backends() if b != "torch"]
TRITON_ON_GPU = "triton" in FUSED_BACKENDS and torch.cuda.is_available()
if "triton" in FUSED_BACKENDS and not TRITON_ON_GPU:
    speed_up_interpreter()

# Values: relative tolerance 1e-5 (float32 accumulation); values that are 0 in
# exact arithmetic (V = 1, identical rows) come out at float32 rounding of the
# O(1) log-terms they cancel, so an absolute 1e-6 floor applies.
VALUE_RTOL = 1e-5
VALUE_ATOL = 1e-6
# Gradients: atol is relative to the largest entry of the block, plus for
# float32 an absolute 1e-7 (and, where that fails, within 4x of the float32
# reference's own error: see assert_matches_oracle): entries like (q - p) / tau_s cancel O(1)
# probabilities whose float32 rounding is ~1e-7.  16-bit gradients are compared
# after one rounding to their dtype (8 / 11 significant bits), and float16 also
# allows two steps of its subnormal spacing 2^-24.
GRAD_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12, atol_abs=0.0),
    torch.float32: dict(rtol=1e-5, atol=1e-5, atol_abs=1e-7),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5, atol_abs=0.0),
    torch.float16: dict(rtol=2**-10, atol=1e-5, atol_abs=2**-23),
}


def cpu_capabilities():
    """The SIMD levels this machine can run (the kernels of each are tested)."""
    if _C is None:
        return []
    order = ["default", "avx2", "avx512", "avx512_bf16"]
    best = _C.supported_cpu_capability()
    return order[: order.index(best) + 1]


# Every fused kernel of this machine: "cpu-<SIMD level>" for each level the CPU
# runs, and "triton" (on the GPU, or interpreted on CPU tensors).
KERNELS = [f"cpu-{cap}" for cap in cpu_capabilities()] + (["triton"] if "triton" in FUSED_BACKENDS else [])
kernels = pytest.mark.parametrize("kernel", KERNELS or [pytest.param("none", marks=pytest.mark.skip(
    reason="no fused backend here: the C++ extension is not built and triton cannot run"))])


def kernel_device(kernel: str) -> torch.device:
    """Where a kernel's inputs live: CUDA for Triton on a GPU, else the CPU."""
    return torch.device("cuda" if kernel == "triton" and TRITON_ON_GPU else "cpu")


@contextlib.contextmanager
def cpu_capability(name):
    before = _C.cpu_capability()
    got = _C.set_cpu_capability(name)
    assert got == name
    try:
        yield
    finally:
        _C.set_cpu_capability(before)


def logits(shape, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@contextlib.contextmanager
def kernel_backend(kernel: str):
    """The ``backend=`` of a kernel name ("cpu-avx2" -> "cpu" with that SIMD level forced)."""
    if kernel.startswith("cpu-"):
        with cpu_capability(kernel[len("cpu-"):]):
            yield "cpu"
    else:
        yield kernel


def loss_and_grad(student, teacher, backend="auto", **kw):
    """(loss, d loss / d student) of distill_loss; backward with a fixed upstream gradient.

    ``backend`` may be a kernel name of ``KERNELS``; results come back on the CPU."""
    device = kernel_device(backend)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    s = student.detach().to(device).clone().requires_grad_(True)
    with kernel_backend(backend) as name:
        loss = kdfast.distill_loss(s, teacher.to(device), backend=name, **kw)
        upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=device).reshape(loss.shape)
        (loss * upstream).sum().backward()
    return loss.detach().cpu(), s.grad.cpu()


def oracle(student, teacher, dtype=torch.float64, **kw):
    """The reference on the same values, in float64 unless told otherwise."""
    kw = dict(kw, backend="torch")
    if isinstance(kw.get("weighting"), torch.Tensor):
        kw["weighting"] = kw["weighting"].to(dtype)
    loss, grad = loss_and_grad(student.to(dtype), teacher.to(dtype), **kw)
    return loss.double(), grad.double()


def assert_matches_oracle(student, teacher, kernel, oracle_dtype=torch.float64, **kw):
    """Loss and gradient of a kernel (a name of ``KERNELS``, or a backend) against the float64 oracle."""
    loss, grad = loss_and_grad(student, teacher, backend=kernel, **kw)
    ref_loss, ref_grad = oracle(student, teacher, dtype=oracle_dtype, **kw)
    f64 = student.dtype == torch.float64
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-12 if f64 else VALUE_RTOL,
                               atol=1e-15 if f64 else VALUE_ATOL)
    assert grad.dtype == student.dtype
    tol = GRAD_TOL[student.dtype]
    expected = ref_grad.to(student.dtype).double() if student.dtype in (torch.bfloat16, torch.float16) else ref_grad
    scale = float(ref_grad.abs().max()) or 1.0
    try:
        torch.testing.assert_close(grad.double(), expected, rtol=tol["rtol"],
                                   atol=tol["atol"] * scale + tol["atol_abs"])
    except AssertionError:
        if student.dtype != torch.float32:
            raise
        # Ill-conditioned cases (small temperatures, peaked rows) cancel terms much larger than
        # the result through the softmax Jacobian; float32 arithmetic cannot do better than the
        # float32 reference does there, so the kernel must be within 4x of that reference's error.
        _, ref32_grad = oracle(student, teacher, dtype=torch.float32, **kw)
        ref32_error = float((ref32_grad - ref_grad).abs().max())
        assert float((grad.double() - ref_grad).abs().max()) <= 4 * ref32_error + tol["atol_abs"]



@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is fastest, and immune to a loaded CI machine (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
