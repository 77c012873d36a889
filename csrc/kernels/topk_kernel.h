// The top-k row kernel (topk_api.h): per row, the support marked in a bitmap,
// one sweep of the entries off it for the off-support log-sum-exp (and the
// cross-entropy's), the k (or k + 1) outcome divergence on the dense row
// kernel, and one sweep writing the gradient.  The row stays in L2 between
// its sweeps, so DRAM sees each logit once and each gradient entry once.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "dtype_pairs.h"
#include "row_kernel.h"
#include "topk_api.h"

namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

// A set of a row's entries, one bit per entry (entry j: bit j % 64 of word j / 64).
// It replaces sorting the support: marking it finds repeats (an entry's bit
// already set), and the sweeps read the bits of a vector's lanes with a shift
// (a sorted support cost a sort of k keys, 6.6 us of a 19 us row at k = 256,
// and a loop setup and partial vectors at each of its k + 1 gaps).  All words
// are 0 between rows: the row clears what it set (EntrySet::Clear).
struct EntrySet {
  std::vector<uint64_t> words;
  void reset(int64_t n) { words.assign(size_t(n / 64 + 1), 0); }
  bool has(int64_t j) const { return (words[size_t(j >> 6)] >> (j & 63)) & 1u; }
  // Marks j; returns whether it was marked already.
  bool mark(int64_t j) {
    uint64_t& w = words[size_t(j >> 6)];
    const uint64_t bit = uint64_t(1) << (j & 63);
    const bool had = (w & bit) != 0;
    w |= bit;
    return had;
  }
  // Unmarks, on destruction, the words of the in-range entries of a list (and one more entry).
  struct Clear {
    EntrySet& set;
    const int64_t* entries;
    int64_t count, n, extra;
    ~Clear() {
      for (int64_t a = 0; a < count; ++a)
        if (entries[a] >= 0 && entries[a] < n) set.words[size_t(entries[a] >> 6)] = 0;
      if (extra >= 0 && extra < n) set.words[size_t(extra >> 6)] = 0;
    }
  };
};

struct NoBits {};  // a vector none of whose lanes is in the set

// Calls body(j, tail, bits) on each vector of a row of n entries as sweep() calls body(j, tail),
// bits holding the set's bits of its lanes (lane i: bit i).  The 64-entry blocks with no bit set
// (most of them: k = 256 of V = 128256 leaves 88 % of the blocks empty) pass NoBits, so that
// their vectors compile to the plain loop (a per-vector shift and test cost the bf16 rows 15 %);
// the others' vectors are meant to use their bits without testing them (a test per vector
// mispredicts on a scattered support).
// Always inlined: called through a function, a body's accumulators live in memory, a
// store-to-load chain on every vector (measured: the bucket's exponential sweep 30 % slower).
template <class V, class Body, class Flush>
[[gnu::always_inline]] inline void sweep_with_bits(int64_t n, const EntrySet& set, Body&& body, Flush&& flush) {
  constexpr int64_t W = V::size;
  static_assert(64 % W == 0 && kFlushEvery % 64 == 0, "a vector's lanes lie in one word, a word in one flush");
  constexpr uint64_t kLanes = (uint64_t(1) << W) - 1;
  const uint64_t* words = set.words.data();
  const int64_t full = n - n % W, blocks = full - full % 64;
  for (int64_t j0 = 0; j0 < blocks; j0 += kFlushEvery) {
    const int64_t end = blocks < j0 + kFlushEvery ? blocks : j0 + kFlushEvery;
    for (int64_t j = j0; j < end; j += 64) {
      const uint64_t word = words[j >> 6];
      if (!word) {
        for (int64_t v = 0; v < 64; v += W) body(j + v, Full{}, NoBits{});
      } else {
        for (int64_t v = 0; v < 64; v += W) body(j + v, Full{}, uint32_t((word >> v) & kLanes));
      }
    }
    flush();
  }
  for (int64_t j = blocks; j < full; j += W) body(j, Full{}, uint32_t((words[j >> 6] >> (j & 63)) & kLanes));
  if (full < n) body(full, int(n - full), uint32_t((words[full >> 6] >> (full & 63)) & kLanes));
  if (blocks < n) flush();
}

