// The fused distillation op on CPU tensors: input checks, the parallel loop
// over rows, and the deterministic reduction of the per-row losses.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kernels/kernel_api.h"
#include "kernels/selftest.h"

namespace kdfast {
namespace {

Divergence parse_divergence(const std::string& name) {
  static const char* names[] = {"kl", "reverse_kl", "jsd", "tvd", "renyi", "ab", "skew_kl", "skew_reverse_kl"};
  for (int i = 0; i < static_cast<int>(Divergence::Count); ++i)
    if (name == names[i]) return static_cast<Divergence>(i);
  TORCH_CHECK_VALUE(false, "unknown divergence '", name, "'");
}

Weighting parse_weighting(const std::string& name) {
  if (name == "none") return Weighting::None;
  if (name == "wttm") return Weighting::WTTM;
  if (name == "entropy") return Weighting::Entropy;
  if (name == "given") return Weighting::Given;
  TORCH_CHECK_VALUE(false, "unknown weighting '", name, "'");
}

DType to_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    case at::kDouble: return DType::Float64;
    default: TORCH_CHECK_TYPE(false, what, " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
  }
}

// (..., V) -> (N, V) with unit stride along V; keeps expanded (stride-0) rows as views.
at::Tensor as_rows(const at::Tensor& t) {
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
// releases what is kept.
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

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& entry : free_) std::free(entry.first);
    free_.clear();
  }

 private:
  static constexpr size_t kHuge = size_t(2) << 20;
  static constexpr size_t kMinBytes = 16 * kHuge;
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

  void give(void* p, size_t capacity) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (enabled_ && free_.size() < kMaxCached) {
        free_.emplace_back(p, capacity);
        return;
      }
    }
    std::free(p);
  }

  std::mutex mu_;
  bool enabled_ = true;
  std::vector<std::pair<void*, size_t>> free_;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> distill_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
    const c10::optional<at::Tensor>& weights, c10::string_view divergence, double tau, double tau_s, double alpha,
    double beta, double skew, c10::string_view weighting, int64_t ignore_index, double hard_weight, double soft_coef,
    c10::string_view reduction, c10::optional<double> normalizer, bool compute_grad) {
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), "student_logits shape ", student.sizes(),
                    " does not match teacher_logits shape ", teacher.sizes());
  TORCH_CHECK_VALUE(student.dim() >= 1 && student.size(-1) >= 1, "logits need a non-empty last (vocabulary) dim, got ",
                    student.sizes());
  TORCH_CHECK_VALUE(student.device().is_cpu() && teacher.device().is_cpu(), "the cpu backend takes CPU tensors, got ",
                    student.device(), " and ", teacher.device());
  DType st = to_dtype(student, "student_logits"), tt = to_dtype(teacher, "teacher_logits");
  TORCH_CHECK_TYPE((st == DType::Float64) == (tt == DType::Float64),
                   "float64 logits must be paired with float64, got ", student.scalar_type(), " and ",
                   teacher.scalar_type());
  TORCH_CHECK_VALUE(tau > 0 && tau_s > 0, "temperatures must be > 0, got ", tau, " and ", tau_s);

  DistillParams prm;
  prm.divergence = parse_divergence(std::string(divergence));
  prm.tau = tau;
  prm.tau_s = tau_s;
  prm.alpha = alpha;
  prm.beta = beta;
  prm.skew = skew;
  prm.weighting = parse_weighting(std::string(weighting));
  prm.soft_coef = soft_coef;
  prm.hard_weight = hard_weight;

  const at::Tensor s2 = as_rows(student), t2 = as_rows(teacher);
  const int64_t N = s2.size(0), V = s2.size(1);

  at::Tensor labels64;
  int64_t valid = N;
  if (labels.has_value()) {
    TORCH_CHECK_VALUE(labels->numel() == N, "labels shape ", labels->sizes(), " does not match the ", N,
                      " rows of logits shape ", student.sizes());
    TORCH_CHECK_TYPE(!at::isFloatingType(labels->scalar_type()) && labels->scalar_type() != at::kBool,
                     "labels must be an integer tensor, got ", labels->scalar_type());
    labels64 = labels->reshape({-1}).to(at::kLong).contiguous();
    const int64_t* lp = labels64.data_ptr<int64_t>();
    valid = 0;
    for (int64_t i = 0; i < N; ++i) {
      if (lp[i] == ignore_index) continue;
      TORCH_CHECK_VALUE(lp[i] >= 0 && lp[i] < V, "label ", lp[i], " at row ", i, " is outside [0, ", V,
                        ") and is not ignore_index (", ignore_index, ")");
      ++valid;
    }
  } else {
    TORCH_CHECK_VALUE(hard_weight == 0.0, "hard_weight != 0 needs labels");
  }

  at::Tensor weights64;
  if (prm.weighting == Weighting::Given) {
    TORCH_CHECK_VALUE(weights.has_value() && weights->numel() == N, "a weighting tensor must have one entry per row (",
                      N, "), got shape ", weights.has_value() ? weights->sizes() : at::IntArrayRef{});
    weights64 = weights->detach().reshape({-1}).to(at::kDouble).contiguous();
  }

  const std::string red(reduction);
  TORCH_CHECK_VALUE(red == "batchmean" || red == "sum" || red == "none", "reduction must be 'batchmean', 'sum' or "
                    "'none', got '", red, "'");
  double denom = 1.0;
  if (red == "batchmean") {
    if (normalizer.has_value()) {
      TORCH_CHECK_VALUE(*normalizer > 0, "normalizer must be > 0, got ", *normalizer);
      denom = *normalizer;
    } else {
      denom = static_cast<double>(valid);
    }
  } else {
    TORCH_CHECK_VALUE(!normalizer.has_value(), "normalizer is only used with reduction='batchmean'");
  }
  prm.inv_denom = denom > 0 ? 1.0 / denom : 0.0;

  const auto acc_dtype = st == DType::Float64 ? at::kDouble : at::kFloat;
  at::Tensor grad = compute_grad ? GradBufferCache::instance().empty(N, V, student.options()) : at::empty({0}, student.options());
  std::vector<double> row_loss(N, 0.0);
  std::vector<int32_t> row_status(N, 0);

  DistillBatch b;
  b.rows = N;
  b.vocab = V;
  b.teacher = t2.data_ptr();
  b.student = s2.data_ptr();
  b.teacher_row_stride = t2.stride(0);
  b.student_row_stride = s2.stride(0);
  b.teacher_dtype = tt;
  b.student_dtype = st;
  b.labels = labels64.defined() ? labels64.data_ptr<int64_t>() : nullptr;
  b.ignore_index = ignore_index;
  b.weights = weights64.defined() ? weights64.data_ptr<double>() : nullptr;
  b.grad = compute_grad ? grad.data_ptr() : nullptr;
  b.row_loss = row_loss.data();
  b.row_status = row_status.data();

  // Rows are independent and each is reduced in a fixed order, so results do
  // not depend on how rows are split across threads.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { distill_rows(prm, b, begin, end); });

  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(row_status[i] >= 0, "kdfast: internal error in row ", i, " (out of memory or unsupported dtypes)");
    TORCH_CHECK_VALUE(row_status[i] != kTeacherAllNegInf, "teacher_logits row ", i,
                      " is all -inf: the teacher distribution is undefined");
    TORCH_CHECK_VALUE(row_status[i] != kStudentAllNegInf, "student_logits row ", i,
                      " is all -inf: the student distribution is undefined");
  }

  at::Tensor loss;
  if (red == "none") {
    loss = at::from_blob(row_loss.data(), {N}, at::TensorOptions().dtype(at::kDouble)).to(acc_dtype, false, /*copy=*/true);
  } else {
    double total = 0.0;  // serial sum: bit-identical run to run
    for (int64_t i = 0; i < N; ++i) total += row_loss[i];
    loss = at::scalar_tensor(total * prm.inv_denom, at::TensorOptions().dtype(acc_dtype));
  }
  return {loss, grad};
}

}  // namespace kdfast

