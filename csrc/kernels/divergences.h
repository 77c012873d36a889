// Divergence policies plugged into the row skeleton (row_kernel.h).
//
// Every divergence D(p || q) is described by:
//   * its row value: either accumulated in the exponential sweep from the
//     shifted logits in base 2, t = log2(e) (z - max) / tau, and e = 2^t
//     (kValueFromExps: no extra sweep; such a policy's g_j is -p_j, folded
//     into the skeleton's gradient coefficients; or kKeptFromExps, below:
//     kept_j and its sum from there), or in a value sweep (Acc::add /
//     Acc::flush);
//   * finish(): the row value D and Sigma_g = sum_j g_j from the sums;
//   * g_j = q_j * dD/dq_j, computed once per entry in the value sweep: Acc::add
//     returns g_j / kept_scale (`kept`, stored over the teacher's exponential
//     in scratch, which nothing reads after), where kept_scale is a per-row
//     scalar that finish() sets (ln 2 where g_j is a difference of base-2
//     logs, a row sum where g_j needs one, as Renyi's, reverse KL's and the
//     mixtures' do) and the skeleton
//     folds into the gradient's coefficient.  So the gradient sweep of every
//     divergence is KL's: two loads, one FMA, one store.
// The value sweep works in base 2: its logs are log2 p = t - log2 S from the
// shifted logits t of the exponential sweep (one multiply fewer per log than
// natural logs), and the row sums are scaled by ln 2 once, in finish().
// The skeleton turns g into the gradient with respect to the student logits
// through the softmax Jacobian: dD/dz_s_j = (g_j - q_j * Sigma_g) / tau_s.
// Any term c * q_j of g_j cancels in that formula, so policies drop such terms.
// The formulas are those of docs/contract.md; `0 * log 0 == 0` is enforced
// with masks because masked (-inf) vocabulary entries are legal input.
#pragma once

#include <limits>
#include <type_traits>

#include "kernel_api.h"
#include "vec.h"

namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

// Per-call constants of the divergence: the op's params vector (kernel_api.h),
// mixture log-weights included (computed once, in kdfast.registry.kernel_params).
using DivConsts = ::kdfast::DivergenceParams;

// One entry of the value sweep: the probabilities, their base-2 logs, and the
// exponentials they come from (p = e_t / S_t), for policies that fold a
// constant into 1 / S_t.
// t_t, t_s: the shifted logits in base 2 themselves (log2 p = t_t - log2 S_t),
// for policies that fold log2 S into a row constant (FloorsShiftedLogits:
// floored where their exponential is 0).
template <class V>
struct Elem {
  V p, q, log2p, log2q, e_t, e_s, t_t, t_s;
};

// Double-precision row accumulators filled by chunk flushes.
struct RowAcc {
  double sum_t = 0, sum_s = 0, log_sum_t = 0, log_sum_s = 0;  // of the exp sweep
  double val = 0, aux = 0;                 // sums
  double lse_max = -INFINITY, lse_sum = 0;  // a running logsumexp
  // set by finish():
  double D = 0, gsum = 0, lse = 0;
  double kept_scale = 1.0;  // g_j = kept_j * kept_scale
};

template <class V> inline V vzero() { return V::zero(); }
template <class V> inline V vset(double x) { return V::broadcast(typename V::value_type(x)); }

// A policy's compile-time flag: D::member where the policy declares it, else
// Default's value (a bool_constant, or another flag).
#define KDFAST_POLICY_FLAG(Trait, member, Default)                                  \
  template <class D, class = void>                                                  \
  struct Trait : Default {};                                                        \
  template <class D>                                                                \
  struct Trait<D, std::void_t<decltype(D::member)>> : std::bool_constant<D::member> {};

// Whether a policy's kept_j needs no row sum, so that the exponential sweep
// computes it (Div::kept_from_exps(t_t, t_s, e_t, e_s)), stores it where the
// teacher's exponential would go and sums it into RowAcc::val: such a policy
// has no value sweep.  Default: false; reverse KL's is.
KDFAST_POLICY_FLAG(KeptFromExps, kKeptFromExps, std::false_type)

