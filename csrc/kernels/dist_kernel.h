// The fused DIST stages (see dist_api.h), written once over the SIMD
// abstraction and compiled per CPU capability like the divergence kernels.
//
// Softmax values are recomputed from the logits where needed (one exp each)
// rather than stored: the only N x V buffer is the gradient.  Column moments
// are raw sums (sum y, sum y^2, sum y_s y_t) kept in double, so the centred
// moments sum y^2 - N mean^2 lose nothing to cancellation at float32 inputs.
#pragma once

#include <cmath>
#include <cstdlib>
#include <vector>

#include "dist_api.h"
#include "dtype_pairs.h"
#include "pearson.h"
#include "row_kernel.h"

namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

template <class V, class TT, class TS>
struct DistKernel {
  using S = typename V::value_type;
  static constexpr float kNegInf = -INFINITY;

  // y = exp((z - max) / tau - log_sum) of one tile, the shift taken as the row
  // kernel's (row_kernel.h): one FMA for ordinary rows, the maximum subtracted
  // first for huge ones.  The same S-rounded constants in every stage, so the
  // stages agree on every softmax value.
  template <class T, class Tail, class Shift>
  static V softmax_tile(const T* z, int64_t j, Tail tail, const Shift& shift, V log_sum) {
    return vexp(shift(ld<V>(z + j, tail, kNegInf)) - log_sum);
  }

  // Calls f(shift_t, shift_s) with the shifts of a row whose maxima are mt, ms at scale k = 1 / tau.
  template <class F>
  static void with_row_shifts(S k, S mt, S ms, F&& f) {
    if (std::fabs(double(mt) * double(k)) < kFmaShiftLimit && std::fabs(double(ms) * double(k)) < kFmaShiftLimit)
      f(ShiftByFma<V>(k, mt), ShiftByFma<V>(k, ms));
    else
      f(ShiftBySub<V>(k, mt), ShiftBySub<V>(k, ms));
  }

  // -- stage 1: per-row normalisers and row Pearson; scratch holds 2 padded rows
  static void row_stats(const DistParams& prm, const DistBatch& b, int64_t i, S* scratch_t, S* scratch_s) {
    const int64_t n = b.vocab;
    const TT* zt = static_cast<const TT*>(b.teacher) + i * b.teacher_row_stride;
    const TS* zs = static_cast<const TS*>(b.student) + i * b.student_row_stride;
    b.row_status[i] = kRowOk;
    const RowMaxima<V> maxima = row_maxima<V>(zt, zs, n);
    const S mt = maxima.teacher, ms = maxima.student;
    if (maxima.status != kRowOk) {
      b.row_status[i] = maxima.status;
      return;
    }
    double sum_t = 0, sum_s = 0;
    with_row_shifts(S(1.0 / prm.tau), mt, ms, [&](const auto to_t, const auto to_s) {
      V at = V::zero(), as = V::zero();
      sweep<V>(n, [&](int64_t j, auto tail) {
        V et = vexp_nonpositive(to_t(ld<V>(zt + j, tail, kNegInf)));
        V es = vexp_nonpositive(to_s(ld<V>(zs + j, tail, kNegInf)));
        et.store(scratch_t + j);
        es.store(scratch_s + j);
        at = at + et;
        as = as + es;
      }, [&] {
        sum_t += at.reduce_add();
        sum_s += as.reduce_add();
        at = as = V::zero();
      });
    });
    b.max_t[i] = mt;
    b.max_s[i] = ms;
    b.log_sum_t[i] = std::log(sum_t);
    b.log_sum_s[i] = std::log(sum_s);

    // centred moments of the row (the mean of a softmax row is exactly 1/V)
    const V inv_sum_t = vset<V>(1.0 / sum_t), inv_sum_s = vset<V>(1.0 / sum_s), mean = vset<V>(1.0 / double(n));
    double aa = 0, bb = 0, ab = 0;
    {
      V vaa = V::zero(), vbb = V::zero(), vab = V::zero();
      sweep<V>(n, [&](int64_t j, auto tail) {
        // padding lanes past V are not classes: out of the centred sums
        // (a masked class, -inf logit, is a class of probability 0 and stays in)
        const V live = live_lanes<V>(tail);
        V a = (V::load(scratch_s + j) * inv_sum_s - mean) * live;
        V c = (V::load(scratch_t + j) * inv_sum_t - mean) * live;
        vaa = fmadd(a, a, vaa);
        vbb = fmadd(c, c, vbb);
        vab = fmadd(a, c, vab);
      }, [&] {
        aa += vaa.reduce_add();
        bb += vbb.reduce_add();
        ab += vab.reduce_add();
        vaa = vbb = vab = V::zero();
      });
    }
    const CentredPearson pc(ab, aa, bb, prm.eps);
    b.row_rho[i] = pc.rho;
    // d(tau^2 beta (1 - mean rho)) / d y_s = -(tau^2 beta / N) d rho / d a  (centring adds nothing:
    // the coefficients multiply centred vectors, whose sums are 0)
    const double k = -prm.tau * prm.tau * prm.beta / double(b.rows);
    b.row_coef_t[i] = k * pc.coef_b;
    b.row_coef_s[i] = -k * pc.coef_a;
  }

