// What the CPU ops (distill_op.cpp, correlation_ops.cpp) share: dtype and layout
// helpers and the cache of large gradient buffers.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kernels/kernel_api.h"

namespace kdfast {

inline DType to_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    case at::kDouble: return DType::Float64;
    default: TORCH_CHECK_TYPE(false, what, " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
  }
}

// (..., V) -> (N, V) with unit stride along V; keeps expanded (stride-0) rows as views.
inline at::Tensor as_rows(const at::Tensor& t) {
  const int64_t V = t.size(-1);
  at::Tensor rows = t.dim() == 2 ? t : t.reshape({-1, V});
  if (rows.stride(1) != 1 && V > 1) rows = rows.contiguous();
  return rows;
}

// The gradient is the one large buffer the op writes.  A fresh multi-MB
// allocation is paid twice on first touch: a page fault per page and the
// kernel zeroing every page, together as long as the kernel itself on a
// typical VM.  So large gradient buffers are (1) backed by transparent huge
// pages and (2) recycled: when autograd frees one, it is kept (at most
// kMaxCached of them) for the next call of a similar size, as a training loop
// makes.  KDFAST_GRAD_CACHE=0 turns the recycling off; kdfast.empty_cache()
// releases what is kept.  From 8 MB: below that glibc's malloc still returns
// a gradient's pages to the OS between some calls and not others (65536x100
// float32, 26 MB, took 4 or 12 ms a call at random), and the buffers it gives
// back are kept most recent first, so that a process alternating between more
// sizes than it keeps (benchmarks, evaluation at another batch size) pays the
// fresh allocation once per change of size, not on every call.
class GradBufferCache {
 public:
  static GradBufferCache& instance() {
    static GradBufferCache* cache = new GradBufferCache();  // leaked: tensors may die after static dtors
    return *cache;
  }

  at::Tensor empty(int64_t N, int64_t V, const at::TensorOptions& options) {
    const size_t bytes = size_t(N) * size_t(V) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= kMinBytes) {
      size_t capacity = 0;
      void* data = take(bytes, &capacity);
      if (!data) {
        capacity = (bytes + kHuge - 1) / kHuge * kHuge;
        if (posix_memalign(&data, kHuge, capacity) != 0) data = nullptr;
        if (data) madvise(data, capacity, MADV_HUGEPAGE);
      }
      if (data)
        return at::from_blob(data, {N, V}, [capacity](void* p) { instance().give(p, capacity); }, options);
    }
#endif
    return at::empty({N, V}, options);
  }

  // Releases the kept buffers; returns their bytes.
  size_t clear() {
    std::lock_guard<std::mutex> lock(mu_);
    size_t bytes = 0;
    for (auto& entry : free_) {
      std::free(entry.first);
      bytes += entry.second;
    }
    free_.clear();
    return bytes;
  }

 private:
  static constexpr size_t kHuge = size_t(2) << 20;
  static constexpr size_t kMinBytes = 4 * kHuge;
  static constexpr size_t kMaxCached = 2;

  GradBufferCache() {
    const char* env = std::getenv("KDFAST_GRAD_CACHE");
    enabled_ = !(env && std::string(env) == "0");
  }

  // The smallest cached buffer that fits without wasting more than half of it.
  void* take(size_t bytes, size_t* capacity) {
    std::lock_guard<std::mutex> lock(mu_);
    size_t best = free_.size();
    for (size_t i = 0; i < free_.size(); ++i)
      if (free_[i].second >= bytes && free_[i].second <= 2 * bytes &&
          (best == free_.size() || free_[i].second < free_[best].second))
        best = i;
    if (best == free_.size()) return nullptr;
    void* p = free_[best].first;
    *capacity = free_[best].second;
    free_.erase(free_.begin() + best);
    return p;
  }

  // Kept most recent first: the oldest is released when a newer one arrives.
  void give(void* p, size_t capacity) {
    void* evicted = p;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (enabled_) {
        free_.emplace(free_.begin(), p, capacity);
        evicted = nullptr;
        if (free_.size() > kMaxCached) {
          evicted = free_.back().first;
          free_.pop_back();
        }
      }
    }
    std::free(evicted);
  }

  std::mutex mu_;
  bool enabled_ = true;
  std::vector<std::pair<void*, size_t>> free_;
};


// Shapes, devices and dtypes of a (student, teacher) logits pair; returns their dtypes.
inline std::pair<DType, DType> check_logits_pair(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), "student_logits shape ", student.sizes(),
                    " does not match teacher_logits shape ", teacher.sizes());
  TORCH_CHECK_VALUE(student.dim() >= 1 && student.size(-1) >= 1, "logits need a non-empty last (vocabulary) dim, got ",
                    student.sizes());
  TORCH_CHECK_VALUE(student.device().is_cpu() && teacher.device().is_cpu(), "the cpu backend takes CPU tensors, got ",
                    student.device(), " and ", teacher.device());
  const DType st = to_dtype(student, "student_logits"), tt = to_dtype(teacher, "teacher_logits");
  TORCH_CHECK_TYPE((st == DType::Float64) == (tt == DType::Float64),
                   "float64 logits must be paired with float64, got ", student.scalar_type(), " and ",
                   teacher.scalar_type());
  return {st, tt};
}