// Whether a policy's value sweep reads the square roots of p and q: the
// exponential sweep then keeps h = 2^(t/2) instead of e = 2^t (and sums
// e = h^2), Elem::p and q are sqrt p = h_t / sqrt S_t and sqrt q, and e_t,
// e_s are h; the gradient sweep squares h_s back.  Same exponentials, one
// multiply more each, and no square root per entry.  Default: false;
// Hellinger's is.
KDFAST_POLICY_FLAG(HalfExps, kHalfExps, std::false_type)

// Whether a policy keeps log-terms x_j whose exp(x_j - max) the skeleton sums
// (into lse_sum, against lse_max) after the value sweep.  Default: false.
KDFAST_POLICY_FLAG(KeptIsLogTerm, kKeptIsLogTerm, std::false_type)

// Whether a policy's value sweep reads log2 p and log2 q (Elem::log2p,
// log2q).  Default: true; TVD, Hellinger and the mixtures do not.
KDFAST_POLICY_FLAG(ReadsLogs, kReadsLogs, std::true_type)

// Whether a policy's value sweep reads the shifted logits (Elem::t_t, t_s).
// Default: false; the mixtures do (and not the logs).
KDFAST_POLICY_FLAG(ReadsShiftedLogits, kReadsShiftedLogits, std::false_type)

// Which of the two a policy that reads them reads (default: both): a 16-bit
// row's t is kept in scratch only where it is read.
KDFAST_POLICY_FLAG(ReadsTeacherT, kReadsTeacherT, ReadsShiftedLogits<D>)
KDFAST_POLICY_FLAG(ReadsStudentT, kReadsStudentT, ReadsShiftedLogits<D>)

// Whether they come floored where their exponential is 0 (exp2_arg_floor), for
// policies that read them only in terms e (t - c).  Default: false; the
// mixtures' are.  Not with the logs, which must stay -inf there.
KDFAST_POLICY_FLAG(FloorsShiftedLogits, kFloorsShiftedLogits, std::false_type)
// Whether the skeleton prefetches the next row's logits during the value sweep
// instead of the exponential sweep (row_kernel.h, NextRow): for a value sweep
// that takes a log per entry (the mixtures), the longer compute-bound sweep and
// the later one, so that the lines are still in L2 when the next row starts.
// Default: false.  Alternating builds on the AMD EPYC (Zen 4), 4096 x 32000,
// x KL: the mixtures 1.62-1.70 -> 1.54-1.65 (bf16, avx512_bf16) and
// 1.57-1.61 -> 1.45-1.57 (fp32, avx2); the short value sweeps of tvd, Hellinger
// and Renyi were slower with it (fp32 avx2: 1.16 -> 1.33, 1.18 -> 1.38, 1.36 -> 1.72).
KDFAST_POLICY_FLAG(PrefetchesInValueSweep, kPrefetchInValueSweep, std::false_type)
#undef KDFAST_POLICY_FLAG

// log2 m' and 1 / m' of the scaled mixture m' = m / c_n (ScaledMixture; jsd,
// skew_kl, skew_reverse_kl), m' clamped at float's smallest normal: below it
// (masked entries, where m = 0, or both exponentials underflowing; m <= m'
// since c_n <= 1.2) every term that reads log m' or 1 / m' is multiplied by a
// weighted probability w x_j <= m below 1.5e-38 and is 0 to float accuracy,
// and the clamp keeps 1 / m' finite and the log free of subnormal arithmetic.
// vlog2_positive is 13 instructions (15 at AVX2), vrecip 3 (where the policy reads 1 / m').
template <class V>
V clamp_tiny(V x) { return vmax(x, vset<V>(double(std::numeric_limits<typename V::value_type>::min()))); }

// ---------------------------------------------------------------- kl
// D = sum p (log p - log q) = (ln 2 / S_t) sum e_t (t_t - t_s) - log S_t + log S_s; g_j = -p_j
template <class V>
struct KL {
  static constexpr bool kValueFromExps = true;
  // acc + e_t (t_t - t_s), skipping e_t == 0 (t_t may be -inf there)
  static V add_exp_term(V acc, V tt, V ts, V et, V) { return fmadd_where(gt(et, vzero<V>()), et, tt - ts, acc); }
  static void finish(RowAcc& r, const DivConsts&) {
    r.D = kLn2D * r.val / r.sum_t - r.log_sum_t + r.log_sum_s;
    r.gsum = -1.0;
  }
};