  // -- stage 2: column moments of one block of columns over all rows.
  // Moments are taken about the first row's values (shifted data): a column
  // whose entries are all equal (a batch of one row, repeated rows) has
  // centred moments of exactly 0, as in exact arithmetic, and near-constant
  // columns lose nothing to cancellation.
  static double column_block(const DistParams& prm, const DistBatch& b, int64_t block) {
    const int64_t n = b.vocab, rows = b.rows;
    const int64_t j0 = block * kDistColumnBlock;
    const int64_t width = std::min<int64_t>(kDistColumnBlock, n - j0);
    constexpr int kMoments = 5;  // sum of d_s, d_t, d_s^2, d_t^2, d_s d_t; d = y - y[row 0]
    alignas(64) S part[kMoments][kDistColumnBlock];
    alignas(64) S first[2][kDistColumnBlock];
    double total[kMoments][kDistColumnBlock] = {};
    const S inv_tau = S(1.0 / prm.tau);
    auto row_tiles = [&](int64_t i, auto&& body) {
      const TT* zt = static_cast<const TT*>(b.teacher) + i * b.teacher_row_stride + j0;
      const TS* zs = static_cast<const TS*>(b.student) + i * b.student_row_stride + j0;
      const V lt = vset<V>(b.log_sum_t[i]), ls = vset<V>(b.log_sum_s[i]);
      with_row_shifts(inv_tau, S(b.max_t[i]), S(b.max_s[i]), [&](const auto to_t, const auto to_s) {
        sweep<V>(width, [&](int64_t j, auto tail) {
          body(j, softmax_tile(zs, j, tail, to_s, ls), softmax_tile(zt, j, tail, to_t, lt));
        }, no_flush);
      });
    };
    row_tiles(0, [&](int64_t j, V ys, V yt) {
      ys.store(first[0] + j);
      yt.store(first[1] + j);
    });
    constexpr int64_t kFlushRows = 32;  // float partials over <= 32 rows, then double
    for (int64_t r0 = 0; r0 < rows; r0 += kFlushRows) {
      for (auto& m : part) std::fill(m, m + kDistColumnBlock, S(0));
      const int64_t r1 = std::min(rows, r0 + kFlushRows);
      for (int64_t i = r0; i < r1; ++i) {
        row_tiles(i, [&](int64_t j, V ys, V yt) {
          // tail lanes are exp(-inf) = 0 in both: they add nothing
          const V ds = ys - V::load(first[0] + j), dt = yt - V::load(first[1] + j);
          (V::load(part[0] + j) + ds).store(part[0] + j);
          (V::load(part[1] + j) + dt).store(part[1] + j);
          fmadd(ds, ds, V::load(part[2] + j)).store(part[2] + j);
          fmadd(dt, dt, V::load(part[3] + j)).store(part[3] + j);
          fmadd(ds, dt, V::load(part[4] + j)).store(part[4] + j);
        });
      }
      for (int m = 0; m < kMoments; ++m)
        for (int64_t j = 0; j < width; ++j) total[m][j] += double(part[m][j]);
    }
    S* u = static_cast<S*>(b.col_coef);
    S* v = u + n;
    S* first_s = v + n;
    S* first_t = first_s + n;
    S* offset_s = first_t + n;
    S* offset_t = offset_s + n;
    const double k = -prm.tau * prm.tau * prm.gamma / double(n);
    const double N = double(rows);
    double rho_sum = 0;
    for (int64_t j = 0; j < width; ++j) {
      const double ms = total[0][j] / N, mt = total[1][j] / N;  // means of d_s, d_t
      const double cc = std::max(0.0, total[2][j] - N * ms * ms);
      const double dd = std::max(0.0, total[3][j] - N * mt * mt);
      const double cd = total[4][j] - N * ms * mt;
      const CentredPearson pc(cd, cc, dd, prm.eps);
      rho_sum += pc.rho;
      // d rho / d y_s = (y_t - mean_t) / (|c| |d|) - rho (y_s - mean_s) / |c|^2
      u[j0 + j] = S(k * pc.coef_b);
      v[j0 + j] = S(-k * pc.coef_a);
      // the means as (first row, offset): the gradient sweep rebuilds the same float
      // d = y - y[row 0] as here, so its centred values agree with the moments
      first_s[j0 + j] = first[0][j];
      first_t[j0 + j] = first[1][j];
      offset_s[j0 + j] = S(ms);
      offset_t[j0 + j] = S(mt);
    }
    return rho_sum;
  }