// A softmax term of the gradient, c * exp(x * scale - lse) per entry, as
// 2^min((z - max) k - log2 sum, 0): base 2 against the max its sum was taken
// at, never above 1 off the support (where the exact value is at most 1; the
// support's entries, which can exceed it, are overwritten after the sweep).
template <class V>
struct SoftmaxTerm {
  using S = typename V::value_type;
  bool on = false;
  V c, max, k, log2_sum;
  SoftmaxTerm() = default;
  SoftmaxTerm(double c_, S max_, double k_, double log2_sum_)
      : on(true), c(V::broadcast(S(c_))), max(V::broadcast(max_)), k(V::broadcast(S(k_))),
        log2_sum(V::broadcast(S(log2_sum_))) {}
  V operator()(V z) const { return c * vexp2_nonpositive(vmin((z - max) * k - log2_sum, V::zero())); }
};

// f(a, b) with two runtime flags as compile-time constants (std::bool_constant), so that each
// case gets a loop without the tests.
template <class F>
inline void with_flags(bool a, bool b, F&& f) {
  if (a && b) f(std::true_type{}, std::true_type{});
  else if (a) f(std::true_type{}, std::false_type{});
  else if (b) f(std::false_type{}, std::true_type{});
  else f(std::false_type{}, std::false_type{});
}

template <class V, class TS>
struct TopkRows {
  using S = typename V::value_type;
  static constexpr float kNegInf = -INFINITY;

  // The exponentials kept for the gradient are taken against the running max of the entries
  // before them (one sweep finds the max and sums the exponentials): from `begin` on (a vector's
  // first entry), against `max`, until the next segment.  coef: the gradient's factor for them.
  struct KeptSegment {
    int64_t begin;
    S max, coef;
  };

  struct Scratch {
    EntrySet support;     // the row's support; the label too while the gradient is written
    std::vector<S> y, g;  // the short row's student "logits" and gradient (k + 1)
    std::vector<S> t;     // the short row's teacher log-probs, the bucket's last (k + 1)
    std::vector<S> e;     // the off-support exponentials, for the gradient sweep (vocab + a vector)
    std::vector<S> patch;  // the support's and the label's gradient entries, at their places (vocab + a vector)
    std::vector<KeptSegment> segments;  // the scales of e (off_support_sums)
  };

  static void run(const DistillParams& prm, const TopkBatch& b, int64_t begin, int64_t end) {
    Scratch sc;
    sc.support.reset(b.vocab);
    sc.y.resize(size_t(b.k + 1));
    sc.g.resize(size_t(b.k + 1));
    sc.t.resize(size_t(b.k + 1));
    if (b.grad) {
      sc.e.resize(size_t(b.vocab + V::size));
      sc.patch.resize(size_t(b.vocab + V::size));
    }
    DistillParams inner = prm;  // the short row's divergence: no weighting, no hard term (this kernel adds its own)
    inner.hard_weight = 0.0;
    inner.weighting = Weighting::None;
    for (int64_t i = begin; i < end; ++i) row(prm, inner, b, i, sc);
  }

  // The sums off the support of 2^((z_j - max) k_e) and (with ce_own_exp) of 2^((z_j - max) log2 e).
  struct OffSupportSums {
    S max = std::numeric_limits<S>::lowest();  // the max off the support, lowest() if none is finite
    double sum_e = 0.0, sum_1 = 0.0;          // sum_e = 0: every entry off the support is -inf
  };

  // 2^t (t <= 0) in the sweep off the support.  16-bit students: the degree-4 exp (relative error
  // 3e-6, 1/80 of a float16 ulp), whose one FMA fewer is 8-10 % of this compute-bound sweep (bf16
  // bucket); a 16-bit gradient rounds that error away.
  static V exp2_of_shifted(V t) {
    if constexpr (sizeof(TS) == 2) return vexp2_nonpositive_coarse(t);
    else return vexp2_nonpositive(t);
  }

