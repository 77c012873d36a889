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

#define KDFAST_POLICY_NAME(policy, name) name,
const char* const kDivergenceNames[] = {KDFAST_FOR_EACH_DIVERGENCE(KDFAST_POLICY_NAME)};
const char* const kWeightingNames[] = {KDFAST_FOR_EACH_WEIGHTING(KDFAST_POLICY_NAME)};
#undef KDFAST_POLICY_NAME
#define KDFAST_KERNEL_PARAM_NAME(name) #name,
const char* const kKernelParamNames[] = {KDFAST_FOR_EACH_KERNEL_PARAM(KDFAST_KERNEL_PARAM_NAME)};
#undef KDFAST_KERNEL_PARAM_NAME

// The gradient goes to `grad_out` (an (N, V) buffer with rows of stride V in
// the student's dtype; it may be the student itself, see distill_forward_inplace),
// a recycled buffer when `grad_out` is undefined and `compute_grad`, or nowhere.
std::tuple<at::Tensor, at::Tensor> run_distill(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
    const c10::optional<at::Tensor>& weights, int64_t divergence, c10::ArrayRef<double> params, int64_t weighting,
    double tau, double tau_s, int64_t ignore_index, double hard_weight, double soft_coef, c10::string_view reduction,
    c10::optional<double> normalizer, bool compute_grad, const at::Tensor& grad_out, double label_revision = 0.0) {
  const auto [st, tt] = check_logits_pair(student, teacher);

  DistillParams prm;
  set_policies(prm, divergence, params, weighting);
  prm.tau = tau;
  prm.tau_s = tau_s;
  prm.soft_coef = soft_coef;
  prm.hard_weight = hard_weight;
  prm.label_revision = label_revision;

  const at::Tensor s2 = as_rows(student), t2 = as_rows(teacher);
  const int64_t N = s2.size(0), V = s2.size(1);

  at::Tensor labels64;
  int64_t valid = N;
  if (labels.has_value()) {
    std::tie(labels64, valid) = checked_labels(*labels, student, N, V, ignore_index);
  }

  at::Tensor weights64;
  if (prm.weighting == Weighting::Given) {
    TORCH_CHECK_VALUE(weights.has_value() && weights->numel() == N, "a weighting tensor must have one entry per row (",
                      N, "), got shape ", weights.has_value() ? weights->sizes() : at::IntArrayRef{});
    weights64 = weights->detach().reshape({-1}).to(at::kDouble).contiguous();
  }

  const std::string red(reduction);
  prm.inv_denom = reduction_scale(red, normalizer, valid);

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
  b.stream_grad = !grad_out.defined() && streams_gradient(grad);
  b.row_loss = rows.loss.data();
  b.row_status = rows.status.data();
  b.keep_shifted_logits = keep_shifted_logits();

  // Rows are independent and each is reduced in a fixed order, so results do
  // not depend on how rows are split across threads.
  rows.run(std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)),
           [&](int64_t begin, int64_t end) { distill_rows(prm, b, begin, end); });

  return {rows.reduced(red, prm.inv_denom, st), grad};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> distill_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
    const c10::optional<at::Tensor>& weights, int64_t divergence, c10::ArrayRef<double> params, int64_t weighting,
    double tau, double tau_s, int64_t ignore_index, double hard_weight, double soft_coef, c10::string_view reduction,
    c10::optional<double> normalizer, bool compute_grad) {
  return run_distill(student, teacher, labels, weights, divergence, params, weighting, tau, tau_s, ignore_index,
                     hard_weight, soft_coef, reduction, normalizer, compute_grad, at::Tensor());
}

// distill_forward with Label Revision of the teacher (eta = label_revision in
// (0, 1); see row_kernel.h): a separate op, as on Triton, so that the schema
// the two backends share stays as it is.
std::tuple<at::Tensor, at::Tensor> distill_forward_revised_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
    const c10::optional<at::Tensor>& weights, int64_t divergence, c10::ArrayRef<double> params, int64_t weighting,
    double tau, double tau_s, int64_t ignore_index, double hard_weight, double soft_coef, c10::string_view reduction,
    c10::optional<double> normalizer, bool compute_grad, double label_revision) {
  TORCH_CHECK_VALUE(labels.has_value(), "label_revision needs labels");
  TORCH_CHECK_VALUE(label_revision > 0.0 && label_revision < 1.0, "label_revision must be in (0, 1), got ",
                    label_revision);
  return run_distill(student, teacher, labels, weights, divergence, params, weighting, tau, tau_s, ignore_index,
                     hard_weight, soft_coef, reduction, normalizer, compute_grad, at::Tensor(), label_revision);
}