// The logits fields every batch struct of the kernels has (DistillBatch, DistBatch).
template <class Batch>
void set_logits(Batch& b, const at::Tensor& student_rows, const at::Tensor& teacher_rows, DType st, DType tt) {
  b.rows = student_rows.size(0);
  b.vocab = student_rows.size(1);
  b.teacher = teacher_rows.data_ptr();
  b.student = student_rows.data_ptr();
  b.teacher_row_stride = teacher_rows.stride(0);
  b.student_row_stride = student_rows.stride(0);
  b.teacher_dtype = tt;
  b.student_dtype = st;
}

// Labels (one per row) as contiguous int64, each checked to be in [0, V) or
// ignore_index; returns them and the number of rows that are not ignored.
inline std::pair<at::Tensor, int64_t> checked_labels(const at::Tensor& labels, const at::Tensor& student, int64_t N,
                                                      int64_t V, int64_t ignore_index) {
  TORCH_CHECK_VALUE(labels.numel() == N, "labels shape ", labels.sizes(), " does not match the ", N,
                    " rows of logits shape ", student.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(labels.scalar_type()) && labels.scalar_type() != at::kBool,
                   "labels must be an integer tensor, got ", labels.scalar_type());
  at::Tensor labels64 = labels.reshape({-1}).to(at::kLong).contiguous();
  const int64_t* lp = labels64.data_ptr<int64_t>();
  int64_t valid = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (lp[i] == ignore_index) continue;
    TORCH_CHECK_VALUE(lp[i] >= 0 && lp[i] < V, "label ", lp[i], " at row ", i, " is outside [0, ", V,
                      ") and is not ignore_index (", ignore_index, ")");
    ++valid;
  }
  return {labels64, valid};
}

// The op's divergence, params and weighting as the kernels take them.  The
// options were validated in Python (kdfast.config); these checks only keep a
// direct caller of the op from indexing past the dispatch tables.
inline void set_policies(DistillParams& prm, int64_t divergence, c10::ArrayRef<double> params, int64_t weighting) {
  TORCH_CHECK_VALUE(divergence >= 0 && divergence < static_cast<int64_t>(Divergence::Count),
                    "divergence must be an index of kdfast.registry.DIVERGENCE_NAMES, got ", divergence);
  TORCH_CHECK_VALUE(weighting >= 0 && weighting < static_cast<int64_t>(Weighting::Count),
                    "weighting must be an index of kdfast.registry.WEIGHTING_NAMES, got ", weighting);
  TORCH_CHECK_VALUE(static_cast<int64_t>(params.size()) == kKernelParamCount, "params must have ", kKernelParamCount,
                    " entries (kdfast.registry.KERNEL_PARAMS), got ", params.size());
  prm.divergence = static_cast<Divergence>(divergence);
  prm.weighting = static_cast<Weighting>(weighting);
  int k = 0;
#define KDFAST_SET_KERNEL_PARAM(name) prm.div.name = params[k++];
  KDFAST_FOR_EACH_KERNEL_PARAM(KDFAST_SET_KERNEL_PARAM)
#undef KDFAST_SET_KERNEL_PARAM
}


// 1 / the batchmean denominator (the normalizer, else the valid rows; 0 for
// none), or 1 for "sum" and "none".
inline double reduction_scale(const std::string& reduction, const c10::optional<double>& normalizer, int64_t valid) {
  TORCH_CHECK_VALUE(reduction == "batchmean" || reduction == "sum" || reduction == "none",
                    "reduction must be 'batchmean', 'sum' or 'none', got '", reduction, "'");
  if (reduction != "batchmean") return 1.0;
  const double denom = normalizer.has_value() ? *normalizer : static_cast<double>(valid);
  return denom > 0 ? 1.0 / denom : 0.0;
}

// The errors of docs/contract.md for the rows a kernel refused (RowStatus codes).
inline void check_row_status(const std::vector<int32_t>& status) {
  int32_t any = 0;
  for (int32_t s : status) any |= s;  // a vectorised scan; rows are looked at one by one only after a report
  if (any == 0) return;
  for (size_t i = 0; i < status.size(); ++i) {
    TORCH_CHECK(status[i] >= 0, "kdfast: internal error in row ", i, " (out of memory or unsupported dtypes)");
    TORCH_CHECK_VALUE(status[i] != kTeacherAllNegInf, "teacher_logits row ", i,
                      " is all -inf: the teacher distribution is undefined");
    TORCH_CHECK_VALUE(status[i] != kStudentAllNegInf, "student_logits row ", i,
                      " is all -inf: the student distribution is undefined");
  }
}