  // One sweep over the row for OffSupportSums, an online max (a block's max first, the sums
  // rescaled when it rises): a separate max sweep read the row from DRAM without computing, and
  // the exponential sweep then computed without reading (measured: the max sweep was a third of
  // the bf16 bucket row's time).  kept (if not null) gets e_j = 2^((z_j - m) k_e), m the max when
  // j was reached (the segments say which); 0 on the support.  The max starts at lowest(), not
  // -inf, so that an entry at -inf gives 2^-inf = 0, not NaN; a NaN entry is skipped by the max
  // and makes the sums NaN.
  static OffSupportSums off_support_sums(const TS* z, int64_t n, const EntrySet& support, double k_e,
                                         bool ce_own_exp, S* kept, std::vector<KeptSegment>& segments) {
    constexpr int64_t W = V::size, G = 64 / W;  // G vectors per bitmap word
    constexpr uint64_t kLanes = (uint64_t(1) << W) - 1;
    static_assert(64 % W == 0 && kFlushEvery % 64 == 0, "a vector's lanes lie in one word, a word in one flush");
    OffSupportSums r;
    segments.clear();
    segments.push_back({0, r.max, S(0)});
    const V neg_inf = V::broadcast(S(kNegInf)), vk_e = V::broadcast(S(k_e)), vk_1 = V::broadcast(S(kLog2eD));
    V m = V::broadcast(r.max), acc_e = V::zero(), acc_1 = V::zero();
    const uint64_t* words = support.words.data();
    // the vectors zs[0..count) from j on, their max already taken with m's
    auto add = [&](int64_t j, const V* zs, auto count, V block_max) {
      if (any_lane(gt(block_max, m))) {  // rare: the row's running max rose
        const S risen = block_max.reduce_max();
        const double to_risen_e = std::exp2((double(r.max) - double(risen)) * k_e);
        const double to_risen_1 = std::exp2((double(r.max) - double(risen)) * kLog2eD);
        acc_e = acc_e * V::broadcast(S(to_risen_e));
        acc_1 = acc_1 * V::broadcast(S(to_risen_1));
        r.sum_e *= to_risen_e;
        r.sum_1 *= to_risen_1;
        r.max = risen;
        m = V::broadcast(risen);
        if (segments.back().begin == j) segments.back().max = risen;
        else segments.push_back({j, risen, S(0)});
      }
      for (int v = 0; v < decltype(count)::value; ++v) {
        // z <= m: no clamp, so that a NaN entry makes a NaN sum
        const V e = exp2_of_shifted((zs[v] - m) * vk_e);
        if (kept) e.store(kept + j + v * W);  // a tail vector's lanes past n: 0, in the scratch's spare vector
        acc_e = acc_e + e;
        if (ce_own_exp) acc_1 = acc_1 + exp2_of_shifted((zs[v] - m) * vk_1);
      }
    };
    auto flush = [&] {
      r.sum_e += acc_e.reduce_add();
      r.sum_1 += acc_1.reduce_add();
      acc_e = acc_1 = V::zero();
    };
    auto off_support = [&](const TS* p, auto tail, uint32_t bits) {
      const V zj = ld<V>(p, tail, kNegInf);
      return select(V::from_bits(bits), neg_inf, zj);  // no test: see sweep_with_bits
    };
    const int64_t full = n - n % W, blocks = full - full % 64;
    // The row comes from DRAM in this sweep: fetched 4 KiB ahead (the hardware prefetcher alone
    // left the exponentials waiting on it: measured 12 % slower in bf16, 10 % in fp32; 2-8 KiB alike).
    constexpr int64_t kSumsAhead = 4096;
    V zs[G];
    for (int64_t j0 = 0; j0 < blocks; j0 += kFlushEvery) {
      const int64_t end = blocks < j0 + kFlushEvery ? blocks : j0 + kFlushEvery;
      for (int64_t j = j0; j < end; j += 64) {
        const uint64_t word = words[j >> 6];
        for (int64_t line = 0; line < 64 * int64_t(sizeof(TS)); line += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(z + j) + kSumsAhead + line, 0, 3);
        V block_max = m;  // NaN-skipping: vmax keeps its second operand when the first is NaN
        if (!word) {
          for (int v = 0; v < G; ++v) {
            zs[v] = ld<V>(z + j + v * W, Full{}, kNegInf);
            block_max = vmax(zs[v], block_max);
          }
        } else {
          for (int v = 0; v < G; ++v) {
            zs[v] = off_support(z + j + v * W, Full{}, uint32_t((word >> (v * W)) & kLanes));
            block_max = vmax(zs[v], block_max);
          }
        }
        add(j, zs, std::integral_constant<int, G>{}, block_max);
      }
      flush();
    }
    for (int64_t j = blocks; j < full; j += W) {
      zs[0] = off_support(z + j, Full{}, uint32_t((words[j >> 6] >> (j & 63)) & kLanes));
      add(j, zs, std::integral_constant<int, 1>{}, vmax(zs[0], m));
    }
    if (full < n) {
      zs[0] = off_support(z + full, int(n - full), uint32_t((words[full >> 6] >> (full & 63)) & kLanes));
      add(full, zs, std::integral_constant<int, 1>{}, vmax(zs[0], m));
    }
    if (blocks < n) flush();
    return r;
  }

