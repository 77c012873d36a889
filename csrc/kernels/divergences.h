// Divergence policies plugged into the row skeleton (row_kernel.h).
//
// Every divergence D(p || q) is described by:
//   * its row value: either accumulated in the exponential sweep from the
//     shifted logits in base 2, t = log2(e) (z - max) / tau, and e = 2^t
//     (kValueFromExps: no extra sweep), or in a value sweep (Acc::add / Acc::flush);
//   * finish(): the row value D and Sigma_g = sum_j g_j from the sums;
//   * grad_term(): g_j = q_j * dD/dq_j.
// The skeleton turns g into the gradient with respect to the student logits
// through the softmax Jacobian: dD/dz_s_j = (g_j - q_j * Sigma_g) / tau_s.
// Any term c * q_j of g_j cancels in that formula, so policies drop such terms.
// The formulas are those of docs/contract.md; `0 * log 0 == 0` is enforced
// with masks because masked (-inf) vocabulary entries are legal input.
#pragma once

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
};

// Whether a policy's grad_term is -p (KL): then the gradient is a combination
// of the two exponential rows, and the skeleton folds the normalisations 1 / S
// into its coefficients (2 multiplies fewer per vector).  Default: false.
template <class D, class = void>
struct GradTermIsMinusP : std::false_type {};
template <class D>
struct GradTermIsMinusP<D, std::void_t<decltype(D::kGradTermIsMinusP)>> : std::bool_constant<D::kGradTermIsMinusP> {};

template <class V> inline V vzero() { return V::zero(); }
template <class V> inline V vset(double x) { return V::broadcast(typename V::value_type(x)); }

// log(exp(a) + exp(b)), exact for -inf operands.
template <class V>
inline V logaddexp(V a, V b) {
  V mx = vmax(a, b), mn = vmin(a, b);
  V r = mx + vlog_normal(vset<V>(1.0) + vexp(mn - mx));
  return select(eq(mx, vset<V>(-INFINITY)), mx, r);
}

// log m of the mixture m = w_p p + w_q q (jsd, skew_kl, skew_reverse_kl), the
// weights taken from DivConsts.
template <class V>
inline V log_mixture(const Elem<V>& e, const DivConsts& c) {
  return logaddexp(vset<V>(c.log_w_p) + e.logp, vset<V>(c.log_w_q) + e.logq);
}

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
// D = sum p (log p - log q) = (ln 2 / S_t) sum e_t (t_t - t_s) - log S_t + log S_s
template <class V>
struct KL {
  static constexpr bool kValueFromExps = true;
  static constexpr bool kGradTermIsMinusP = true;  // the skeleton folds 1 / S_t into its coefficient
  // acc + e_t (t_t - t_s), skipping e_t == 0 (t_t may be -inf there)
  static V add_exp_term(V acc, V tt, V ts, V et, V) { return fmadd_where(gt(et, vzero<V>()), et, tt - ts, acc); }
  static void finish(RowAcc& r, const DivConsts&) {
    r.D = kLn2D * r.val / r.sum_t - r.log_sum_t + r.log_sum_s;
    r.gsum = -1.0;
  }
  static V grad_term(const Elem<V>& e, const RowAcc&, const DivConsts&) { return vzero<V>() - e.p; }
};

