// The top-k row kernel (topk_api.h): per row, the sorted support, one sweep
// of the gaps between its entries for the off-support log-sum-exp (and the
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

#include "row_kernel.h"
#include "topk_api.h"

namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

// Calls seg(a, b) for each maximal run [a, b) of entries off the sorted support.
template <class Seg>
inline void for_each_gap(const int64_t* sorted, int64_t k, int64_t n, Seg&& seg) {
  int64_t a = 0;
  for (int64_t i = 0; i < k; ++i) {
    if (sorted[i] > a) seg(a, sorted[i]);
    a = sorted[i] + 1;
  }
  if (a < n) seg(a, n);
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

template <class V, class TS>
struct TopkRows {
  using S = typename V::value_type;
  static constexpr float kNegInf = -INFINITY;

  struct Scratch {
    std::vector<int64_t> sorted;
    std::vector<int64_t> keys;  // (index << bits) | position in the row's top-k: the support sorted with its order
    std::vector<S> y, g;  // the short row's student "logits" and gradient (k + 1)
    std::vector<S> e;     // the gaps' exponentials, for the gradient sweep (vocab + a vector of padding)
    std::vector<int64_t> patch_pos;  // the support and the label, by position (k + 1)
    std::vector<S> patch_value;
  };

  static void run(const DistillParams& prm, const TopkBatch& b, int64_t begin, int64_t end) {
    Scratch sc;
    sc.sorted.resize(size_t(b.k));
    sc.keys.resize(size_t(b.k));
    sc.patch_pos.resize(size_t(b.k + 1));
    sc.patch_value.resize(size_t(b.k + 1));
    sc.y.resize(size_t(b.k + 1));
    sc.g.resize(size_t(b.k + 1));
    if (b.grad) sc.e.resize(size_t(b.vocab + V::size));
    DistillParams inner = prm;  // the short row's divergence: no weighting, no hard term (this kernel adds its own)
    inner.hard_weight = 0.0;
    inner.weighting = Weighting::None;
    for (int64_t i = begin; i < end; ++i) row(prm, inner, b, i, sc);
  }

  static bool stream_row(const TopkBatch& b, const TS* grad) {
    return Streamable<V, TS> && b.stream_grad && reinterpret_cast<uintptr_t>(grad) % kStreamAlign<V, TS> == 0;
  }

  // Entries whose gradient is not the sweep's formula (the support, the label), by position.
  struct Patches {
    const int64_t* pos = nullptr;
    const S* value = nullptr;
    int64_t count = 0;
  };

  // grad_j = coef * kept_j + c(z_j) over the row (kept may be null, c off: zeros), the patched
  // entries' lanes replaced in the vector before it is stored: a scalar store after the sweep
  // would land on a line the streaming stores have sent to memory, and read it back (measured:
  // a third of the bf16 bucket row's time at k = 256).  The runs of vectors between patched
  // ones are plain loops: a patch test in every iteration halved the renormalised tail's speed.
  static void write_row(TS* grad, const TS* z, int64_t n, bool stream, const S* kept, double coef,
                        const SoftmaxTerm<V>& c, const Patches& patches = Patches()) {
    const V vcoef = V::broadcast(S(coef));
    auto value = [&](int64_t j, auto tail) {
      V out = kept ? vcoef * V::load(kept + j) : V::zero();
      if (c.on) out = out + c(ld<V>(z + j, tail, kNegInf));
      return out;
    };
    constexpr int64_t W = V::size;
    const int64_t full = n - n % W;
    int64_t j = 0, p = 0;
    while (j < full) {
      const int64_t next = p < patches.count ? patches.pos[p] - patches.pos[p] % W : full;
      const int64_t stop = next < full ? next : full;
      for (; j < stop; j += W) store_grad(grad + j, value(j, Full{}), Full{}, stream);
      if (j >= full) break;
      V out = value(j, Full{});
      p = patch(out, j, j + W, patches, p);
      store_grad(grad + j, out, Full{}, stream);
      j += W;
    }
    if (full < n) {
      V out = value(full, int(n - full));
      p = patch(out, full, n, patches, p);
      store_grad(grad + full, out, int(n - full), stream);
    }
    if (stream) stream_fence();
  }

  // The patches at positions [j, end) written into the lanes of `out` (which holds entries j...);
  // returns the first patch after them.
  static int64_t patch(V& out, int64_t j, int64_t end, const Patches& patches, int64_t p) {
    if (p >= patches.count || patches.pos[p] >= end) return p;
    alignas(64) S lane[V::size];
    out.store(lane);
    do {
      lane[patches.pos[p] - j] = patches.value[p];
    } while (++p < patches.count && patches.pos[p] < end);
    out = V::load(lane);
    return p;
  }

  static void refuse_row(const TopkBatch& b, int64_t i, int32_t status, TS* grad) {
    b.row_status[i] = status;
    b.row_loss[i] = 0.0;
    if (grad) write_row(grad, nullptr, b.vocab, stream_row(b, grad), nullptr, 0.0, SoftmaxTerm<V>());
  }

  static void row(const DistillParams& prm, const DistillParams& inner, const TopkBatch& b, int64_t i, Scratch& sc) {
    const int64_t n = b.vocab, k = b.k, kk = k + (b.bucket ? 1 : 0);
    const TS* z = static_cast<const TS*>(b.student) + i * b.student_row_stride;
    TS* grad = b.grad ? static_cast<TS*>(b.grad) + i * n : nullptr;
    const int64_t* idx = b.indices + i * k;
    const int64_t label = b.labels ? b.labels[i] : -1;
    b.row_status[i] = kRowOk;
    if (b.labels && label == b.ignore_index) return refuse_row(b, i, kRowOk, grad);

    // -- the support: in range and distinct (sorting finds repeats for free)
    int64_t* sorted = sc.sorted.data();
    int64_t* keys = sc.keys.data();
    const int bits = order_bits(k);
    for (int64_t a = 0; a < k; ++a) {
      if (idx[a] < 0 || idx[a] >= n) return refuse_row(b, i, kIndexOutOfRange, grad);
      keys[a] = (idx[a] << bits) | a;
    }
    std::sort(keys, keys + k);
    for (int64_t a = 0; a < k; ++a) sorted[a] = keys[a] >> bits;
    for (int64_t a = 1; a < k; ++a)
      if (sorted[a] == sorted[a - 1]) return refuse_row(b, i, kIndexRepeated, grad);

    S* y = sc.y.data();
    S max_support = S(kNegInf);
    for (int64_t a = 0; a < k; ++a) {
      y[a] = S(to_float(z[idx[a]]));
      if (y[a] > max_support) max_support = y[a];  // NaN-skipping
    }
    const bool hard = b.labels && prm.hard_weight != 0.0;
    const double z_label = hard ? double(to_float(z[label])) : 0.0;  // read before an in-place write

    // -- the gaps: their max, then the sums at 1 / tau_s (the bucket) and at 1 (the cross-entropy)
    S max_off = S(kNegInf);
    if (b.bucket || hard) {
      using M = FloatLaneMax<V, TS>;
      typename M::Acc m = M::init();
      for_each_gap(sorted, k, n, [&](int64_t lo, int64_t hi) {
        sweep<V>(hi - lo, [&](int64_t j, auto tail) { m = M::add(m, z + lo + j, tail); }, no_flush);
      });
      max_off = M::result(m);
      if (max_off == S(kNegInf) && gaps_have_nan(z, sorted, k, n)) max_off = std::numeric_limits<S>::quiet_NaN();
    }
    const S max_all = std::max(max_off, max_support);  // NaN max_off: NaN sums below
    const double k_s = kLog2eD / prm.tau_s;
    // The gaps' exponentials e_j = 2^((z_j - max_off) k_e), at the bucket's scale (or the
    // cross-entropy's, without a bucket), are kept in scratch for the gradient sweep: that sweep
    // is then one multiply per entry, not one exp per term.  The cross-entropy's are the same
    // e_j times 2^((max_off - max_all) log2 e) unless the bucket's temperature differs from 1.
    const bool gaps = (b.bucket || hard) && max_off != S(kNegInf);  // NaN max_off: a gap holds a NaN
    const double k_e = b.bucket ? k_s : kLog2eD;
    const bool ce_own_exp = hard && b.bucket && prm.tau_s != 1.0;
    S* kept = grad ? sc.e.data() : nullptr;
    double sum_e = 0.0, sum_1 = 0.0;  // sum over the gaps of e_j; of 2^((z - max_all) log2 e)
    if (gaps) {
      const V m_e = V::broadcast(max_off), m_1 = V::broadcast(max_all);
      const V vk_e = V::broadcast(S(k_e)), vk_1 = V::broadcast(S(kLog2eD));
      V acc_e = V::zero(), acc_1 = V::zero();
      for_each_gap(sorted, k, n, [&](int64_t lo, int64_t hi) {
        sweep<V>(hi - lo, [&](int64_t j, auto tail) {
          const V zj = ld<V>(z + lo + j, tail, kNegInf);
          // z <= the max it is shifted by, exactly: no clamp, so that a NaN entry makes a NaN sum
          const V e = vexp2_nonpositive((zj - m_e) * vk_e);
          if (kept) e.store(kept + lo + j);  // a tail's padding lanes (0) land on the support, rewritten later
          acc_e = acc_e + e;
          if (ce_own_exp) acc_1 = acc_1 + vexp2_nonpositive((zj - m_1) * vk_1);
        }, [&] {
          sum_e += acc_e.reduce_add();
          sum_1 += acc_1.reduce_add();
          acc_e = acc_1 = V::zero();
        });
      });
      if (std::isnan(max_off)) sum_e = std::numeric_limits<double>::quiet_NaN();  // gaps of NaN and -inf
      if (hard && !ce_own_exp) sum_1 = sum_e * std::exp2((double(max_off) - double(max_all)) * kLog2eD);
    }
    // the bucket as a student "logit": tau_s logsumexp(z_off / tau_s) = max_off + tau_s ln(sum_e)
    const double log2_sum_s = gaps && b.bucket ? std::log2(sum_e) : 0.0;
    if (b.bucket) y[k] = gaps ? S(double(max_off) + prm.tau_s * kLn2D * log2_sum_s) : S(kNegInf);

    // -- the k (+ 1) outcome divergence on the dense row kernel
    double soft = 0.0;
    int32_t status = kRowOk;
    DistillBatch one;
    one.rows = 1;
    one.vocab = kk;
    one.teacher = static_cast<const char*>(b.teacher) + i * kk * (b.teacher_dtype == DType::Float64 ? 8 : 4);
    one.teacher_dtype = b.teacher_dtype;
    one.student = y;
    one.student_dtype = std::is_same_v<S, double> ? DType::Float64 : DType::Float32;
    one.teacher_row_stride = one.student_row_stride = kk;
    one.grad = grad ? sc.g.data() : nullptr;
    one.row_loss = &soft;
    one.row_status = &status;
    KDFAST_CPU_CAPABILITY::distill_rows(inner, one, 0, 1);  // this capability's, not the dispatcher
    if (status != kRowOk) return refuse_row(b, i, status, grad);

    // -- the cross-entropy at temperature 1: lse over the gaps and the support
    double lse_1 = 0.0;
    if (hard) {
      double support = 0.0;
      for (int64_t a = 0; a < k; ++a) support += std::exp(double(y[a]) - double(max_all));
      lse_1 = double(max_all) + std::log(sum_1 + support);
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
    if (gaps && b.bucket) coef += a_off * std::exp2(-log2_sum_s);
    if (gaps && hard && !ce_own_exp) coef += c_hard * std::exp2((double(max_off) - double(max_all)) * kLog2eD - log2_sum_1);
    const SoftmaxTerm<V> ce_term = gaps && ce_own_exp ? SoftmaxTerm<V>(c_hard, max_all, kLog2eD, log2_sum_1)
                                                      : SoftmaxTerm<V>();
    // the support's and the label's entries, in the order of their positions
    int64_t* patch_pos = sc.patch_pos.data();
    S* patch_value = sc.patch_value.data();
    int64_t patches = 0;
    const bool label_off_support = hard && !std::binary_search(sorted, sorted + k, label);
    auto patch_label = [&] {
      double g = c_hard * (std::exp(z_label - lse_1) - 1.0);
      if (gaps && b.bucket) g += a_off * std::exp2((z_label - double(max_off)) * k_s - log2_sum_s);
      patch_pos[patches] = label;
      patch_value[patches++] = entry_value(g);
    };
    for (int64_t s_ = 0; s_ < k; ++s_) {
      if (label_off_support && label < sorted[s_] && (s_ == 0 || label > sorted[s_ - 1])) patch_label();
      const int64_t a = keys[s_] & ((int64_t(1) << bits) - 1);
      double g = double(sc.g[a]);
      if (hard) g += c_hard * std::exp(double(y[a]) - lse_1);
      if (hard && idx[a] == label) g -= c_hard;
      patch_pos[patches] = sorted[s_];
      patch_value[patches++] = entry_value(g);
    }
    if (label_off_support && label > sorted[k - 1]) patch_label();
    write_row(grad, z, n, stream_row(b, grad), gaps ? kept : nullptr, coef, ce_term,
              Patches{patch_pos, patch_value, patches});
  }

  // The bits that hold a position in [0, k) (the low part of a sort key).
  static int order_bits(int64_t k) {
    int bits = 1;
    while ((int64_t(1) << bits) < k) ++bits;
    return bits;
  }

  // A gradient entry as the sweep's lanes hold it: float lanes round a double through float,
  // as the stores of a float row always did.
  static S entry_value(double g) { return S(g); }

  // Whether an entry off the support is NaN (only asked of rows whose gaps' max is -inf: rare, scalar).
  static bool gaps_have_nan(const TS* z, const int64_t* sorted, int64_t k, int64_t n) {
    bool nan = false;
    for_each_gap(sorted, k, n, [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi && !nan; ++j) nan = std::isnan(to_float(z[j]));
    });
    return nan;
  }
};

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