  // grad_j = coef_j * kept_j + c(z_j) over the row (kept may be null, c off: zeros), coef_j the
  // coef of j's segment (a list ending at a sentinel), the entries of `patched` taken from
  // patch_value instead, blended into the vector before it is stored: a scalar store after the
  // sweep would land on a line the streaming stores have sent to memory, and read it back
  // (measured: a third of the bf16 bucket row's time at k = 256).
  static void write_row(TS* grad, const TS* z, int64_t n, bool stream, const S* kept,
                        const KeptSegment* segment, const SoftmaxTerm<V>& c,
                        const EntrySet* patched = nullptr, const S* patch_value = nullptr) {
    V vcoef = V::zero();
    int64_t next = std::numeric_limits<int64_t>::max();
    if (kept) {
      vcoef = V::broadcast(segment->coef);
      next = segment[1].begin;
    }
    // one loop per (kept, c) case: a test of each per vector costs the store-bound loop its speed
    // Captures by copy: a streaming store (an intrinsic's may-alias vector type) may alias anything
    // whose address escaped, so referenced state (grad, next, ...) was reloaded after every store.
    const StreamedLines lines = streamed_lines<V>(grad, n, stream);  // streams_aligned_row: no head
    with_flags(kept != nullptr, c.on, [=](auto with_kept, auto with_c) {
      auto write = [=](int64_t j, auto tail, auto bits) mutable {
        V out = V::zero();
        if constexpr (with_kept) {
          if (j >= next) {  // segments begin on vectors
            ++segment;
            vcoef = V::broadcast(segment->coef);
            next = segment[1].begin;
          }
          out = vcoef * V::load(kept + j);
        }
        if constexpr (with_c) out = out + c(ld<V>(z + j, tail, kNegInf));
        if constexpr (!std::is_same_v<decltype(bits), NoBits>)
          out = select(V::from_bits(bits), V::load(patch_value + j), out);
        store_grad(grad + j, out, tail, lines.streams(j));
      };
      if (patched)
        sweep_with_bits<V>(n, *patched, write, no_flush);
      else
        sweep<V>(n, [&](int64_t j, auto tail) { write(j, tail, NoBits{}); }, no_flush);
    });
    if (stream) stream_fence();
  }

  static void refuse_row(const TopkBatch& b, int64_t i, int32_t status, TS* grad) {
    b.row_status[i] = status;
    b.row_loss[i] = 0.0;
    if (grad)
      write_row(grad, nullptr, b.vocab, streams_aligned_row<V>(b.stream_grad, grad), nullptr, nullptr, SoftmaxTerm<V>());
  }

