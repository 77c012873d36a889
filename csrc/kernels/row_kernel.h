// The one row-kernel skeleton of the divergence family.
//
// For one row it computes, in a few sweeps over the vocabulary (the row stays
// in L2 after the first sweep, so DRAM sees each logit once and each gradient
// entry once):
//   1. max of teacher and student logits;
//   2. the exponentials exp((z - max) / tau) of both (kept in a per-thread
//      scratch row so later sweeps need no exp), their sums, for KL and
//      reverse KL the row value itself, and for a weighting that needs it the
//      teacher at temperature 1;
//   3. when asked for, the student at temperature 1 (the CE normaliser);
//   4. the divergence value (other policies), then the gradient with respect
//      to the student logits.
// The divergence is the compile-time policy `Div` (divergences.h); the
// weighting is a run-time policy (weightings.h: a scalar per row); both it and
// the hard-label term are folded into the gradient coefficients.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "convert.h"
#include "divergences.h"
#include "kernel_api.h"
#include "weightings.h"

namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

// Partial sums are flushed to double every kFlushEvery entries: float lanes
// for speed, double totals so that long rows (V = 256k) keep full accuracy.
constexpr int64_t kFlushEvery = 1024;

struct Full {};  // tag: a full-width vector (no tail)

template <class V, class T> inline V ld(const T* p, Full, float) { return Convert<V, T>::load(p); }
template <class V, class T> inline V ld(const T* p, int n, float fill) { return load_tail<V>(p, n, fill); }
template <class V, class T> inline void st(T* p, V v, Full) { Convert<V, T>::store(p, v); }
template <class V, class T> inline void st(T* p, V v, int n) { store_tail(p, v, n); }
inline int lanes(Full, int w) { return w; }
inline int lanes(int n, int) { return n; }

// Calls body(j, Full{}) on each full vector and body(j, n) on the tail,
// flush() after every kFlushEvery entries and at the end.
template <class V, class Body, class Flush>
inline void sweep(int64_t n, Body&& body, Flush&& flush) {
  const int64_t full = n - n % V::size;
  for (int64_t j0 = 0; j0 < full; j0 += kFlushEvery) {
    const int64_t end = full < j0 + kFlushEvery ? full : j0 + kFlushEvery;
    for (int64_t j = j0; j < end; j += V::size) body(j, Full{});
    flush();
  }
  if (full < n) {
    body(full, int(n - full));
    flush();
  }
}
inline void no_flush() {}

// The exponential sweep works on L2-resident data and is compute-bound, so
// DRAM would idle through it: it prefetches the next row's logits, one line of
// each input per vector, spread over the sweep (the mixtures' value sweep does
// instead: RowKernel::NextRow).  Hint: all levels (t0), not
// L2 only (t1).  On the Intel Xeon with AVX-512 of 2026-12-01 (fp32,
// 4096 x 32000, fwd+bwd, alternating builds) t0 against t1: wttm 60 against
// 65-67 ms, tvd 67 against 79, jsd 80 against 82, KL 70 against 73; bf16 and
// the avx2 level alike.  No prefetch at all was faster still for KL (63-66 ms)
// but slower for the others (wttm 71, tvd 72, jsd 83) and for every bf16 row
// (KL 46 against 36).  The lines do not stay in L1 until the next row reads
// them (the row is larger); why the L2 hint loses there is not established.
// The AMD EPYC, where prefetching was first measured (+14 % fp32), has not
// run t0.
template <class T> inline void prefetch_line(const T* p) { __builtin_prefetch(p, 0, 3); }
// The line of `row` that holds entry j, once per line: a vector of 16-bit
// logits covers half a line, and a second prefetch of it is a wasted slot.
template <class V, class T> inline void prefetch_next_line(const T* row, int64_t j) {
  constexpr int64_t kPerLine = 64 / sizeof(T);
  if constexpr (kPerLine > V::size) {
    if (j % kPerLine != 0) return;
  }
  prefetch_line(row + j);
}

// The maxima of a teacher row and a student row (the first sweep of every
// row kernel), and the row's status: a row that is all -inf has no
// distribution, which the op reports as the contract's error (docs/contract.md).
template <class V>
struct RowMaxima {
  typename V::value_type teacher, student;
  RowStatus status;
};
// The running maximum of one input's logits, on float lanes (a value type, so
// that the sweep keeps it in registers).  NaN logits are skipped (vmax keeps
// its second operand); they reach the loss through sums.
template <class V, class T>
struct FloatLaneMax {
  using Acc = V;
  static Acc init() { return V::broadcast(-INFINITY); }
  template <class Tail> static Acc add(Acc m, const T* p, Tail tail) { return vmax(ld<V>(p, tail, -INFINITY), m); }
  static typename V::value_type result(Acc m) { return m.reduce_max(); }  // never NaN
};
// The max sweep's accumulator for a dtype: float lanes unless specialised.
template <class V, class T>
struct LaneMax : FloatLaneMax<V, T> {};

