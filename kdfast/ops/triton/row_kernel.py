"""The one Triton row-kernel skeleton of the divergence family.

One program handles one row, in vocabulary tiles of ``BLOCK`` entries, so any
V (256k included) runs with a fixed tile and bounded registers:

  A. online logsumexp of the teacher at ``tau`` and the student at ``tau_s``
     (and at temperature 1 when a weighting or the CE term needs it): a
     running maximum of the raw logits and float64 running sums that are
     rescaled when the maximum moves;
  B. when the divergence needs a row sum before its gradient (all but kl),
     or no gradient is asked for: the value and ``Sigma_g``;
  C. the gradient with respect to the student logits, written once (kl adds
     its value here, so the KD case reads each row twice and writes it once).

With ``REVISE`` (Label Revision), between A and B one scalar fix-up per row
(:func:`label_revision_fixup`) turns the teacher's sums into those of the
revised distribution; B and C then read the revised ``p`` at no extra pass.

Each sweep runs in the opposite direction of the one before it, so that it
starts on the tiles the previous sweep read last: on a GPU those are the ones
most likely still in L2 when a row (2 x 256 KB for V = 128k in bf16) does
not fit there whole.  (A design choice, not yet measured on a GPU.)

The divergence is the compile-time policy ``DIV`` (``divergences.py``), the
weighting the compile-time policy ``WEIGHTING`` (``weightings.py``); the weight
and the hard-label term are per-row scalars folded into the gradient
coefficients.  Tile sums are tree reductions in the accumulation dtype and
are carried across tiles in float64: V = 256k rows keep float32-level
accuracy and nothing depends on the launch configuration but the tile order.
Row offsets are 64-bit, so ``N * V > 2^31`` is safe.

The per-row losses go to a buffer that ``reduce_kernel`` sums in a fixed
order: no atomics, bit-identical run to run.
"""

import triton
import triton.language as tl

from ...registry import KERNEL_PARAMS
from .divergences import grad_term, row_value, value_term
from .weightings import row_weight

# Row status codes; the launcher turns them into the errors of docs/contract.md.
STATUS_OK = tl.constexpr(0)
STATUS_TEACHER_ALL_NEG_INF = tl.constexpr(1)
STATUS_STUDENT_ALL_NEG_INF = tl.constexpr(2)
STATUS_LABEL_OUT_OF_RANGE = tl.constexpr(3)

# Layout of the float64 parameter vector: the op's params (the divergence's
# constants, kdfast.registry.KERNEL_PARAMS) between the per-call scalars.
# Triton passes Python floats as float32; a float64 vector keeps the float64
# (gradcheck) path exact.
PARAMS = ("inv_tau", "inv_tau_s") + KERNEL_PARAMS + ("hard_weight", "soft_coef", "log_V", "eta")
P_INV_TAU = tl.constexpr(PARAMS.index("inv_tau"))
P_INV_TAU_S = tl.constexpr(PARAMS.index("inv_tau_s"))
P_ALPHA = tl.constexpr(PARAMS.index("alpha"))
P_BETA = tl.constexpr(PARAMS.index("beta"))
P_SKEW = tl.constexpr(PARAMS.index("skew"))
P_LOG_W_P = tl.constexpr(PARAMS.index("log_w_p"))
P_LOG_W_Q = tl.constexpr(PARAMS.index("log_w_q"))
P_HARD_WEIGHT = tl.constexpr(PARAMS.index("hard_weight"))
P_SOFT_COEF = tl.constexpr(PARAMS.index("soft_coef"))
P_LOG_V = tl.constexpr(PARAMS.index("log_V"))
P_ETA = tl.constexpr(PARAMS.index("eta"))


