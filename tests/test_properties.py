"""Properties over random shapes and options (hypothesis)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdfast
from kdfast.registry import divergence_cases
from conftest import KERNELS, TRITON_ON_GPU, assert_matches_oracle, logits

DIVERGENCE_PARAMS = st.sampled_from(divergence_cases())


_CASES = dict(
    n=st.integers(1, 5),
    v=st.integers(1, 300),
    tau=st.floats(0.25, 8.0),
    tau_s=st.floats(0.25, 8.0),
    div=DIVERGENCE_PARAMS,
    weighting=st.sampled_from([None, "wttm", "entropy"]),
    seed=st.integers(0, 2**16),
)


def _kernel_equals_reference(kernel, n, v, tau, tau_s, div, weighting, seed):
    s, t = logits((n, v), seed=seed), logits((n, v), seed=seed + 1)
    name, params = div
    assert_matches_oracle(s, t, kernel, divergence=name, temperature=tau, student_temperature=tau_s,
                          weighting=weighting, **params)


@pytest.mark.skipif("cpu-default" not in KERNELS, reason="the C++ extension is not built")
@settings(max_examples=60, deadline=None)
@given(**_CASES)
def test_cpu_equals_reference(n, v, tau, tau_s, div, weighting, seed):
    _kernel_equals_reference("cpu", n, v, tau, tau_s, div, weighting, seed)  # the best SIMD level


@pytest.mark.skipif("triton" not in KERNELS, reason="triton cannot run here")
@settings(max_examples=60 if TRITON_ON_GPU else 20, deadline=None)
@given(**_CASES)
def test_triton_equals_reference(n, v, tau, tau_s, div, weighting, seed):
    _kernel_equals_reference("triton", n, v, tau, tau_s, div, weighting, seed)


@settings(max_examples=40, deadline=None)
@given(v=st.integers(2, 100), tau=st.floats(0.5, 4.0), div=DIVERGENCE_PARAMS, seed=st.integers(0, 2**16))
def test_divergence_is_zero_iff_equal_and_nonnegative(v, tau, div, seed):
    name, params = div
    s, t = logits((3, v), torch.float64, seed=seed), logits((3, v), torch.float64, seed=seed + 1)
    d = kdfast.distill_loss(s, t, divergence=name, temperature=tau, reduction="none", **params)
    assert (d >= -1e-12).all()
    same = kdfast.distill_loss(t, t, divergence=name, temperature=tau, reduction="none", **params)
    assert same.abs().max() < 1e-10