#if defined(KDFAST_ISA_AVX2) || defined(KDFAST_ISA_AVX512)
// bf16 logits: the max and the min of their raw bits as int16, with no
// conversion to float (the first sweep of a bf16 row costs 2 instructions per
// vector instead of 6).  Bits order non-negative floats as the floats do and
// negative ones in reverse, so the largest float is the largest bit pattern
// when that is >= 0 (some entry is non-negative), else the smallest one.  Tail
// padding is -inf, which neither can pick over a real entry.  A NaN could
// win either way; result() is then NaN and row_maxima redoes the sweep on
// float lanes, which skip NaNs.
template <>
struct LaneMax<VecF, BF16> {
  struct Acc { VecI16 hi, lo; };
  static constexpr uint16_t kNegInfBits = 0xff80;
  static Acc init() { return {VecI16::broadcast(INT16_MIN), VecI16::broadcast(INT16_MAX)}; }
  static Acc add(Acc m, const BF16* p, Full) {
    const VecI16 x = VecI16::load(p);
    return {vmax(m.hi, x), vmin(m.lo, x)};
  }
  static Acc add(Acc m, const BF16* p, int n) {
#if defined(KDFAST_ISA_AVX512)
    // a masked load of the tail's 16-bit lanes (AVX512BW), the rest -inf
    const __m512i x = _mm512_mask_loadu_epi16(_mm512_set1_epi16(int16_t(kNegInfBits)), __mmask32((1u << n) - 1u), p);
    const VecI16 v{_mm512_castsi512_si256(x)};
    return {vmax(m.hi, v), vmin(m.lo, v)};
#else
    BF16 t[VecF::size];
    for (int i = 0; i < VecF::size; ++i) t[i] = i < n ? p[i] : BF16{kNegInfBits};
    return add(m, t, Full{});
#endif
  }
  static float result(Acc m) {
    const int16_t top = m.hi.reduce_max();
    return to_float(BF16{uint16_t(top >= 0 ? top : m.lo.reduce_min())});
  }
};
#endif

// The max of one input on float lanes, NaN-skipping: the redo of a raw-bits max.
template <class V, class T>
inline typename V::value_type float_lane_max(const T* z, int64_t n) {
  using M = FloatLaneMax<V, T>;
  typename M::Acc m = M::init();
  sweep<V>(n, [&](int64_t j, auto tail) { m = M::add(m, z + j, tail); }, no_flush);
  return M::result(m);
}

// A row of the contract's NaN in, NaN out: every gradient entry NaN.
template <class T>
inline void fill_nan(T* row, int64_t n) {
  const T nan = from_float<T>(std::numeric_limits<float>::quiet_NaN());
  for (int64_t j = 0; j < n; ++j) row[j] = nan;
}

// Whether a row has a NaN entry (only asked of rows whose maximum is -inf: rare, scalar).
template <class T>
inline bool row_has_nan(const T* z, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (std::isnan(to_float(z[j]))) return true;
  return false;
}

template <class V, class TT, class TS>
inline RowMaxima<V> row_maxima(const TT* zt, const TS* zs, int64_t n) {
  using S = typename V::value_type;
  constexpr float kNegInf = -INFINITY;
  using MaxT = LaneMax<V, TT>;
  using MaxS = LaneMax<V, TS>;
  typename MaxT::Acc amt = MaxT::init();
  typename MaxS::Acc ams = MaxS::init();
  sweep<V>(n, [&](int64_t j, auto tail) {
    amt = MaxT::add(amt, zt + j, tail);
    ams = MaxS::add(ams, zs + j, tail);
  }, no_flush);
  S mt = MaxT::result(amt), ms = MaxS::result(ams);
  if (std::isnan(mt)) mt = float_lane_max<V>(zt, n);  // only a raw-bits max can be NaN
  if (std::isnan(ms)) ms = float_lane_max<V>(zs, n);
  // The float max skips NaNs: a row of NaN (and -inf) entries is not all -inf.
  // A NaN maximum sends it down the NaN-row path (NaN sums) instead of the error.
  if (mt == S(kNegInf) && row_has_nan(zt, n)) mt = std::numeric_limits<S>::quiet_NaN();
  if (ms == S(kNegInf) && row_has_nan(zs, n)) ms = std::numeric_limits<S>::quiet_NaN();
  const RowStatus status = mt == S(kNegInf) ? kTeacherAllNegInf : ms == S(kNegInf) ? kStudentAllNegInf : kRowOk;
  return {mt, ms, status};
}

// Stores a vector of gradient, streamed (around the caches) when `stream`
// and the vector is full; a tail stores normally.
template <class V, class T, class Tail>
inline void store_grad(T* p, V v, Tail tail, bool stream) {
  if constexpr (Streamable<V, T> && std::is_same_v<Tail, Full>) {
    if (stream) {
      stream_store(p, v);
      return;
    }
  }
  st(p, v, tail);
}

// Which entries of a gradient row are streamed: the vectors of the row's whole
// cache lines.  A line the row shares with its neighbour, or only partly
// fills, is stored normally: a line left partly written by streaming stores
// leaves the write-combining buffer as a partial write to DRAM, dearer than the
// read for ownership that streaming saves.  (Streaming by vector, bf16 rows of
// 100 entries took 2.8x as long as normal stores on the Intel Xeon of
// 2026-12-01; by whole lines they are no slower.)  The entries before the first
// vector-aligned one (`head`) are written first, as a partial vector, so that
// every later vector is aligned for a streaming store.
struct StreamedLines {
  int64_t head = 0;
  int64_t begin = 0, end = 0;  // [begin, end): the entries of the whole lines
  bool streams(int64_t j) const { return j >= begin && j < end; }
};

