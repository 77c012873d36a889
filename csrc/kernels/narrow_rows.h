// KL over rows of a small vocabulary (classification: V = 2 ... kNarrowMaxVocab),
// a block of V::size rows at a time, one row per SIMD lane.
//
// Why a second layout: the row skeleton (row_kernel.h) vectorises along the
// row, so a row of 10 logits fills one masked vector per sweep and its cost is
// the per-row chain around it: the maxima's and the sums' horizontal
// reductions, the scalar logs and coefficients, each waiting on the last
// (about 180 cycles a row at V = 10 on Zen 4, 1.7x torch.compile at 655360x10).
// Here a block's rows are transposed into lane-per-row tiles, so that every
// sweep of the skeleton becomes V vertical vector operations for V::size rows
// and no reduction crosses lanes; the per-row scalars are computed for all
// lanes at once, the gradient is transposed back.
//
// The formulas are the skeleton's for KL (row_kernel.h, divergences.h: KL):
// the exponentials 2^t of t = log2(e) (z - max) / tau, KL's value from the
// exponential sweep, the hard-label term, the weights None and Given.  Only
// ordinary rows are written here: a row with an ignored label, an all -inf
// row or a row with a NaN / +inf logit is left to the row skeleton, which
// holds the contract's edge cases (docs/contract.md, section 7) in one place.
// Lanes never mix, so a row's result depends on its own logits only, not on
// which rows share its block (or on how rows are split across threads).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "row_kernel.h"

namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

// Above this vocabulary the row skeleton's per-row cost is small next to its
// entries' (measured on Zen 4, AVX-512 and AVX2: at V = 64 the transposes cost
// what they save).
constexpr int64_t kNarrowMaxVocab = 32;

template <template <class> class Div, class V, class TT, class TS>
struct NarrowRows {
  using S = typename V::value_type;
  static constexpr int W = V::size;
  // Lanes are rows: a scalar "vector" gains nothing; only KL's value comes
  // from the exponential sweep without a value sweep of its own.
  static constexpr bool kApplies = std::is_same_v<S, float> && W >= 8 && std::is_same_v<Div<V>, KL<V>>;

  static bool eligible(const DistillParams& prm, const DistillBatch& b) {
    return b.vocab <= kNarrowMaxVocab && prm.label_revision == 0.0 &&
           (prm.weighting == Weighting::None || prm.weighting == Weighting::Given);
  }

