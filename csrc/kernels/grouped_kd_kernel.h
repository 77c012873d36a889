// The fused Grouped KD row kernel (see grouped_kd_api.h), written once over the
// SIMD abstraction.  Sweeps over a row:
//   1. the maxima of teacher and student (row_kernel.h's row_maxima, with its
//      all -inf / NaN status handling);
//   2. (primary_mass < 1) the threshold z*: the teacher's exponentials at the
//      group temperature, kept in scratch, their total and the masses above a
//      few fixed pivots, which bracket z*; the logits inside the bracket are
//      copied out with their masses, narrowed by passes over the copies, and
//      z* is selected among the rest exactly (threshold_among: a three-way
//      quickselect on the values, summing masses).  No sort of the row, and
//      equal logits need no tie-breaking (the group is z >= z*);
//   3. the exponentials at T (kept in scratch), the four group sums (teacher,
//      student) x (primary, rest), Primary-KD's sum and the groups' maxima;
//   4. the gradient from the scratch rows.
// Sweep 3 shifts by the row's maxima.  A group whose top entry lies so far
// below that its exponentials may underflow (1e30-scale logits) is redone
// with each group shifted by its own maximum, as the reference's per-group
// logsumexps: log(1 - Q) is never 1 minus something, nor log of an underflow.
#pragma once

#include <algorithm>
#include <cmath>
#include <utility>

#include "dkd_kernel.h"  // plogratio
#include "dtype_pairs.h"
#include "grouped_kd_api.h"
#include "row_kernel.h"

namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

// Offsets below the teacher's maximum, in units of the group temperature, of
// the pivots that bracket z* in the first sweep: exp(-offset) spans 0.4 to
// 2e-6 of the top class's mass, where the threshold of a 0.5-0.99 mass lies
// for most teachers (a confident teacher's z* is then bracketed tightly at
// once).  Whatever the row, the bracket holds z*; a poor one only takes more
// sweeps or leaves more candidates to the exact selection.
constexpr int kFixedPivots = 4;
constexpr double kFixedPivotOffsets[kFixedPivots] = {1.0, 3.0, 6.5, 13.0};
// Pivots per narrowing pass over the copied logits.
constexpr int kNarrowingPivots = 8;
// The bracket's logits are copied out with their masses; while they are more
// than kSelectionLimit, passes over the copies with pivots spread evenly over
// their values narrow the bracket and drop the logits outside it (a few
// passes over a shrinking fraction of the row), and the exact selection
// takes the rest.
constexpr int kMaxNarrowingPasses = 8;
constexpr int64_t kSelectionLimit = 128;

// Appends the lanes of z and of e where `keep` to out_z and out_e; returns how many.
template <class T>
inline int append_where(bool keep, ScalarVec<T> z, ScalarVec<T> e, T* out_z, T* out_e) {
  *out_z = z.v;
  *out_e = e.v;
  return int(keep);
}
#if defined(KDFAST_ISA_AVX512)
// Compressed in registers and stored whole (vcompressps to memory is microcoded on some CPUs, Zen 4): the
// caller leaves room for a full vector after its last entry.
inline int append_where(__mmask16 keep, VecF z, VecF e, float* out_z, float* out_e) {
  if (!keep) return 0;
  _mm512_storeu_ps(out_z, _mm512_maskz_compress_ps(keep, z.v));
  _mm512_storeu_ps(out_e, _mm512_maskz_compress_ps(keep, e.v));
  return __builtin_popcount(keep);
}
#elif defined(KDFAST_ISA_AVX2)
inline int append_where(__m256 keep, VecF z, VecF e, float* out_z, float* out_e) {
  unsigned bits = unsigned(_mm256_movemask_ps(keep));
  if (!bits) return 0;
  alignas(32) float zl[8], el[8];
  z.store(zl);
  e.store(el);
  int count = 0;
  for (; bits; bits &= bits - 1, ++count) {
    const int l = __builtin_ctz(bits);
    out_z[count] = zl[l];
    out_e[count] = el[l];
  }
  return count;
}
#endif