@triton.jit
def _finite_shift(m):
    """The shift of a running logsumexp: its maximum, or 0 while that is -inf (no NaN from -inf - -inf)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _lse_update(m, total, z, inv_t):
    """Adds a tile to a running ``(max of z, sum exp((z - max) inv_t))``; returns the new pair."""
    m_new = tl.maximum(m, tl.max(z, 0))
    c = _finite_shift(m_new)
    tile = tl.sum(tl.exp((z - c) * inv_t), 0)
    total = total * tl.exp((m - c) * inv_t).to(tl.float64) + tile.to(tl.float64)
    return m_new, total


@triton.jit
def _entropy_update(m, s1, h1, z):
    """Adds a tile to the temperature-1 sums ``S = sum e``, ``H = sum e (z - max)``, ``e = exp(z - max)``.

    When the maximum moves from m to m', ``H' = exp(m - m') (H + (m - m') S)``."""
    m_new = tl.maximum(m, tl.max(z, 0))
    c = _finite_shift(m_new)
    r = tl.exp(m - c).to(tl.float64)
    h1 = tl.where(s1 > 0, r * (h1 + (m - c).to(tl.float64) * s1), 0.0)
    d = z - c
    e = tl.exp(d)
    s1 = s1 * r + tl.sum(e, 0).to(tl.float64)
    h1 = h1 + tl.sum(tl.where(e > 0, e * d, 0.0), 0).to(tl.float64)
    return s1, h1


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """``x`` (float32) rounded to nearest-even in ``DTYPE``, the same on the GPU and in the interpreter.

    bfloat16 is done on the bits (the interpreter's cast truncates); finite values only."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _tile_start(i, V, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Start of the i-th tile of a sweep.  Sweeps alternate direction: a sweep that
    begins where the previous one ended reads the tiles likeliest to be still in L2."""
    if REVERSE:
        return (tl.cdiv(V, BLOCK) - 1 - i) * BLOCK
    else:
        return i * BLOCK


@triton.jit
def all_neg_inf_status(mt, sum_t, ms, sum_s):
    """The row's status from its running maxima and sums: an all -inf row sums to 0 (the contract's error).

    A NaN or +inf logit, whether or not the maximum saw it, makes its sum NaN
    instead (see :func:`undefined_sums`): such a row is not "all -inf"."""
    dead_t = (mt == float("-inf")) & (sum_t == 0)
    dead_s = (ms == float("-inf")) & (sum_s == 0)
    return tl.where(dead_t, STATUS_TEACHER_ALL_NEG_INF, tl.where(dead_s, STATUS_STUDENT_ALL_NEG_INF, STATUS_OK))


@triton.jit
def undefined_sums(sum_t, sum_s):
    """A NaN or +inf logit in the row: the contract's NaN in, NaN out for its loss and gradient."""
    return (sum_t != sum_t) | (sum_s != sum_s)


