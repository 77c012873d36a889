// The fused LTKD row kernels (see ltkd_api.h), written once over the SIMD
// abstraction.  Sweeps of ltkd_rows per row: the per-group maxima of each
// input; the exponentials 2^t, t = log2(e) (z - max of z's group) / tau,
// kept in scratch, with their per-group sums and the per-group sums of
// e_t (t_t - t_s) (the within-group KLs); the gradient from the scratch rows.
//
// Group membership is a lane mask per group (the class's float group id
// compared with g): G compares and selects per vector instead of a gather or
// a scatter, cheap for LTKD's G = 3 and bounded by kLtkdMaxGroups.
//
// The gradient with respect to z_s,c for c in group g (c = tau / denominator,
// P~ the inter-group target, w_g the intra weight, 0 without teacher mass):
//   c [ inter_weight (Q_g - P~_g) q_{c|g} + intra_weight w_g (q_{c|g} - p_{c|g}) ]
// = A_g e_s,c + B_g e_t,c with A_g, B_g per group: one FMA per entry.
#pragma once

#include <cmath>
#include <cstring>
#include <limits>

#include "dtype_pairs.h"
#include "ltkd_api.h"
#include "row_kernel.h"

namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

template <class V>
using LaneMask = decltype(eq(V::zero(), V::zero()));

// The lane masks of the G groups for the vector of classes at j (tail
// padding reads id -1: in no group).
template <class V, class Tail>
inline void group_masks(const float* group_of, int64_t j, Tail tail, const V* ids, int groups, LaneMask<V>* in) {
  const V id = ld<V>(group_of + j, tail, -1.0f);
  for (int g = 0; g < groups; ++g) in[g] = eq(id, ids[g]);
}

// values[g] on the lanes of group g, 0 on lanes in no group.
template <class V>
inline V per_lane(const LaneMask<V>* in, const V* values, int groups) {
  V out = V::zero();
  for (int g = 0; g < groups; ++g) out = select(in[g], values[g], out);
  return out;
}

// Per-group partial sums on vector lanes, flushed into double totals (long rows keep their accuracy).
template <class V>
struct GroupSums {
  V lanes[kLtkdMaxGroups];
  double total[kLtkdMaxGroups];
  int groups;
  explicit GroupSums(int g) : groups(g) {
    for (int k = 0; k < g; ++k) {
      lanes[k] = V::zero();
      total[k] = 0.0;
    }
  }
  void flush() {
    for (int k = 0; k < groups; ++k) {
      total[k] += double(lanes[k].reduce_add());
      lanes[k] = V::zero();
    }
  }
};

// log(sum_g exp(x_g)) of G doubles; -inf when every x_g is -inf.
inline double logsumexp_groups(const double* x, int groups) {
  double m = -INFINITY;
  for (int g = 0; g < groups; ++g) m = x[g] > m ? x[g] : m;
  if (m == -INFINITY) return m;
  double s = 0.0;
  for (int g = 0; g < groups; ++g) s += std::exp(x[g] - m);
  return m + std::log(s);
}

template <class V, class TT, class TS>
struct LtkdKernel {
  using S = typename V::value_type;
  static constexpr float kNegInf = -INFINITY;

  struct Ids {
    V id[kLtkdMaxGroups];
    explicit Ids(int groups) {
      for (int g = 0; g < groups; ++g) id[g] = V::broadcast(S(g));
    }
  };

  // The maximum of each group's logits (NaN skipped: vmax keeps its second operand); -inf for a group with no
  // finite logit, or no class.  Of one input, or of two in one sweep (zb non-null: the masks serve both).
  template <class TA, class TB>
  static void group_maxima(const LtkdBatch& b, const Ids& ids, const TA* za, S* out_a, const TB* zb, S* out_b) {
    V acc_a[kLtkdMaxGroups], acc_b[kLtkdMaxGroups];
    const int G = b.groups;
    const V neg_inf = V::broadcast(S(kNegInf));
    for (int g = 0; g < G; ++g) acc_a[g] = acc_b[g] = neg_inf;
    LaneMask<V> in[kLtkdMaxGroups];
    sweep<V>(b.vocab, [&](int64_t j, auto tail) {
      group_masks<V>(b.group_of, j, tail, ids.id, G, in);
      const V xa = ld<V>(za + j, tail, kNegInf);
      for (int g = 0; g < G; ++g) acc_a[g] = vmax(select(in[g], xa, neg_inf), acc_a[g]);
      if (zb) {
        const V xb = ld<V>(zb + j, tail, kNegInf);
        for (int g = 0; g < G; ++g) acc_b[g] = vmax(select(in[g], xb, neg_inf), acc_b[g]);
      }
    }, no_flush);
    for (int g = 0; g < G; ++g) {
      out_a[g] = acc_a[g].reduce_max();
      if (zb) out_b[g] = acc_b[g].reduce_max();
    }
  }

