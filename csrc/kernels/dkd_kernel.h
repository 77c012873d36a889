// The fused DKD row kernel (see dkd_api.h), written once over the SIMD
// abstraction.  Sweeps: non-target maxima; non-target exponentials (kept in
// scratch) with their sums; the gradient from the scratch rows.  The target
// enters through double-precision scalars only.
#pragma once

#include <cmath>

#include "dkd_api.h"
#include "dtype_pairs.h"
#include "row_kernel.h"

namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

// p (log p - log q) with 0 log 0 = 0.
inline double plogratio(double log_p, double log_q) {
  return log_p == -INFINITY ? 0.0 : std::exp(log_p) * (log_p - log_q);
}

template <class V, class TT, class TS>
struct DkdKernel {
  using S = typename V::value_type;
  static constexpr float kNegInf = -INFINITY;

  static void run(const DkdParams& prm, const DkdBatch& b, int64_t i, S* scratch_t, S* scratch_s) {
    const int64_t n = b.vocab;
    const TT* zt = static_cast<const TT*>(b.teacher) + i * b.teacher_row_stride;
    const TS* zs = static_cast<const TS*>(b.student) + i * b.student_row_stride;
    TS* grad = b.grad ? static_cast<TS*>(b.grad) + i * n : nullptr;
    const int64_t label = b.labels[i];
    b.row_status[i] = kRowOk;
    b.row_loss[i] = 0.0;
    if (label == b.ignore_index) {
      if (grad) std::memset(static_cast<void*>(grad), 0, sizeof(TS) * n);
      return;
    }
    // The non-target classes are shifted by their own maximum, not the row's: a target far above
    // them (p_t = 1 - 1e-200) must still leave a well-defined non-target distribution.
    auto without_target = [&](V x, int64_t j, auto tail) {
      if (label >= j && label < j + lanes(tail, V::size)) {  // the one vector holding the target
        alignas(64) S lanes_of_x[V::size];
        x.store(lanes_of_x);
        lanes_of_x[label - j] = S(kNegInf);
        return V::load(lanes_of_x);
      }
      return x;
    };
    V vmt = V::broadcast(kNegInf), vms = V::broadcast(kNegInf);
    sweep<V>(n, [&](int64_t j, auto tail) {
      vmt = vmax(without_target(ld<V>(zt + j, tail, kNegInf), j, tail), vmt);
      vms = vmax(without_target(ld<V>(zs + j, tail, kNegInf), j, tail), vms);
    }, no_flush);
    const double zl_t = double(to_float(zt[label])), zl_s = double(to_float(zs[label]));
    const double mot = double(vmt.reduce_max()), mos = double(vms.reduce_max());  // -inf: no other class
    // (vmax skips NaNs: a row of NaN and -inf entries is a NaN row, not an all -inf one)
    const bool dead_t = mot == -INFINITY && zl_t == -INFINITY && !row_has_nan(zt, n);
    const bool dead_s = mos == -INFINITY && zl_s == -INFINITY && !row_has_nan(zs, n);
    if (dead_t || dead_s) {
      b.row_status[i] = dead_t ? kTeacherAllNegInf : kStudentAllNegInf;
      if (grad) std::memset(static_cast<void*>(grad), 0, sizeof(TS) * n);
      return;
    }

    // exponentials of the non-target classes at x = (z - max_other) / tau (target lane 0), their sums
    // and sum e_t (x_t - x_s); all -inf non-target classes shift by 0 (their exponentials are 0).
    // The shift is the row kernel's (row_kernel.h): one FMA for ordinary rows, whose rounding
    // offsets every x of a row by the same t_max (taken out of the log-masses below), and the
    // maximum subtracted first for huge ones.
    const S k = S(1.0 / prm.tau);
    const S shift_t = mot == -INFINITY ? S(0) : S(mot), shift_s = mos == -INFINITY ? S(0) : S(mos);
    double other_t = 0, other_s = 0, other_kl = 0, t_max_t = 0, t_max_s = 0;
    auto exp_sweep = [&](const auto to_t, const auto to_s) {
      V ot = V::zero(), os = V::zero(), ok = V::zero();
      sweep<V>(n, [&](int64_t j, auto tail) {
        V xt = to_t(without_target(ld<V>(zt + j, tail, kNegInf), j, tail));
        V xs = to_s(without_target(ld<V>(zs + j, tail, kNegInf), j, tail));
        V et = vexp_nonpositive(xt), es = vexp_nonpositive(xs);
        et.store(scratch_t + j);
        es.store(scratch_s + j);
        ot = ot + et;
        os = os + es;
        ok = ok + select(gt(et, V::zero()), et * (xt - xs), V::zero());
      }, [&] {
        other_t += ot.reduce_add();
        other_s += os.reduce_add();
        other_kl += ok.reduce_add();
        ot = os = ok = V::zero();
      });
      t_max_t = to_t.at_max();
      t_max_s = to_s.at_max();
    };
    if (std::fabs(double(shift_t) * double(k)) < kFmaShiftLimit && std::fabs(double(shift_s) * double(k)) < kFmaShiftLimit)
      exp_sweep(ShiftByFma<V>(k, shift_t), ShiftByFma<V>(k, shift_s));
    else
      exp_sweep(ShiftBySub<V>(k, shift_t), ShiftBySub<V>(k, shift_s));
    // A NaN or +inf logit, off the target (NaN sums) or on it: NaN in, NaN out.
    if (!std::isfinite(other_t) || !std::isfinite(other_s) || std::isnan(zl_t) || std::isnan(zl_s) ||
        zl_t == INFINITY || zl_s == INFINITY) {
      b.row_loss[i] = std::numeric_limits<double>::quiet_NaN();
      if (grad) fill_nan(grad, n);
      return;
    }
    // log-masses in double: lse_other = max_other / tau + log(sum), lse = logaddexp(lse_other, z_target / tau)
    auto logaddexp = [](double a, double c) {
      const double hi = std::max(a, c), lo = std::min(a, c);
      return hi == -INFINITY ? hi : hi + std::log1p(std::exp(lo - hi));
    };
    const double lo_t = other_t > 0 ? mot / prm.tau + std::log(other_t) - t_max_t : -INFINITY;
    const double lo_s = other_s > 0 ? mos / prm.tau + std::log(other_s) - t_max_s : -INFINITY;
    const double lse_t = logaddexp(lo_t, zl_t / prm.tau), lse_s = logaddexp(lo_s, zl_s / prm.tau);
    const double log_pt = zl_t / prm.tau - lse_t, log_qt = zl_s / prm.tau - lse_s;
    const double tckd = plogratio(log_pt, log_qt) + plogratio(lo_t - lse_t, lo_s - lse_s);
    // sum_{j != t} phat (log phat - log qhat), phat = e_t / other_t: 0 without teacher mass off the target
    const double nckd = other_t > 0 ? other_kl / other_t - std::log(other_t) + std::log(other_s) : 0.0;
    const double t2 = prm.tau * prm.tau;
    b.row_loss[i] = t2 * (prm.alpha * tckd + prm.beta * nckd);
    if (!grad) return;

    // j == t: c alpha (q_t - p_t);  j != t: c [beta (qhat_j - phat_j) - alpha (q_t - p_t) qhat_j]
    const double c = t2 / prm.tau * prm.inv_denom;
    const double gap = std::exp(log_qt) - std::exp(log_pt);
    const double beta_nckd = other_t > 0 ? prm.beta : 0.0;  // no NCKD (nor its gradient) without teacher mass there
    const V coef_q = vset<V>(other_s > 0 ? c * (beta_nckd - prm.alpha * gap) / other_s : 0.0);
    const V coef_p = vset<V>(other_t > 0 ? -c * prm.beta / other_t : 0.0);
    const S at_target = S(c * prm.alpha * gap);
    sweep<V>(n, [&](int64_t j, auto tail) {
      V out = fmadd(coef_q, V::load(scratch_s + j), coef_p * V::load(scratch_t + j));
      if (label >= j && label < j + lanes(tail, V::size)) {
        alignas(64) S o[V::size];
        out.store(o);
        o[label - j] = at_target;
        out = V::load(o);
      }
      st(grad + j, out, tail);
    }, no_flush);
  }
};

template <class V, class TT, class TS>
void dkd_run_rows(const DkdParams& prm, const DkdBatch& b, int64_t begin, int64_t end) {
  using S = typename V::value_type;
  rows_with_scratch<V>(b.vocab, b.row_status, begin, end, [&](int64_t i, S* scratch_t, S* scratch_s) {
    DkdKernel<V, TT, TS>::run(prm, b, i, scratch_t, scratch_s);
  });
}

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
