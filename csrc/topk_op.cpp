// The fused top-k distillation op on CPU tensors (kdfast/ops/topk.py calls
// it): the student's dense logits against the teacher's top-k log-probabilities,
// the loss and the student gradient in one pass over the logits.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <iomanip>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/topk_api.h"
#include "op_common.h"

namespace kdfast {
namespace {

// The op's inputs as check_topk_status reads them.
struct TopkInputs {
  const at::Tensor& indices;    // (N, k) int64
  const at::Tensor& logprobs;   // (N, k)
  const at::Tensor* tail;       // (N,) or null
  at::ScalarType teacher_type;  // what the kernel rounded the log-probs to before checking them
  double mass_tolerance;
  int64_t V;
  bool bucket;
};

// The first entry of `values` (rounded as the kernel rounded it) for which bad(entry) holds.
template <class Bad>
std::optional<double> first_failing(const at::Tensor& values, at::ScalarType as, Bad&& bad) {
  const at::Tensor read = values.reshape({-1}).to(as).to(at::kDouble).contiguous();
  const double* v = read.data_ptr<double>();
  const double* hit = std::find_if(v, v + read.numel(), bad);
  return hit == v + read.numel() ? std::nullopt : std::optional<double>(*hit);
}

// The first refused row's error, row numbers counted from first_row (a chunk's first row in the
// whole call).  The kernel only marks the row: the offending entry is found again here.
void check_topk_status(const RowResults& rows, const TopkInputs& in, int64_t first_row) {
  const std::vector<int32_t>& status = rows.status;
  for (size_t r = 0; r < status.size(); ++r) {
    if (status[r] == kRowOk) continue;
    const int64_t i = first_row + int64_t(r);
    const int64_t k = in.indices.size(1);
    const int64_t* row = in.indices.data_ptr<int64_t>() + int64_t(r) * k;
    if (status[r] == kIndexOutOfRange) {
      const int64_t V = in.V;
      const int64_t* bad = std::find_if(row, row + k, [V](int64_t v) { return v < 0 || v >= V; });
      TORCH_CHECK_VALUE(false, "topk_indices value ", *bad, " at row ", i, " is outside [0, ", V, ")");
    }
    if (status[r] == kIndexRepeated) {
      std::vector<int64_t> sorted(row, row + k);
      std::sort(sorted.begin(), sorted.end());
      const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
      TORCH_CHECK_VALUE(false, "topk_indices row ", i, " repeats index ", *dup, ": the k entries must be distinct");
    }
    // the log-prob checks of check_topk_logprobs (kdfast/llm/topk.py), with its messages
    if (status[r] == kLogprobNotFinite || status[r] == kLogprobPositive) {
      const bool finiteness = status[r] == kLogprobNotFinite;
      const double tol = in.teacher_type == at::kFloat ? double(float(in.mass_tolerance)) : in.mass_tolerance;
      auto bad = [&](double v) { return finiteness ? std::isnan(v) || v == INFINITY : v > tol; };
      const char* name = "topk_logprobs";
      std::optional<double> value = first_failing(in.logprobs[int64_t(r)], in.teacher_type, bad);
      if (!value && in.tail) {
        name = "tail_logprobs";
        value = first_failing((*in.tail)[int64_t(r)], in.teacher_type, bad);
      }
      TORCH_CHECK_VALUE(!finiteness, name, " must be finite or -inf, row ", i, " has ", value.value_or(NAN));
      TORCH_CHECK_VALUE(false, name, " are log-probabilities and must be <= 0, row ", i, " has ",
                        value.value_or(NAN));
    }
    if (status[r] == kMassOverOne) {
      std::ostringstream mass;
      mass << std::setprecision(6) << rows.loss[r];
      TORCH_CHECK_VALUE(false, "topk_logprobs row ", i, in.tail ? " (with tail_logprobs)" : "",
                        " holds probability mass ", mass.str(),
                        " > 1: they must be the teacher's log-probabilities (log_softmax over the full "
                        "vocabulary, then top-k), not logits");
    }
    TORCH_CHECK_VALUE(status[r] != kTeacherAllNegInf, "topk_logprobs row ", i,
                      in.bucket ? " (with its tail) is all -inf: the teacher distribution is undefined"
                                : " is all -inf: the renormalised teacher is undefined");
    TORCH_CHECK_VALUE(status[r] != kStudentAllNegInf, "student_logits row ", i,
                      in.bucket ? " is all -inf: the student distribution is undefined"
                                : " is all -inf on its top-k support: the student is undefined");
    TORCH_CHECK(false, "kdfast: internal error in row ", i, " (out of memory or unsupported dtypes)");
  }
}

std::tuple<at::Tensor, at::Tensor> run_topk(
    const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
    const c10::optional<at::Tensor>& tail_logprobs, double mass_tolerance, double empty_bucket_below, bool bucket,
    const c10::optional<at::Tensor>& labels, int64_t divergence, c10::ArrayRef<double> params, double tau,
    double tau_s, int64_t ignore_index, double hard_weight, double soft_coef, c10::string_view reduction,
    c10::optional<double> normalizer, int64_t first_row, bool compute_grad, const at::Tensor& grad_out) {
  TORCH_CHECK_VALUE(student.dim() >= 1 && student.size(-1) >= 1,
                    "student_logits need a non-empty last (vocabulary) dim, got ", student.sizes());
  TORCH_CHECK_VALUE(student.device().is_cpu() && indices.device().is_cpu() && logprobs.device().is_cpu() &&
                        (!tail_logprobs.has_value() || tail_logprobs->device().is_cpu()),
                    "the cpu backend takes CPU tensors");
  const DType st = to_dtype(student, "student_logits");
  const at::Tensor s2 = as_rows(student);
  const int64_t N = s2.size(0), V = s2.size(1);
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == N && indices.size(1) >= 1 && indices.size(1) <= V,
                    "topk_indices must be (", N, ", k) with 1 <= k <= ", V, ", got ", indices.sizes());
  const int64_t k = indices.size(1);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
                   "topk_indices must be int32 or int64, got ", indices.scalar_type());
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  TORCH_CHECK_VALUE(logprobs.sizes() == indices.sizes(), "topk_logprobs must be (", N, ", ", k, "), got ",
                    logprobs.sizes());
  const DType lt = to_dtype(logprobs, "topk_logprobs");
  const at::Tensor lp = logprobs.contiguous();
  at::Tensor tail;
  if (tail_logprobs.has_value()) {
    TORCH_CHECK_VALUE(bucket, "tail_logprobs is the teacher's bucket: it needs the bucket tail");
    TORCH_CHECK_VALUE(tail_logprobs->numel() == N, "tail_logprobs must hold one value per row (", N, "), got ",
                      tail_logprobs->sizes());
    tail = tail_logprobs->reshape({N}).contiguous();
  }
  const at::ScalarType teacher_type = st == DType::Float64 ? at::kDouble : at::kFloat;

