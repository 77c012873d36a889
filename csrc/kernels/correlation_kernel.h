// The fused Pearson + Spearman correlation row kernel (see correlation_api.h),
// written once over the SIMD abstraction.  Per row: maxima; exponentials of
// both rows and the Pearson sums of the softmaxes; one pairwise loop giving
// the teacher's exact and the student's soft ranks; the Spearman sums; then
// the gradient, whose rank part is a second pairwise loop (the soft-rank
// Jacobian is dense).  Six scratch rows per thread; nothing of size N x V but
// the gradient.
#pragma once

#include <cmath>
#include <cstring>

#include "correlation_api.h"
#include "dtype_pairs.h"
#include "pearson.h"
#include "row_kernel.h"

namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

template <class V, class TT, class TS>
struct CorrelationKernel {
  using S = typename V::value_type;
  static constexpr float kNegInf = -INFINITY, kPosInf = INFINITY;
  // scratch rows: softmaxes (y_t later holds the gradient), the teacher logits and the
  // student's x / strength as S (the pairwise loops read them V times), the centred ranks
  enum Scratch { kYt, kYs, kZt, kXs, kRankT, kRankS, kRows };

  // Two -inf logits differ by NaN: for the ranks they tie.
  static V nan_to(V d, V value) { return select(eq(d, d), d, value); }