  // -- stage 3: the gradient of one row
  static void grad_row(const DistParams& prm, const DistBatch& b, int64_t i, S* scratch_y, S* scratch_g) {
    const int64_t n = b.vocab;
    TS* grad = static_cast<TS*>(b.grad) + i * n;
    const TT* zt = static_cast<const TT*>(b.teacher) + i * b.teacher_row_stride;
    const TS* zs = static_cast<const TS*>(b.student) + i * b.student_row_stride;
    const S* u = static_cast<const S*>(b.col_coef);
    const S* v = u + n;
    const S* first_s = v + n;
    const S* first_t = first_s + n;
    const S* offset_s = first_t + n;
    const S* offset_t = offset_s + n;
    const V inv_tau = vset<V>(1.0 / prm.tau);
    const V lt = vset<V>(b.log_sum_t[i]), ls = vset<V>(b.log_sum_s[i]);
    const V row_mean = vset<V>(1.0 / double(n));
    const V ct = vset<V>(b.row_coef_t[i]), cs = vset<V>(b.row_coef_s[i]);
    double gy = 0;
    V acc = V::zero();
    with_row_shifts(S(1.0 / prm.tau), S(b.max_t[i]), S(b.max_s[i]), [&](const auto to_t, const auto to_s) {
      sweep<V>(n, [&](int64_t j, auto tail) {
        V ys = softmax_tile(zs, j, tail, to_s, ls);
        V yt = softmax_tile(zt, j, tail, to_t, lt);
        // row part ct (y_t - 1/V) + cs (y_s - 1/V), column part u (y_t - mean_t) + v (y_s - mean_s):
        // centred before scaling, since with few rows the two column terms nearly cancel
        V g = fmadd(ct, yt - row_mean, cs * (ys - row_mean));
        const V dt = (yt - ld<V>(first_t + j, tail, 0.0f)) - ld<V>(offset_t + j, tail, 0.0f);
        const V ds = (ys - ld<V>(first_s + j, tail, 0.0f)) - ld<V>(offset_s + j, tail, 0.0f);
        g = fmadd(ld<V>(u + j, tail, 0.0f), dt, fmadd(ld<V>(v + j, tail, 0.0f), ds, g));
        ys.store(scratch_y + j);
        g.store(scratch_g + j);
        acc = fmadd(g, ys, acc);  // tail lanes: y_s = 0
      }, [&] {
        gy += acc.reduce_add();
        acc = V::zero();
      });
    });
    const V vgy = vset<V>(gy);
    sweep<V>(n, [&](int64_t j, auto tail) {
      st(grad + j, V::load(scratch_y + j) * (V::load(scratch_g + j) - vgy) * inv_tau, tail);
    }, no_flush);
  }
};

template <class V, class TT, class TS>
struct DistRows {
  using S = typename V::value_type;
  using K = DistKernel<V, TT, TS>;

  template <class F>
  static void with_scratch(const DistBatch& b, int64_t begin, int64_t end, F&& f) {
    rows_with_scratch<V>(b.vocab, b.row_status, begin, end, f);
  }
  static void row_stats(const DistParams& p, const DistBatch& b, int64_t begin, int64_t end) {
    with_scratch(b, begin, end, [&](int64_t i, S* s0, S* s1) { K::row_stats(p, b, i, s0, s1); });
  }
  static void column_stats(const DistParams& p, const DistBatch& b, int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) b.block_rho[blk] = K::column_block(p, b, blk);
  }
  static void grad_rows(const DistParams& p, const DistBatch& b, int64_t begin, int64_t end) {
    with_scratch(b, begin, end, [&](int64_t i, S* s0, S* s1) { K::grad_row(p, b, i, s0, s1); });
  }
};

// Calls stage(Fn<V, TT, TS>{}) for the batch's dtype pair.
template <class V, template <class, class, class> class Fn, class Stage>
void dist_dtypes(const DistBatch& b, Stage&& stage) {
  with_dtype_pair(b.teacher_dtype, b.student_dtype, [&](auto tt, auto ts) {
    stage(Fn<V, typename decltype(tt)::type, typename decltype(ts)::type>{});
  });
}

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