// Whether a kernel that stores no partial head vector (top-k, LTKD, grouped KD) streams the
// gradient row at `row`: the lanes have streaming stores for T, the op asked for them
// (stream_grad), and the row starts on a vector boundary (other rows store normally).
template <class V, class T>
inline bool streams_aligned_row(bool stream_grad, const T* row) {
  return Streamable<V, T> && stream_grad && reinterpret_cast<uintptr_t>(row) % kStreamAlign<V, T> == 0;
}

template <class V, class T>
inline StreamedLines streamed_lines(const T* row, int64_t n, bool stream) {
  static_assert(64 % kStreamAlign<V, T> == 0, "a streamed vector lies in one cache line");
  constexpr int64_t kLine = 64, kSize = int64_t(sizeof(T));
  const auto address = int64_t(reinterpret_cast<uintptr_t>(row));
  if (!stream || address % kSize != 0) return {};
  const int64_t misaligned = address % kStreamAlign<V, T>;
  const int64_t head = misaligned ? (kStreamAlign<V, T> - misaligned) / kSize : 0;
  const int64_t first_line = (kLine - address % kLine) % kLine / kSize;
  const int64_t lines_end = ((address + n * kSize) / kLine * kLine - address) / kSize;
  if (lines_end <= first_line) return {};
  return {head < n ? head : n, first_line, lines_end};
}

// The sum of a scratch row's n entries, on float lanes flushed to double as
// the sweeps sum them.
template <class V>
inline double row_sum(const typename V::value_type* row, int64_t n) {
  double total = 0.0;
  V acc = V::zero();
  sweep<V>(n, [&](int64_t j, auto tail) { acc = acc + ld<V>(row + j, tail, 0.0f); },
           [&] { total += acc.reduce_add(); acc = V::zero(); });
  return total;
}

