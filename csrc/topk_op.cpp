// The fused top-k distillation op on CPU tensors (kdfast/ops/topk.py calls
// it): the student's dense logits against the teacher's top-k log-probabilities,
// the loss and the student gradient in one pass over the logits.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/topk_api.h"
#include "op_common.h"

namespace kdfast {
namespace {

// The error of the first refused row, with the offending entry for the index checks (found again here:
// the kernel only marks the row).
void check_topk_status(const std::vector<int32_t>& status, const at::Tensor& indices, int64_t V, bool bucket) {
  for (size_t i = 0; i < status.size(); ++i) {
    if (status[i] == kRowOk) continue;
    const int64_t k = indices.size(1);
    const int64_t* row = indices.data_ptr<int64_t>() + int64_t(i) * k;
    if (status[i] == kIndexOutOfRange) {
      const int64_t* bad = std::find_if(row, row + k, [V](int64_t v) { return v < 0 || v >= V; });
      TORCH_CHECK_VALUE(false, "topk_indices value ", *bad, " at row ", i, " is outside [0, ", V, ")");
    }
    if (status[i] == kIndexRepeated) {
      std::vector<int64_t> sorted(row, row + k);
      std::sort(sorted.begin(), sorted.end());
      const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
      TORCH_CHECK_VALUE(false, "topk_indices row ", i, " repeats index ", *dup, ": the k entries must be distinct");
    }
    TORCH_CHECK_VALUE(status[i] != kTeacherAllNegInf, "topk_logprobs row ", i,
                      bucket ? " (with its tail) is all -inf: the teacher distribution is undefined"
                             : " is all -inf: the renormalised teacher is undefined");
    TORCH_CHECK_VALUE(status[i] != kStudentAllNegInf, "student_logits row ", i,
                      bucket ? " is all -inf: the student distribution is undefined"
                             : " is all -inf on its top-k support: the student is undefined");
    TORCH_CHECK(false, "kdfast: internal error in row ", i, " (out of memory or unsupported dtypes)");
  }
}

std::tuple<at::Tensor, at::Tensor> run_topk(
    const at::Tensor& student, const at::Tensor& indices, const at::Tensor& teacher, bool bucket,
    const c10::optional<at::Tensor>& labels, int64_t divergence, c10::ArrayRef<double> params, double tau,
    double tau_s, int64_t ignore_index, double hard_weight, double soft_coef, c10::string_view reduction,
    c10::optional<double> normalizer, bool compute_grad, const at::Tensor& grad_out) {
  TORCH_CHECK_VALUE(student.dim() >= 1 && student.size(-1) >= 1,
                    "student_logits need a non-empty last (vocabulary) dim, got ", student.sizes());
  TORCH_CHECK_VALUE(student.device().is_cpu() && indices.device().is_cpu() && teacher.device().is_cpu(),
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
  const at::ScalarType teacher_type = st == DType::Float64 ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(teacher.scalar_type() == teacher_type, "the top-k op's teacher rows must be ",
                   teacher_type, " for ", student.scalar_type(), " student logits, got ", teacher.scalar_type());
  TORCH_CHECK_VALUE(teacher.dim() == 2 && teacher.size(0) == N && teacher.size(1) == k + (bucket ? 1 : 0),
                    "the top-k op's teacher rows must be (", N, ", ", k + (bucket ? 1 : 0), "), got ",
                    teacher.sizes());
  const at::Tensor t2 = teacher.contiguous();

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
  b.teacher = t2.data_ptr();
  b.teacher_dtype = st == DType::Float64 ? DType::Float64 : DType::Float32;
  b.bucket = bucket;
  b.labels = labels64.defined() ? labels64.data_ptr<int64_t>() : nullptr;
  b.ignore_index = ignore_index;
  b.grad = grad.numel() ? grad.data_ptr() : nullptr;
  b.stream_grad = !grad_out.defined() && streams_gradient(grad);
  b.row_loss = rows.loss.data();
  b.row_status = rows.status.data();

  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / V), [&](int64_t lo, int64_t hi) { topk_rows(prm, b, lo, hi); });
  check_topk_status(rows.status, idx, V, bucket);

  return {rows.reduced(red, prm.inv_denom, st), grad};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_distill_forward_cpu(
    const at::Tensor& student, const at::Tensor& indices, const at::Tensor& teacher, bool bucket,
    const c10::optional<at::Tensor>& labels, int64_t divergence, c10::ArrayRef<double> params, double tau,
    double tau_s, int64_t ignore_index, double hard_weight, double soft_coef, c10::string_view reduction,
    c10::optional<double> normalizer, bool compute_grad) {
  return run_topk(student, indices, teacher, bucket, labels, divergence, params, tau, tau_s, ignore_index,
                  hard_weight, soft_coef, reduction, normalizer, compute_grad, at::Tensor());
}

// The loss, its gradient written over the student logits (the fused linear
// loss's chunks): each row's sweeps read it before its last sweep overwrites
// it vector by vector, and the support and label entries it needs after are
// read first.
at::Tensor topk_distill_forward_inplace_cpu(
    at::Tensor& student, const at::Tensor& indices, const at::Tensor& teacher, bool bucket,
    const c10::optional<at::Tensor>& labels, int64_t divergence, c10::ArrayRef<double> params, double tau,
    double tau_s, int64_t ignore_index, double hard_weight, double soft_coef, c10::string_view reduction,
    c10::optional<double> normalizer) {
  check_inplace_student(student, "topk_distill_forward_inplace");
  auto [loss, grad] = run_topk(student, indices, teacher, bucket, labels, divergence, params, tau, tau_s,
                               ignore_index, hard_weight, soft_coef, reduction, normalizer, /*compute_grad=*/true,
                               student);
  return loss;
}

}  // namespace kdfast

#define KDFAST_TOPK_ARGS                                                                                         \
  "Tensor indices, Tensor teacher, bool bucket, Tensor? labels, int divergence, float[] params, float tau, "   \
  "float tau_s, int ignore_index, float hard_weight, float soft_coef, str reduction, float? normalizer"

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  m.def("topk_distill_forward(Tensor student, " KDFAST_TOPK_ARGS ", bool compute_grad) -> (Tensor, Tensor)");
  m.def("topk_distill_forward_inplace(Tensor(a!) student, " KDFAST_TOPK_ARGS ") -> Tensor");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("topk_distill_forward", &kdfast::topk_distill_forward_cpu);
  m.impl("topk_distill_forward_inplace", &kdfast::topk_distill_forward_inplace_cpu);
}