@triton.jit
def fill_row(G_row, V, value, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        offs = start + cols
        tl.store(G_row + offs, tl.full([BLOCK], value, G_row.dtype.element_ty), mask=offs < V)


@triton.jit
def _fill_zero_row(G_row, V, BLOCK: tl.constexpr):
    fill_row(G_row, V, 0.0, BLOCK)


@triton.jit
def load_logits(T_row, S_row, offs, mask, ACC: tl.constexpr):
    """Teacher and student logits of a tile in the accumulation dtype; masked-off lanes are -inf."""
    zt = tl.load(T_row + offs, mask=mask, other=float("-inf")).to(ACC)
    zs = tl.load(S_row + offs, mask=mask, other=float("-inf")).to(ACC)
    return zt, zs


@triton.jit
def _log_probs(T_row, S_row, offs, mask, mt, ms, inv_tau, inv_tau_s, log_sum_t, log_sum_s, ACC: tl.constexpr):
    """``(p, q, log p, log q)`` of a tile; masked and -inf entries give probability 0."""
    zt, zs = load_logits(T_row, S_row, offs, mask, ACC)
    # (z - max) / tau before subtracting log-sums: no rounding of large logits
    logp = (zt - mt) * inv_tau - log_sum_t
    logq = (zs - ms) * inv_tau_s - log_sum_s
    return tl.exp(logp), tl.exp(logq), logp, logq, zs


@triton.jit
def label_revision_fixup(T_row, label, mt, sum_t, log_sum_t64, inv_tau64, eta, ACC: tl.constexpr):
    """Label Revision (kdfast.label_revision) as a per-row scalar fix-up of the teacher's running sums.

    With ``e_j = exp((z_j - m) / tau)`` and ``S = sum_j e_j`` (``m`` the row's
    maximum) the teacher is ``p_j = e_j / S``, ``p_max = 1 / S``, ``p_y = e_y / S``.
    On a row the teacher gets wrong (``z_y < m``), ``beta = eta / (1 + p_max - p_y)``
    and ``p' = beta p + (1 - beta) onehot(y)`` is the same softmax with
    ``S' = S / beta`` (so ``log S' = log S - log beta``) and, at the label only,
    ``e'_y = e_y + (1 - beta) / beta * S``, i.e. ``p'_y = beta p_y + 1 - beta``.
    Returns ``(the revised entry: y on a wrong row, else -1, log S' in ACC, p'_y, log p'_y)``; on a right row
    ``S' = S`` and no entry is revised.
    """
    z_label = tl.load(T_row + label).to(ACC)
    wrong = z_label < mt
    e_label = tl.exp((z_label - mt).to(tl.float64) * inv_tau64)
    inv_s = 1.0 / sum_t
    beta = eta / (1.0 + inv_s - e_label * inv_s)
    log_beta = tl.where(wrong, tl.log(beta), 0.0)
    p_label = beta * e_label * inv_s + (1.0 - beta)
    revised = tl.where(wrong, label, -1)
    return revised, (log_sum_t64 - log_beta).to(ACC), p_label.to(ACC), tl.log(p_label).to(ACC)


@triton.jit
def _revised(p, logp, offs, revised, p_label, logp_label):
    """A tile's ``(p, log p)`` with the revised label entry on a wrong row (the rest came from ``S'``)."""
    at_label = offs == revised
    return tl.where(at_label, p_label, p), tl.where(at_label, logp_label, logp)


@triton.jit
def distill_rows_kernel(
    S_ptr, T_ptr, s_row_stride, t_row_stride, G_ptr, LABELS_ptr, WEIGHTS_ptr, PARAMS_ptr, INV_DENOM_ptr,
    ROW_LOSS_ptr, STATUS_ptr, V, ignore_index,
    DIV: tl.constexpr,          # divergence name
    WEIGHTING: tl.constexpr,    # a name of kdfast.registry.WEIGHTING_NAMES
    NEEDS_T1: tl.constexpr,     # the weighting needs the teacher at temperature 1
    HAS_LABELS: tl.constexpr,
    HARD: tl.constexpr,         # labels and hard_weight != 0
    STUDENT_T1: tl.constexpr,   # HARD and tau_s != 1: the CE needs the student at temperature 1
    SUM_G: tl.constexpr,        # the divergence needs Sigma_g (divergences.sums_g)
    COMPUTE_GRAD: tl.constexpr,
    ACC: tl.constexpr,          # tl.float32, or tl.float64 for float64 inputs
    BLOCK: tl.constexpr,
    REVISE: tl.constexpr = False,  # Label Revision (needs HAS_LABELS; eta in PARAMS)
):
    row = tl.program_id(0).to(tl.int64)
    S_row = S_ptr + row * s_row_stride
    T_row = T_ptr + row * t_row_stride
    G_row = G_ptr + row * V
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    inv_tau64 = tl.load(PARAMS_ptr + P_INV_TAU)
    inv_tau_s64 = tl.load(PARAMS_ptr + P_INV_TAU_S)
    alpha64 = tl.load(PARAMS_ptr + P_ALPHA)
    hard_weight = tl.load(PARAMS_ptr + P_HARD_WEIGHT)
    soft_coef = tl.load(PARAMS_ptr + P_SOFT_COEF)
    log_V = tl.load(PARAMS_ptr + P_LOG_V)
    inv_tau = inv_tau64.to(ACC)
    inv_tau_s = inv_tau_s64.to(ACC)
    alpha = alpha64.to(ACC)
    beta = tl.load(PARAMS_ptr + P_BETA).to(ACC)
    skew = tl.load(PARAMS_ptr + P_SKEW).to(ACC)
    log_w_p = tl.load(PARAMS_ptr + P_LOG_W_P).to(ACC)
    log_w_q = tl.load(PARAMS_ptr + P_LOG_W_Q).to(ACC)

    label = 0
    if HAS_LABELS:
        label = tl.load(LABELS_ptr + row)
        if label == ignore_index:
            tl.store(ROW_LOSS_ptr + row, 0.0)
            tl.store(STATUS_ptr + row, STATUS_OK)
            if COMPUTE_GRAD:
                _fill_zero_row(G_row, V, BLOCK)
            return
        if (label < 0) | (label >= V):
            tl.store(ROW_LOSS_ptr + row, 0.0)
            tl.store(STATUS_ptr + row, STATUS_LABEL_OUT_OF_RANGE)
            return

    # -- A: online logsumexps
    mt = tl.full([], neg_inf, ACC)
    ms = tl.full([], neg_inf, ACC)
    sum_t = tl.zeros([], tl.float64)
    sum_s = tl.zeros([], tl.float64)
    sum_t1 = tl.zeros([], tl.float64)
    ent_t1 = tl.zeros([], tl.float64)
    sum_s1 = tl.zeros([], tl.float64)
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        zt, zs = load_logits(T_row, S_row, offs, mask, ACC)
        if NEEDS_T1:
            sum_t1, ent_t1 = _entropy_update(mt, sum_t1, ent_t1, zt)
        if STUDENT_T1:
            _, sum_s1 = _lse_update(ms, sum_s1, zs, 1.0)
        mt, sum_t = _lse_update(mt, sum_t, zt, inv_tau)
        ms, sum_s = _lse_update(ms, sum_s, zs, inv_tau_s)

    status = all_neg_inf_status(mt, sum_t, ms, sum_s)
    if status != STATUS_OK:
        tl.store(ROW_LOSS_ptr + row, 0.0)
        tl.store(STATUS_ptr + row, status)
        if COMPUTE_GRAD:
            _fill_zero_row(G_row, V, BLOCK)
        return
    if undefined_sums(sum_t, sum_s):
        tl.store(ROW_LOSS_ptr + row, float("nan"))
        tl.store(STATUS_ptr + row, STATUS_OK)
        if COMPUTE_GRAD:
            fill_row(G_row, V, float("nan"), BLOCK)
        return

    log_sum_t64 = tl.log(sum_t)
    log_sum_s64 = tl.log(sum_s)
    log_sum_t = log_sum_t64.to(ACC)
    log_sum_s = log_sum_s64.to(ACC)

    weight = row_weight(WEIGHTING, log_sum_t64, sum_t1, ent_t1, inv_tau64, log_V, WEIGHTS_ptr, row)

    # Label Revision: after the weight (which is of the unrevised teacher), a scalar fix-up of the teacher's sums.
    revised = -1
    p_label = tl.zeros([], ACC)
    logp_label = tl.zeros([], ACC)
    if REVISE:
        revised, log_sum_t, p_label, logp_label = label_revision_fixup(
            T_row, label, mt, sum_t, log_sum_t64, inv_tau64, tl.load(PARAMS_ptr + P_ETA), ACC)

    ce = tl.zeros([], tl.float64)
    log_sum_s1 = log_sum_s64
    if STUDENT_T1:
        log_sum_s1 = tl.log(sum_s1)
    if HARD:
        z_label = tl.load(S_row + label).to(tl.float64)
        ce = (ms.to(tl.float64) - z_label) + log_sum_s1

    # -- B: value and Sigma_g
    value_sum = tl.zeros([], tl.float64)
    g_sum = tl.full([], -1.0, tl.float64)  # kl and renyi
    renyi_lse = tl.zeros([], ACC)
    if DIV != "kl" or not COMPUTE_GRAD:
        renyi_max = tl.full([], neg_inf, ACC)
        if SUM_G:
            g_sum = tl.zeros([], tl.float64)
        for i in range(0, tl.cdiv(V, BLOCK)):
            offs = _tile_start(i, V, True, BLOCK) + cols
            p, q, logp, logq, _ = _log_probs(T_row, S_row, offs, offs < V, mt, ms, inv_tau, inv_tau_s,
                                             log_sum_t, log_sum_s, ACC)
            if REVISE:
                p, logp = _revised(p, logp, offs, revised, p_label, logp_label)
            v = value_term(DIV, p, q, logp, logq, alpha, beta, skew, log_w_p, log_w_q)
            if DIV == "renyi":
                renyi_max, value_sum = _lse_update(renyi_max, value_sum, v, 1.0)
            else:
                value_sum += tl.sum(v, 0).to(tl.float64)
            if SUM_G:
                g = grad_term(DIV, p, q, logp, logq, alpha, beta, skew, log_w_p, log_w_q, renyi_lse)
                g_sum += tl.sum(g, 0).to(tl.float64)
        if DIV == "renyi":
            # sum_j p^alpha q^(1-alpha) > 0 on a defined row; its logsumexp
            value_sum = renyi_max.to(tl.float64) + tl.log(value_sum)
            renyi_lse = value_sum.to(ACC)

    # -- C: gradient (and the kl value)
    if COMPUTE_GRAD:
        inv_denom = tl.load(INV_DENOM_ptr).to(tl.float64)
        c_soft = soft_coef * weight * inv_denom
        c_hard = tl.zeros([], tl.float64)
        if HARD:
            c_hard = hard_weight * inv_denom
        # gradient_j = A g_j + B q_j (+ C softmax(z_s)_j when tau_s != 1) - C [j == label]
        A = (c_soft * inv_tau_s64).to(ACC)
        B64 = -c_soft * inv_tau_s64 * g_sum
        if not STUDENT_T1:
            B64 += c_hard
        B = B64.to(ACC)
        C = c_hard.to(ACC)
        # (z - max) - log S1, not z - (max + log S1): the sum rounded to float32 would shift the whole
        # softmax by half an ulp of max (1.6 % at logits of 3e5)
        log_sum_s1_acc = log_sum_s1.to(ACC)
        for i in range(0, tl.cdiv(V, BLOCK)):
            offs = _tile_start(i, V, DIV == "kl", BLOCK) + cols  # kl has no sweep B: reverse A's order
            mask = offs < V
            p, q, logp, logq, zs = _log_probs(T_row, S_row, offs, mask, mt, ms, inv_tau, inv_tau_s,
                                              log_sum_t, log_sum_s, ACC)
            if REVISE:
                p, logp = _revised(p, logp, offs, revised, p_label, logp_label)
            g = grad_term(DIV, p, q, logp, logq, alpha, beta, skew, log_w_p, log_w_q, renyi_lse)
            out = A * g + B * q
            if STUDENT_T1:
                out += C * tl.exp((zs - ms) - log_sum_s1_acc)
            if HARD:
                out = tl.where(offs == label, out - C, out)
            tl.store(G_row + offs, _round_to(out, G_ptr.dtype.element_ty), mask=mask)
            if DIV == "kl":
                value_sum += tl.sum(value_term(DIV, p, q, logp, logq, alpha, beta, skew, log_w_p, log_w_q),
                                    0).to(tl.float64)

    D = row_value(DIV, value_sum, alpha64)
    loss = soft_coef * weight * D
    if HARD:
        loss += hard_weight * ce
    tl.store(ROW_LOSS_ptr + row, loss)
    tl.store(STATUS_ptr + row, STATUS_OK)


@triton.jit
def reduce_kernel(ROW_LOSS_ptr, OUT_ptr, INV_DENOM_ptr, N, BLOCK: tl.constexpr):
    """``OUT = sum(ROW_LOSS) * INV_DENOM`` in one program, in a fixed order (deterministic)."""
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float64)
    for start in range(0, N, BLOCK):
        offs = start + cols
        acc += tl.load(ROW_LOSS_ptr + offs, mask=offs < N, other=0.0).to(tl.float64)
    total = tl.sum(acc, 0) * tl.load(INV_DENOM_ptr).to(tl.float64)
    tl.store(OUT_ptr, total)