// Whether a gradient is written with streaming (non-temporal) stores: one
// that outgrows the caches, so that DRAM does not read every line before it is
// overwritten, and whose rows are long enough.  The kernels stream a row's
// whole cache lines only (row_kernel.h, streamed_lines).  A row of a few lines
// shares a large part of them with its neighbours (stored normally), and there
// streaming the rest cost more than the reads it saved.  Measured on the
// Intel Xeon (AVX-512) of 2026-12-01, KL fwd+bwd, streamed against stored:
// fp32 rows of 4000 bytes gain from 24 MB of gradient (6144 x 1000: 2.15 ->
// 1.97 ms; 16384 x 1000: 9.3 -> 6.5 ms), bf16 rows of 2000 bytes at 32 MB
// (4.6 -> 4.2 ms); rows of 1 KiB neither gain nor lose; rows of 400 bytes lose
// at every size (131072 x 100 fp32: 9.0 -> 10.5 ms); at 20 MB nothing changes.
constexpr size_t kStreamGradMinBytes = size_t(20) << 20;
constexpr int64_t kStreamRowMinBytes = 1024;

inline bool streams_gradient(const at::Tensor& grad) {
  return grad.dim() >= 1 && grad.nbytes() >= kStreamGradMinBytes &&
         grad.size(-1) * int64_t(grad.element_size()) >= kStreamRowMinBytes;
}

// The student logits an in-place op overwrites with their gradient: a contiguous (N, V) tensor.
inline void check_inplace_student(const at::Tensor& student, const char* op) {
  TORCH_CHECK_VALUE(student.dim() == 2 && student.is_contiguous(), op,
                    " needs contiguous (N, V) student logits, got shape ", student.sizes(), " and strides ",
                    student.strides());
}

// The (N, V) student gradient an op writes in its forward (a recycled buffer),
// or an empty tensor when no gradient is wanted.
inline at::Tensor grad_buffer(bool compute_grad, int64_t N, int64_t V, const at::Tensor& student) {
  return compute_grad ? GradBufferCache::instance().empty(N, V, student.options()) : at::empty({0}, student.options());
}

// The dtype of an op's loss: float64 for float64 logits, else float32.
inline at::ScalarType loss_dtype(DType student) { return student == DType::Float64 ? at::kDouble : at::kFloat; }

// Zeroed per-row buffers, kept per thread from one op call to the next: a
// vector of N entries freshly allocated each call pays its page faults (with
// N = 655360 rows of 10 classes, a tenth of the op's time).  A pool, not one
// buffer, so that two results alive at once never share one.
template <class T>
class RowBufferPool {
 public:
  static std::vector<T> take(size_t n) {
    std::vector<std::vector<T>>& free = kept();
    std::vector<T> v;
    if (!free.empty()) {
      v = std::move(free.back());
      free.pop_back();
    }
    v.assign(n, T(0));
    return v;
  }
  static void give(std::vector<T>&& v) {
    std::vector<std::vector<T>>& free = kept();
    if (free.size() < kMaxKept && v.capacity() <= kMaxKeptEntries) free.push_back(std::move(v));
  }

 private:
  static constexpr size_t kMaxKept = 4;
  static constexpr size_t kMaxKeptEntries = size_t(1) << 22;  // larger ones go back to the allocator
  static std::vector<std::vector<T>>& kept() {
    static thread_local std::vector<std::vector<T>> free;
    return free;
  }
};

// What a row kernel reports per row (its loss and its status), filled in
// parallel and then checked and summed serially: in a fixed order, so the
// loss is bit-identical run to run and for any number of threads.
struct RowResults {
  std::vector<double> loss;
  std::vector<int32_t> status;

  explicit RowResults(int64_t N)
      : loss(RowBufferPool<double>::take(size_t(N))), status(RowBufferPool<int32_t>::take(size_t(N))) {}
  ~RowResults() {
    RowBufferPool<double>::give(std::move(loss));
    RowBufferPool<int32_t>::give(std::move(status));
  }
  RowResults(const RowResults&) = delete;
  RowResults& operator=(const RowResults&) = delete;

  // Runs rows(lo, hi) over [0, N) in parallel tasks of at least `grain` rows,
  // then raises the contract's error for the first row that reported one.
  template <class Rows>
  void run(int64_t grain, Rows&& rows) {
    at::parallel_for(0, int64_t(loss.size()), grain, rows);
    check_row_status(status);
  }

  // Eight interleaved partial sums added in a fixed order: the same result
  // for any thread count, without a chain of N dependent additions.
  double sum() const {
    double part[8] = {};
    const size_t n = loss.size(), full = n - n % 8;
    for (size_t i = 0; i < full; i += 8)
      for (int k = 0; k < 8; ++k) part[k] += loss[i + k];
    for (size_t i = full; i < n; ++i) part[i - full] += loss[i];
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  }

  at::Tensor scalar(double scale, DType student) const {
    return at::scalar_tensor(sum() * scale, at::TensorOptions().dtype(loss_dtype(student)));
  }

  // The op's loss: the rows' losses for reduction "none", else their sum times `scale`.
  at::Tensor reduced(const std::string& reduction, double scale, DType student) {
    if (reduction != "none") return scalar(scale, student);
    const at::Tensor per_row = at::from_blob(loss.data(), {int64_t(loss.size())}, at::TensorOptions().dtype(at::kDouble));
    return per_row.to(loss_dtype(student), false, /*copy=*/true);
  }
};

}  // namespace kdfast
