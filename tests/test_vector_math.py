"""The SIMD math of the CPU kernels (csrc/kernels/vec.h) against float64, at every SIMD level this CPU has.

Each function is run through ``_C._vector_math`` on the code of one level
(the baseline's libm, AVX2, AVX-512, AVX-512 + BF16) over its whole domain
as the kernels use it: the full float line for ``exp`` (subnormal results,
overflow, -inf, NaN), every non-positive float for ``exp2_nonpositive`` (and its degree-4 ``_coarse`` twin),
every positive normal float below 2^127 for ``log2_positive``, every normal one for ``recip``, every
non-negative float for ``sqrt``.  The
bounds are the ones vec.h states.
"""

import math

import numpy as np
import pytest
import torch

from kdfast.ops.extension import _C

pytestmark = pytest.mark.skipif(_C is None, reason="the C++ extension is not built")

LEVELS = ["default", "avx2", "avx512", "avx512_bf16"]
F32 = np.finfo(np.float32)
TINY = float(F32.tiny)  # smallest normal


def _levels():
    order = {name: i for i, name in enumerate(LEVELS)}
    best = _C.supported_cpu_capability() if _C is not None else "default"
    return [name for name in LEVELS if order[name] <= order[best]]


levels = pytest.mark.parametrize("level", _levels())


def run(fn: str, level: str, x: np.ndarray) -> np.ndarray:
    out, used = _C._vector_math(fn, level, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    assert used == level
    return out.numpy().astype(np.float64)


def log_uniform(lo: float, hi: float, n: int = 200_003, seed: int = 0) -> np.ndarray:
    """Floats spread over [lo, hi] by exponent (every binade), plus both ends; an odd count hits the vector tails."""
    g = np.random.default_rng(seed)
    x = np.exp(g.uniform(math.log(lo), math.log(hi), n)).astype(np.float32)
    x[:2] = [lo, hi]
    return x


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want) / np.abs(want)))


# Below these results the levels flush to 0 (AVX2 clamps its argument; AVX-512 and libm go on through subnormals).
EXP2_FLUSH = 2.0**-124
EXP_FLUSH = math.exp(-86.5)


@levels
def test_exp_on_the_whole_line(level):
    """exp(x) = 2^(x log2 e): the roundings of x log2 e (of the product and of log2 e) add up to
    1.5 |x| 2^-24 to the polynomial's 2.5 ulp: relative error <= 3e-7 + 9e-8 |x| (7.8e-6 at |x| = 87)
    down to exp(-86.5) = 2.7e-38; below, 0 or a subnormal within that of the truth; +inf above
    88.72; NaN stays NaN."""
    x = np.concatenate([np.linspace(-87.0, 88.7, 200_001, dtype=np.float32),
                        -log_uniform(1e-30, 1e30), log_uniform(1e-30, 88.7)])
    got, want = run("exp", level, x), np.exp(x.astype(np.float64))
    normal = (want >= EXP_FLUSH) & (want <= F32.max)
    bound = 3e-7 + 9e-8 * np.abs(x[normal].astype(np.float64))
    assert np.all(np.abs(got[normal] - want[normal]) / want[normal] <= bound)
    assert np.all(np.abs(got[want < EXP_FLUSH] - want[want < EXP_FLUSH]) <= EXP_FLUSH)
    special = np.array([-np.inf, np.inf, 88.8, 1e30, np.nan, 0.0, -0.0], dtype=np.float32)
    got = run("exp", level, special)
    assert got[0] == 0 and got[1] == np.inf and got[2] == np.inf and got[3] == np.inf
    assert np.isnan(got[4]) and got[5] == 1 and got[6] == 1


@levels
@pytest.mark.parametrize("fn,bound,degree_4", [("exp2_nonpositive", 3e-7, False),
                                               ("exp2_nonpositive_coarse", 4e-6, True)])
def test_exp2_of_non_positive_arguments(level, fn, bound, degree_4):
    """2^t for t <= 0 (t exact: the kernels fold log2 e into their logits' scale): relative error
    <= 2.5 ulp (3e-7) down to 2^-124; below, 0 or a subnormal within 2^-124 of it; 2^-inf = 0.
    ``_coarse``, the degree-4 2^t of the sweeps whose results are 16-bit (the top-k kernel's sweep off
    the support for 16-bit students): <= 4e-6 (the polynomial's 3e-6 and float rounding), and above
    3e-7 except on the baseline (libm's exp2), so that the degree-4 code is what runs."""
    t = np.concatenate([-log_uniform(1e-30, 200.0), np.linspace(-126.0, 0.0, 100_001, dtype=np.float32)])
    got, want = run(fn, level, t), np.exp2(t.astype(np.float64))
    normal = want >= EXP2_FLUSH
    error = relative_error(got[normal], want[normal])
    assert error <= bound
    if degree_4 and level != "default":
        assert error > 3e-7
    assert np.all(np.abs(got[~normal] - want[~normal]) <= EXP2_FLUSH)
    special = run(fn, level, np.array([-np.inf, 0.0, np.nan], dtype=np.float32))
    assert special[0] == 0 and special[1] == 1 and np.isnan(special[2])


@levels
def test_log2_of_positive_normal_floats(level):
    """log2 x from 1.2e-38 to 2^127: absolute error <= 5e-8 + 2^-24 |log2 x| (half an ulp of the result
    and the polynomial's 2.7e-8), and relative <= 1.6e-7 around 1, where the result is small (vec.h).
    Every float of [0.5, 2) is checked (every mantissa, on both sides of 1, in each reduction's
    branches; the reductions then only add the exponent), and floats spread over the whole range."""
    binades = np.arange(np.float32(0.5).view(np.int32), np.float32(2.0).view(np.int32), dtype=np.int32).view(np.float32)
    x = np.concatenate([binades, log_uniform(TINY, 2.0**127)])
    got, want = run("log2_positive", level, x), np.log2(x.astype(np.float64))
    assert np.all(np.abs(got - want) <= 5e-8 + 2.0**-24 * np.abs(want))
    near_one = (binades >= 0.7) & (binades <= 1.4) & (binades != 1)
    assert relative_error(got[: len(binades)][near_one], want[: len(binades)][near_one]) <= 1.6e-7
    assert run("log2_positive", level, np.array([1.0, 2.0, 0.5, TINY], dtype=np.float32)).tolist() == [0, 1, -1, -126]


@levels
def test_reciprocal_of_normal_floats(level):
    """1/x for x (and 1/x) normal: relative error <= 2^-22 (AVX2's estimate and one Newton step; others below it)."""
    x = log_uniform(4 * TINY, float(F32.max) / 4)
    got, want = run("recip", level, x), 1.0 / x.astype(np.float64)
    assert relative_error(got, want) <= 2.0**-22


@levels
def test_sqrt_is_correctly_rounded(level):
    x = np.concatenate([log_uniform(1e-45, float(F32.max)), np.array([0.0, 1e-45, 1.0, 4.0], dtype=np.float32)])
    got = run("sqrt", level, x)
    want = np.sqrt(x.astype(np.float64)).astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(got, want)


def test_unknown_function_and_level_are_errors():
    with pytest.raises(ValueError, match="unknown vector function"):
        _C._vector_math("nope", "default", torch.zeros(3))
    with pytest.raises(ValueError, match="unknown CPU capability"):
        _C._vector_math("exp", "avx9000", torch.zeros(3))