// The threshold among candidate (logit, mass) pairs: the largest logit z with
// `above` + (the mass of the candidates >= z) >= need, where `above` is the
// mass of the row's logits above every candidate.  Equal logits are all in or
// all out (a three-way partition), whatever their order.  When rounding
// leaves `need` unreached, the smallest candidate (the whole bracket in).
// Reorders the pairs; n >= 1.
template <class S>
S threshold_among(S* z, S* e, int64_t n, double above, double need) {
  int64_t lo = 0, hi = n;
  for (;;) {
    const S a = z[lo], b = z[lo + (hi - lo) / 2], c = z[hi - 1];
    const S pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));  // median of three
    // [lo, gt_end): > pivot, [gt_end, i): == pivot, [lt_begin, hi): < pivot
    int64_t gt_end = lo, i = lo, lt_begin = hi;
    double mass_gt = 0.0, mass_eq = 0.0;
    while (i < lt_begin) {
      const S zi = z[i];
      if (zi > pivot) {
        std::swap(z[i], z[gt_end]);
        std::swap(e[i], e[gt_end]);
        mass_gt += double(e[gt_end]);
        ++gt_end;
        ++i;
      } else if (zi < pivot) {
        --lt_begin;
        std::swap(z[i], z[lt_begin]);
        std::swap(e[i], e[lt_begin]);
      } else {
        mass_eq += double(e[i]);
        ++i;
      }
    }
    if (gt_end > lo && above + mass_gt >= need) {
      hi = gt_end;
      continue;
    }
    above += mass_gt + mass_eq;
    if (above >= need || lt_begin == hi) return pivot;
    lo = lt_begin;
  }
}

template <class V, class TT, class TS>
struct GroupedKdKernel {
  using S = typename V::value_type;
  static constexpr int kScratchRows = 4;  // e_t (first e at the group temperature), e_s, candidate logits and masses
  static constexpr float kNegInf = -INFINITY;

  // The shift of a group's exponentials: its maximum, or 0 for a group without
  // a finite entry (whose exponentials are all 0, never -inf - -inf).
  static S finite_shift(S m) { return m == S(kNegInf) ? S(0) : m; }

  // The shifts of the exponentials of the four groups: (teacher, student) x (primary, rest).
  struct GroupShifts {
    S tp, to, sp, so;
  };
  // The exponential sweep's sums per group, Primary-KD's numerator and the groups' maxima.
  struct GroupSums {
    double tp = 0, to = 0, sp = 0, so = 0, kl = 0;
    GroupShifts max{};
  };

  // Where z* lies: in [lo, up), `above` the mass of the logits >= up.  Invariant: the mass of the logits
  // >= lo reaches `need`, the mass >= up does not.
  struct Bracket {
    S lo = S(kNegInf), up = S(INFINITY);
    double above = 0.0;
  };

  // The mass of the logits >= each of K descending pivots, over one sweep.
  template <int K>
  struct PivotSums {
    S pivot[K];
    V below[K], acc[K];
    double mass[K] = {};

    explicit PivotSums(const S* pivots) {
      for (int k = 0; k < K; ++k) {
        pivot[k] = pivots[k];
        // z >= p as z > (the value just below p): the vectors' compare is a strict one
        below[k] = V::broadcast(std::nextafter(pivots[k], S(kNegInf)));
        acc[k] = V::zero();
      }
    }
    void add(V z, V e) {
      for (int k = 0; k < K; ++k) acc[k] = acc[k] + select(gt(z, below[k]), e, V::zero());
    }
    void flush() {
      for (int k = 0; k < K; ++k) {
        mass[k] += acc[k].reduce_add();
        acc[k] = V::zero();
      }
    }
    // The bracket shrunk to the two pivots around the crossing of `need` (the pivots lie in the bracket).
    void narrow(Bracket& br, double need) const {
      int k = 0;
      while (k < K && mass[k] < need) ++k;
      if (k > 0) {
        br.up = pivot[k - 1];
        br.above = mass[k - 1];
      }
      if (k < K) br.lo = pivot[k];
    }
  };