// Accumulator of two plain sums (value and Sigma_g), the common case.
template <class V>
struct TwoSums {
  V val = vzero<V>(), gs = vzero<V>();
  void add(V v, V g) { val = val + v; gs = gs + g; }
  void flush(RowAcc& r) {
    r.val += val.reduce_add();
    r.aux += gs.reduce_add();
    val = gs = vzero<V>();
  }
};

// ---------------------------------------------------------------- reverse kl
// D = sum q (log q - log p) = (ln 2 / S_s) sum e_s (t_s - t_t) + ln S_t - ln S_s,
// g_j = q_j (log q_j - log p_j) (+ q_j, which cancels) = (ln 2 / S_s) e_s (t_s - t_t) + (a constant) q_j:
// kept_j = e_s (t_s - t_t), 0 where q_j = 0 (p_j may be 0 there too) and +inf
// where p_j = 0 < q_j, from the unfloored t.  Sigma_g is the sum of these same
// kept_j, so that where g_j and q_j Sigma_g cancel (both ~1e30 at huge
// logits) they cancel as rounded alike (the skeleton's a_kept).
template <class V>
struct ReverseKL {
  static constexpr bool kValueFromExps = false;
  // kept_j needs no row sum: the exponential sweep computes it from its
  // registers, and reverse KL has no value sweep (its t rows are never kept).
  static constexpr bool kKeptFromExps = true;
  static V kept_from_exps(V tt, V ts, V, V es) { return select(gt(es, vzero<V>()), es * (ts - tt), vzero<V>()); }
  static void finish(RowAcc& r, const DivConsts&) {
    r.kept_scale = kLn2D / r.sum_s;
    r.gsum = r.kept_scale * r.val;
    r.D = r.gsum + r.log_sum_t - r.log_sum_s;
  }
};

// ---------------------------------------------------------------- the mixtures' m
// The mixture m = c_t e_t + c_s e_s of the two rows' exponentials (c = w / S:
// a mixture weight over its row's sum; jsd, skew_kl, skew_reverse_kl), taken
// as m = c_n m' with c_n the c of the side of the larger weight (w >= 1/2) and
// m' = e_n + r e_o, r = c_o / c_n: one FMA per entry.  Then log2 x - log2 m =
// t_x - log2 m' - log2(c_n S_x), so the policies sum their terms against
// log2 m' from the shifted logits t and add the row constants back in
// finish(); in g_j such a constant multiplies q_j and cancels (see the top),
// so it is dropped.  Against forming p, q, their logs and m itself, that is a
// fifth of the value sweep's instructions.  Scaling by the heavier side keeps
// small the terms of the side that dominates m (its constant is log2 w_n, at
// most 1 in size): where m is close to it and D is small, D keeps float
// accuracy, which a scale by a weight near 0 (log2 of it in every term: -20
// at 1e-6) would lose.  The side is a per-call constant: the branch between
// the two FMAs is predicted, or hoisted out of the sweep.
struct MixtureScale {
  bool teacher_heavier;
  double scale_t, scale_s;  // c_t / c_n and c_s / c_n: one of them 1
  double log_c_n;
  MixtureScale(double w_t, double w_s, const RowAcc& r)
      : teacher_heavier(w_t >= w_s),
        scale_t(teacher_heavier ? 1.0 : (w_t / r.sum_t) / (w_s / r.sum_s)),
        scale_s(teacher_heavier ? (w_s / r.sum_s) / (w_t / r.sum_t) : 1.0),
        log_c_n(teacher_heavier ? std::log(w_t) - r.log_sum_t : std::log(w_s) - r.log_sum_s) {}
};

template <class V>
struct ScaledMixture {
  MixtureScale scale;
  V r;
  explicit ScaledMixture(const MixtureScale& s) : scale(s), r(vset<V>(s.teacher_heavier ? s.scale_s : s.scale_t)) {}
  V operator()(V e_t, V e_s) const {  // m'
    return clamp_tiny(scale.teacher_heavier ? fmadd(e_s, r, e_t) : fmadd(e_t, r, e_s));
  }
};

