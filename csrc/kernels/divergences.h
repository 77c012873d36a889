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
//     returns what the gradient sweep needs of entry j (`kept`, stored over the
//     teacher's exponential in scratch, which nothing reads after), and
//     grad_from_kept() turns it into g_j there (g_j itself, unless g_j needs a
//     row sum, as Renyi's does).  So the gradient sweep of every divergence is
//     KL's: two loads, one FMA, one store.
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

template <class V>
struct Elem {
  V p, q, logp, logq;
};

// Double-precision row accumulators filled by chunk flushes.
struct RowAcc {
  double sum_t = 0, sum_s = 0, log_sum_t = 0, log_sum_s = 0;  // of the exp sweep
  double val = 0, aux = 0;                 // sums
  double lse_max = -INFINITY, lse_sum = 0;  // a running logsumexp
  // set by finish():
  double D = 0, gsum = 0, lse = 0;
  double kept_scale = 1.0;  // a factor of grad_from_kept (Renyi)
};

template <class V> inline V vzero() { return V::zero(); }
template <class V> inline V vset(double x) { return V::broadcast(typename V::value_type(x)); }

// Whether a policy keeps log-terms x_j whose exp(x_j - max) the skeleton sums
// (into lse_sum, against lse_max) after the value sweep.  Default: false.
template <class D, class = void>
struct KeptIsLogTerm : std::false_type {};
template <class D>
struct KeptIsLogTerm<D, std::void_t<decltype(D::kKeptIsLogTerm)>> : std::bool_constant<D::kKeptIsLogTerm> {};

// g_j as kept by the value sweep: the default.
struct KeptIsG {
  template <class V>
  static V grad_from_kept(V kept, const RowAcc&, const DivConsts&) { return kept; }
};