  static void run(const CorrelationParams& prm, const CorrelationBatch& b, int64_t i, S* scratch, int64_t padded) {
    const int64_t n = b.vocab;
    const TT* zt = static_cast<const TT*>(b.teacher) + i * b.teacher_row_stride;
    const TS* zs = static_cast<const TS*>(b.student) + i * b.student_row_stride;
    TS* grad = b.grad ? static_cast<TS*>(b.grad) + i * n : nullptr;
    S* yt = scratch + kYt * padded;
    S* ys = scratch + kYs * padded;
    S* zt_row = scratch + kZt * padded;
    S* xs = scratch + kXs * padded;
    S* rank_t = scratch + kRankT * padded;
    S* rank_s = scratch + kRankS * padded;
    b.row_status[i] = kRowOk;
    b.row_loss[i] = 0.0;

    const RowMaxima<V> maxima = row_maxima<V>(zt, zs, n);
    const S mt = maxima.teacher, ms = maxima.student;
    if (maxima.status != kRowOk) {
      b.row_status[i] = maxima.status;
      if (grad) std::memset(static_cast<void*>(grad), 0, sizeof(TS) * n);
      return;
    }

    // exponentials about the maxima; the logits the pairwise loop compares (padding lanes -inf)
    const V inv_tau = vset<V>(1.0 / prm.tau), rank_scale = vset<V>(1.0 / (prm.tau * prm.strength));
    // (the maxima are subtracted before the scaling: folded into an FMA, a huge one would round away)
    const V vmax_t = V::broadcast(mt), vmax_s = V::broadcast(ms);
    double sum_t = 0, sum_s = 0;
    {
      V at = V::zero(), as = V::zero();
      sweep<V>(n, [&](int64_t j, auto tail) {
        const V lt = ld<V>(zt + j, tail, kNegInf), ls = ld<V>(zs + j, tail, kNegInf);
        const V et = vexp_nonpositive((lt - vmax_t) * inv_tau), es = vexp_nonpositive((ls - vmax_s) * inv_tau);
        et.store(yt + j);
        es.store(ys + j);
        lt.store(zt_row + j);
        (ls * rank_scale).store(xs + j);
        at = at + et;
        as = as + es;
      }, [&] {
        sum_t += at.reduce_add();
        sum_s += as.reduce_add();
        at = as = V::zero();
      });
    }

    // A NaN or +inf logit makes its sum NaN: NaN in, NaN out.
    if (!(std::isfinite(sum_t) && std::isfinite(sum_s))) {
      b.row_loss[i] = std::numeric_limits<double>::quiet_NaN();
      if (grad) fill_nan(grad, n);
      return;
    }

    // softmaxes (stored) and the Pearson sums of their centred values (the mean of a softmax row is 1/V)
    const V inv_sum_t = vset<V>(1.0 / sum_t), inv_sum_s = vset<V>(1.0 / sum_s), mean = vset<V>(1.0 / double(n));
    double ab = 0, aa = 0, bb = 0;
    {
      V vab = V::zero(), vaa = V::zero(), vbb = V::zero();
      sweep<V>(n, [&](int64_t j, auto tail) {
        const V y_s = V::load(ys + j) * inv_sum_s, y_t = V::load(yt + j) * inv_sum_t;
        y_s.store(ys + j);
        y_t.store(yt + j);
        const V live = live_lanes<V>(tail);
        const V a = (y_s - mean) * live, c = (y_t - mean) * live;
        vab = fmadd(a, c, vab);
        vaa = fmadd(a, a, vaa);
        vbb = fmadd(c, c, vbb);
      }, [&] {
        ab += vab.reduce_add();
        aa += vaa.reduce_add();
        bb += vbb.reduce_add();
        vab = vaa = vbb = V::zero();
      });
    }
    const CentredPearson values(ab, aa, bb);

    // ranks, centred on their mean (V + 1) / 2: rank_j = 1/2 + sum_k step(d_jk), the k = j term
    // included (step(0) = 1/2); padding lanes compare against +inf and add 0
    const V zero = V::zero(), one = vset<V>(1.0), half = vset<V>(0.5), pos_inf = V::broadcast(kPosInf);
    const double mean_rank = 0.5 * double(n + 1);
    for (int64_t j = 0; j < n; ++j) {
      const V ztj = V::broadcast(zt_row[j]), xsj = V::broadcast(xs[j]);
      double exact = 0, soft = 0;
      V ve = zero, vs = zero;
      sweep<V>(n, [&](int64_t k, auto tail) {
        const V dt = nan_to(ztj - ld<V>(zt_row + k, tail, kPosInf), zero);
        ve = ve + select(gt(dt, zero), one, select(eq(dt, zero), half, zero));
        const V d = nan_to(xsj - ld<V>(xs + k, tail, kPosInf), zero);
        const V e = vexp_nonpositive(zero - vabs(d));  // sigmoid(d) = (d > 0 ? 1 : e) / (1 + e)
        vs = vs + select(gt(d, zero), one, e) / (one + e);
      }, [&] {
        exact += ve.reduce_add();
        soft += vs.reduce_add();
        ve = vs = zero;
      });
      rank_t[j] = S(0.5 + exact - mean_rank);
      rank_s[j] = S(0.5 + soft - mean_rank);
    }
    double rst = 0, rss = 0, rtt = 0;
    {
      V vst = zero, vss = zero, vtt = zero;
      sweep<V>(n, [&](int64_t j, auto tail) {
        const V s = ld<V>(rank_s + j, tail, 0.0f), t = ld<V>(rank_t + j, tail, 0.0f);
        vst = fmadd(s, t, vst);
        vss = fmadd(s, s, vss);
        vtt = fmadd(t, t, vtt);
      }, [&] {
        rst += vst.reduce_add();
        rss += vss.reduce_add();
        rtt += vtt.reduce_add();
        vst = vss = vtt = zero;
      });
    }
    const CentredPearson ranks(rst, rss, rtt);

    const double w = b.weights ? b.weights[i] : 1.0;
    const double c_values = prm.pearson_weight * w, c_ranks = prm.spearman_weight * (b.weights ? 1.0 - w : 1.0);
    b.row_loss[i] = c_values * (1.0 - values.rho) + c_ranks * (1.0 - ranks.rho);
    if (!grad) return;

    // values: g_j = dL/dy_s_j = k (coef_b b_j - coef_a a_j), and dL/dz_j = y_j (g_j - sum_k y_k g_k) / tau;
    // y_t's row becomes the gradient (the teacher's centred softmax is read before it is overwritten)
    const double k_values = -c_values * prm.inv_rows;
    const V gb = vset<V>(k_values * values.coef_b), ga = vset<V>(-k_values * values.coef_a);
    double yg = 0;
    {
      V vyg = zero;
      sweep<V>(n, [&](int64_t j, auto tail) {
        const V y_s = V::load(ys + j);
        const V g = fmadd(gb, V::load(yt + j) - mean, ga * (y_s - mean));
        g.store(yt + j);
        vyg = fmadd(y_s, g, vyg);  // padding lanes: y_s = 0
      }, [&] {
        yg += vyg.reduce_add();
        vyg = zero;
      });
    }
    const V vyg = vset<V>(yg);
    sweep<V>(n, [&](int64_t j, auto) { (V::load(ys + j) * (V::load(yt + j) - vyg) * inv_tau).store(yt + j); }, no_flush);

    // ranks: h_j = dL/drank_s_j (into rank_s), and dL/dz_m = sum_k sigmoid'(d_mk) (h_m - h_k) / (tau strength);
    // a -inf pair (tied above) and a -inf against a finite logit have sigmoid' = 0
    const double k_ranks = -c_ranks * prm.inv_rows;
    const V hb = vset<V>(k_ranks * ranks.coef_b), ha = vset<V>(-k_ranks * ranks.coef_a);
    sweep<V>(n, [&](int64_t j, auto) {
      fmadd(hb, V::load(rank_t + j), ha * V::load(rank_s + j)).store(rank_s + j);
    }, no_flush);
    const double rank_coef = 1.0 / (prm.tau * prm.strength);
    for (int64_t m = 0; m < n; ++m) {
      const V xsm = V::broadcast(xs[m]), hm = V::broadcast(rank_s[m]);
      double total = 0;
      V acc = zero;
      sweep<V>(n, [&](int64_t k, auto tail) {
        const V d = nan_to(xsm - ld<V>(xs + k, tail, kPosInf), pos_inf);
        const V e = vexp_nonpositive(zero - vabs(d));
        const V ope = one + e;
        acc = fmadd(e / (ope * ope), hm - ld<V>(rank_s + k, tail, 0.0f), acc);
      }, [&] {
        total += acc.reduce_add();
        acc = zero;
      });
      yt[m] = S(double(yt[m]) + rank_coef * total);
    }
    sweep<V>(n, [&](int64_t j, auto tail) { st(grad + j, V::load(yt + j), tail); }, no_flush);
  }
};

template <class V, class TT, class TS>
void correlation_run_rows(const CorrelationParams& prm, const CorrelationBatch& b, int64_t begin, int64_t end) {
  using K = CorrelationKernel<V, TT, TS>;
  using S = typename V::value_type;
  rows_with_scratch_n<V, K::kRows>(b.vocab, b.row_status, begin, end,
                                   [&](int64_t i, S* scratch, int64_t padded) { K::run(prm, b, i, scratch, padded); });
}

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
