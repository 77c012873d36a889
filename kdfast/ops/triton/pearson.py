"""torchdistill's Pearson of two centred vectors from their sums, in Triton (csrc/kernels/pearson.h in C++).

``rho = <a,b> / (max(|a|, eps) max(|b|, eps))`` and ``d rho / d a = coef_b * b - coef_a * a``;
each coefficient is 0 where it cannot matter (``b`` exactly 0, or ``|a|`` clamped).
"""

import triton
import triton.language as tl


@triton.jit
def centred_pearson(ab, aa, bb, eps):
    """``(rho, coef_b, coef_a)`` from ``<a,b>``, ``|a|^2``, ``|b|^2`` (float64 scalars or vectors)."""
    na = tl.sqrt(tl.maximum(aa, 0.0))
    nb = tl.sqrt(tl.maximum(bb, 0.0))
    ca = tl.maximum(na, eps)
    cb = tl.maximum(nb, eps)
    rho = ab / (ca * cb)
    coef_b = tl.where(nb > 0, 1.0 / (ca * cb), 0.0)
    coef_a = tl.where(na > eps, rho / (ca * ca), 0.0)
    return rho, coef_b, coef_a