// finish() of the skew divergences, KL(x || m) with m = c_n m' (ScaledMixture)
// and r.val = A = sum e_x (t_x - log2 m'): D = ln 2 A / S_x - ln S_x - ln c_n,
// and Sigma_g = kept_scale * sum kept (r.aux).
inline void finish_kl_to_mixture(RowAcc& r, double sum_x, double log_sum_x, double log_c_n, double kept_scale) {
  r.D = kLn2D * r.val / sum_x - log_sum_x - log_c_n;
  r.kept_scale = kept_scale;
  r.gsum = kept_scale * r.aux;
}

// ---------------------------------------------------------------- jsd (0 < beta < 1)
// m = beta p + (1 - beta) q, D = sum beta p (log p - log m) + (1 - beta) q (log q - log m),
// g_j = (1 - beta) q_j (log q_j - log m_j).  With c_p = beta / S_t, c_q = (1 - beta) / S_s,
// m = c_n m' (ScaledMixture) and the base-2 sums
// A = sum e_t (t_t - log2 m'), B = sum e_s (t_s - log2 m'):
//   D = ln 2 (c_p A + c_q B) - beta ln S_t - (1 - beta) ln S_s - ln c_n,
//   g_j = ln 2 c_q e_s (t_s - log2 m') + (a constant) q_j: kept_j = e_s (t_s - log2 m').
template <class V>
struct JSD {
  static constexpr bool kValueFromExps = false;
  static constexpr bool kReadsLogs = false;
  static constexpr bool kReadsShiftedLogits = true;
  static constexpr bool kFloorsShiftedLogits = true;
  static constexpr bool kPrefetchInValueSweep = true;
  struct Acc {
    ScaledMixture<V> mix;
    TwoSums<V> sums;
    Acc(const DivConsts& c, const RowAcc& r) : mix(MixtureScale(c.beta, 1.0 - c.beta, r)) {}
    V add(const Elem<V>& e) {
      const V log2m = vlog2_positive(mix(e.e_t, e.e_s));
      const V kept = e.e_s * (e.t_s - log2m);
      sums.val = fmadd(e.e_t, e.t_t - log2m, sums.val);
      sums.gs = sums.gs + kept;
      return kept;
    }
    void flush(RowAcc& r) { sums.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts& c) {
    const double c_p = c.beta / r.sum_t, c_q = (1.0 - c.beta) / r.sum_s;
    const double log_c_n = MixtureScale(c.beta, 1.0 - c.beta, r).log_c_n;
    r.D = kLn2D * (c_p * r.val + c_q * r.aux) - c.beta * r.log_sum_t - (1.0 - c.beta) * r.log_sum_s - log_c_n;
    r.kept_scale = kLn2D * c_q;
    r.gsum = r.kept_scale * r.aux;
  }
};

// ---------------------------------------------------------------- tvd
template <class V>
struct TVD {
  static constexpr bool kValueFromExps = false;
  static constexpr bool kReadsLogs = false;
  struct Acc {
    TwoSums<V> s;
    Acc(const DivConsts&, const RowAcc&) {}
    // 0.5 * q * sign(q - p), sign(0) = 0 (the subgradient autograd takes for |x|)
    V add(const Elem<V>& e) {
      const V half_q = vset<V>(0.5) * e.q;
      const V g = select(gt(e.q, e.p), half_q, select(gt(e.p, e.q), vzero<V>() - half_q, vzero<V>()));
      s.add(vset<V>(0.5) * vabs(e.p - e.q), g);
      return g;
    }
    void flush(RowAcc& r) { s.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts&) { r.D = r.val; r.gsum = r.aux; }
};

// ---------------------------------------------------------------- renyi (alpha != 1)
// D = LSE_j(x_j) / (alpha - 1), x_j = alpha log p_j + (1 - alpha) log q_j
// (the terms overflow for alpha > 1 and may all underflow where p and q are
// nearly disjoint, so their sum is taken against the row's maximum).  The value
// sweep keeps x_j in base 2 and the lanes' maxima (no exp); the skeleton then
// turns the kept x_j into 2^(x_j - max) and sums them (kKeptIsLogTerm: one exp
// per entry), and g_j = -2^(x_j - LSE) is that kept value times -2^(max - LSE).
template <class V>
struct Renyi {
  static constexpr bool kValueFromExps = false;
  static constexpr bool kKeptIsLogTerm = true;
  struct Acc {
    V alpha, one_minus_alpha, m = vset<V>(-INFINITY);
    Acc(const DivConsts& c, const RowAcc&) : alpha(vset<V>(c.alpha)), one_minus_alpha(vset<V>(1.0 - c.alpha)) {}
    // Masked entries (log p_j = -inf) contribute nothing.  Not p_j > 0: with huge
    // logits the largest term can be one whose p_j underflows while q_j does not.
    V add(const Elem<V>& e) {
      const V v = alpha * e.log2p + one_minus_alpha * e.log2q;
      const V xj = select(gt(e.log2p, vset<V>(-INFINITY)), v, vset<V>(-INFINITY));
      m = vmax(xj, m);
      return xj;
    }
    void flush(RowAcc& r) { r.lse_max = std::max(r.lse_max, double(m.reduce_max())); }
  };
  // r.lse_sum = sum_j 2^(x_j - r.lse_max), from the skeleton (base 2 throughout)
  static void finish(RowAcc& r, const DivConsts& c) {
    r.lse = r.lse_sum > 0 ? kLn2D * (r.lse_max + std::log2(r.lse_sum)) : -INFINITY;
    r.D = r.lse / (c.alpha - 1.0);
    r.gsum = -1.0;  // sum_j r_j / sum_k r_k
    r.kept_scale = -1.0 / r.lse_sum;
  }
};

// ---------------------------------------------------------------- alpha-beta (alpha, beta > 0)
// Terms p^a q^b, p^(a+b), q^(a+b): all <= 1 (exponents of non-positive logs),
// zero where p or q is 0.  At alpha + beta = 1 (the default 0.5, 0.5) the last
// two are p and q themselves: one exp per entry instead of three.
template <class V>
struct AB {
  static constexpr bool kValueFromExps = false;
  struct Acc {
    TwoSums<V> s;
    V a, b, apb, coef_pp, coef_qq, value_scale, grad_scale;
    bool unit;
    Acc(const DivConsts& c, const RowAcc&)
        : a(vset<V>(c.alpha)), b(vset<V>(c.beta)), apb(vset<V>(c.alpha + c.beta)),
          coef_pp(vset<V>(c.alpha / (c.alpha + c.beta))), coef_qq(vset<V>(c.beta / (c.alpha + c.beta))),
          value_scale(vset<V>(-1.0 / (c.alpha * c.beta))), grad_scale(vset<V>(-1.0 / c.alpha)),
          unit(c.alpha + c.beta == 1.0) {}
    V add(const Elem<V>& e) {
      const V pq = vexp2_nonpositive(a * e.log2p + b * e.log2q);
      const V pp = unit ? e.p : vexp2_nonpositive(apb * e.log2p);
      const V qq = unit ? e.q : vexp2_nonpositive(apb * e.log2q);
      const V g = grad_scale * (pq - qq);  // -(p^a q^b - q^(a+b)) / a
      s.add(value_scale * (pq - coef_pp * pp - coef_qq * qq), g);
      return g;
    }
    void flush(RowAcc& r) { s.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts&) { r.D = r.val; r.gsum = r.aux; }
};

// ---------------------------------------------------------------- skew kl: KL(p || s p + (1-s) q)
// m = s p + (1 - s) q, D = sum p (log p - log m), g_j = -p_j (1 - s) q_j / m_j.
// With c_p = s / S_t, c_q = (1 - s) / S_s, m = c_n m' (ScaledMixture) and
// A = sum e_t (t_t - log2 m'):
//   D = ln 2 A / S_t - ln S_t - ln c_n,
//   g_j = -(c_q / c_n) e_t e_s / (S_t m'): kept_j = e_t e_s / m', kept_scale = -(c_q / c_n) / S_t.
// At skew = 1 (m = p) c_q is 0: D = 0 and no gradient, from the same formulas.
template <class V>
struct SkewKL {
  static constexpr bool kValueFromExps = false;
  static constexpr bool kReadsLogs = false;
  static constexpr bool kReadsShiftedLogits = true;
  static constexpr bool kReadsStudentT = false;
  static constexpr bool kFloorsShiftedLogits = true;
  static constexpr bool kPrefetchInValueSweep = true;
  struct Acc {
    ScaledMixture<V> mix;
    TwoSums<V> sums;
    Acc(const DivConsts& c, const RowAcc& r) : mix(MixtureScale(c.skew, 1.0 - c.skew, r)) {}
    V add(const Elem<V>& e) {
      const V m = mix(e.e_t, e.e_s);
      const V kept = e.e_t * e.e_s * vrecip(m);
      sums.val = fmadd(e.e_t, e.t_t - vlog2_positive(m), sums.val);
      sums.gs = sums.gs + kept;
      return kept;
    }
    void flush(RowAcc& r) { sums.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts& c) {
    const MixtureScale m(c.skew, 1.0 - c.skew, r);
    finish_kl_to_mixture(r, r.sum_t, r.log_sum_t, m.log_c_n, -m.scale_s / r.sum_t);
  }
};

// ---------------------------------------------------------------- skew reverse kl: KL(q || (1-s) p + s q)
// m = (1 - s) p + s q, D = sum q (log q - log m),
// g_j = q_j (log q_j - log m_j) - q_j s q_j / m_j (the +q_j term cancels).
// With c_p = (1 - s) / S_t, c_q = s / S_s, m = c_n m' (ScaledMixture) and
// A = sum e_s (t_s - log2 m'):
//   D = ln 2 A / S_s - ln S_s - ln c_n,
//   g_j = (ln 2 / S_s) e_s (t_s - log2 m' - log2(e) (c_q / c_n) e_s / m') + (a constant) q_j.
// At skew = 1 (m = q) c_p is 0: D = 0 and no gradient, from the same formulas.
template <class V>
struct SkewReverseKL {
  static constexpr bool kValueFromExps = false;
  static constexpr bool kReadsLogs = false;
  static constexpr bool kReadsShiftedLogits = true;
  static constexpr bool kReadsTeacherT = false;
  static constexpr bool kFloorsShiftedLogits = true;
  static constexpr bool kPrefetchInValueSweep = true;
  struct Acc {
    ScaledMixture<V> mix;
    V minus_log2e_scale_s;
    TwoSums<V> sums;
    Acc(const DivConsts& c, const RowAcc& r)
        : mix(MixtureScale(1.0 - c.skew, c.skew, r)), minus_log2e_scale_s(vset<V>(-kLog2eD * mix.scale.scale_s)) {}
    V add(const Elem<V>& e) {
      const V m = mix(e.e_t, e.e_s);
      const V d = e.t_s - vlog2_positive(m);
      const V kept = e.e_s * fmadd(e.e_s * vrecip(m), minus_log2e_scale_s, d);
      sums.val = fmadd(e.e_s, d, sums.val);
      sums.gs = sums.gs + kept;
      return kept;
    }
    void flush(RowAcc& r) { sums.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts& c) {
    finish_kl_to_mixture(r, r.sum_s, r.log_sum_s, MixtureScale(1.0 - c.skew, c.skew, r).log_c_n, kLn2D / r.sum_s);
  }
};

// ---------------------------------------------------------------- squared hellinger: sum (sqrt p - sqrt q)^2
template <class V>
struct Hellinger {
  static constexpr bool kValueFromExps = false;
  static constexpr bool kReadsLogs = false;
  static constexpr bool kHalfExps = true;  // e.p, e.q are sqrt p, sqrt q
  struct Acc {
    TwoSums<V> s;
    Acc(const DivConsts&, const RowAcc&) {}
    // g_j = q_j (1 - sqrt(p_j / q_j)) = q_j - sqrt(p_j q_j)   (the q_j term cancels)
    V add(const Elem<V>& e) {
      const V sp = e.p, sq = e.q;
      const V d = sp - sq;
      const V g = vzero<V>() - sp * sq;
      s.add(d * d, g);
      return g;
    }
    void flush(RowAcc& r) { s.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts&) { r.D = r.val; r.gsum = r.aux; }
};

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