  // Copies the logits in a bracket, with their masses, to out_z / out_e, and keeps their range.  A copy
  // never passes the entries read so far by more than a vector, which the scratch rows' padding holds, so
  // out may be the input itself.
  struct BracketCopy {
    V lo_below, up, max_acc, neg_min_acc;
    S* out_z;
    S* out_e;
    int64_t count = 0;

    BracketCopy(const Bracket& br, S* z, S* e)
        : lo_below(V::broadcast(std::nextafter(br.lo, S(kNegInf)))), up(V::broadcast(br.up)),
          max_acc(V::broadcast(S(kNegInf))), neg_min_acc(V::broadcast(S(kNegInf))), out_z(z), out_e(e) {}
    void add(V z, V e) {  // tail padding -inf: never in a bracket
      const auto in = mask_and(gt(z, lo_below), gt(up, z));
      count += append_where(in, z, e, out_z + count, out_e + count);
      max_acc = vmax(select(in, z, max_acc), max_acc);
      neg_min_acc = vmax(select(in, V::zero() - z, neg_min_acc), neg_min_acc);
    }
    S max() const { return max_acc.reduce_max(); }
    S min() const { return -neg_min_acc.reduce_max(); }
  };

  // The primary group's threshold logit z* of a finite teacher row (NaN: a
  // NaN teacher logit, the row is NaN).  scratch_e gets the exponentials at
  // the group temperature; cand_z / cand_e hold the bracket's candidates.
  static S primary_threshold(const GroupedKdParams& prm, const TT* zt, int64_t n, S mt, S* scratch_e, S* cand_z,
                             S* cand_e) {
    S fixed_pivots[kFixedPivots];
    for (int k = 0; k < kFixedPivots; ++k) fixed_pivots[k] = S(double(mt) - prm.group_tau * kFixedPivotOffsets[k]);
    // -- the exponentials at the group temperature, their total and the masses above the fixed pivots
    PivotSums<kFixedPivots> fixed(fixed_pivots);
    const V vmt = V::broadcast(mt), kg = vset<V>(1.0 / prm.group_tau);
    V acc_total = V::zero();
    double total = 0.0;
    sweep<V>(n, [&](int64_t j, auto tail) {
      const V z = ld<V>(zt + j, tail, kNegInf);
      const V e = vexp_nonpositive((z - vmt) * kg);
      e.store(scratch_e + j);
      acc_total = acc_total + e;
      fixed.add(z, e);
    }, [&] {
      total += acc_total.reduce_add();
      acc_total = V::zero();
      fixed.flush();
    });
    if (!std::isfinite(total)) return std::numeric_limits<S>::quiet_NaN();
    const double need = prm.primary_mass * total;
    Bracket br;
    fixed.narrow(br, need);

    // -- the bracket's logits and their masses, copied out
    BracketCopy copy(br, cand_z, cand_e);
    sweep<V>(n, [&](int64_t j, auto tail) { copy.add(ld<V>(zt + j, tail, kNegInf), V::load(scratch_e + j)); },
             no_flush);
    // -- narrowing passes over the copies, pivots spread evenly over their values: each pass drops at least
    // the largest or the smallest of them, unless they are all equal
    for (int pass = 0; pass < kMaxNarrowingPasses && copy.count > kSelectionLimit; ++pass) {
      const double lo = copy.min(), hi = copy.max();
      if (!(lo < hi)) break;
      S pivots[kNarrowingPivots];  // descending from hi, above lo (halves first: no overflow at the range's ends)
      for (int k = 0; k < kNarrowingPivots; ++k)
        pivots[k] = S(hi - (hi * 0.5 - lo * 0.5) * (2.0 * k / kNarrowingPivots));
      PivotSums<kNarrowingPivots> sums(pivots);
      const int64_t count = copy.count;
      sweep<V>(count, [&](int64_t j, auto tail) {
        sums.add(ld<V>(cand_z + j, tail, kNegInf), ld<V>(cand_e + j, tail, 0.0f));
      }, [&] { sums.flush(); });
      for (double& m : sums.mass) m += br.above;  // the mass above a pivot: the candidates' and the bracket's
      sums.narrow(br, need);
      copy = BracketCopy(br, cand_z, cand_e);
      sweep<V>(count, [&](int64_t j, auto tail) {
        copy.add(ld<V>(cand_z + j, tail, kNegInf), ld<V>(cand_e + j, tail, 0.0f));
      }, no_flush);
    }
    const int64_t count = copy.count;
    // An empty bracket would have two equal masses, which the sweeps never compute for the same set of
    // logits: unreachable, and the group would be {z >= lo} either way.
    if (count == 0) return br.lo;
    return threshold_among(cand_z, cand_e, count, br.above, need);
  }