  static void row(const DistillParams& prm, const DistillParams& inner, const TopkBatch& b, int64_t i, Scratch& sc) {
    const int64_t n = b.vocab, k = b.k, kk = k + (b.bucket ? 1 : 0);
    const TS* z = static_cast<const TS*>(b.student) + i * b.student_row_stride;
    TS* grad = b.grad ? static_cast<TS*>(b.grad) + i * n : nullptr;
    const int64_t* idx = b.indices + i * k;
    const int64_t label = b.labels ? b.labels[i] : -1;
    b.row_status[i] = kRowOk;
    if (b.labels && label == b.ignore_index) return refuse_row(b, i, kRowOk, grad);

    // -- the support: in range and distinct (marking it finds repeats; a row with both
    // reports the range, as the op's error message looks for that first)
    EntrySet& support = sc.support;
    const EntrySet::Clear unmark_on_return{support, idx, k, n, label};
    bool repeated = false;
    for (int64_t a = 0; a < k; ++a) {
      if (idx[a] < 0 || idx[a] >= n) return refuse_row(b, i, kIndexOutOfRange, grad);
      repeated = support.mark(idx[a]) || repeated;
    }
    if (repeated) return refuse_row(b, i, kIndexRepeated, grad);

    // -- the teacher's outcomes, checked on their one read
    S* t = sc.t.data();
    double mass = 0.0;
    if (const int32_t status = teacher_row(b, i, t, mass); status != kRowOk) {
      refuse_row(b, i, status, grad);
      if (status == kMassOverOne) b.row_loss[i] = mass;  // for the op's message
      return;
    }

    // The support's logits and gradient entries are scattered over the row: the next row's are
    // fetched while this row is processed (the renormalised tail reads nothing else of the row,
    // and waited on a miss per support entry).  A row swept off the support is fetched after
    // that sweep: its row and exponentials fill L2 and evicted what was fetched before it
    // (measured: the bf16 bucket at k = 1024 waited 70 % of its scalar work on these misses).
    const bool hard = b.labels && prm.hard_weight != 0.0;
    const bool sweeps_off_support = b.bucket || hard;
    const bool prefetch_next = i + 1 < b.rows;
    if (prefetch_next && !sweeps_off_support) prefetch_support(b, i + 1, sc);

    S* y = sc.y.data();
    S max_support = S(kNegInf);
    for (int64_t a = 0; a < k; ++a) {
      const S y_a = S(to_float(z[idx[a]]));
      y[a] = y_a;
      max_support = y_a > max_support ? y_a : max_support;  // NaN-skipping
    }
    const double z_label = hard ? double(to_float(z[label])) : 0.0;  // read before an in-place write

    // -- the entries off the support: one sweep for their max and their exponentials at 1 / tau_s
    // (the bucket) or at 1 (the cross-entropy), kept for the gradient sweep (one multiply per
    // entry there, not an exp per term).  The cross-entropy's sum is the bucket's times a
    // constant unless the bucket's temperature differs from 1.
    const double k_s = kLog2eD / prm.tau_s;
    const double k_e = b.bucket ? k_s : kLog2eD;
    const bool ce_own_exp = hard && b.bucket && prm.tau_s != 1.0;
    S* kept = grad ? sc.e.data() : nullptr;
    OffSupportSums off;
    if (sweeps_off_support) off = off_support_sums(z, n, support, k_e, ce_own_exp, kept, sc.segments);
    if (prefetch_next && sweeps_off_support) prefetch_support(b, i + 1, sc);
    // mass_off: some mass off the support (an entry there NaN: NaN sums, and a NaN max below)
    const bool mass_off = sweeps_off_support && off.sum_e != 0.0;
    const S max_off = std::isnan(off.sum_e) ? std::numeric_limits<S>::quiet_NaN() : mass_off ? off.max : S(kNegInf);
    const S max_all = std::max(max_off, max_support);  // NaN max_off: NaN sums below
    const double sum_e = off.sum_e;  // sum off the support of 2^((z - max_off) k_e)
    double sum_1 = 0.0;              // sum off the support of 2^((z - max_all) log2 e)
    if (mass_off && hard) {
      const double to_max_all = std::exp2((double(max_off) - double(max_all)) * kLog2eD);
      sum_1 = (ce_own_exp ? off.sum_1 : sum_e) * to_max_all;
    }
    // the bucket as a student "logit": tau_s logsumexp(z_off / tau_s) = max_off + tau_s ln(sum_e)
    const double log2_sum_s = mass_off && b.bucket ? std::log2(sum_e) : 0.0;
    if (b.bucket) y[k] = mass_off ? S(double(max_off) + prm.tau_s * kLn2D * log2_sum_s) : S(kNegInf);

    // -- the k (+ 1) outcome divergence on the dense row kernel
    double soft = 0.0;
    int32_t status = kRowOk;
    DistillBatch one;
    one.rows = 1;
    one.vocab = kk;
    one.teacher = t;
    one.student = y;
    one.teacher_dtype = one.student_dtype = std::is_same_v<S, double> ? DType::Float64 : DType::Float32;
    one.teacher_row_stride = one.student_row_stride = kk;
    one.grad = grad ? sc.g.data() : nullptr;
    one.row_loss = &soft;
    one.row_status = &status;
    KDFAST_CPU_CAPABILITY::distill_rows(inner, one, 0, 1);  // this capability's, not the dispatcher
    if (status != kRowOk) return refuse_row(b, i, status, grad);

    // -- the cross-entropy at temperature 1: lse over the entries off and on the support
    double lse_1 = 0.0;
    if (hard) {
      double on_support = 0.0;
      for (int64_t a = 0; a < k; ++a) on_support += std::exp(double(y[a]) - double(max_all));
      lse_1 = double(max_all) + std::log(sum_1 + on_support);
    }
    b.row_loss[i] = soft + (hard ? prm.hard_weight * (lse_1 - z_label) : 0.0);
    if (!grad) return;

    // -- the gradient: the bucket's spread over the entries off S, the
    // cross-entropy's softmax everywhere, then the support and the label
    const double c_hard = hard ? prm.hard_weight * prm.inv_denom : 0.0;
    const double a_off = b.bucket ? double(sc.g[k]) : 0.0;
    const double log2_sum_1 = hard ? kLog2eD * (lse_1 - double(max_all)) : 0.0;
    // off S: grad_j = coef e_j (+ the cross-entropy's own exp when it is not at the bucket's scale)
    double coef = 0.0;
    if (mass_off && b.bucket) coef += a_off * std::exp2(-log2_sum_s);
    if (mass_off && hard && !ce_own_exp) coef += c_hard * std::exp2((double(max_off) - double(max_all)) * kLog2eD - log2_sum_1);
    // each segment's e_j against the max off the support
    if (mass_off)
      for (KeptSegment& s : sc.segments) s.coef = S(coef * std::exp2((double(s.max) - double(max_off)) * k_e));
    const SoftmaxTerm<V> ce_term = mass_off && ce_own_exp ? SoftmaxTerm<V>(c_hard, max_all, kLog2eD, log2_sum_1)
                                                      : SoftmaxTerm<V>();
    // the support's and the label's entries, at their places; the label joins the marked set
    // (it was read as an ordinary entry above)
    S* patch = sc.patch.data();
    for (int64_t a = 0; a < k; ++a) {
      double g = double(sc.g[a]);
      if (hard) g += c_hard * std::exp(double(y[a]) - lse_1);
      if (hard && idx[a] == label) g -= c_hard;
      patch[idx[a]] = entry_value(g);
    }
    if (hard && !support.has(label)) {
      double g = c_hard * (std::exp(z_label - lse_1) - 1.0);
      if (mass_off && b.bucket) g += a_off * std::exp2((z_label - double(max_off)) * k_s - log2_sum_s);
      patch[label] = entry_value(g);
      support.mark(label);
    }
    sc.segments.push_back({std::numeric_limits<int64_t>::max(), S(0), S(0)});  // the sentinel
    write_row(grad, z, n, streams_aligned_row<V>(b.stream_grad, grad), mass_off ? kept : nullptr, sc.segments.data(),
              ce_term, &support, patch);
  }

