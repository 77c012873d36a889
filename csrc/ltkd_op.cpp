// The fused CPU ops of long-tailed KD (kernels/ltkd_api.h):
//   ltkd_forward: the loss (reduced, or per row) and the student gradient, written in the forward;
//   ltkd_teacher_group_log_masses: the teacher's (N, G) group log-masses, the input of the batch prior.
// The options were validated in Python (kdfast.longtail); the checks here guard memory.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <vector>

#include "kernels/ltkd_api.h"
#include "op_common.h"

namespace kdfast {
namespace {

// The class -> group map as the kernels read it: (V,) float ids, each checked to be in [0, G).
at::Tensor float_group_ids(const at::Tensor& groups, int64_t num_groups, int64_t V) {
  TORCH_CHECK_VALUE(num_groups >= 1 && num_groups <= kLtkdMaxGroups, "the fused LTKD kernels take 1 to ",
                    kLtkdMaxGroups, " groups, got num_groups = ", num_groups);
  TORCH_CHECK_TYPE(!at::isFloatingType(groups.scalar_type()) && groups.scalar_type() != at::kBool,
                   "groups must hold integer group ids, got ", groups.scalar_type());
  TORCH_CHECK_VALUE(groups.dim() == 1 && groups.numel() == V, "groups must have one group id per class: shape ",
                    groups.sizes(), " for ", V, " classes");
  const at::Tensor ids = groups.to(at::kLong).contiguous();
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t c = 0; c < V; ++c)
    TORCH_CHECK_VALUE(p[c] >= 0 && p[c] < num_groups, "groups[", c, "] = ", p[c], " is outside [0, ", num_groups,
                      ")");
  return ids.to(at::kFloat);
}

LtkdBatch make_batch(const at::Tensor& s2, const at::Tensor& t2, DType st, DType tt, const at::Tensor& group_of,
                     int64_t num_groups) {
  LtkdBatch b;
  set_logits(b, s2, t2, st, tt);
  b.groups = static_cast<int>(num_groups);
  b.group_of = group_of.data_ptr<float>();
  return b;
}

// Rows per parallel task: about 16k logits of work each.
int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> ltkd_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                    const at::Tensor& groups, int64_t num_groups,
                                                    const c10::optional<at::Tensor>& log_prior, double tau,
                                                    double inter_weight, double intra_weight, bool teacher_weighting,
                                                    const std::string& reduction, bool compute_grad) {
  const auto [st, tt] = check_logits_pair(student, teacher);
  const at::Tensor s2 = as_rows(student), t2 = as_rows(teacher);
  const int64_t N = s2.size(0), V = s2.size(1);
  const at::Tensor group_of = float_group_ids(groups, num_groups, V);
  at::Tensor prior64;
  LtkdParams prm;
  if (log_prior.has_value()) {
    TORCH_CHECK_VALUE(log_prior->numel() == num_groups, "log_prior must have one entry per group (", num_groups,
                      "), got shape ", log_prior->sizes());
    prior64 = log_prior->reshape({num_groups}).to(at::kCPU, at::kDouble).contiguous();
    prm.log_prior = prior64.data_ptr<double>();
  }
  prm.tau = tau;
  prm.inter_weight = inter_weight;
  prm.intra_weight = intra_weight;
  prm.teacher_weighting = teacher_weighting;
  // batchmean divides by every row (the reference's N, NaN rows included)
  prm.grad_scale = reduction_scale(reduction, c10::nullopt, N);
  at::Tensor grad = grad_buffer(compute_grad, N, V, student);
  RowResults rows(N);
  LtkdBatch b = make_batch(s2, t2, st, tt, group_of, num_groups);
  b.grad = compute_grad ? grad.data_ptr() : nullptr;
  b.stream_grad = compute_grad && streams_gradient(grad);
  b.row_loss = rows.loss.data();
  b.row_status = rows.status.data();
  rows.run(row_grain(V), [&](int64_t lo, int64_t hi) { ltkd_rows(prm, b, lo, hi); });
  return {rows.reduced(reduction, prm.grad_scale, st), grad};
}

at::Tensor ltkd_teacher_group_log_masses_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                             const at::Tensor& groups, int64_t num_groups, double tau) {
  const auto [st, tt] = check_logits_pair(student, teacher);
  const at::Tensor s2 = as_rows(student), t2 = as_rows(teacher);
  const int64_t N = s2.size(0), V = s2.size(1);
  const at::Tensor group_of = float_group_ids(groups, num_groups, V);
  LtkdParams prm;
  prm.tau = tau;
  at::Tensor out = at::empty({N, num_groups}, at::TensorOptions().dtype(at::kDouble));
  std::vector<int32_t> status(size_t(N), 0);
  LtkdBatch b = make_batch(s2, t2, st, tt, group_of, num_groups);
  b.teacher_log_mass = out.data_ptr<double>();
  b.row_status = status.data();
  at::parallel_for(0, N, row_grain(V), [&](int64_t lo, int64_t hi) { ltkd_teacher_groups_rows(prm, b, lo, hi); });
  check_row_status(status);
  return out;
}

}  // namespace kdfast

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  m.def("ltkd_forward(Tensor student, Tensor teacher, Tensor groups, int num_groups, Tensor? log_prior, float tau, "
        "float inter_weight, float intra_weight, bool teacher_weighting, str reduction, bool compute_grad) "
        "-> (Tensor, Tensor)");
  m.def("ltkd_teacher_group_log_masses(Tensor student, Tensor teacher, Tensor groups, int num_groups, float tau) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("ltkd_forward", &kdfast::ltkd_forward_cpu);
  m.impl("ltkd_teacher_group_log_masses", &kdfast::ltkd_teacher_group_log_masses_cpu);
}
