"""Every divergence x weighting x reduction x dtype: fused backends against the oracle.

Shape (5, 1029): 1029 = 1024 + 5 crosses a partial-sum flush boundary of the
C++ kernels and leaves a tail that is not a multiple of any vector width; for
the interpreted Triton kernel (tile 512) it is two full tiles and a partial one.
"""

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from conftest import (KERNELS, VALUE_ATOL, VALUE_RTOL, _C, assert_matches_oracle, kernel_backend, kernels, logits,
                      loss_and_grad, oracle)
from kdfast.registry import divergence_cases

DIVERGENCES = divergence_cases()
WEIGHTINGS = [None, "wttm", "entropy", "tensor"]
REDUCTIONS = ["batchmean", "sum", "none"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
N, V = 5, 1029


def _options(weighting, with_labels):
    kw = {"temperature": 2.0}
    if weighting == "tensor":
        kw["weighting"] = torch.linspace(0.2, 1.8, N)
    else:
        kw["weighting"] = weighting
    if with_labels:
        kw.update(labels=torch.tensor([3, -100, 1028, 0, 517]), hard_weight=0.7, soft_weight=0.9,
                  student_temperature=1.5)
    return kw


@kernels
@pytest.mark.parametrize("with_labels", [False, True], ids=["soft", "hard+ignore"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighting", WEIGHTINGS, ids=str)
@pytest.mark.parametrize("divergence,params", DIVERGENCES, ids=lambda x: str(x))
def test_kernel_matches_reference(divergence, params, weighting, reduction, dtype, with_labels, kernel):
    student, teacher = logits((N, V), dtype, seed=1), logits((N, V), dtype, seed=2)
    kw = dict(_options(weighting, with_labels), divergence=divergence, reduction=reduction, **params)
    assert_matches_oracle(student, teacher, kernel, **kw)


@kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "hellinger"])
@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_temperature_1_softmaxes_at_temperatures_2_and_4(temperature, divergence, dtype, kernel):
    """At tau = tau_s = 2 or 4 the C++ kernels take the temperature-1 softmaxes (the hard-label CE's, the
    weighting's teacher) as the exponential sweep's 2^t squared once or twice, not an exponential of their
    own, and the student's is not kept: the gradient sweep squares e_s again.  One case per way the
    gradient sweep reads e_s (KL's exponentials, reverse KL's kept terms, a value sweep's, Hellinger's
    square roots), with masked entries, an ignored row and a label at the tail."""
    student, teacher = logits((N, V), dtype, seed=21), logits((N, V), dtype, seed=22)
    student[2, 500:600] = teacher[2, 500:600] = float("-inf")
    kw = dict(_options("wttm", True), divergence=divergence, temperature=temperature, student_temperature=temperature)
    assert_matches_oracle(student, teacher, kernel, **kw)


@kernels
@pytest.mark.parametrize("pair", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                  (torch.float16, torch.bfloat16), (torch.float32, torch.float16)], ids=str)
def test_mixed_dtypes(pair, kernel):
    """Teacher and student may differ in dtype; the gradient has the student's."""
    s_dtype, t_dtype = pair
    student, teacher = logits((4, 300), s_dtype, seed=3), logits((4, 300), t_dtype, seed=4)
    assert_matches_oracle(student, teacher, kernel, divergence="jsd", temperature=1.5)


MIXTURE_ENDS = [("skew_kl", {"skew": 0.0}), ("skew_kl", {"skew": 1.0}), ("skew_kl", {"skew": 1.0 - 1e-9}),
                ("skew_reverse_kl", {"skew": 0.0}), ("skew_reverse_kl", {"skew": 1.0}),
                ("skew_reverse_kl", {"skew": 1e-9}), ("jsd", {"beta": 1e-6}), ("jsd", {"beta": 1.0 - 1e-6})]


@kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence,params", MIXTURE_ENDS, ids=str)
def test_mixtures_at_the_ends_of_their_weights(divergence, params, dtype, kernel):
    """A mixture weight of 0 (skew = 0: kl or reverse_kl; skew = 1: the divergence of a distribution from
    itself, 0 with no gradient) or nearly 0 (the C++ kernels scale the mixture by one weight over the other,
    down to 1e-9 or up to 1e6), with entries masked in both rows and a hard-label term."""
    student, teacher = logits((N, V), dtype, seed=5), logits((N, V), dtype, seed=6)
    for row, masked in ((1, slice(0, 40)), (2, slice(100, 140))):
        student[row, masked] = teacher[row, masked] = float("-inf")
    kw = dict(_options(None, True), divergence=divergence, **params)
    assert_matches_oracle(student, teacher, kernel, **kw)


@kernels
@pytest.mark.parametrize("divergence,masked_side", [("skew_kl", "student"), ("skew_reverse_kl", "teacher")])
def test_skew_zero_is_infinite_where_its_kl_is(divergence, masked_side, kernel):
    """At skew = 0 the mixture is the masked distribution itself: a row where the other has mass on its
    masked entries has the loss +inf, as kl (reverse_kl) does; the other rows match the reference."""
    student, teacher = logits((3, 300), torch.float32, seed=7), logits((3, 300), torch.float32, seed=8)
    (student if masked_side == "student" else teacher)[1, 10:20] = float("-inf")
    kw = dict(divergence=divergence, skew=0.0, reduction="none", temperature=2.0)
    loss, _ = loss_and_grad(student, teacher, backend=kernel, **kw)
    ref_loss, _ = oracle(student, teacher, **kw)
    assert float(loss[1]) == float(ref_loss[1]) == float("inf")
    torch.testing.assert_close(loss[[0, 2]].double(), ref_loss[[0, 2]], rtol=1e-5, atol=1e-6)