  DistillParams prm;
  set_policies(prm, divergence, params, static_cast<int64_t>(Weighting::None));
  prm.tau = tau;
  prm.tau_s = tau_s;
  prm.soft_coef = soft_coef;
  prm.hard_weight = hard_weight;

  at::Tensor labels64;
  int64_t valid = N;
  if (labels.has_value()) std::tie(labels64, valid) = checked_labels(*labels, student, N, V, ignore_index);
  const std::string red(reduction);
  prm.inv_denom = reduction_scale(red, normalizer, valid);

  at::Tensor grad = grad_out.defined() ? grad_out : grad_buffer(compute_grad, N, V, student);
  RowResults rows(N);
  TopkBatch b;
  b.rows = N;
  b.vocab = V;
  b.k = k;
  b.student = s2.data_ptr();
  b.student_row_stride = s2.stride(0);
  b.student_dtype = st;
  b.indices = idx.data_ptr<int64_t>();
  b.logprobs = lp.data_ptr();
  b.logprob_dtype = lt;
  if (tail.defined()) {
    b.tail_logprobs = tail.data_ptr();
    b.tail_dtype = to_dtype(tail, "tail_logprobs");
  }
  b.mass_tolerance = mass_tolerance;
  b.empty_bucket_below = empty_bucket_below;
  b.bucket = bucket;
  b.labels = labels64.defined() ? labels64.data_ptr<int64_t>() : nullptr;
  b.ignore_index = ignore_index;
  b.grad = grad.numel() ? grad.data_ptr() : nullptr;
  b.stream_grad = !grad_out.defined() && streams_gradient(grad);
  b.row_loss = rows.loss.data();
  b.row_status = rows.status.data();

  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / V), [&](int64_t lo, int64_t hi) { topk_rows(prm, b, lo, hi); });
  check_topk_status(rows, TopkInputs{idx, lp, tail.defined() ? &tail : nullptr, teacher_type, mass_tolerance, V, bucket},
                    first_row);

  return {rows.reduced(red, prm.inv_denom, st), grad};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_distill_forward_cpu(
    const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
    const c10::optional<at::Tensor>& tail_logprobs, double mass_tolerance, double empty_bucket_below, bool bucket,
    const c10::optional<at::Tensor>& labels, int64_t divergence, c10::ArrayRef<double> params, double tau,
    double tau_s, int64_t ignore_index, double hard_weight, double soft_coef, c10::string_view reduction,
    c10::optional<double> normalizer, int64_t first_row, bool compute_grad) {
  return run_topk(student, indices, logprobs, tail_logprobs, mass_tolerance, empty_bucket_below, bucket, labels,
                  divergence, params, tau, tau_s, ignore_index, hard_weight, soft_coef, reduction, normalizer,
                  first_row, compute_grad, at::Tensor());
}