  // The row's teacher outcomes into t: its k log-probs in the lanes' type, then for the bucket
  // tail the log-mass off the support.  Checked on this one read as check_topk_logprobs
  // (kdfast/llm/topk.py) checks them; the mass is their max and one vector sweep of
  // 2^((t - max) log2 e), the Python form's logsumexp in the same precision.  Returns the row's
  // status; mass gets the row's probability mass (with the tail's).
  static int32_t teacher_row(const TopkBatch& b, int64_t i, S* t, double& mass) {
    const int64_t k = b.k;
    const S tol = S(b.mass_tolerance), inf = S(INFINITY);
    S max = -inf;
    bool not_finite = false, positive = false;
    with_dtype(b.logprob_dtype, [&](auto tag) {
      using L = typename decltype(tag)::type;
      const L* lp = static_cast<const L*>(b.logprobs) + i * k;
      for (int64_t a = 0; a < k; ++a) {
        const S v = S(to_float(lp[a]));
        t[a] = v;
        not_finite |= !(v < inf);  // NaN or +inf
        positive |= v > tol;
        max = v > max ? v : max;
      }
    });
    S rest = -inf;
    if (b.tail_logprobs)
      with_dtype(b.tail_dtype, [&](auto tag) {
        rest = S(to_float(static_cast<const typename decltype(tag)::type*>(b.tail_logprobs)[i]));
      });
    if (not_finite || !(rest < inf)) return kLogprobNotFinite;
    if (positive || rest > tol) return kLogprobPositive;

    double log_top = -INFINITY;  // log of the top-k's mass
    if (max > -inf) {
      const V vmax_t = V::broadcast(max), vlog2e = V::broadcast(S(kLog2eD));
      V acc = V::zero();
      sweep<V>(k, [&](int64_t a, auto tail) {
        acc = acc + vexp2_nonpositive((ld<V>(t + a, tail, kNegInf) - vmax_t) * vlog2e);
      }, no_flush);
      log_top = double(max) + std::log(double(acc.reduce_add()));
    }
    mass = std::exp(log_top) + (b.tail_logprobs ? std::exp(double(rest)) : 0.0);
    if (mass > 1.0 + double(tol)) return kMassOverOne;
    if (b.bucket) t[k] = S(bucket_log_mass(b, log_top, double(rest)));
    return kRowOk;
  }