NEARLY_EQUAL = [("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.99}), ("jsd", {"beta": 1.0 - 1e-6}), ("jsd", {"beta": 1e-6}),
                ("skew_kl", {"skew": 0.9}), ("skew_kl", {"skew": 1.0 - 1e-6}), ("skew_reverse_kl", {"skew": 0.9}),
                ("skew_reverse_kl", {"skew": 1.0 - 1e-6}), ("reverse_kl", {})]


@kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence,params", NEARLY_EQUAL, ids=str)
def test_nearly_equal_rows_keep_the_loss_to_float_accuracy(divergence, params, dtype, kernel):
    """Teacher and student 1e-3 apart: D is 1e-7 or, at mixture weights near 0 or 1, far smaller, a difference of
    O(1) log-terms, so its float32 error is absolute; it stays within the contract's VALUE_ATOL at every weight
    (a mixture scaled by the weight near 0 carries log2 of it, -20 at 1e-6, in every term: up to 1.6e-6 here;
    scaled by the heavier one, 1e-8 to 1.3e-7 at AVX-512, up to 7e-7 on the scalar level)."""
    t = logits((16, 4000), torch.float64, seed=9)
    s = (t + 1e-3 * logits((16, 4000), torch.float64, seed=10, scale=1.0)).to(dtype)
    t = t.to(dtype)
    kw = dict(divergence=divergence, reduction="none", temperature=2.0, **params)
    loss, _ = loss_and_grad(s, t, backend=kernel, **kw)
    ref, _ = oracle(s, t, **kw)
    torch.testing.assert_close(loss.double(), ref, rtol=VALUE_RTOL, atol=VALUE_ATOL)


CPU_KERNELS = [k for k in KERNELS if k.startswith("cpu-")]
KEEPS_T = [("jsd", {"beta": 0.3}), ("skew_kl", {"skew": 0.2}), ("skew_reverse_kl", {"skew": 0.2}),
           ("renyi", {"alpha": 0.7}), ("ab", {"alpha": 0.5, "beta": 0.8})]


@contextlib.contextmanager
def shifted_logits_kept(keep: bool):
    assert _C.set_keep_shifted_logits(int(keep)) == keep
    try:
        yield
    finally:
        # -1: back to the default, which follows the CPU level (restoring the value seen before would pin
        # it for every later test, whatever level it sets)
        _C.set_keep_shifted_logits(-1)


@pytest.mark.skipif(not CPU_KERNELS, reason="the C++ extension is not built")
@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("keep", [True, False], ids=["kept", "reloaded"])
@pytest.mark.parametrize("pair", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                  (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("divergence,params", KEEPS_T, ids=str)
def test_16_bit_shifted_logits_kept_or_reloaded(divergence, params, pair, keep, kernel):
    """The policies that read t take it kept in scratch or reloaded from 16-bit logits, a per-CPU choice
    (keep_shifted_logits): both match the oracle, with masked entries, hard labels and the tail of a row."""
    s_dtype, t_dtype = pair
    student, teacher = logits((N, V), s_dtype, seed=13), logits((N, V), t_dtype, seed=14)
    student[1, 0:40] = teacher[1, 0:40] = float("-inf")
    kw = dict(_options("wttm", True), divergence=divergence, **params)
    with shifted_logits_kept(keep):
        assert_matches_oracle(student, teacher, kernel, **kw)


@pytest.mark.skipif(not CPU_KERNELS, reason="the C++ extension is not built")
def test_the_shifted_logits_choice_defaults_by_cpu_and_is_overridden_by_the_environment():
    """Intel CPUs at the AVX-512 levels reload the logits, other CPUs and levels keep t;
    KDFAST_KEEP_SHIFTED_LOGITS=0|1 decides instead; -1 restores the default."""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        intel = "GenuineIntel" in f.read()
    env = os.environ.get("KDFAST_KEEP_SHIFTED_LOGITS")
    try:
        for kernel in CPU_KERNELS:
            with kernel_backend(kernel):
                default = not (intel and kernel in ("cpu-avx512", "cpu-avx512_bf16"))
                assert _C.set_keep_shifted_logits(-1) == (env == "1" if env in ("0", "1") else default)
                assert _C.set_keep_shifted_logits(0) is False and _C.keep_shifted_logits() is False
                assert _C.set_keep_shifted_logits(1) is True
    finally:
        _C.set_keep_shifted_logits(-1)
    best = _C.supported_cpu_capability()
    script = "from kdfast.ops.extension import _C; print(_C.keep_shifted_logits())"
    for value, want in (("0", False), ("1", True), ("", not (intel and best.startswith("avx512")))):
        child = dict(os.environ, KDFAST_KEEP_SHIFTED_LOGITS=value)
        child.pop("KDFAST_CPU_CAPABILITY", None)
        out = subprocess.run([sys.executable, "-c", script], env=child, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == str(want)


@pytest.mark.skipif(not CPU_KERNELS, reason="the C++ extension is not built")
@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("keep", [True, False], ids=["kept", "reloaded"])
def test_label_revision_with_the_shifted_logits_kept_or_reloaded(keep, kernel):
    """The revised label's t is patched into the kept row or into the reloaded lane: both match the oracle."""
    student, teacher = logits((6, 300), torch.bfloat16, seed=15), logits((6, 300), torch.bfloat16, seed=16)
    labels = torch.tensor([3, 299, 17, 150, 0, 64])
    kw = dict(divergence="jsd", beta=0.4, temperature=2.0, labels=labels, label_revision=0.8, reduction="none")
    with shifted_logits_kept(keep):
        assert_matches_oracle(student, teacher, kernel, **kw)
