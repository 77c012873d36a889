// The fused distillation op on CPU tensors: input checks, the parallel loop
// over rows, and the deterministic reduction of the per-row losses.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kernels/kernel_api.h"
#include "kernels/selftest.h"
#include "op_common.h"

namespace kdfast {
namespace {

constexpr size_t kStreamGradMinBytes = size_t(64) << 20;

#define KDFAST_DIVERGENCE_NAME(policy, name) name,
const char* const kDivergenceNames[] = {KDFAST_FOR_EACH_DIVERGENCE(KDFAST_DIVERGENCE_NAME)};
#undef KDFAST_DIVERGENCE_NAME

Divergence parse_divergence(const std::string& name) {
  const auto& names = kDivergenceNames;
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

// The gradient goes to `grad_out` (an (N, V) buffer with rows of stride V in
// the student's dtype; it may be the student itself, see distill_forward_inplace),
// a recycled buffer when `grad_out` is undefined and `compute_grad`, or nowhere.
std::tuple<at::Tensor, at::Tensor> run_distill(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
    const c10::optional<at::Tensor>& weights, c10::string_view divergence, double tau, double tau_s, double alpha,
    double beta, double skew, c10::string_view weighting, int64_t ignore_index, double hard_weight, double soft_coef,
    c10::string_view reduction, c10::optional<double> normalizer, bool compute_grad, const at::Tensor& grad_out) {
  const auto [st, tt] = check_logits_pair(student, teacher);
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
    std::tie(labels64, valid) = checked_labels(*labels, student, N, V, ignore_index);
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

  at::Tensor grad = grad_out.defined() ? grad_out : grad_buffer(compute_grad, N, V, student);
  RowResults rows(N);

  DistillBatch b;
  set_logits(b, s2, t2, st, tt);
  b.labels = labels64.defined() ? labels64.data_ptr<int64_t>() : nullptr;
  b.ignore_index = ignore_index;
  b.weights = weights64.defined() ? weights64.data_ptr<double>() : nullptr;
  b.grad = grad.numel() ? grad.data_ptr() : nullptr;
  // A gradient that outgrows the caches is written around them (the caller
  // reads it long after); a small one stays cached for the ops that follow.
  // Not over the student logits: the row's next load would hit a line that a
  // streamed half-line has just taken out of the cache.
  b.stream_grad = !grad_out.defined() && grad.nbytes() >= kStreamGradMinBytes;
  b.row_loss = rows.loss.data();
  b.row_status = rows.status.data();

  // Rows are independent and each is reduced in a fixed order, so results do
  // not depend on how rows are split across threads.
  rows.run(std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)),
           [&](int64_t begin, int64_t end) { distill_rows(prm, b, begin, end); });

  if (red == "none") {
    at::Tensor per_row = at::from_blob(rows.loss.data(), {N}, at::TensorOptions().dtype(at::kDouble));
    return {per_row.to(loss_dtype(st), false, /*copy=*/true), grad};
  }
  return {rows.scalar(prm.inv_denom, st), grad};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> distill_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
    const c10::optional<at::Tensor>& weights, c10::string_view divergence, double tau, double tau_s, double alpha,
    double beta, double skew, c10::string_view weighting, int64_t ignore_index, double hard_weight, double soft_coef,
    c10::string_view reduction, c10::optional<double> normalizer, bool compute_grad) {
  return run_distill(student, teacher, labels, weights, divergence, tau, tau_s, alpha, beta, skew, weighting,
                     ignore_index, hard_weight, soft_coef, reduction, normalizer, compute_grad, at::Tensor());
}

// The loss, with its student gradient written over the student logits.  The
// row kernel's last sweep reads a vector of logits before it stores the same
// vector of gradient, and no sweep reads them after, so the aliasing is safe;
// it lets a caller that no longer needs the logits (the fused linear loss's
// chunk loop) skip the (N, V) gradient buffer.
at::Tensor distill_forward_inplace_cpu(
    at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
    const c10::optional<at::Tensor>& weights, c10::string_view divergence, double tau, double tau_s, double alpha,
    double beta, double skew, c10::string_view weighting, int64_t ignore_index, double hard_weight, double soft_coef,
    c10::string_view reduction, c10::optional<double> normalizer) {
  TORCH_CHECK_VALUE(student.dim() == 2 && student.is_contiguous(),
                    "distill_forward_inplace needs contiguous (N, V) student logits, got shape ", student.sizes(),
                    " and strides ", student.strides());
  auto [loss, grad] = run_distill(student, teacher, labels, weights, divergence, tau, tau_s, alpha, beta, skew,
                                  weighting, ignore_index, hard_weight, soft_coef, reduction, normalizer,
                                  /*compute_grad=*/true, student);
  return loss;
}

}  // namespace kdfast

TORCH_LIBRARY(kdfast, m) {
  m.def(
      "distill_forward(Tensor student, Tensor teacher, Tensor? labels, Tensor? weights, str divergence, "
      "float tau, float tau_s, float alpha, float beta, float skew, str weighting, int ignore_index, "
      "float hard_weight, float soft_coef, str reduction, float? normalizer, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "distill_forward_inplace(Tensor(a!) student, Tensor teacher, Tensor? labels, Tensor? weights, str divergence, "
      "float tau, float tau_s, float alpha, float beta, float skew, str weighting, int ignore_index, "
      "float hard_weight, float soft_coef, str reduction, float? normalizer) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("distill_forward", &kdfast::distill_forward_cpu);
  m.impl("distill_forward_inplace", &kdfast::distill_forward_inplace_cpu);
}

namespace {
std::string capability() { return kdfast::cpu_capability_name(kdfast::active_cpu_capability()); }
std::string supported_capability() { return kdfast::cpu_capability_name(kdfast::supported_cpu_capability()); }
std::string set_capability(const std::string& name) {
  kdfast::CpuCapability want = kdfast::CpuCapability::Default;
  TORCH_CHECK_VALUE(kdfast::parse_cpu_capability(name.c_str(), &want), "unknown CPU capability '", name, "'");
  return kdfast::cpu_capability_name(kdfast::set_cpu_capability(want));
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdfast fused CPU kernels";
  m.def("cpu_capability", &capability, "The SIMD capability the kernels run with.");
  m.def("divergence_names", [] {
    return std::vector<std::string>(std::begin(kdfast::kDivergenceNames), std::end(kdfast::kDivergenceNames));
  }, "The divergences of the C++ kernels, in their enum's order (kdfast.registry's table).");
  m.def("supported_cpu_capability", &supported_capability, "The best SIMD capability this CPU supports.");
  m.def("set_cpu_capability", &set_capability, "Lower (or restore) the SIMD capability; returns the one in effect.");
  m.def("empty_cache", [] { kdfast::GradBufferCache::instance().clear(); },
        "Release the gradient buffers kept for reuse.");
  m.def("_check_large_row_offsets", &kdfast::check_large_row_offsets,
        "Kernel self-test: a row at an element offset beyond 2^31; returns '' when it passes.");
}