// The loss, with its student gradient written over the student logits.  The
// row kernel's last sweep reads a vector of logits before it stores the same
// vector of gradient, and no sweep reads them after, so the aliasing is safe;
// it lets a caller that no longer needs the logits (the fused linear loss's
// chunk loop) skip the (N, V) gradient buffer.
at::Tensor distill_forward_inplace_cpu(
    at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
    const c10::optional<at::Tensor>& weights, int64_t divergence, c10::ArrayRef<double> params, int64_t weighting,
    double tau, double tau_s, int64_t ignore_index, double hard_weight, double soft_coef, c10::string_view reduction,
    c10::optional<double> normalizer) {
  check_inplace_student(student, "distill_forward_inplace");
  auto [loss, grad] = run_distill(student, teacher, labels, weights, divergence, params, weighting, tau, tau_s,
                                  ignore_index, hard_weight, soft_coef, reduction, normalizer, /*compute_grad=*/true,
                                  student);
  return loss;
}

}  // namespace kdfast

// The arguments after the logits: divergence and weighting are positions in
// kdfast.registry's tables, params its kernel_params vector (see
// kdfast/ops/fused_op.py, loss_arguments); the Triton op has the same schema.
#define KDFAST_DISTILL_ARGS                                                                                    \
  "Tensor? labels, Tensor? weights, int divergence, float[] params, int weighting, float tau, float tau_s, " \
  "int ignore_index, float hard_weight, float soft_coef, str reduction, float? normalizer"

TORCH_LIBRARY(kdfast, m) {
  m.def("distill_forward(Tensor student, Tensor teacher, " KDFAST_DISTILL_ARGS
        ", bool compute_grad) -> (Tensor, Tensor)");
  m.def("distill_forward_inplace(Tensor(a!) student, Tensor teacher, " KDFAST_DISTILL_ARGS ") -> Tensor");
  m.def("distill_forward_revised(Tensor student, Tensor teacher, " KDFAST_DISTILL_ARGS
        ", bool compute_grad, float label_revision) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("distill_forward", &kdfast::distill_forward_cpu);
  m.impl("distill_forward_inplace", &kdfast::distill_forward_inplace_cpu);
  m.impl("distill_forward_revised", &kdfast::distill_forward_revised_cpu);
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
  m.def("weighting_names", [] {
    return std::vector<std::string>(std::begin(kdfast::kWeightingNames), std::end(kdfast::kWeightingNames));
  }, "The weightings of the C++ kernels, in their enum's order (kdfast.registry's table).");
  m.def("kernel_param_names", [] {
    return std::vector<std::string>(std::begin(kdfast::kKernelParamNames), std::end(kdfast::kKernelParamNames));
  }, "The entries of the ops' params vector, in order (kdfast.registry.KERNEL_PARAMS).");
  m.def("supported_cpu_capability", &supported_capability, "The best SIMD capability this CPU supports.");
  m.def("set_cpu_capability", &set_capability, "Lower (or restore) the SIMD capability; returns the one in effect.");
  m.def("keep_shifted_logits", [] { return kdfast::keep_shifted_logits(); },
        "Whether the row kernels keep a 16-bit row's shifted logits in scratch (else they reload the logits).");
  m.def("set_keep_shifted_logits", [](int keep) { return kdfast::set_keep_shifted_logits(keep); },
        "Keep (1) or reload (0) a 16-bit row's shifted logits, or restore the CPU's default (-1); returns the one in effect.");
  m.def("gradient_streaming_thresholds", [] {
    return std::make_tuple(kdfast::kStreamGradMinBytes, kdfast::kStreamRowMinBytes);
  }, "(bytes, row bytes): a gradient at least this large, of rows at least this long, is written with streaming stores.");
  m.def("empty_cache", [] { return kdfast::GradBufferCache::instance().clear(); },
        "Release the gradient buffers kept for reuse; returns their bytes.");
  m.def("_vector_math", [](const std::string& fn, const std::string& capability, const at::Tensor& x) {
    static const char* const names[] = {
#define KDFAST_VECTOR_FN_NAME(name, text, function) text,
        KDFAST_FOR_EACH_VECTOR_FN(KDFAST_VECTOR_FN_NAME)
#undef KDFAST_VECTOR_FN_NAME
    };
    int index = -1;
    for (int i = 0; i < static_cast<int>(kdfast::VectorFn::Count); ++i)
      if (fn == names[i]) index = i;
    TORCH_CHECK_VALUE(index >= 0, "unknown vector function '", fn, "'");
    kdfast::CpuCapability want = kdfast::CpuCapability::Default;
    TORCH_CHECK_VALUE(kdfast::parse_cpu_capability(capability.c_str(), &want), "unknown CPU capability '",
                      capability, "'");
    TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "_vector_math takes float32, got ", x.scalar_type());
    const at::Tensor in = x.contiguous();
    at::Tensor out = at::empty_like(in);
    const auto got = kdfast::vector_math(want, static_cast<kdfast::VectorFn>(index), in.data_ptr<float>(),
                                         out.data_ptr<float>(), in.numel());
    return std::make_tuple(out, std::string(kdfast::cpu_capability_name(got)));
  }, "Test hook: a SIMD math function of the kernels (vec.h) on float32 entries, at a capability; "
     "returns (result, the capability used).");
  m.def("_check_large_row_offsets", &kdfast::check_large_row_offsets,
        "Kernel self-test: a row at an element offset beyond 2^31; returns '' when it passes.");
}
