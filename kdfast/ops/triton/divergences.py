"""Divergence policies of the Triton row kernel (the twin of csrc/kernels/divergences.h).

Every divergence ``D(p || q)`` is described by three ``@triton.jit`` pieces that
the skeleton (``row_kernel.py``) calls with a compile-time ``DIV`` name, so each
(divergence, options) pair compiles to its own straight-line kernel:

* ``value_term``: per-entry ``v_j`` whose row sum gives the value (for
  ``renyi``: the log-terms of a logsumexp, see the skeleton);
* ``grad_term``: ``g_j = q_j dD/dq_j``, whose row sum is ``Sigma_g``;
* ``row_value``: the row value ``D`` from the value sum.

Shared subexpressions of the value and the gradient (``log m``) are written once
here and merged by the compiler's common-subexpression elimination.

The skeleton turns ``g`` into the student-logit gradient through the softmax
Jacobian, ``(g_j - q_j Sigma_g) / tau_s``; any ``c q_j`` term of ``g_j`` cancels
there, so the policies drop such terms.  ``0 * log 0 == 0`` is enforced with
masks because masked (-inf) vocabulary entries are legal input.  The formulas
are those of docs/contract.md and of ``kdfast.reference``.
"""

import triton
import triton.language as tl

# float32's smallest normal: below it a mixture's terms are negligible and its ratio is not taken.
FLOAT32_TINY = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def log_mixture(p, q, log_w_p, log_w_q):
    """``log max(m, tiny)``, ``m = w_p p + w_q q`` (the weights come as their logs, possibly -inf).

    As the C++ policies (csrc/kernels/divergences.h, ``clamp_tiny`` and
    ``vlog2_positive``): one FMA and one log.  Below float32's smallest normal
    (masked entries, where ``m = 0``, or both probabilities underflowing) every
    term that reads the log is multiplied by a probability below 1.2e-38 (or
    masked by ``p > 0`` / ``q > 0``), so the clamp changes no term and keeps
    the log finite."""
    return tl.log(tl.maximum(_mixture(p, q, log_w_p, log_w_q), FLOAT32_TINY))


@triton.jit
def _renyi_log_term(p, logp, logq, alpha):
    """``alpha log p + (1 - alpha) log q``; masked entries (``log p = -inf``) add nothing.

    Not ``p > 0``: with huge logits the largest term can be one whose ``p``
    underflows while ``q`` does not (the reference's rule)."""
    return tl.where(logp > float("-inf"), alpha * logp + (1.0 - alpha) * logq, float("-inf"))


@triton.jit
def _ab_powers(p, q, logp, logq, s):
    """``(p^s, q^s)``, ``s = alpha + beta``: ``p`` and ``q`` themselves at ``s = 1`` (the default), no exp."""
    if s == 1.0:
        pp = p
        qq = q
    else:
        pp = tl.exp(s * logp)
        qq = tl.exp(s * logq)
    return pp, qq


@triton.jit
def _ab_g(p, q, logp, logq, alpha, beta):
    """``-(p^a q^b - q^(a+b)) / a``."""
    pq = tl.exp(alpha * logp + beta * logq)
    _, qq = _ab_powers(p, q, logp, logq, alpha + beta)
    return -(pq - qq) / alpha


@triton.jit
def _tvd_g(p, q):
    """``0.5 q sign(q - p)`` with ``sign(0) = 0``, the subgradient autograd takes for ``|x|``."""
    half_q = 0.5 * q
    return tl.where(q > p, half_q, tl.where(p > q, -half_q, 0.0))


@triton.jit
def _mixture(p, q, log_w_p, log_w_q):
    """``m = w_p p + w_q q``."""
    return tl.exp(log_w_p) * p + tl.exp(log_w_q) * q


@triton.jit
def _skew_kl_g(p, q, m, skew):
    """``-(1 - s) p q / m`` (0 where ``m`` underflows: both ``p`` and ``q`` below float's range)."""
    return tl.where(m >= FLOAT32_TINY, -(1.0 - skew) * (p * q) / tl.where(m > 0, m, 1.0), 0.0)


