"""Weighting policies of the Triton row kernel (the twin of csrc/kernels/weightings.h).

A weighting is the per-row weight ``w`` of the divergence term ``w * D(p || q)``.
The skeleton (``row_kernel.py``) gathers the teacher at temperature 1 (its
running ``S = sum e`` and ``H = sum e (z - max)``, ``e = exp(z - max)``) only when
the table says a weighting needs it (``NEEDS_T1``, from
:data:`kdfast.registry.WEIGHTING_TABLE`), then asks :func:`row_weight` for ``w``
with the compile-time ``WEIGHTING`` name.  The formulas are those of
docs/contract.md and ``kdfast.reference.WEIGHT_FORMULAS``.
"""

import triton
import triton.language as tl


@triton.jit
def row_weight(WEIGHTING: tl.constexpr, log_sum_t64, sum_t1, ent_t1, inv_tau64, log_V, WEIGHTS_ptr, row):
    """``w`` of a row (float64).

    ``log_sum_t64``: ``log sum exp((z - max) / tau)`` of the teacher;
    ``sum_t1``, ``ent_t1``: its temperature-1 sums (only for a weighting that needs them)."""
    if WEIGHTING == "none":
        w = tl.full([], 1.0, tl.float64)
    elif WEIGHTING == "wttm":
        # U_{1/tau}(p1) = exp(LSE(z/tau) - LSE(z)/tau); both LSEs share the shift max/tau
        w = tl.exp(log_sum_t64 - tl.log(sum_t1) * inv_tau64)
    elif WEIGHTING == "entropy":
        w = tl.full([], 1.0, tl.float64)
        if log_V > 0:
            entropy = tl.log(sum_t1) - ent_t1 / sum_t1
            w = 1.0 - entropy / log_V
    elif WEIGHTING == "given":
        w = tl.load(WEIGHTS_ptr + row).to(tl.float64)
    else:
        tl.static_assert(False, "a weighting of kdfast.registry without a Triton row_weight")
    return w