// 1 on the lanes that are entries of the row, 0 on the padding of a tail
template <class V> inline V live_lanes(Full) { return V::broadcast(typename V::value_type(1)); }
template <class V> inline V live_lanes(int n) {
  using S = typename V::value_type;
  alignas(64) static const S ones[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  return load_tail<V>(ones, n, 0.0f);
}

// Calls f(scratch, padded) once for the rows [begin, end): kRows scratch rows
// of padded length V (row r at scratch + r * padded), per call (= per thread
// chunk), so O(threads * V) memory, never O(N * V).  Out of memory marks the
// rows -1.
template <class V, int kRows, class F>
inline void with_scratch_rows(int64_t vocab, int32_t* row_status, int64_t begin, int64_t end, F&& f) {
  using S = typename V::value_type;
  const int64_t padded = (vocab + V::size - 1) / V::size * V::size;
  // one vector more: a sweep shifted by a partial first vector (a gradient
  // row aligned for streaming) reads its last full vector past `padded`
  const size_t bytes = (((kRows * padded + V::size) * sizeof(S)) + 63) / 64 * 64;
  S* scratch = static_cast<S*>(std::aligned_alloc(64, bytes));
  if (!scratch) {
    for (int64_t i = begin; i < end; ++i) row_status[i] = -1;
    return;
  }
  f(scratch, padded);
  std::free(scratch);
}

// Calls f(i, scratch, padded) for each row of [begin, end), all with the same
// scratch rows (with_scratch_rows).
template <class V, int kRows, class F>
inline void rows_with_scratch_n(int64_t vocab, int32_t* row_status, int64_t begin, int64_t end, F&& f) {
  with_scratch_rows<V, kRows>(vocab, row_status, begin, end, [&](typename V::value_type* scratch, int64_t padded) {
    for (int64_t i = begin; i < end; ++i) f(i, scratch, padded);
  });
}

// The common case: two scratch rows, f(i, scratch_a, scratch_b).
template <class V, class F>
inline void rows_with_scratch(int64_t vocab, int32_t* row_status, int64_t begin, int64_t end, F&& f) {
  using S = typename V::value_type;
  rows_with_scratch_n<V, 2>(vocab, row_status, begin, end,
                            [&](int64_t i, S* scratch, int64_t padded) { f(i, scratch, scratch + padded); });
}

// Below this |k max| the one-FMA shift's rounding (half an ulp of c) is at
// most 1/4: 2^t stays within [2^-1/4, 2^1/4] of its exact value at the max.
constexpr double kFmaShiftLimit = 4194304.0;  // 2^22

// t = log2(e) (z - max) / tau as one FMA, z k + c, c = -k max rounded once.
template <class V>
struct ShiftByFma {
  using S = typename V::value_type;
  V k, c;
  double t_max;  // the t of the maximum itself (the rounding of c, |t_max| <= 1/4)
  ShiftByFma(S k_, S max) : k(V::broadcast(k_)), c(V::broadcast(S(-double(k_) * double(max)))),
                            t_max(double(max) * double(k_) + double(S(-double(k_) * double(max)))) {}
  V operator()(V z) const { return fmadd(z, k, c); }
  S scalar(S z) const { return std::fma(z, k.lane(0), c.lane(0)); }  // one rounding, as fmadd
  double at_max() const { return t_max; }
};

// t = (z - max) k: exact 0 at the maximum whatever its size; z - max may
// round (or be -inf) far below it, where 2^t is 0 anyway.
template <class V>
struct ShiftBySub {
  using S = typename V::value_type;
  V k, m;
  ShiftBySub(S k_, S max) : k(V::broadcast(k_)), m(V::broadcast(max)) {}
  V operator()(V z) const { return (z - m) * k; }
  S scalar(S z) const { return (z - m.lane(0)) * k.lane(0); }
  double at_max() const { return 0.0; }
};

// The per-thread scratch rows of one row kernel: the exponentials of both
// inputs, (where kept) their shifted logits t, and the student's
// exponentials at temperature 1 (for the hard-label term when tau_s != 1,
// unless it is 2 or 4: see exp_sweep).
template <class S>
struct RowScratch {
  S* e_t;
  S* e_s;
  S* t_t;  // null unless kept
  S* t_s;
  S* e_s1;
};

template <template <class> class Div, class V, class TT, class TS>
struct RowKernel {
  using S = typename V::value_type;
  static constexpr float kNegInf = -INFINITY;
  // A policy that reads t in its value sweep (its logs, or t itself) reads the
  // t that the exponential sweep computed.  For a 16-bit input it may keep t
  // in scratch (DistillBatch::keep_shifted_logits, a per-CPU choice): keeping
  // is one store now and one load then, and scratch rows at twice the size of
  // the input's, which still fit L2 beside the others up to V = 32k;
  // reloading and converting the logits again is a load, two conversions and
  // an FMA.  On the AMD EPYC keeping was faster, on the Intel Xeon reloading
  // (cpu_dispatch.cpp).  A float input is always reloaded (load + FMA): its t
  // would double its share of L2.
  // A policy that reads t floored (the mixtures) keeps it floored: on the
  // kept path at AVX2 that is the exponential's own clamp, shared with it;
  // otherwise one max per entry, in whichever sweep computes t.
  static constexpr bool kKeptFromExps = KeptFromExps<Div<V>>::value;
  static constexpr bool kValueSweep = !Div<V>::kValueFromExps && !kKeptFromExps;
  static constexpr bool kPrefetchInValueSweep = kValueSweep && PrefetchesInValueSweep<Div<V>>::value;
  static constexpr bool kHalfExps = kValueSweep && HalfExps<Div<V>>::value;
  static constexpr bool kReadsLogs = kValueSweep && ReadsLogs<Div<V>>::value;
  static constexpr bool kReadsT = kReadsLogs || (kValueSweep && ReadsShiftedLogits<Div<V>>::value);
  static constexpr bool kFloorT = FloorsShiftedLogits<Div<V>>::value;
  static_assert(!(kFloorT && kReadsLogs), "the logs need the unfloored t");
  // whether t may be kept (scratch rows are allocated for it); RowScratch::t_t
  // and t_s say whether it is
  static constexpr bool kKeepT = kValueSweep && (kReadsLogs || ReadsTeacherT<Div<V>>::value) && sizeof(TT) < 4;
  static constexpr bool kKeepS = kValueSweep && (kReadsLogs || ReadsStudentT<Div<V>>::value) && sizeof(TS) < 4;
  static V kept_t(V t) {
    if constexpr (kFloorT) return exp2_arg_floor(t);
    else return t;
  }
  static constexpr int kScratchRows = 3 + int(kKeepT) + int(kKeepS);
  static RowScratch<S> scratch_rows(S* base, int64_t padded, bool keep_shifted_logits) {
    S* next = base + 2 * padded;
    S* t_t = kKeepT ? next : nullptr;
    if (kKeepT) next += padded;
    S* t_s = kKeepS ? next : nullptr;
    if (kKeepS) next += padded;
    if (!keep_shifted_logits) t_t = t_s = nullptr;
    return {base, base + padded, t_t, t_s, next};
  }

  // scratch: per-thread rows of padded length (multiple of V::size), from scratch_rows().
  static void run(const DistillParams& prm, const DivConsts& dc, const DistillBatch& b, int64_t row,
                  const RowScratch<S>& scratch) {
    const int64_t n = b.vocab;
    const TT* zt = static_cast<const TT*>(b.teacher) + row * b.teacher_row_stride;
    const TS* zs = static_cast<const TS*>(b.student) + row * b.student_row_stride;
    TS* grad = b.grad ? static_cast<TS*>(b.grad) + row * n : nullptr;
    const int64_t label = b.labels ? b.labels[row] : -1;
    b.row_status[row] = kRowOk;
    if (b.labels && label == b.ignore_index) {
      b.row_loss[row] = 0.0;
      if (grad) std::memset(static_cast<void*>(grad), 0, sizeof(TS) * n);
      return;
    }

    // -- sweep 1: maxima
    const RowMaxima<V> maxima = row_maxima<V>(zt, zs, n);
    const S mzt = maxima.teacher, mzs = maxima.student;
    if (maxima.status != kRowOk) {
      b.row_status[row] = maxima.status;
      b.row_loss[row] = 0.0;
      if (grad) std::memset(static_cast<void*>(grad), 0, sizeof(TS) * n);
      return;
    }

    // -- sweep 2: exponentials at the temperatures, kept in scratch
    // The shifted logits in base 2, t = log2(e) (z - max) / tau.  Ordinary rows
    // take them in one FMA, z k + c with c = -k max (the exponentials are 2^t:
    // no multiply by log2(e) per entry); the rounding of c moves a whole row by
    // the same amount, which every softmax quantity is invariant to, as long as
    // every later use of the row (log p, log q below) derives from the same t.
    // That offset is at most half an ulp of k max: rows where k max could be
    // 2^22 or more (huge logits, tiny temperatures) subtract the maximum first,
    // so that 2^t never overflows and t = 0 at the maximum exactly.
    // A weighting's teacher at temperature 1 is 2^(tau t) from the same t
    // (exp_sweep), and so is the hard-label term's student at temperature 1,
    // 2^(tau_s t): there the rounding counts tau (tau_s) times, so a row where
    // that could leave float's range (logits past ~1e8 at large tau) takes
    // the exact shift too.
    const S k_t = S(kLog2eD / prm.tau), k_s = S(kLog2eD / prm.tau_s);
    const bool fma_shift = std::fabs(double(mzt) * double(k_t)) < kFmaShiftLimit &&
                           std::fabs(double(mzs) * double(k_s)) < kFmaShiftLimit;
    const ShiftByFma<V> fma_t(k_t, mzt), fma_s(k_s, mzs);
    auto finish = [&](const auto& to_t, const auto& to_s) {
      if constexpr (kKeepT || kKeepS) {
        if (scratch.t_t || scratch.t_s) {
          finish_row<true>(prm, dc, b, row, scratch, zt, zs, grad, label, mzt, mzs, to_t, to_s);
          return;
        }
      }
      finish_row<false>(prm, dc, b, row, scratch, zt, zs, grad, label, mzt, mzs, to_t, to_s);
    };
    if (fma_shift && !(weighting_needs_t1(prm) && std::fabs(prm.tau * fma_t.at_max()) >= 16.0) &&
        !(hard_needs_student_t1(prm, b) && std::fabs(prm.tau_s * fma_s.at_max()) >= 16.0))
      finish(fma_t, fma_s);
    else
      finish(ShiftBySub<V>(k_t, mzt), ShiftBySub<V>(k_s, mzs));
  }

  static bool weighting_needs_t1(const DistillParams& prm) {
    return with_weighting(prm.weighting, [](auto policy) { return decltype(policy)::kNeedsTeacherT1; });
  }

  // The hard-label term's softmax is the student's at temperature 1: its own
  // exponentials when tau_s != 1.
  static bool hard_needs_student_t1(const DistillParams& prm, const DistillBatch& b) {
    return b.labels && prm.hard_weight != 0.0 && prm.tau_s != 1.0;
  }

  // How many squarings of 2^t give 2^(tau t): 1 at tau = 2, 2 at tau = 4, else
  // 0 (an exponential of its own).
  static int squarings(double tau) { return tau == 2.0 ? 1 : tau == 4.0 ? 2 : 0; }
  // e^(2^n), n = 1 or 2
  static V power_of_two_power(V e, int n) {
    const V e2 = e * e;
    return n == 1 ? e2 : e2 * e2;
  }

  // The teacher at temperature 1 as sums over u = tau t (base 2: 2^u = exp(z - max)
  // up to the shift's rounding, which every use below is invariant to).
  struct TeacherT1Sums {
    double sum = 0.0, u_sum = 0.0;  // sum 2^u, sum 2^u u
  };

  // The next row's logits, prefetched one line of each input per vector over
  // a compute-bound sweep that reads only L2-resident data, so that DRAM does
  // not idle through it: the exponential sweep's, or the value sweep's where
  // the policy asks for it (PrefetchesInValueSweep).
  struct NextRow {
    const TT* zt;
    const TS* zs;
    NextRow(const DistillBatch& b, int64_t row, const TT* zt_row, const TS* zs_row)
        : zt(row + 1 < b.rows ? zt_row + b.teacher_row_stride : zt_row),
          zs(row + 1 < b.rows ? zs_row + b.student_row_stride : zs_row) {}
    void prefetch(int64_t j) const {
      prefetch_next_line<V>(zt, j);
      prefetch_next_line<V>(zs, j);
    }
  };

  // Sweep 2: the exponentials 2^t of both rows at their temperatures, kept in
  // scratch, their sums and KL's value.  With kT1, also the teacher at
  // temperature 1 from the same t (2^(tau t), one more exp per entry while t is
  // in registers): a weighting that needs it then costs no sweep of its own.
  // With kS1, the same for the student (2^(tau_s t), kept in scratch for the
  // gradient, summed into s1_sum): the hard-label term then needs no sweep and
  // no exponential of its own.  At tau (tau_s) = 2 or 4, the usual KD
  // temperatures, 2^(tau t) is 2^t squared once or twice (squarings(): a
  // multiply or two for an exponential of a dozen instructions; about 6 (12)
  // ulp from the exact value, 2^t's 2.5 ulp doubled by each squaring), and the
  // student's is not kept: the gradient sweep squares its e_s again.
  template <bool kKeep, bool kT1, bool kS1, class Shift>
  static void exp_sweep(const DistillBatch& b, int64_t row, const RowScratch<S>& scratch, const TT* zt, const TS* zs,
                        const Shift& to_t, const Shift& to_s, S tau, S tau_s, int t1_squarings, int s1_squarings,
                        RowAcc& r, TeacherT1Sums& t1, double& s1_sum) {
    S* scratch_t = scratch.e_t;
    S* scratch_s = scratch.e_s;
    const int64_t n = b.vocab;
    const NextRow next(b, row, zt, zs);
    const V vtau = V::broadcast(tau), vtau_s = V::broadcast(tau_s);
    V at = V::zero(), as = V::zero(), av = V::zero(), a1 = V::zero(), h1 = V::zero(), as1 = V::zero();
    sweep<V>(n, [&](int64_t j, auto tail) {
      if constexpr (!kPrefetchInValueSweep) next.prefetch(j);
      V tt = to_t(ld<V>(zt + j, tail, kNegInf));
      V ts = to_s(ld<V>(zs + j, tail, kNegInf));
      V et, es;
      if constexpr (kHalfExps) {  // h = 2^(t/2) kept, e = h^2 summed
        const V half = V::broadcast(S(0.5));
        const V ht = vexp2_nonpositive(tt * half), hs = vexp2_nonpositive(ts * half);
        ht.store(scratch_t + j);
        hs.store(scratch_s + j);
        et = ht * ht;
        es = hs * hs;
      } else {
        et = vexp2_nonpositive(tt);
        es = vexp2_nonpositive(ts);
        if constexpr (kKeptFromExps) {  // the teacher's exponentials are read for the last time here
          const V kept = Div<V>::kept_from_exps(tt, ts, et, es);
          kept.store(scratch_t + j);
          av = av + kept;
        } else {
          et.store(scratch_t + j);
        }
        es.store(scratch_s + j);
      }
      if constexpr (kKeep && kKeepT) kept_t(tt).store(scratch.t_t + j);
      if constexpr (kKeep && kKeepS) kept_t(ts).store(scratch.t_s + j);
      at = at + et;
      as = as + es;
      if constexpr (Div<V>::kValueFromExps) av = Div<V>::add_exp_term(av, tt, ts, et, es);
      if constexpr (kT1) {
        // u floored at the float range: where u is -inf (a masked logit) e1 is
        // 0 and e1 u is 0, one max instead of a compare and a blend.
        const V u = vmax(tt * vtau, vset<V>(double(std::numeric_limits<S>::lowest())));
        const V e1 = t1_squarings ? power_of_two_power(et, t1_squarings) : vexp2_nonpositive(u);
        a1 = a1 + e1;
        h1 = fmadd(e1, u, h1);
      }
      if constexpr (kS1) {
        if (s1_squarings) {
          as1 = as1 + power_of_two_power(es, s1_squarings);
        } else {
          const V e1 = vexp2_nonpositive(ts * vtau_s);
          e1.store(scratch.e_s1 + j);
          as1 = as1 + e1;
        }
      }
    }, [&] {
      r.sum_t += at.reduce_add();
      r.sum_s += as.reduce_add();
      if constexpr (Div<V>::kValueFromExps || kKeptFromExps) r.val += av.reduce_add();
      if constexpr (kT1) {
        t1.sum += a1.reduce_add();
        t1.u_sum += h1.reduce_add();
      }
      if constexpr (kS1) s1_sum += as1.reduce_add();
      at = as = av = a1 = h1 = as1 = V::zero();
    });
  }

  // Sweeps 2 to the end of one row, with the base-2 shift of the row's size;
  // kKeep: the shifted logits kept in scratch where they may be (kKeepT, kKeepS).
  template <bool kKeep, class Shift>
  static void finish_row(const DistillParams& prm, const DivConsts& dc, const DistillBatch& b, int64_t row,
                         const RowScratch<S>& scratch, const TT* zt, const TS* zs, TS* grad, int64_t label, S mzt,
                         S mzs, const Shift to_t, const Shift to_s) {
    constexpr bool keep_t = kKeep && kKeepT, keep_s = kKeep && kKeepS;
    S* scratch_t = scratch.e_t;
    S* scratch_s = scratch.e_s;
    const int64_t n = b.vocab;
    RowAcc r;
    TeacherT1Sums t1;
    double s1_sum = 0.0;
    const int s1_squarings = squarings(prm.tau_s);
    auto exp_sweep_with = [&](auto teacher_t1, auto student_t1) {
      exp_sweep<kKeep, decltype(teacher_t1)::value, decltype(student_t1)::value>(
          b, row, scratch, zt, zs, to_t, to_s, S(prm.tau), S(prm.tau_s), squarings(prm.tau), s1_squarings, r, t1,
          s1_sum);
    };
    const bool teacher_t1 = weighting_needs_t1(prm), student_t1 = hard_needs_student_t1(prm, b);
    if (teacher_t1 && student_t1) exp_sweep_with(std::true_type{}, std::true_type{});
    else if (teacher_t1) exp_sweep_with(std::true_type{}, std::false_type{});
    else if (student_t1) exp_sweep_with(std::false_type{}, std::true_type{});
    else exp_sweep_with(std::false_type{}, std::false_type{});
    // A NaN or +inf logit makes its sum NaN (2^t of a finite row is at most
    // 2^(1/4) per entry, so a finite row's sums are finite): the contract's
    // NaN in, NaN out, for the row's loss and every entry of its gradient.
    if (!(std::isfinite(r.sum_t) && std::isfinite(r.sum_s))) {
      b.row_loss[row] = std::numeric_limits<double>::quiet_NaN();
      if (grad) fill_nan(grad, n);
      return;
    }
    r.log_sum_t = std::log(r.sum_t);
    r.log_sum_s = std::log(r.sum_s);

    // -- the row's weight.  The exponential sweep's sums are of 2^t, i.e.
    // exp((z - max) / tau) times 2^(t at the max) (the rounding of the one-FMA
    // shift), and the temperature-1 sums carry the same rounding times tau:
    // the weights are invariant to both.
    const double weight = with_weighting(prm.weighting, [&](auto policy) {
      using Policy = decltype(policy);
      WeightInputs in;
      in.log_sum_t = r.log_sum_t;
      in.tau = prm.tau;
      in.vocab = n;
      if (b.weights) in.given = b.weights[row];
      if constexpr (Policy::kNeedsTeacherT1) {
        const double log_s1 = std::log(t1.sum);
        in.t1 = {log_s1, log_s1 - kLn2D * t1.u_sum / t1.sum};
      }
      return Policy::weight(in);
    });

    // -- hard-label cross-entropy of the student at temperature 1
    const bool hard = b.labels && prm.hard_weight != 0.0;
    // At tau_s = 1 the sum of the exponential sweep serves, in natural units:
    // its 2^t are exp(z - max) times 2^(t at the max), which the rounding of
    // the base-2 constants leaves nonzero (1e-3 for logits of 1e4).
    const double t_at_max_s = to_s.at_max();
    double ce = 0.0, log_sum_s1 = r.log_sum_s - kLn2D * t_at_max_s;
    const bool student_t1_differs = prm.tau_s != 1.0;
    if (hard) {
      // The exponential sweep's 2^(tau_s t) carry 2^(tau_s t at the max).
      if (student_t1_differs) log_sum_s1 = std::log(s1_sum) - kLn2D * prm.tau_s * t_at_max_s;
      ce = (double(mzs) - double(to_float(zs[label]))) + log_sum_s1;
    }

    // -- Label Revision (Lan et al., 2024; kdfast/reference/distill.py,
    // revise_teacher_log_probs): on a row whose label logit is below the
    // teacher's maximum, the teacher's distribution becomes
    // p' = beta p + (1 - beta) onehot(label), beta = eta / (1 + p_max - p_label).
    // In the exponentials that is e'_label = e_label + (1 - beta) / beta * S_t
    // and S'_t = S_t / beta, every other e_j unchanged: a scalar fix-up of the
    // label's scratch entries, of the sums and of KL's value, after the
    // weighting (which the reference takes from the unrevised teacher).
    const bool revise = prm.label_revision > 0.0 && b.labels && S(to_float(zt[label])) < mzt;
    S revised_t_label = 0;  // the label's t' = log2 e'_label
    if (revise) {
      // (a kept-from-exps policy has overwritten it: its 2^t again, as the sweep took it)
      const S e_label = kKeptFromExps ? vexp2_nonpositive(to_t(V::broadcast(S(to_float(zt[label]))))).lane(0)
                        : kHalfExps   ? scratch_t[label] * scratch_t[label]
                                      : scratch_t[label];
      const double p_label = double(e_label) / r.sum_t, p_max = std::exp2(to_t.at_max()) / r.sum_t;
      const double beta = prm.label_revision / (1.0 + p_max - p_label);
      const double e_revised = double(e_label) + (1.0 - beta) / beta * r.sum_t;
      revised_t_label = S(std::log2(e_revised));
      if constexpr (Div<V>::kValueFromExps) {  // KL's sum of e_t (t_t - t_s): the label's term replaced
        const double t_s_label = double(to_s.scalar(S(to_float(zs[label]))));
        if (t_s_label == -INFINITY) {  // the revised teacher has mass where the student has none
          r.val = INFINITY;
        } else {
          if (e_label > 0) r.val -= double(e_label) * (double(to_t.scalar(S(to_float(zt[label])))) - t_s_label);
          r.val += double(S(e_revised)) * (double(revised_t_label) - t_s_label);
        }
      }
      if constexpr (kKeptFromExps) {  // the label's kept entry from its revised t, and their sum again
        const V ts_label = to_s(V::broadcast(S(to_float(zs[label]))));
        scratch_t[label] = Div<V>::kept_from_exps(V::broadcast(revised_t_label), ts_label, V::broadcast(S(e_revised)),
                                                  V::broadcast(scratch_s[label])).lane(0);
        r.val = row_sum<V>(scratch_t, n);
      } else {
        scratch_t[label] = kHalfExps ? S(std::sqrt(e_revised)) : S(e_revised);
      }
      if constexpr (keep_t) scratch.t_t[label] = revised_t_label;
      r.sum_t /= beta;
      r.log_sum_t = std::log(r.sum_t);
    }

    // -- divergence value and gradient
    // (kHalfExps: h / sqrt S, the square roots of p and q)
    const V inv_sum_t = vset<V>(kHalfExps ? 1.0 / std::sqrt(r.sum_t) : 1.0 / r.sum_t);
    const V inv_sum_s = vset<V>(kHalfExps ? 1.0 / std::sqrt(r.sum_s) : 1.0 / r.sum_s);
    // log2 p = t - log2 S_t: from the t of the exponential sweep, so that it is
    // the log of the p it sits next to (to float rounding near the max).
    const V log2_sum_t_v = vset<V>(kLog2eD * r.log_sum_t), log2_sum_s_v = vset<V>(kLog2eD * r.log_sum_s);
    auto elem = [&](int64_t j, auto tail) {
      Elem<V> e;
      e.e_t = V::load(scratch_t + j);
      e.e_s = V::load(scratch_s + j);
      e.p = e.e_t * inv_sum_t;
      e.q = e.e_s * inv_sum_s;
      if constexpr (kReadsT) {
        V tt = keep_t ? V::load(scratch.t_t + j) : to_t(ld<V>(zt + j, tail, kNegInf));
        if (!keep_t && revise && label >= j && label < j + lanes(tail, V::size)) {
          alignas(64) S lane_t[V::size];
          tt.store(lane_t);
          lane_t[label - j] = revised_t_label;
          tt = V::load(lane_t);
        }
        const V ts = keep_s ? V::load(scratch.t_s + j) : to_s(ld<V>(zs + j, tail, kNegInf));
        if constexpr (kReadsLogs) {
          e.log2p = tt - log2_sum_t_v;
          e.log2q = ts - log2_sum_s_v;
        } else {  // kept as the policy reads them, or floored here
          e.t_t = keep_t ? tt : kept_t(tt);
          e.t_s = keep_s ? ts : kept_t(ts);
        }
      }
      return e;
    };

    const double c_soft = prm.soft_coef * weight * prm.inv_denom;
    const double c_hard = hard ? prm.hard_weight * prm.inv_denom : 0.0;
    // gradient_j = A * g_j + B * q_j (+ c_hard * softmax(z_s)_j when tau_s != 1) - c_hard [j == label]
    // Streaming needs full vectors at their natural alignment: a row whose
    // start is not aligned (V not a multiple of the vector) stores its first
    // entries, up to the first aligned one, as a partial vector (the scratch
    // rows are padded for the shifted last vector); streamed_lines says which
    // of the later vectors are streamed.
    const bool stream = Streamable<V, TS> && b.stream_grad;
    const StreamedLines lines = streamed_lines<V>(grad, n, stream);
    const int64_t head = lines.head;
    auto write_grad = [&] {
      const double a = c_soft / prm.tau_s;
      // A g_j = (A kept_scale) kept_j, rounded to S once; the B q_j term takes
      // A Sigma_g = (that rounded A kept_scale) Sigma kept, so that where g_j
      // and q_j Sigma_g cancel (reverse KL at huge logits: both ~1e29) they
      // cancel as exactly as with an unscaled A.
      const S a_kept = S(a * r.kept_scale);
      const bool from_kept = !Div<V>::kValueFromExps && std::isfinite(r.kept_scale) && r.kept_scale != 0.0;
      const double a_sigma_g = from_kept ? double(a_kept) * (r.gsum / r.kept_scale) : a * r.gsum;
      const double b = -a_sigma_g + (student_t1_differs ? 0.0 : c_hard);
      const V A_kept = V::broadcast(a_kept);
      // B q = (B / S_s) e_s; for KL, A g = A (-p) = (-A / S_t) e_t
      const V A_minus_p = vset<V>(-a / r.sum_t), B_q = vset<V>(b / r.sum_s);
      const bool add_q1 = hard && student_t1_differs;
      const V C = vset<V>(add_q1 ? c_hard / s1_sum : c_hard);  // the student at T = 1: (c_hard / s1) e_s1
      auto write = [&](int64_t j, auto tail) {
        V out;
        V e_s = V::load(scratch_s + j);
        if constexpr (Div<V>::kValueFromExps) {
          out = fmadd(V::load(scratch_t + j), A_minus_p, e_s * B_q);
        } else {  // scratch_t holds what the value sweep kept of entry j
          // A g_j rounded first, then q_j B added in the FMA: where the two
          // cancel exactly (a one-hot student, q_j B = -A g_j, both ~1e30 at
          // huge logits), B is that same product rounded once, and the sum is 0.
          if constexpr (kHalfExps) e_s = e_s * e_s;
          out = fmadd(e_s, B_q, A_kept * V::load(scratch_t + j));
        }
        if (add_q1)
          out = fmadd(C, s1_squarings ? power_of_two_power(e_s, s1_squarings) : V::load(scratch.e_s1 + j), out);
        if (hard && label >= j && label < j + lanes(tail, V::size)) {
          alignas(64) S t[V::size];
          out.store(t);
          t[label - j] -= S(c_hard);
          out = V::load(t);
        }
        store_grad(grad + j, out, tail, lines.streams(j));
      };
      if (head) write(0, int(head));
      // (no fence per row: run_rows fences once per thread chunk; a fence per
      // row of 100 entries costs more than its streaming saves)
      sweep<V>(n - head, [&](int64_t j, auto tail) { write(head + j, tail); }, no_flush);
    };

    if constexpr (kValueSweep) {
      // The teacher's exponentials are read here for the last time: each
      // entry's slot takes what the gradient sweep needs of it instead.
      typename Div<V>::Acc acc(dc, r);
      const NextRow next(b, row, zt, zs);
      sweep<V>(n, [&](int64_t j, auto tail) {
        if constexpr (kPrefetchInValueSweep) next.prefetch(j);
        acc.add(elem(j, tail)).store(scratch_t + j);
      }, [&] { acc.flush(r); });
      if constexpr (KeptIsLogTerm<Div<V>>::value) {
        // The kept base-2 log-terms, exponentiated against the row's maximum
        // (in place: the gradient sweep reads 2^(x_j - max)) and summed.
        const V max_x = vset<V>(r.lse_max);
        V acc_e = V::zero();
        sweep<V>(n, [&](int64_t j, auto) {
          const V e = vexp2_nonpositive(V::load(scratch_t + j) - max_x);
          e.store(scratch_t + j);
          acc_e = acc_e + e;
        }, [&] { r.lse_sum += acc_e.reduce_add(); acc_e = V::zero(); });
      }
    }
    Div<V>::finish(r, dc);
    if (grad) write_grad();

    b.row_loss[row] = (hard ? prm.hard_weight * ce : 0.0) + prm.soft_coef * weight * r.D;
  }
};

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
