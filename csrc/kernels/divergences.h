// Divergence policies plugged into the row skeleton (row_kernel.h).
//
// Every divergence D(p || q) is described by:
//   * its row value: either accumulated in the exponential sweep from the
//     shifted logits in base 2, t = log2(e) (z - max) / tau, and e = 2^t
//     (kValueFromExps: no extra sweep; such a policy's g_j is -p_j, folded
//     into the skeleton's gradient coefficients), or in a value sweep
//     (Acc::add / Acc::flush);
//   * finish(): the row value D and Sigma_g = sum_j g_j from the sums;
//   * g_j = q_j * dD/dq_j, computed once per entry in the value sweep: Acc::add
//     returns g_j / kept_scale (`kept`, stored over the teacher's exponential
//     in scratch, which nothing reads after), where kept_scale is a per-row
//     scalar that finish() sets (ln 2 where g_j is a difference of base-2
//     logs, a row sum where g_j needs one, as Renyi's does) and the skeleton
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
template <class V>
struct Elem {
  V p, q, log2p, log2q, e_t, e_s;
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

// Whether a policy keeps log-terms x_j whose exp(x_j - max) the skeleton sums
// (into lse_sum, against lse_max) after the value sweep.  Default: false.
template <class D, class = void>
struct KeptIsLogTerm : std::false_type {};
template <class D>
struct KeptIsLogTerm<D, std::void_t<decltype(D::kKeptIsLogTerm)>> : std::bool_constant<D::kKeptIsLogTerm> {};

// Whether a policy's value sweep reads log2 p and log2 q (Elem::log2p,
// log2q).  Default: true; TVD and Hellinger do not.
template <class D, class = void>
struct ReadsLogs : std::true_type {};
template <class D>
struct ReadsLogs<D, std::void_t<decltype(D::kReadsLogs)>> : std::bool_constant<D::kReadsLogs> {};

// log2 m and 1 / m of the mixture m = w_p p + w_q q (jsd, skew_kl,
// skew_reverse_kl), m clamped at float's smallest normal: below it (masked
// entries, where m = 0, or both probabilities underflowing) every term that
// reads log m or 1 / m is multiplied by a probability below 1.2e-38 and is 0
// to float accuracy, and the clamp keeps 1 / m finite and the log free of
// subnormal arithmetic.  vlog2_positive is 16 instructions, vrecip 3 (where
// the policy reads 1 / m).
template <class V>
V clamp_tiny(V x) { return vmax(x, vset<V>(double(std::numeric_limits<typename V::value_type>::min()))); }

// A base-2 log floored at -FLT_MAX, for a term w * (log2 x - log2 m) whose
// weight w is 0 wherever log2 x is -inf (a masked entry): 0 * finite is 0, one
// max instead of the compare and blend of a select.  Only where the mixture's
// log2 m is finite (clamp_tiny) and x > 0 implies w > 0, i.e. the mixtures.
template <class V>
V floor_log(V log2x) { return vmax(log2x, vset<V>(double(std::numeric_limits<typename V::value_type>::lowest()))); }

// ---------------------------------------------------------------- kl
// D = sum p (log p - log q) = (ln 2 / S_t) sum e_t (t_t - t_s) - log S_t + log S_s; g_j = -p_j
template <class V>
struct KL {
  static constexpr bool kValueFromExps = true;
  static constexpr bool kReadsLogs = false;  // no value sweep
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

// The finish() of the policies whose two sums are of base-2 terms: value and
// Sigma_g times ln 2, and g_j = kept_j ln 2.
struct Base2Sums {
  static void finish(RowAcc& r, const DivConsts&) {
    r.D = kLn2D * r.val;
    r.gsum = kLn2D * r.aux;
    r.kept_scale = kLn2D;
  }
};

// ---------------------------------------------------------------- reverse kl
// The value is summed from the same log q, log p as the gradient (not in the
// exponential sweep): the gradient (g_j - q_j D) / tau_s cancels terms of
// size D, and only a D rounded like g_j cancels them to float32 accuracy.
// For the same reason g_j is kept in natural units (kept_scale 1, one multiply
// by ln 2 per entry): at huge logits g_j and q_j D are both ~1e30, and the
// product of a kept_scale of ln 2 with g_j would round differently from D.
template <class V>
struct ReverseKL {
  static constexpr bool kValueFromExps = false;
  struct Acc {
    TwoSums<V> s;
    V ln2 = vset<V>(kLn2D);
    Acc(const DivConsts&, const RowAcc&) {}
    // g_j = q_j (log q_j - log p_j + 1); the +q_j part cancels, so Sigma_g = D.
    V add(const Elem<V>& e) {
      const V g = select(gt(e.q, vzero<V>()), e.q * ((e.log2q - e.log2p) * ln2), vzero<V>());
      s.add(g, g);
      return g;
    }
    void flush(RowAcc& r) { s.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts&) {
    r.D = r.val;
    r.gsum = r.val;
  }
};

// ---------------------------------------------------------------- jsd (0 < beta < 1)
// With bp = beta p and cq = (1 - beta) q (the weights folded into 1 / S):
// m = bp + cq, D = sum bp (log p - log m) + cq (log q - log m),
// g_j = cq_j (log q_j - log m_j).
template <class V>
struct JSD : Base2Sums {
  static constexpr bool kValueFromExps = false;
  struct Acc {
    TwoSums<V> s;
    V beta_over_sum_t, one_minus_beta_over_sum_s;
    Acc(const DivConsts& c, const RowAcc& r)
        : beta_over_sum_t(vset<V>(c.beta / r.sum_t)), one_minus_beta_over_sum_s(vset<V>((1.0 - c.beta) / r.sum_s)) {}
    V add(const Elem<V>& e) {
      const V bp = e.e_t * beta_over_sum_t, cq = e.e_s * one_minus_beta_over_sum_s;
      const V log2m = vlog2_positive(clamp_tiny(bp + cq));
      const V g = cq * (floor_log(e.log2q) - log2m);
      s.add(fmadd(bp, floor_log(e.log2p) - log2m, g), g);
      return g;
    }
    void flush(RowAcc& r) { s.flush(r); }
  };
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
// With sp = s p and cq = (1 - s) q: m = sp + cq, D = sum p (log p - log m),
// g_j = -p_j cq_j / m_j (a plain sum: the value alone is base 2).
template <class V>
struct SkewKL {
  static constexpr bool kValueFromExps = false;
  struct Acc {
    TwoSums<V> s;
    V skew_over_sum_t, one_minus_skew_over_sum_s;
    Acc(const DivConsts& c, const RowAcc& r)
        : skew_over_sum_t(vset<V>(c.skew / r.sum_t)), one_minus_skew_over_sum_s(vset<V>((1.0 - c.skew) / r.sum_s)) {}
    V add(const Elem<V>& e) {
      const V cq = e.e_s * one_minus_skew_over_sum_s;
      const V m = clamp_tiny(fmadd(e.e_t, skew_over_sum_t, cq));
      const V g = vzero<V>() - e.p * cq * vrecip(m);
      s.add(e.p * (floor_log(e.log2p) - vlog2_positive(m)), g);
      return g;
    }
    void flush(RowAcc& r) { s.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts&) { r.D = kLn2D * r.val; r.gsum = r.aux; }
};

// ---------------------------------------------------------------- skew reverse kl: KL(q || (1-s) p + s q)
// With cp = (1 - s) p and sq = s q: m = cp + sq, D = sum q (log q - log m),
// g_j = q_j (log q_j - log m_j) - q_j sq_j / m_j (the +q_j term cancels),
// kept in base-2 units: q (log2 q - log2 m) - q sq / (m ln 2).
template <class V>
struct SkewReverseKL : Base2Sums {
  static constexpr bool kValueFromExps = false;
  struct Acc {
    TwoSums<V> s;
    V one_minus_skew_over_sum_t, skew_over_sum_s, log2e;
    Acc(const DivConsts& c, const RowAcc& r)
        : one_minus_skew_over_sum_t(vset<V>((1.0 - c.skew) / r.sum_t)), skew_over_sum_s(vset<V>(c.skew / r.sum_s)),
          log2e(vset<V>(kLog2eD)) {}
    V add(const Elem<V>& e) {
      const V sq = e.e_s * skew_over_sum_s;
      const V m = clamp_tiny(fmadd(e.e_t, one_minus_skew_over_sum_t, sq));
      const V value = e.q * (floor_log(e.log2q) - vlog2_positive(m));
      const V g = value - e.q * (sq * log2e) * vrecip(m);
      s.add(value, g);
      return g;
    }
    void flush(RowAcc& r) { s.flush(r); }
  };
};

// ---------------------------------------------------------------- squared hellinger: sum (sqrt p - sqrt q)^2
template <class V>
struct Hellinger {
  static constexpr bool kValueFromExps = false;
  static constexpr bool kReadsLogs = false;
  struct Acc {
    TwoSums<V> s;
    Acc(const DivConsts&, const RowAcc&) {}
    // g_j = q_j (1 - sqrt(p_j / q_j)) = q_j - sqrt(p_j q_j)   (the q_j term cancels)
    V add(const Elem<V>& e) {
      const V sp = vsqrt(e.p), sq = vsqrt(e.q);
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