  // Whether every group maximum is -inf and no entry is NaN: the contract's all -inf row.
  template <class T>
  static bool all_neg_inf(const T* z, int64_t n, const S* m, int groups) {
    for (int g = 0; g < groups; ++g)
      if (m[g] != S(kNegInf)) return false;
    return !row_has_nan(z, n);
  }

  // The shift of each group: its maximum, or 0 for a group whose maximum is -inf (its exponentials are 0).  A +inf
  // maximum stays: +inf - +inf is NaN, which marks the row undefined (2^t is only defined for t <= 0).
  static void shifts(const S* m, int groups, V* out) {
    for (int g = 0; g < groups; ++g) out[g] = V::broadcast(m[g] == S(kNegInf) ? S(0) : m[g]);
  }

  // log of the group masses relative to the row's normaliser: L_g = max_g / tau + log sum_g 2^t, minus their lse.
  static void group_log_masses(const S* m, const double* sums, int groups, double tau, double* out) {
    for (int g = 0; g < groups; ++g) out[g] = sums[g] > 0 ? double(m[g]) / tau + std::log(sums[g]) : -INFINITY;
    const double lse = logsumexp_groups(out, groups);
    for (int g = 0; g < groups; ++g) out[g] -= lse;  // -inf stays -inf (lse is finite on a defined row)
  }

  static void zero_row(TS* grad, int64_t n) {
    if (grad) std::memset(static_cast<void*>(grad), 0, sizeof(TS) * n);
  }