@triton.jit
def _q_log_ratio(q, logq, logm):
    return tl.where(q > 0, q * (logq - logm), 0.0)


@triton.jit
def value_term(DIV: tl.constexpr, p, q, logp, logq, alpha, beta, skew, log_w_p, log_w_q):
    """Per-entry ``v_j``: the row sum is the value (for renyi: the terms of a logsumexp)."""
    if DIV == "kl":
        v = tl.where(p > 0, p * (logp - logq), 0.0)
    elif DIV == "reverse_kl":
        v = tl.where(q > 0, q * (logq - logp), 0.0)
    elif DIV == "jsd":
        logm = log_mixture(p, q, log_w_p, log_w_q)
        v = beta * tl.where(p > 0, p * (logp - logm), 0.0) + (1.0 - beta) * _q_log_ratio(q, logq, logm)
    elif DIV == "tvd":
        v = 0.5 * tl.abs(p - q)
    elif DIV == "renyi":
        v = _renyi_log_term(p, logp, logq, alpha)
    elif DIV == "ab":
        s = alpha + beta
        pq = tl.exp(alpha * logp + beta * logq)
        pp, qq = _ab_powers(p, q, logp, logq, s)
        v = -(pq - alpha / s * pp - beta / s * qq) / (alpha * beta)
    elif DIV == "skew_kl":
        v = tl.where(p > 0, p * (logp - log_mixture(p, q, log_w_p, log_w_q)), 0.0)
    elif DIV == "skew_reverse_kl":
        v = _q_log_ratio(q, logq, log_mixture(p, q, log_w_p, log_w_q))
    elif DIV == "hellinger":
        d = tl.sqrt(p) - tl.sqrt(q)
        v = d * d
    else:
        tl.static_assert(False, "a divergence of kdfast.registry without a Triton value_term")
    return v


@triton.jit
def row_value(DIV: tl.constexpr, value_sum, alpha):
    """``D`` of a row from the sum of its value terms (for renyi: their logsumexp)."""
    if DIV == "renyi":
        return value_sum / (alpha - 1.0)
    else:
        return value_sum


@triton.jit
def grad_term(DIV: tl.constexpr, p, q, logp, logq, alpha, beta, skew, log_w_p, log_w_q, renyi_lse):
    """``g_j = q_j dD/dq_j`` (terms proportional to ``q_j`` dropped)."""
    if DIV == "kl":
        g = -p
    elif DIV == "reverse_kl":
        g = tl.where(q > 0, q * (logq - logp), 0.0)
    elif DIV == "jsd":
        g = (1.0 - beta) * _q_log_ratio(q, logq, log_mixture(p, q, log_w_p, log_w_q))
    elif DIV == "tvd":
        g = _tvd_g(p, q)
    elif DIV == "renyi":
        # -p^alpha q^(1-alpha) / sum_k p^alpha q^(1-alpha)
        g = -tl.exp(_renyi_log_term(p, logp, logq, alpha) - renyi_lse)
    elif DIV == "ab":
        g = _ab_g(p, q, logp, logq, alpha, beta)
    elif DIV == "skew_kl":
        g = _skew_kl_g(p, q, _mixture(p, q, log_w_p, log_w_q), skew)
    elif DIV == "skew_reverse_kl":
        logm = log_mixture(p, q, log_w_p, log_w_q)
        m = _mixture(p, q, log_w_p, log_w_q)
        sq = tl.where(m >= FLOAT32_TINY, skew * (q * q) / tl.where(m > 0, m, 1.0), 0.0)
        g = tl.where(q > 0, _q_log_ratio(q, logq, logm) - sq, 0.0)
    elif DIV == "hellinger":
        g = -(tl.sqrt(p) * tl.sqrt(q))  # -sqrt(p q)
    else:
        tl.static_assert(False, "a divergence of kdfast.registry without a Triton grad_term")
    return g
