// The fused CPU op of Grouped KD, kdfast::grouped_kd_forward: the row kernel of
// kernels/grouped_kd_api.h over the rows in parallel, then the deterministic
// final sum (RowResults).  Returns (loss, student gradient) like dkd_forward;
// the options were validated in Python (kdfast.grouped_kd), the checks here
// guard memory and the kernel's assumptions.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#include "kernels/grouped_kd_api.h"
#include "op_common.h"

namespace kdfast {

std::tuple<at::Tensor, at::Tensor> grouped_kd_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                          const c10::optional<at::Tensor>& labels, double tau,
                                                          double primary_mass, double primary_weight,
                                                          double binary_weight, double group_tau, int64_t ignore_index,
                                                          c10::string_view reduction, bool compute_grad) {
  const auto [st, tt] = check_logits_pair(student, teacher);
  TORCH_CHECK_VALUE(tau > 0 && group_tau > 0 && primary_mass > 0 && primary_mass <= 1,
                    "grouped_kd_forward needs temperature > 0, group_temperature > 0 and primary_mass in (0, 1], got ",
                    tau, ", ", group_tau, ", ", primary_mass);
  const at::Tensor s2 = as_rows(student), t2 = as_rows(teacher);
  const int64_t N = s2.size(0), V = s2.size(1);
  at::Tensor labels64;
  int64_t valid = N;
  if (labels.has_value()) std::tie(labels64, valid) = checked_labels(*labels, student, N, V, ignore_index);
  const std::string red(reduction);
  GroupedKdParams prm;
  prm.tau = tau;
  prm.group_tau = group_tau;
  prm.primary_mass = primary_mass;
  prm.primary_weight = primary_weight;
  prm.binary_weight = binary_weight;
  prm.inv_denom = reduction_scale(red, c10::nullopt, valid);
  at::Tensor grad = grad_buffer(compute_grad, N, V, student);
  RowResults rows(N);
  GroupedKdBatch b;
  set_logits(b, s2, t2, st, tt);
  b.labels = labels.has_value() ? labels64.data_ptr<int64_t>() : nullptr;
  b.ignore_index = ignore_index;
  b.grad = compute_grad ? grad.data_ptr() : nullptr;
  b.stream_grad = compute_grad && streams_gradient(grad);
  b.row_loss = rows.loss.data();
  b.row_status = rows.status.data();
  rows.run(std::max<int64_t>(1, 16384 / V), [&](int64_t lo, int64_t hi) { grouped_kd_rows(prm, b, lo, hi); });
  return {rows.reduced(red, prm.inv_denom, st), grad};
}

}  // namespace kdfast

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  m.def("grouped_kd_forward(Tensor student, Tensor teacher, Tensor? labels, float tau, float primary_mass, "
        "float primary_weight, float binary_weight, float group_tau, int ignore_index, str reduction, "
        "bool compute_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) { m.impl("grouped_kd_forward", &kdfast::grouped_kd_forward_cpu); }