TORCH_LIBRARY(kdfast, m) {
  m.def(
      "distill_forward(Tensor student, Tensor teacher, Tensor? labels, Tensor? weights, str divergence, "
      "float tau, float tau_s, float alpha, float beta, float skew, str weighting, int ignore_index, "
      "float hard_weight, float soft_coef, str reduction, float? normalizer, bool compute_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) { m.impl("distill_forward", &kdfast::distill_forward_cpu); }

namespace {
std::string capability() { return kdfast::cpu_capability_name(kdfast::active_cpu_capability()); }
std::string supported_capability() { return kdfast::cpu_capability_name(kdfast::supported_cpu_capability()); }
std::string set_capability(const std::string& name) {
  kdfast::CpuCapability want = kdfast::CpuCapability::Default;
  if (name == "avx2") want = kdfast::CpuCapability::AVX2;
  else if (name == "avx512") want = kdfast::CpuCapability::AVX512;
  else TORCH_CHECK_VALUE(name == "default", "unknown CPU capability '", name, "'");
  return kdfast::cpu_capability_name(kdfast::set_cpu_capability(want));
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdfast fused CPU kernels";
  m.def("cpu_capability", &capability, "The SIMD capability the kernels run with.");
  m.def("supported_cpu_capability", &supported_capability, "The best SIMD capability this CPU supports.");
  m.def("set_cpu_capability", &set_capability, "Lower (or restore) the SIMD capability; returns the one in effect.");
  m.def("empty_cache", [] { kdfast::GradBufferCache::instance().clear(); },
        "Release the gradient buffers kept for reuse.");
  m.def("_check_large_row_offsets", &kdfast::check_large_row_offsets,
        "Kernel self-test: a row at an element offset beyond 2^31; returns '' when it passes.");
}
