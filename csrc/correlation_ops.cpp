// The fused CPU ops of the correlation and decoupled losses: DIST (the three
// parallel stages of kernels/dist_api.h), DKD and Pearson + Spearman matching
// (one row kernel each, kernels/dkd_api.h, kernels/correlation_api.h) and their deterministic final sums.
// The options were validated in Python (kdfast.correlation_losses); the checks here guard memory.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels/correlation_api.h"
#include "kernels/dist_api.h"
#include "kernels/dkd_api.h"
#include "op_common.h"

namespace kdfast {

std::tuple<at::Tensor, at::Tensor> dist_forward_cpu(const at::Tensor& student, const at::Tensor& teacher, double tau,
                                                    double beta, double gamma, bool compute_grad) {
  const auto [st, tt] = check_logits_pair(student, teacher);
  const at::Tensor s2 = as_rows(student), t2 = as_rows(teacher);
  const int64_t N = s2.size(0), V = s2.size(1);
  TORCH_CHECK_VALUE(N >= 1, "dist_loss needs at least one row, got logits shape ", student.sizes());

  DistParams prm;
  prm.tau = tau;
  prm.beta = beta;
  prm.gamma = gamma;
  const auto acc = loss_dtype(st);
  std::vector<double> per_row(8 * size_t(N));
  std::vector<int32_t> status(N, 0);
  const int64_t blocks = (V + kDistColumnBlock - 1) / kDistColumnBlock;
  std::vector<double> block_rho(blocks, 0.0);
  at::Tensor col_coef = at::empty({6, V}, at::TensorOptions().dtype(acc));
  at::Tensor grad = grad_buffer(compute_grad, N, V, student);

  DistBatch b;
  set_logits(b, s2, t2, st, tt);
  double* p = per_row.data();
  b.max_t = p;
  b.max_s = p + N;
  b.log_sum_t = p + 2 * N;
  b.log_sum_s = p + 3 * N;
  b.row_rho = p + 4 * N;
  b.row_coef_t = p + 5 * N;
  b.row_coef_s = p + 6 * N;
  b.row_status = status.data();
  b.col_coef = col_coef.data_ptr();
  b.block_rho = block_rho.data();
  b.grad = compute_grad ? grad.data_ptr() : nullptr;

  const int64_t row_grain = std::max<int64_t>(1, 16384 / V);
  at::parallel_for(0, N, row_grain, [&](int64_t lo, int64_t hi) { dist_row_stats(prm, b, lo, hi); });
  check_row_status(status);
  // The columns couple every row: one NaN or +inf logit (a NaN row sum) makes the loss and the whole gradient NaN.
  for (int64_t i = 0; i < N; ++i) {
    if (std::isnan(b.log_sum_t[i]) || std::isnan(b.log_sum_s[i])) {
      if (compute_grad) grad.fill_(std::numeric_limits<double>::quiet_NaN());
      return {at::scalar_tensor(std::numeric_limits<double>::quiet_NaN(), at::TensorOptions().dtype(acc)), grad};
    }
  }
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) { dist_column_stats(prm, b, lo, hi); });
  if (compute_grad) at::parallel_for(0, N, row_grain, [&](int64_t lo, int64_t hi) { dist_grad_rows(prm, b, lo, hi); });

  // serial sums in a fixed order: bit-identical run to run and across thread counts
  double row_sum = 0, col_sum = 0;
  for (int64_t i = 0; i < N; ++i) row_sum += b.row_rho[i];
  for (int64_t k = 0; k < blocks; ++k) col_sum += block_rho[k];
  const double value = tau * tau * (beta * (1.0 - row_sum / double(N)) + gamma * (1.0 - col_sum / double(V)));
  return {at::scalar_tensor(value, at::TensorOptions().dtype(acc)), grad};
}

std::tuple<at::Tensor, at::Tensor> dkd_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                   const at::Tensor& labels, double tau, double alpha, double beta,
                                                   int64_t ignore_index, bool compute_grad) {
  const auto [st, tt] = check_logits_pair(student, teacher);
  const at::Tensor s2 = as_rows(student), t2 = as_rows(teacher);
  const int64_t N = s2.size(0), V = s2.size(1);
  TORCH_CHECK_VALUE(V >= 2, "dkd_loss needs at least 2 classes (target and non-target), got V = ", V);
  const auto [labels64, valid] = checked_labels(labels, student, N, V, ignore_index);
  DkdParams prm;
  prm.tau = tau;
  prm.alpha = alpha;
  prm.beta = beta;
  prm.inv_denom = valid > 0 ? 1.0 / double(valid) : 0.0;
  at::Tensor grad = grad_buffer(compute_grad, N, V, student);
  RowResults rows(N);
  DkdBatch b;
  set_logits(b, s2, t2, st, tt);
  b.labels = labels64.data_ptr<int64_t>();
  b.ignore_index = ignore_index;
  b.grad = compute_grad ? grad.data_ptr() : nullptr;
  b.row_loss = rows.loss.data();
  b.row_status = rows.status.data();
  rows.run(std::max<int64_t>(1, 16384 / V), [&](int64_t lo, int64_t hi) { dkd_rows(prm, b, lo, hi); });
  return {rows.scalar(prm.inv_denom, st), grad};
}

std::tuple<at::Tensor, at::Tensor> correlation_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                           const c10::optional<at::Tensor>& weights, double tau,
                                                           double pearson_weight, double spearman_weight,
                                                           double strength, bool compute_grad) {
  const auto [st, tt] = check_logits_pair(student, teacher);
  const at::Tensor s2 = as_rows(student), t2 = as_rows(teacher);
  const int64_t N = s2.size(0), V = s2.size(1);
  at::Tensor w64;
  if (weights.has_value()) {
    TORCH_CHECK_VALUE(weights->numel() == N, "weights must have one entry per row (", N, "), got shape ",
                      weights->sizes());
    w64 = weights->reshape({N}).to(at::kDouble).contiguous();
  }
  CorrelationParams prm;
  prm.tau = tau;
  prm.pearson_weight = pearson_weight;
  prm.spearman_weight = spearman_weight;
  prm.strength = strength;
  prm.inv_rows = N > 0 ? 1.0 / double(N) : 0.0;
  at::Tensor grad = grad_buffer(compute_grad, N, V, student);
  RowResults rows(N);
  CorrelationBatch b;
  set_logits(b, s2, t2, st, tt);
  b.weights = weights.has_value() ? w64.data_ptr<double>() : nullptr;
  b.grad = compute_grad ? grad.data_ptr() : nullptr;
  b.row_loss = rows.loss.data();
  b.row_status = rows.status.data();
  // a row costs O(V^2): one row is plenty of work per task
  rows.run(1, [&](int64_t lo, int64_t hi) { correlation_rows(prm, b, lo, hi); });
  return {rows.scalar(prm.inv_rows, st), grad};
}

}  // namespace kdfast

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  m.def("dist_forward(Tensor student, Tensor teacher, float tau, float beta, float gamma, bool compute_grad) "
        "-> (Tensor, Tensor)");
  m.def("dkd_forward(Tensor student, Tensor teacher, Tensor labels, float tau, float alpha, float beta, "
        "int ignore_index, bool compute_grad) -> (Tensor, Tensor)");
  m.def("correlation_forward(Tensor student, Tensor teacher, Tensor? weights, float tau, float pearson_weight, "
        "float spearman_weight, float strength, bool compute_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("dist_forward", &kdfast::dist_forward_cpu);
  m.impl("dkd_forward", &kdfast::dkd_forward_cpu);
  m.impl("correlation_forward", &kdfast::correlation_forward_cpu);
}