// ---------------------------------------------------------------- reverse kl
// The value is summed from the same log q, log p as the gradient (not in the
// exponential sweep): the gradient (g_j - q_j D) / tau_s cancels terms of
// size D, and only a D rounded like g_j cancels them to float32 accuracy.
template <class V>
struct ReverseKL {
  static constexpr bool kValueFromExps = false;
  // g_j = q_j (log q_j - log p_j + 1); the +q_j part cancels, so Sigma_g = D.
  static V g(const Elem<V>& e) { return select(gt(e.q, vzero<V>()), e.q * (e.logq - e.logp), vzero<V>()); }
  struct Acc {
    TwoSums<V> s;
    void add(const Elem<V>& e, const DivConsts&) {
      V gj = g(e);
      s.add(gj, gj);
    }
    void flush(RowAcc& r) { s.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts&) {
    r.D = r.val;
    r.gsum = r.val;
  }
  static V grad_term(const Elem<V>& e, const RowAcc&, const DivConsts&) { return g(e); }
};

// ---------------------------------------------------------------- jsd (0 < beta < 1)
template <class V>
struct JSD {
  static constexpr bool kValueFromExps = false;
  // log m with m = beta p + (1 - beta) q
  static V g(const Elem<V>& e, V lm, const DivConsts& c) {
    return select(gt(e.q, vzero<V>()), vset<V>(1.0 - c.beta) * e.q * (e.logq - lm), vzero<V>());
  }
  struct Acc {
    TwoSums<V> s;
    void add(const Elem<V>& e, const DivConsts& c) {
      V lm = log_mixture(e, c);
      V gj = g(e, lm, c);
      V vp = select(gt(e.p, vzero<V>()), vset<V>(c.beta) * e.p * (e.logp - lm), vzero<V>());
      s.add(vp + gj, gj);
    }
    void flush(RowAcc& r) { s.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts&) { r.D = r.val; r.gsum = r.aux; }
  static V grad_term(const Elem<V>& e, const RowAcc&, const DivConsts& c) { return g(e, log_mixture(e, c), c); }
};

// ---------------------------------------------------------------- tvd
template <class V>
struct TVD {
  static constexpr bool kValueFromExps = false;
  // 0.5 * q * sign(q - p), sign(0) = 0 (the subgradient autograd takes for |x|)
  static V g(const Elem<V>& e) {
    V half_q = vset<V>(0.5) * e.q;
    return select(gt(e.q, e.p), half_q, select(gt(e.p, e.q), vzero<V>() - half_q, vzero<V>()));
  }
  struct Acc {
    TwoSums<V> s;
    void add(const Elem<V>& e, const DivConsts&) { s.add(vset<V>(0.5) * vabs(e.p - e.q), g(e)); }
    void flush(RowAcc& r) { s.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts&) { r.D = r.val; r.gsum = r.aux; }
  static V grad_term(const Elem<V>& e, const RowAcc&, const DivConsts&) { return g(e); }
};

// ---------------------------------------------------------------- renyi (alpha != 1)
template <class V>
struct Renyi {
  static constexpr bool kValueFromExps = false;
  // x_j = alpha log p_j + (1 - alpha) log q_j; masked entries (log p_j = -inf)
  // contribute nothing.  Not p_j > 0: with huge logits the largest term can be
  // one whose p_j underflows while q_j does not.
  static V x(const Elem<V>& e, const DivConsts& c) {
    V v = vset<V>(c.alpha) * e.logp + vset<V>(1.0 - c.alpha) * e.logq;
    return select(gt(e.logp, vset<V>(-INFINITY)), v, vset<V>(-INFINITY));
  }
  // Per-lane online logsumexp: the terms p^alpha q^(1-alpha) overflow for alpha > 1.
  struct Acc {
    V m = vset<V>(-INFINITY), s = vzero<V>();
    void add(const Elem<V>& e, const DivConsts& c) {
      V xj = x(e, c);
      V mn = vmax(xj, m);
      V ninf = vset<V>(-INFINITY);
      V keep = select(eq(m, mn), vset<V>(1.0), vexp(m - mn));
      V fresh = select(eq(mn, ninf), vzero<V>(), vexp(xj - mn));
      s = s * keep + fresh;
      m = mn;
    }
    void flush(RowAcc& r) {
      for (int i = 0; i < V::size; ++i) {
        double mi = m.lane(i), si = s.lane(i);
        if (si == 0) continue;
        if (mi > r.lse_max) {
          r.lse_sum = r.lse_sum * std::exp(r.lse_max - mi) + si;
          r.lse_max = mi;
        } else {
          r.lse_sum += si * std::exp(mi - r.lse_max);
        }
      }
      m = vset<V>(-INFINITY);
      s = vzero<V>();
    }
  };
  static void finish(RowAcc& r, const DivConsts& c) {
    r.lse = r.lse_sum > 0 ? r.lse_max + std::log(r.lse_sum) : -INFINITY;
    r.D = r.lse / (c.alpha - 1.0);
    r.gsum = -1.0;  // sum_j r_j / sum_k r_k
  }
  // g_j = -p^alpha q^(1-alpha) / sum_k p^alpha q^(1-alpha)
  static V grad_term(const Elem<V>& e, const RowAcc& r, const DivConsts& c) {
    return vzero<V>() - vexp(x(e, c) - vset<V>(r.lse));
  }
};

// ---------------------------------------------------------------- alpha-beta (alpha, beta > 0)
template <class V>
struct AB {
  static constexpr bool kValueFromExps = false;
  struct Terms { V pq, pp, qq; };  // p^a q^b, p^(a+b), q^(a+b); all <= 1, zero where p or q is 0
  static Terms terms(const Elem<V>& e, const DivConsts& c) {
    V a = vset<V>(c.alpha), b = vset<V>(c.beta), ab = vset<V>(c.alpha + c.beta);
    return {vexp(a * e.logp + b * e.logq), vexp(ab * e.logp), vexp(ab * e.logq)};
  }
  static V g(const Terms& t, const DivConsts& c) { return vset<V>(-1.0 / c.alpha) * (t.pq - t.qq); }
  struct Acc {
    TwoSums<V> s;
    void add(const Elem<V>& e, const DivConsts& c) {
      Terms t = terms(e, c);
      double apb = c.alpha + c.beta;
      V inner = t.pq - vset<V>(c.alpha / apb) * t.pp - vset<V>(c.beta / apb) * t.qq;
      s.add(vset<V>(-1.0 / (c.alpha * c.beta)) * inner, g(t, c));
    }
    void flush(RowAcc& r) { s.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts&) { r.D = r.val; r.gsum = r.aux; }
  static V grad_term(const Elem<V>& e, const RowAcc&, const DivConsts& c) { return g(terms(e, c), c); }
};

// ---------------------------------------------------------------- skew kl: KL(p || s p + (1-s) q)
template <class V>
struct SkewKL {
  static constexpr bool kValueFromExps = false;
  // g_j = -(1 - s) p_j q_j / m_j
  static V g(const Elem<V>& e, V lm, const DivConsts& c) {
    V v = vset<V>(-(1.0 - c.skew)) * vexp(e.logp + e.logq - lm);
    return select(mask_and(gt(e.p, vzero<V>()), gt(e.q, vzero<V>())), v, vzero<V>());
  }
  struct Acc {
    TwoSums<V> s;
    void add(const Elem<V>& e, const DivConsts& c) {
      V lm = log_mixture(e, c);
      s.add(select(gt(e.p, vzero<V>()), e.p * (e.logp - lm), vzero<V>()), g(e, lm, c));
    }
    void flush(RowAcc& r) { s.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts&) { r.D = r.val; r.gsum = r.aux; }
  static V grad_term(const Elem<V>& e, const RowAcc&, const DivConsts& c) { return g(e, log_mixture(e, c), c); }
};

// ---------------------------------------------------------------- skew reverse kl: KL(q || (1-s) p + s q)
template <class V>
struct SkewReverseKL {
  static constexpr bool kValueFromExps = false;
  static V value(const Elem<V>& e, V lm) {
    return select(gt(e.q, vzero<V>()), e.q * (e.logq - lm), vzero<V>());
  }
  // g_j = q_j (log q_j - log m_j) - s q_j^2 / m_j   (the +q_j term cancels)
  static V g(const Elem<V>& e, V lm, const DivConsts& c) {
    V sq = vset<V>(c.skew) * vexp(e.logq + e.logq - lm);
    return select(gt(e.q, vzero<V>()), value(e, lm) - sq, vzero<V>());
  }
  struct Acc {
    TwoSums<V> s;
    void add(const Elem<V>& e, const DivConsts& c) {
      V lm = log_mixture(e, c);
      s.add(value(e, lm), g(e, lm, c));
    }
    void flush(RowAcc& r) { s.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts&) { r.D = r.val; r.gsum = r.aux; }
  static V grad_term(const Elem<V>& e, const RowAcc&, const DivConsts& c) { return g(e, log_mixture(e, c), c); }
};

// ---------------------------------------------------------------- squared hellinger: sum (sqrt p - sqrt q)^2
// From log p and log q (sqrt p = exp(log p / 2)): masked entries give 0, and
// no square root of an underflowed p loses digits.
template <class V>
struct Hellinger {
  static constexpr bool kValueFromExps = false;
  // g_j = q_j (1 - sqrt(p_j / q_j)) = q_j - sqrt(p_j q_j)   (the q_j term cancels)
  static V g(const Elem<V>& e) { return vzero<V>() - vexp(vset<V>(0.5) * (e.logp + e.logq)); }
  struct Acc {
    TwoSums<V> s;
    void add(const Elem<V>& e, const DivConsts&) {
      const V half = vset<V>(0.5);
      const V d = vexp(half * e.logp) - vexp(half * e.logq);
      s.add(d * d, g(e));
    }
    void flush(RowAcc& r) { s.flush(r); }
  };
  static void finish(RowAcc& r, const DivConsts&) { r.D = r.val; r.gsum = r.aux; }
  static V grad_term(const Elem<V>& e, const RowAcc&, const DivConsts&) { return g(e); }
};

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