  // teacher_bucket (kdfast/llm/topk.py): empty when S is the whole vocabulary (1 - mass would be
  // the stored log-probs' rounding), the given tail, or log(1 - exp(log_top)) (Maechler's two
  // branches), empty when that is within the log-probs' rounding of 0.
  static double bucket_log_mass(const TopkBatch& b, double log_top, double rest) {
    if (b.k == b.vocab) return -INFINITY;
    if (b.tail_logprobs) return rest;
    if (-log_top <= b.empty_bucket_below) return -INFINITY;
    const double x = std::min(log_top, 0.0);
    return x > -kLn2D ? std::log(-std::expm1(x)) : std::log1p(-std::exp(x));
  }

  static void prefetch_support(const TopkBatch& b, int64_t i, const Scratch& sc) {
    const TS* z = static_cast<const TS*>(b.student) + i * b.student_row_stride;
    const int64_t* idx = b.indices + i * b.k;
    const S* patch = sc.patch.empty() ? nullptr : sc.patch.data();
    for (int64_t a = 0; a < b.k; ++a) {
      const int64_t j = idx[a];
      if (j < 0 || j >= b.vocab) continue;
      __builtin_prefetch(z + j, 0, 2);
      if (patch) __builtin_prefetch(patch + j, 1, 2);
    }
  }

  // A gradient entry as the sweep's lanes hold it: float lanes round a double through float,
  // as the stores of a float row always did.
  static S entry_value(double g) { return S(g); }
};

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