  static void loss_row(const LtkdParams& prm, const LtkdBatch& b, const Ids& ids, int64_t i, S* scratch_t,
                       S* scratch_s) {
    const int64_t n = b.vocab;
    const int G = b.groups;
    const TT* zt = static_cast<const TT*>(b.teacher) + i * b.teacher_row_stride;
    const TS* zs = static_cast<const TS*>(b.student) + i * b.student_row_stride;
    TS* grad = b.grad ? static_cast<TS*>(b.grad) + i * n : nullptr;
    b.row_status[i] = kRowOk;
    b.row_loss[i] = 0.0;

    S mt[kLtkdMaxGroups], ms[kLtkdMaxGroups];
    group_maxima(b, ids, zt, mt, zs, ms);
    if (all_neg_inf(zt, n, mt, G) || all_neg_inf(zs, n, ms, G)) {
      b.row_status[i] = all_neg_inf(zt, n, mt, G) ? kTeacherAllNegInf : kStudentAllNegInf;
      zero_row(grad, n);
      return;
    }

    // t = (z - shift of its group) k, exact 0 at each group's maximum whatever its size.
    const V k = V::broadcast(S(kLog2eD / prm.tau));
    V shift_t[kLtkdMaxGroups], shift_s[kLtkdMaxGroups];
    shifts(mt, G, shift_t);
    shifts(ms, G, shift_s);
    GroupSums<V> sum_t(G), sum_s(G), kl(G);
    LaneMask<V> in[kLtkdMaxGroups];
    const V one = V::broadcast(S(1));
    // the compute-bound sweep prefetches the next row's logits (row_kernel.h), which the maxima sweep reads next
    const bool has_next = i + 1 < b.rows;
    const TT* zt_next = has_next ? zt + b.teacher_row_stride : zt;
    const TS* zs_next = has_next ? zs + b.student_row_stride : zs;
    sweep<V>(n, [&](int64_t j, auto tail) {
      prefetch_next_line<V>(zt_next, j);
      prefetch_next_line<V>(zs_next, j);
      group_masks<V>(b.group_of, j, tail, ids.id, G, in);
      const V tt = (ld<V>(zt + j, tail, kNegInf) - per_lane<V>(in, shift_t, G)) * k;
      const V ts = (ld<V>(zs + j, tail, kNegInf) - per_lane<V>(in, shift_s, G)) * k;
      const V et = vexp2_nonpositive(tt), es = vexp2_nonpositive(ts);
      et.store(scratch_t + j);
      es.store(scratch_s + j);
      const V diff = tt - ts;  // +inf where the student masks a class the teacher holds
      const auto teacher_mass = gt(et, V::zero());
      for (int g = 0; g < G; ++g) {  // masked FMAs (x * 1 + sum): one instruction each on AVX-512
        sum_t.lanes[g] = fmadd_where(in[g], et, one, sum_t.lanes[g]);
        sum_s.lanes[g] = fmadd_where(in[g], es, one, sum_s.lanes[g]);
        kl.lanes[g] = fmadd_where(mask_and(in[g], teacher_mass), et, diff, kl.lanes[g]);
      }
    }, [&] {
      sum_t.flush();
      sum_s.flush();
      kl.flush();
    });
    // A NaN or +inf logit makes its group's sum NaN (a finite group sums to at most its size).
    for (int g = 0; g < G; ++g) {
      if (!std::isfinite(sum_t.total[g]) || !std::isfinite(sum_s.total[g])) {
        b.row_loss[i] = std::numeric_limits<double>::quiet_NaN();
        if (grad) fill_nan(grad, n);
        return;
      }
    }

    double log_p[kLtkdMaxGroups], log_q[kLtkdMaxGroups], log_target[kLtkdMaxGroups];
    group_log_masses(mt, sum_t.total, G, prm.tau, log_p);
    group_log_masses(ms, sum_s.total, G, prm.tau, log_q);
    // P~_g ∝ P_g / prior_g over the groups that have teacher mass
    for (int g = 0; g < G; ++g)
      log_target[g] = prm.log_prior && log_p[g] != -INFINITY ? log_p[g] - prm.log_prior[g] : log_p[g];
    if (prm.log_prior) {
      const double lse = logsumexp_groups(log_target, G);
      for (int g = 0; g < G; ++g) log_target[g] -= lse;
    }

    double inter = 0.0, intra = 0.0, weight[kLtkdMaxGroups];
    for (int g = 0; g < G; ++g) {
      const double mass_t = sum_t.total[g], mass_s = sum_s.total[g];
      if (log_target[g] != -INFINITY) inter += std::exp(log_target[g]) * (log_target[g] - log_q[g]);
      weight[g] = mass_t > 0 ? (prm.teacher_weighting ? std::exp(log_p[g]) : 1.0) : 0.0;
      if (weight[g] > 0) {
        // KL(p_{.|g} || q_{.|g}) = sum p_{c|g} (log p_{c|g} - log q_{c|g}) with log p_{c|g} = ln2 t_t - log S_t
        const double within = mass_s > 0 ? kLn2D * kl.total[g] / mass_t - std::log(mass_t) + std::log(mass_s)
                                         : INFINITY;
        intra += weight[g] * within;
      }
    }
    const double a = prm.inter_weight, bw = prm.intra_weight, t2 = prm.tau * prm.tau;
    b.row_loss[i] = t2 * ((a != 0.0 ? a * inter : 0.0) + (bw != 0.0 ? bw * intra : 0.0));
    if (!grad) return;

    const double c = prm.tau * prm.grad_scale;  // tau^2 / tau / denominator
    V coef_s[kLtkdMaxGroups], coef_t[kLtkdMaxGroups];
    for (int g = 0; g < G; ++g) {
      const double mass_t = sum_t.total[g], mass_s = sum_s.total[g];
      const double target = std::exp(log_target[g]), q = std::exp(log_q[g]);
      coef_s[g] = vset<V>(mass_s > 0 ? c * (a * (q - target) + bw * weight[g]) / mass_s : 0.0);
      coef_t[g] = vset<V>(mass_t > 0 ? -c * bw * weight[g] / mass_t : 0.0);
    }
    const bool stream = streams_aligned_row<V>(b.stream_grad, grad);
    const StreamedLines lines = streamed_lines<V>(grad, n, stream);
    sweep<V>(n, [&](int64_t j, auto tail) {
      group_masks<V>(b.group_of, j, tail, ids.id, G, in);
      const V out = fmadd(per_lane<V>(in, coef_s, G), V::load(scratch_s + j),
                          per_lane<V>(in, coef_t, G) * V::load(scratch_t + j));
      store_grad(grad + j, out, tail, lines.streams(j));
    }, no_flush);
    if (stream) stream_fence();
  }