// log m of the mixture m = w_p p + w_q q (jsd, skew_kl, skew_reverse_kl).
// With x = w_p p and y = w_q q, hi = max(x, y), lo = min(x, y), r = lo / hi:
// log m = log hi + log(1 + r), where log hi is log w + log p (or log q)
// exactly as the other terms use it, and log(1 + r) on [0, 1] is a short
// polynomial (vlog1p_unit): the ratio of the two probabilities replaces
// logaddexp's exp of the difference of their logs, and no general log is
// taken.  Where hi is below float's normal range (underflow, or a zero
// weight) the larger log-space term stands in: it is -inf for masked entries
// and within log 2 of log m otherwise, where both probabilities are below
// 1.2e-38 and their terms negligible.
template <class V>
struct Mixture {
  V w_p, w_q, log_w_p, log_w_q;
  explicit Mixture(const DivConsts& c)
      : w_p(vset<V>(std::exp(c.log_w_p))), w_q(vset<V>(std::exp(c.log_w_q))),
        log_w_p(vset<V>(c.log_w_p)), log_w_q(vset<V>(c.log_w_q)) {}
  struct Terms {
    V log_m;
    V inv_m;  // 1 / m, where `normal` (inf or NaN elsewhere)
    typename V::Mask normal;  // m from the ratio; else hi underflowed and log_m is the stand-in
  };
  Terms operator()(const Elem<V>& e) const {
    using S = typename V::value_type;
    const V a = log_w_p + e.logp, b = log_w_q + e.logq;
    const V x = w_p * e.p, y = w_q * e.q;
    const V hi = vmax(x, y), lo = vmin(x, y);
    const auto normal = gt(hi, vset<V>(double(std::numeric_limits<S>::min())));
    const V inv_hi = vrecip(hi);
    const V r = lo * inv_hi;
    const V lm = select(normal, select(gt(y, x), b, a) + vlog1p_unit(r), vmax(a, b));
    // 1 / m = (1 / hi) / (1 + r), r in [0, 1]
    const V inv_m = inv_hi * vrecip(vset<V>(1.0) + r);
    return {lm, inv_m, normal};
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

// ---------------------------------------------------------------- reverse kl
// The value is summed from the same log q, log p as the gradient (not in the
// exponential sweep): the gradient (g_j - q_j D) / tau_s cancels terms of
// size D, and only a D rounded like g_j cancels them to float32 accuracy.
template <class V>
struct ReverseKL : KeptIsG {
  static constexpr bool kValueFromExps = false;
  struct Acc {
    TwoSums<V> s;
    explicit Acc(const DivConsts&) {}
    // g_j = q_j (log q_j - log p_j + 1); the +q_j part cancels, so Sigma_g = D.
    V add(const Elem<V>& e) {
      const V g = select(gt(e.q, vzero<V>()), e.q * (e.logq - e.logp), vzero<V>());
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
template <class V>
struct JSD : KeptIsG {
  static constexpr bool kValueFromExps = false;
  struct Acc {
    TwoSums<V> s;
    Mixture<V> mix;
    V beta, one_minus_beta;
    explicit Acc(const DivConsts& c) : mix(c), beta(vset<V>(c.beta)), one_minus_beta(vset<V>(1.0 - c.beta)) {}
    // g_j = (1 - beta) q_j (log q_j - log m_j)
    V add(const Elem<V>& e) {
      const V lm = mix(e).log_m;
      const V g = select(gt(e.q, vzero<V>()), one_minus_beta * e.q * (e.logq - lm), vzero<V>());
      const V vp = select(gt(e.p, vzero<V>()), beta * e.p * (e.logp - lm), vzero<V>());
      s.add(vp + g, g);
      return g;
    }
    void flush(RowAcc& r) { s.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts&) { r.D = r.val; r.gsum = r.aux; }
};

// ---------------------------------------------------------------- tvd
template <class V>
struct TVD : KeptIsG {
  static constexpr bool kValueFromExps = false;
  struct Acc {
    TwoSums<V> s;
    explicit Acc(const DivConsts&) {}
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
// sweep keeps x_j and the lanes' maxima (no exp); the skeleton then turns the
// kept x_j into exp(x_j - max) and sums them (kKeptIsLogTerm: one exp per
// entry), and g_j = -exp(x_j - LSE) is that kept value times -exp(max - LSE).
template <class V>
struct Renyi {
  static constexpr bool kValueFromExps = false;
  static constexpr bool kKeptIsLogTerm = true;
  struct Acc {
    V alpha, one_minus_alpha, m = vset<V>(-INFINITY);
    explicit Acc(const DivConsts& c) : alpha(vset<V>(c.alpha)), one_minus_alpha(vset<V>(1.0 - c.alpha)) {}
    // Masked entries (log p_j = -inf) contribute nothing.  Not p_j > 0: with huge
    // logits the largest term can be one whose p_j underflows while q_j does not.
    V add(const Elem<V>& e) {
      const V v = alpha * e.logp + one_minus_alpha * e.logq;
      const V xj = select(gt(e.logp, vset<V>(-INFINITY)), v, vset<V>(-INFINITY));
      m = vmax(xj, m);
      return xj;
    }
    void flush(RowAcc& r) { r.lse_max = std::max(r.lse_max, double(m.reduce_max())); }
  };
  // r.lse_sum = sum_j exp(x_j - r.lse_max), from the skeleton
  static void finish(RowAcc& r, const DivConsts& c) {
    r.lse = r.lse_sum > 0 ? r.lse_max + std::log(r.lse_sum) : -INFINITY;
    r.D = r.lse / (c.alpha - 1.0);
    r.gsum = -1.0;  // sum_j r_j / sum_k r_k
    r.kept_scale = -1.0 / r.lse_sum;
  }
  // g_j = -p^alpha q^(1-alpha) / sum_k p^alpha q^(1-alpha) = -exp(x_j - max) / sum_k exp(x_k - max)
  static V grad_from_kept(V kept, const RowAcc& r, const DivConsts&) { return kept * vset<V>(r.kept_scale); }
};

// ---------------------------------------------------------------- alpha-beta (alpha, beta > 0)
// Terms p^a q^b, p^(a+b), q^(a+b): all <= 1 (exponents of non-positive logs),
// zero where p or q is 0.  At alpha + beta = 1 (the default 0.5, 0.5) the last
// two are p and q themselves: one exp per entry instead of three.
template <class V>
struct AB : KeptIsG {
  static constexpr bool kValueFromExps = false;
  struct Acc {
    TwoSums<V> s;
    V a, b, apb, coef_pp, coef_qq, value_scale, grad_scale;
    bool unit;
    explicit Acc(const DivConsts& c)
        : a(vset<V>(c.alpha)), b(vset<V>(c.beta)), apb(vset<V>(c.alpha + c.beta)),
          coef_pp(vset<V>(c.alpha / (c.alpha + c.beta))), coef_qq(vset<V>(c.beta / (c.alpha + c.beta))),
          value_scale(vset<V>(-1.0 / (c.alpha * c.beta))), grad_scale(vset<V>(-1.0 / c.alpha)),
          unit(c.alpha + c.beta == 1.0) {}
    V add(const Elem<V>& e) {
      const V pq = vexp_nonpositive(a * e.logp + b * e.logq);
      const V pp = unit ? e.p : vexp_nonpositive(apb * e.logp);
      const V qq = unit ? e.q : vexp_nonpositive(apb * e.logq);
      const V g = grad_scale * (pq - qq);  // -(p^a q^b - q^(a+b)) / a
      s.add(value_scale * (pq - coef_pp * pp - coef_qq * qq), g);
      return g;
    }
    void flush(RowAcc& r) { s.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts&) { r.D = r.val; r.gsum = r.aux; }
};

// ---------------------------------------------------------------- skew kl: KL(p || s p + (1-s) q)
template <class V>
struct SkewKL : KeptIsG {
  static constexpr bool kValueFromExps = false;
  struct Acc {
    TwoSums<V> s;
    Mixture<V> mix;
    V minus_one_minus_skew;
    explicit Acc(const DivConsts& c) : mix(c), minus_one_minus_skew(vset<V>(-(1.0 - c.skew))) {}
    // g_j = -(1 - s) p_j q_j / m_j; 0 where m_j underflows (both p_j and q_j below float's range)
    V add(const Elem<V>& e) {
      const auto mt = mix(e);
      const V g = select(mt.normal, minus_one_minus_skew * (e.p * e.q * mt.inv_m), vzero<V>());
      s.add(select(gt(e.p, vzero<V>()), e.p * (e.logp - mt.log_m), vzero<V>()), g);
      return g;
    }
    void flush(RowAcc& r) { s.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts&) { r.D = r.val; r.gsum = r.aux; }
};

// ---------------------------------------------------------------- skew reverse kl: KL(q || (1-s) p + s q)
template <class V>
struct SkewReverseKL : KeptIsG {
  static constexpr bool kValueFromExps = false;
  struct Acc {
    TwoSums<V> s;
    Mixture<V> mix;
    V skew;
    explicit Acc(const DivConsts& c) : mix(c), skew(vset<V>(c.skew)) {}
    // g_j = q_j (log q_j - log m_j) - s q_j^2 / m_j   (the +q_j term cancels)
    V add(const Elem<V>& e) {
      const auto mt = mix(e);
      const V value = select(gt(e.q, vzero<V>()), e.q * (e.logq - mt.log_m), vzero<V>());
      const V g = select(mt.normal, value - skew * (e.q * e.q * mt.inv_m), value);
      s.add(value, g);
      return g;
    }
    void flush(RowAcc& r) { s.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts&) { r.D = r.val; r.gsum = r.aux; }
};

// ---------------------------------------------------------------- squared hellinger: sum (sqrt p - sqrt q)^2
template <class V>
struct Hellinger : KeptIsG {
  static constexpr bool kValueFromExps = false;
  struct Acc {
    TwoSums<V> s;
    explicit Acc(const DivConsts&) {}
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