// The loss, its gradient written over the student logits (the fused linear
// loss's chunks): each row's sweeps read it before its last sweep overwrites
// it vector by vector, and the support and label entries it needs after are
// read first.
at::Tensor topk_distill_forward_inplace_cpu(
    at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
    const c10::optional<at::Tensor>& tail_logprobs, double mass_tolerance, double empty_bucket_below, bool bucket,
    const c10::optional<at::Tensor>& labels, int64_t divergence, c10::ArrayRef<double> params, double tau,
    double tau_s, int64_t ignore_index, double hard_weight, double soft_coef, c10::string_view reduction,
    c10::optional<double> normalizer, int64_t first_row) {
  check_inplace_student(student, "topk_distill_forward_inplace");
  auto [loss, grad] = run_topk(student, indices, logprobs, tail_logprobs, mass_tolerance, empty_bucket_below,
                               bucket, labels, divergence, params, tau, tau_s, ignore_index, hard_weight, soft_coef,
                               reduction, normalizer, first_row, /*compute_grad=*/true, student);
  return loss;
}

}  // namespace kdfast

#define KDFAST_TOPK_ARGS                                                                                     \
  "Tensor indices, Tensor logprobs, Tensor? tail_logprobs, float mass_tolerance, float empty_bucket_below, "  \
  "bool bucket, Tensor? labels, int divergence, float[] params, float tau, float tau_s, int ignore_index, "   \
  "float hard_weight, float soft_coef, str reduction, float? normalizer, int first_row"

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  m.def("topk_distill_forward(Tensor student, " KDFAST_TOPK_ARGS ", bool compute_grad) -> (Tensor, Tensor)");
  m.def("topk_distill_forward_inplace(Tensor(a!) student, " KDFAST_TOPK_ARGS ") -> Tensor");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("topk_distill_forward", &kdfast::topk_distill_forward_cpu);
  m.impl("topk_distill_forward_inplace", &kdfast::topk_distill_forward_inplace_cpu);
}