  // Whether a row has a NaN or +inf entry (one vector sweep, no exponentials).
  template <class T>
  static bool has_nan_or_posinf(const T* z, int64_t n) {
    const V pos_inf = V::broadcast(S(INFINITY)), one = V::broadcast(S(1));
    V bad = V::zero();
    sweep<V>(n, [&](int64_t j, auto tail) {
      bad = bad + select(gt(pos_inf, ld<V>(z + j, tail, kNegInf)), V::zero(), one);
    }, no_flush);
    return bad.reduce_add() > 0;
  }

  static void teacher_groups_row(const LtkdParams& prm, const LtkdBatch& b, const Ids& ids, int64_t i) {
    const int64_t n = b.vocab;
    const int G = b.groups;
    const TT* zt = static_cast<const TT*>(b.teacher) + i * b.teacher_row_stride;
    const TS* zs = static_cast<const TS*>(b.student) + i * b.student_row_stride;
    double* out = b.teacher_log_mass + i * G;
    b.row_status[i] = kRowOk;
    S mt[kLtkdMaxGroups];
    group_maxima(b, ids, zt, mt, static_cast<const TS*>(nullptr), nullptr);
    // (an all -inf student row is left to the loss pass, which refuses it)
    if (all_neg_inf(zt, n, mt, G)) {
      b.row_status[i] = kTeacherAllNegInf;
      for (int g = 0; g < G; ++g) out[g] = -INFINITY;
      return;
    }
    const bool student_undefined = has_nan_or_posinf(zs, n);
    const V k = V::broadcast(S(kLog2eD / prm.tau));
    V shift_t[kLtkdMaxGroups];
    shifts(mt, G, shift_t);
    GroupSums<V> sum_t(G);
    LaneMask<V> in[kLtkdMaxGroups];
    const V one = V::broadcast(S(1));
    const bool has_next = i + 1 < b.rows;
    const TT* zt_next = has_next ? zt + b.teacher_row_stride : zt;
    const TS* zs_next = has_next ? zs + b.student_row_stride : zs;
    sweep<V>(n, [&](int64_t j, auto tail) {
      prefetch_next_line<V>(zt_next, j);
      prefetch_next_line<V>(zs_next, j);
      group_masks<V>(b.group_of, j, tail, ids.id, G, in);
      const V et = vexp2_nonpositive((ld<V>(zt + j, tail, kNegInf) - per_lane<V>(in, shift_t, G)) * k);
      for (int g = 0; g < G; ++g) sum_t.lanes[g] = fmadd_where(in[g], et, one, sum_t.lanes[g]);
    }, [&] { sum_t.flush(); });
    bool undefined = student_undefined;
    for (int g = 0; g < G; ++g) undefined = undefined || !std::isfinite(sum_t.total[g]);
    if (undefined) {
      for (int g = 0; g < G; ++g) out[g] = std::numeric_limits<double>::quiet_NaN();
      return;
    }
    group_log_masses(mt, sum_t.total, G, prm.tau, out);
  }
};

template <class V, class TT, class TS>
void ltkd_run_rows(const LtkdParams& prm, const LtkdBatch& b, int64_t begin, int64_t end) {
  using K = LtkdKernel<V, TT, TS>;
  using S = typename V::value_type;
  const typename K::Ids ids(b.groups);
  rows_with_scratch<V>(b.vocab, b.row_status, begin, end, [&](int64_t i, S* scratch_t, S* scratch_s) {
    K::loss_row(prm, b, ids, i, scratch_t, scratch_s);
  });
}

template <class V, class TT, class TS>
void ltkd_run_teacher_groups(const LtkdParams& prm, const LtkdBatch& b, int64_t begin, int64_t end) {
  using K = LtkdKernel<V, TT, TS>;
  const typename K::Ids ids(b.groups);
  for (int64_t i = begin; i < end; ++i) K::teacher_groups_row(prm, b, ids, i);
}

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