  // Rows [row0, row0 + count), count <= W: the losses, statuses and gradient
  // rows of the ordinary ones.  Returns the lanes (bit i: row row0 + i) that
  // the row skeleton must take.  Lanes past count compute on zeros, unwritten.
  static uint32_t run(const DistillParams& prm, const DistillBatch& b, int64_t row0, int count) {
    const int64_t n = b.vocab;
    const bool hard = b.labels && prm.hard_weight != 0.0;
    uint32_t skeleton = 0;
    int64_t label[W];
    for (int i = 0; i < W; ++i) {
      label[i] = -1;
      if (i < count && b.labels) {
        label[i] = b.labels[row0 + i];
        if (label[i] == b.ignore_index) skeleton |= 1u << i;
      }
    }

    // Tiles [entry][lane].  The logits are transposed as stored (16-bit ones
    // are converted a vector at a time, not entry by entry), then kept as
    // floats; the exponentials replace them, and the gradient, converted to
    // the student's dtype, takes the student's input tile for the transpose
    // back.  e1: the student at temperature 1 (the CE
    // normaliser) when its temperature differs.
    alignas(64) TT zt_in[kNarrowMaxVocab * W];
    alignas(64) TS zs_in[kNarrowMaxVocab * W];
    alignas(64) S zt_tile[kNarrowMaxVocab * W];
    alignas(64) S zs_tile[kNarrowMaxVocab * W];
    alignas(64) S e1_tile[kNarrowMaxVocab * W];
    for (int i = 0; i < W; ++i) {
      if (i >= count) {
        for (int64_t j = 0; j < n; ++j) {
          zt_in[j * W + i] = from_float<TT>(0.0f);
          zs_in[j * W + i] = from_float<TS>(0.0f);
        }
        continue;
      }
      const TT* zt = teacher_row(b, row0 + i);
      const TS* zs = student_row(b, row0 + i);
      for (int64_t j = 0; j < n; ++j) {
        zt_in[j * W + i] = zt[j];
        zs_in[j * W + i] = zs[j];
      }
    }

    // -- maxima (vmax keeps its second operand on NaN: NaNs reach the sums)
    const V neg_inf = V::broadcast(-INFINITY);
    V mt = neg_inf, ms = neg_inf;
    for (int64_t j = 0; j < n; ++j) {
      const V xt = ld<V>(zt_in + j * W, Full{}, 0.0f), xs = ld<V>(zs_in + j * W, Full{}, 0.0f);
      xt.store(zt_tile + j * W);
      xs.store(zs_tile + j * W);
      mt = vmax(xt, mt);
      ms = vmax(xs, ms);
    }

    // -- exponentials, sums and KL's sum e_t (t_t - t_s).  The shift subtracts
    // the maximum (t = 0 there exactly): one operation more than the row
    // skeleton's FMA, and no limit on the logits' size.
    const bool student_t1_differs = prm.tau_s != 1.0;
    const bool add_q1 = hard && student_t1_differs;
    const V k_t = V::broadcast(S(kLog2eD / prm.tau)), k_s = V::broadcast(S(kLog2eD / prm.tau_s));
    const V k_1 = V::broadcast(S(kLog2eD)), zero = V::zero();
    V sum_t = zero, sum_s = zero, val = zero, sum_1 = zero;
    for (int64_t j = 0; j < n; ++j) {
      const V dzs = V::load(zs_tile + j * W) - ms;
      const V tt = (V::load(zt_tile + j * W) - mt) * k_t, ts = dzs * k_s;
      const V et = vexp2_nonpositive(tt), es = vexp2_nonpositive(ts);
      et.store(zt_tile + j * W);
      es.store(zs_tile + j * W);
      sum_t = sum_t + et;
      sum_s = sum_s + es;
      val = fmadd_where(gt(et, zero), et, tt - ts, val);
      if (add_q1) {
        const V e1 = vexp2_nonpositive(dzs * k_1);
        e1.store(e1_tile + j * W);
        sum_1 = sum_1 + e1;
      }
    }
    // The logs for all lanes at once, in float (vlog2_positive: error below
    // 5e-8 + 6e-8 |log2 x|): ~1e-7 in a row's value, next to the ~1e-7
    // relative of its float sums, where a scalar double log per row would
    // cost as much as the rest of the row at V = 10.
    alignas(64) S lane_sum_t[W], lane_sum_s[W], lane_val[W], mzs[W], mzt[W], log2_ratio[W], log2_s1[W];
    sum_t.store(lane_sum_t);
    sum_s.store(lane_sum_s);
    val.store(lane_val);
    vlog2_positive(sum_s / sum_t).store(log2_ratio);
    if (hard) vlog2_positive(add_q1 ? sum_1 : sum_s).store(log2_s1);
    ms.store(mzs);
    mt.store(mzt);
    // All -inf rows have a -inf maximum; a NaN or +inf logit makes a sum NaN
    // (each 2^t <= 1 in a finite row).
    for (int i = 0; i < count; ++i)
      if (mzt[i] == -INFINITY || mzs[i] == -INFINITY || !(std::isfinite(lane_sum_t[i]) && std::isfinite(lane_sum_s[i])))
        skeleton |= 1u << i;

    // -- per row: loss and status
    const bool given = prm.weighting == Weighting::Given;
    for (int i = 0; i < count; ++i) {
      if (skeleton >> i & 1u) continue;
      const int64_t row = row0 + i;
      const double weight = given ? b.weights[row] : 1.0;
      const double D = kLn2D * (double(lane_val[i]) / double(lane_sum_t[i]) + double(log2_ratio[i]));  // log S_s - log S_t in one log
      double ce = 0.0;
      if (hard) ce = (double(mzs[i]) - double(to_float(student_row(b, row)[label[i]]))) + kLn2D * double(log2_s1[i]);
      b.row_loss[row] = (hard ? prm.hard_weight * ce : 0.0) + prm.soft_coef * weight * D;
      b.row_status[row] = kRowOk;
    }
    if (!b.grad) return skeleton;

    // -- gradient: A e_t + B e_s (+ C e_1) - c_hard [j == label], transposed
    // back; the coefficients are write_grad's (row_kernel.h) with KL's
    // Sigma_g = -1, for all lanes at once
    alignas(64) S weight_lane[W], label_lane[W];
    for (int i = 0; i < W; ++i) {
      weight_lane[i] = given && i < count ? S(b.weights[row0 + i]) : S(1);
      label_lane[i] = hard ? S(label[i]) : S(-1);
    }
    const V a = V::broadcast(S(prm.soft_coef * prm.inv_denom / prm.tau_s)) * V::load(weight_lane);
    const V H = V::broadcast(hard ? S(prm.hard_weight * prm.inv_denom) : S(0));
    const V A = (zero - a) / sum_t;
    const V B = (student_t1_differs ? a : a + H) / sum_s;
    const V C = add_q1 ? H / sum_1 : zero;
    const V L = V::load(label_lane);
    for (int64_t j = 0; j < n; ++j) {
      V out = fmadd(V::load(zt_tile + j * W), A, V::load(zs_tile + j * W) * B);
      if (add_q1) out = fmadd(C, V::load(e1_tile + j * W), out);
      if (hard) out = out - select(eq(L, V::broadcast(S(j))), H, zero);
      st(zs_in + j * W, out, Full{});
    }
    for (int i = 0; i < count; ++i) {
      if (skeleton >> i & 1u) continue;
      TS* g = static_cast<TS*>(b.grad) + (row0 + i) * n;
      for (int64_t j = 0; j < n; ++j) g[j] = zs_in[j * W + i];
    }
    return skeleton;
  }

  static const TT* teacher_row(const DistillBatch& b, int64_t row) {
    return static_cast<const TT*>(b.teacher) + row * b.teacher_row_stride;
  }
  static const TS* student_row(const DistillBatch& b, int64_t row) {
    return static_cast<const TS*>(b.student) + row * b.student_row_stride;
  }
};

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