  static void run(const GroupedKdParams& prm, const GroupedKdBatch& b, int64_t i, S* scratch, int64_t padded) {
    const int64_t n = b.vocab;
    const TT* zt = static_cast<const TT*>(b.teacher) + i * b.teacher_row_stride;
    const TS* zs = static_cast<const TS*>(b.student) + i * b.student_row_stride;
    TS* grad = b.grad ? static_cast<TS*>(b.grad) + i * n : nullptr;
    const int64_t label = b.labels ? b.labels[i] : -1;
    b.row_status[i] = kRowOk;
    b.row_loss[i] = 0.0;
    auto zero_grad = [&] {
      if (grad) std::memset(static_cast<void*>(grad), 0, sizeof(TS) * n);
    };
    auto nan_row = [&] {
      b.row_loss[i] = std::numeric_limits<double>::quiet_NaN();
      if (grad) fill_nan(grad, n);
    };
    if (b.labels && label == b.ignore_index) return zero_grad();

    // -- 1: maxima
    const RowMaxima<V> maxima = row_maxima<V>(zt, zs, n);
    if (maxima.status != kRowOk) {
      b.row_status[i] = maxima.status;
      return zero_grad();
    }
    const S mt = maxima.teacher, ms = maxima.student;
    // a +inf logit (or a NaN maximum) is the contract's NaN row
    if (!(std::isfinite(mt) && std::isfinite(ms))) return nan_row();

    S* e_t = scratch;
    S* e_s = scratch + padded;

    // -- 2: the group is {z_t > z_below} and the label; primary_mass >= 1: every finite teacher logit
    S z_below = S(kNegInf);
    if (prm.primary_mass < 1.0) {
      const S z_star = primary_threshold(prm, zt, n, mt, e_t, scratch + 2 * padded, scratch + 3 * padded);
      if (std::isnan(z_star)) return nan_row();
      z_below = std::nextafter(z_star, S(kNegInf));
    }
    const V vz_below = V::broadcast(z_below), one = V::broadcast(S(1)), half = V::broadcast(S(0.5));
    // the mask of the lanes of the group's classes
    auto in_group = [&](V z, int64_t j, auto tail) {
      if (label >= j && label < j + lanes(tail, V::size)) {  // the one vector holding the label
        alignas(64) S flags[V::size];
        select(gt(z, vz_below), one, V::zero()).store(flags);
        flags[label - j] = S(1);
        return gt(V::load(flags), half);
      }
      return gt(z, vz_below);
    };

    // -- 3: x = (z - shift) / T and e = exp(x), kept in scratch, with the shift of the entry's group; the
    // group sums, sum_{j in P, e_t > 0} e_t (x_t - x_s) (Primary-KD's numerator) and the groups' maxima
    const V k = vset<V>(1.0 / prm.tau), ninf = V::broadcast(S(kNegInf));
    GroupSums g;
    auto exp_sweep = [&](const GroupShifts& sh) {
      g = GroupSums{};
      const V sh_tp = V::broadcast(sh.tp), sh_to = V::broadcast(sh.to);
      const V sh_sp = V::broadcast(sh.sp), sh_so = V::broadcast(sh.so);
      V a_tp = V::zero(), a_to = V::zero(), a_sp = V::zero(), a_so = V::zero(), a_kl = V::zero();
      V m_tp = ninf, m_to = ninf, m_sp = ninf, m_so = ninf;
      sweep<V>(n, [&](int64_t j, auto tail) {
        const V t = ld<V>(zt + j, tail, kNegInf), s = ld<V>(zs + j, tail, kNegInf);
        const auto in = in_group(t, j, tail);
        const V xt = (t - select(in, sh_tp, sh_to)) * k, xs = (s - select(in, sh_sp, sh_so)) * k;
        const V et = vexp_nonpositive(xt), es = vexp_nonpositive(xs);
        et.store(e_t + j);
        es.store(e_s + j);
        a_tp = a_tp + select(in, et, V::zero());
        a_to = a_to + select(in, V::zero(), et);
        a_sp = a_sp + select(in, es, V::zero());
        a_so = a_so + select(in, V::zero(), es);
        // x_s may be -inf where e_t > 0 (the student masks a class the teacher holds): +inf, as it should
        a_kl = a_kl + select(mask_and(in, gt(et, V::zero())), et * (xt - xs), V::zero());
        m_tp = vmax(select(in, t, ninf), m_tp);
        m_to = vmax(select(in, ninf, t), m_to);
        m_sp = vmax(select(in, s, ninf), m_sp);
        m_so = vmax(select(in, ninf, s), m_so);
      }, [&] {
        g.tp += a_tp.reduce_add();
        g.to += a_to.reduce_add();
        g.sp += a_sp.reduce_add();
        g.so += a_so.reduce_add();
        g.kl += a_kl.reduce_add();
        a_tp = a_to = a_sp = a_so = a_kl = V::zero();
      });
      g.max = {m_tp.reduce_max(), m_to.reduce_max(), m_sp.reduce_max(), m_so.reduce_max()};
    };
    // Shifted by the row's maxima first; a group whose top entry lies so far below its row's maximum that
    // its exponentials may underflow (1e30-scale logits, a student putting its mass elsewhere) is redone with
    // each group shifted by its own maximum, as the reference's per-group logsumexps.
    GroupShifts shifts{mt, mt, ms, ms};
    exp_sweep(shifts);
    // exp(-40) = 4e-18 lies far above float's underflow (1e-38; double: exp(-600) and 2e-308), so what a group
    // within 40 T of its row's maximum loses to underflow is below 1e-20 of its largest term.
    const double far_below = prm.tau * (sizeof(S) == 4 ? 40.0 : 600.0);
    auto far = [&](S group_max, S row_max) {
      return group_max != S(kNegInf) && double(row_max) - double(group_max) > far_below;
    };
    if (far(g.max.tp, mt) || far(g.max.to, mt) || far(g.max.sp, ms) || far(g.max.so, ms)) {
      shifts = {finite_shift(g.max.tp), finite_shift(g.max.to), finite_shift(g.max.sp), finite_shift(g.max.so)};
      exp_sweep(shifts);
    }
    const double sum_tp = g.tp, sum_to = g.to, sum_sp = g.sp, sum_so = g.so, primary_sum = g.kl;
    // a NaN logit makes its sums NaN (every finite exponential here is at most 1)
    if (!(std::isfinite(sum_tp) && std::isfinite(sum_to) && std::isfinite(sum_sp) && std::isfinite(sum_so)))
      return nan_row();

    // -- value: each group's log-mass relative to the row's own maximum, in double
    const double inv_tau = 1.0 / prm.tau;
    auto log_mass = [&](double sum, S shift, S row_max) {
      return sum > 0 ? (double(shift) - double(row_max)) * inv_tau + std::log(sum) : -INFINITY;
    };
    const double l_tp = log_mass(sum_tp, shifts.tp, mt), l_to = log_mass(sum_to, shifts.to, mt);
    const double l_sp = log_mass(sum_sp, shifts.sp, ms), l_so = log_mass(sum_so, shifts.so, ms);
    auto logaddexp = [](double a, double c) {
      const double hi = std::max(a, c), lo = std::min(a, c);
      return hi == -INFINITY ? hi : hi + std::log1p(std::exp(lo - hi));
    };
    const double lse_t = logaddexp(l_tp, l_to), lse_s = logaddexp(l_sp, l_so);
    const double log_pt = l_tp - lse_t, log_qs = l_sp - lse_s;
    const double binary = plogratio(log_pt, log_qs) + plogratio(l_to - lse_t, l_so - lse_s);
    // sum_{j in P} phat (log phat - log qhat) with phat = e_t / sum_tp, qhat = e_s / sum_sp: 0 without teacher
    // mass in the group, +inf when the student has none there
    double primary = 0.0;
    if (sum_tp > 0) primary = sum_sp > 0 ? primary_sum / sum_tp - std::log(sum_tp) + std::log(sum_sp) : INFINITY;
    const double t2 = prm.tau * prm.tau;
    b.row_loss[i] = t2 * (prm.binary_weight * binary + prm.primary_weight * primary);
    if (!grad) return;

    // -- 4: gradient (c = T^2 / T / denominator, Q - P_t the gap of the primary masses)
    //   j in P:     c (binary_weight (Q - P_t) qhat_j + primary_weight (qhat_j - phat_j))
    //   j not in P: c binary_weight (P_t - Q) qtilde_j,  qtilde_j = e_s / sum_so
    const double c = prm.tau * prm.inv_denom;
    const double gap = std::exp(log_qs) - std::exp(log_pt);
    const double pw = sum_tp > 0 ? prm.primary_weight : 0.0;  // no Primary-KD (nor its gradient) without teacher mass
    const V coef_in_s = vset<V>(sum_sp > 0 ? c * (prm.binary_weight * gap + pw) / sum_sp : 0.0);
    const V coef_in_t = vset<V>(sum_tp > 0 ? -c * pw / sum_tp : 0.0);
    const V coef_out_s = vset<V>(sum_so > 0 ? -c * prm.binary_weight * gap / sum_so : 0.0);
    const bool stream = streams_aligned_row<V>(b.stream_grad, grad);
    const StreamedLines lines = streamed_lines<V>(grad, n, stream);
    sweep<V>(n, [&](int64_t j, auto tail) {
      const auto in = in_group(ld<V>(zt + j, tail, kNegInf), j, tail);
      const V out = fmadd(select(in, coef_in_s, coef_out_s), V::load(e_s + j),
                          select(in, coef_in_t, V::zero()) * V::load(e_t + j));
      store_grad(grad + j, out, tail, lines.streams(j));
    }, no_flush);
    if (stream) stream_fence();
  }
};

template <class V, class TT, class TS>
void grouped_kd_run_rows(const GroupedKdParams& prm, const GroupedKdBatch& b, int64_t begin, int64_t end) {
  using K = GroupedKdKernel<V, TT, TS>;
  using S = typename V::value_type;
  rows_with_scratch_n<V, K::kScratchRows>(b.vocab, b.row_status, begin, end, [&](int64_t i, S* scratch,
                                                                                 int64_t padded) {
    K::run(prm, b, i, scratch, padded);
  });
}

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
