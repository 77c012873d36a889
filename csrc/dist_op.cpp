// The fused DIST op on CPU tensors: checks, the three parallel stages of
// kernels/dist_api.h, and the deterministic final sums.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <vector>

#include "kernels/dist_api.h"
#include "op_common.h"

namespace kdfast {

std::tuple<at::Tensor, at::Tensor> dist_forward_cpu(const at::Tensor& student, const at::Tensor& teacher, double tau,
                                                    double beta, double gamma, bool compute_grad) {
  const auto [st, tt] = check_logits_pair(student, teacher);
  TORCH_CHECK_VALUE(tau > 0, "temperature must be > 0, got ", tau);
  const at::Tensor s2 = as_rows(student), t2 = as_rows(teacher);
  const int64_t N = s2.size(0), V = s2.size(1);
  TORCH_CHECK_VALUE(N >= 1, "dist_loss needs at least one row, got logits shape ", student.sizes());

  DistParams prm;
  prm.tau = tau;
  prm.beta = beta;
  prm.gamma = gamma;
  const auto acc = st == DType::Float64 ? at::kDouble : at::kFloat;
  std::vector<double> per_row(8 * size_t(N));
  std::vector<int32_t> status(N, 0);
  const int64_t blocks = (V + kDistColumnBlock - 1) / kDistColumnBlock;
  std::vector<double> block_rho(blocks, 0.0);
  at::Tensor col_coef = at::empty({6, V}, at::TensorOptions().dtype(acc));
  at::Tensor grad = compute_grad ? GradBufferCache::instance().empty(N, V, student.options())
                                 : at::empty({0}, student.options());

  DistBatch b;
  set_logits(b, s2, t2, st, tt);
  double* p = per_row.data();
  b.shift_t = p;
  b.shift_s = p + N;
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
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) { dist_column_stats(prm, b, lo, hi); });
  if (compute_grad) at::parallel_for(0, N, row_grain, [&](int64_t lo, int64_t hi) { dist_grad_rows(prm, b, lo, hi); });

  // serial sums in a fixed order: bit-identical run to run and across thread counts
  double row_sum = 0, col_sum = 0;
  for (int64_t i = 0; i < N; ++i) row_sum += b.row_rho[i];
  for (int64_t k = 0; k < blocks; ++k) col_sum += block_rho[k];
  const double value = tau * tau * (beta * (1.0 - row_sum / double(N)) + gamma * (1.0 - col_sum / double(V)));
  return {at::scalar_tensor(value, at::TensorOptions().dtype(acc)), grad};
}

}  // namespace kdfast

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  m.def("dist_forward(Tensor student, Tensor teacher, float tau, float beta, float gamma, bool compute_grad) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) { m.impl("dist_forward", &kdfast::dist_forward_cpu); }
