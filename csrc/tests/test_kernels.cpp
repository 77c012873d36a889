// C++ unit tests of the row kernels (ctest): no Python, torch only for the
// op-level check.  Built by CMakeLists.txt.
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "kernels/kernel_api.h"
#include "kernels/selftest.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// KL of a row with itself is 0 and the gradient is 0, for every capability.
void identical_rows_give_zero() {
  const int64_t V = 1037;
  std::vector<float> z(V), grad(V, 1.0f);
  for (int64_t j = 0; j < V; ++j) z[j] = float(std::sin(0.3 * double(j)) * 5.0);
  double loss = -1;
  int32_t status = -1;
  kdfast::DistillParams prm;
  prm.tau = prm.tau_s = 2.0;
  kdfast::DistillBatch b;
  b.rows = 1;
  b.vocab = V;
  b.teacher = b.student = z.data();
  b.teacher_row_stride = b.student_row_stride = V;
  b.grad = grad.data();
  b.row_loss = &loss;
  b.row_status = &status;
  for (auto cap : {kdfast::CpuCapability::Default, kdfast::CpuCapability::AVX2, kdfast::CpuCapability::AVX512}) {
    auto got = kdfast::set_cpu_capability(cap);
    kdfast::distill_rows(prm, b, 0, 1);
    double gmax = 0;
    for (float g : grad) gmax = std::max(gmax, double(std::fabs(g)));
    check(status == 0 && std::fabs(loss) < 1e-6 && gmax < 1e-7,
          std::string("identical rows, capability ") + kdfast::cpu_capability_name(got));
  }
  kdfast::set_cpu_capability(kdfast::supported_cpu_capability());
}

// The SIMD kernels agree with the scalar baseline on every divergence.
void capabilities_agree() {
  const int64_t N = 3, V = 517;
  auto s = torch::randn({N, V}) * 3, t = torch::randn({N, V}) * 3;
  for (int d = 0; d < static_cast<int>(kdfast::Divergence::Count); ++d) {
    kdfast::DistillParams prm;
    prm.divergence = static_cast<kdfast::Divergence>(d);
    prm.div.alpha = 0.7;
    prm.div.beta = 0.4;
    prm.div.skew = 0.2;
    prm.div.log_w_p = std::log(0.4);  // the mixture of jsd with beta = 0.4 (any mixture serves this comparison)
    prm.div.log_w_q = std::log(0.6);
    prm.tau = 1.5;
    prm.tau_s = 1.5;
    std::vector<double> loss[2] = {std::vector<double>(N), std::vector<double>(N)};
    std::vector<int32_t> status(N);
    torch::Tensor grad[2] = {torch::empty({N, V}), torch::empty({N, V})};
    for (int k = 0; k < 2; ++k) {
      kdfast::set_cpu_capability(k == 0 ? kdfast::CpuCapability::Default : kdfast::supported_cpu_capability());
      kdfast::DistillBatch b;
      b.rows = N;
      b.vocab = V;
      b.teacher = t.data_ptr();
      b.student = s.data_ptr();
      b.teacher_row_stride = b.student_row_stride = V;
      b.grad = grad[k].data_ptr();
      b.row_loss = loss[k].data();
      b.row_status = status.data();
      kdfast::distill_rows(prm, b, 0, N);
    }
    double worst = 0;
    for (int64_t i = 0; i < N; ++i) worst = std::max(worst, std::fabs(loss[0][i] - loss[1][i]) / std::fabs(loss[0][i]));
    const double gdiff = (grad[0] - grad[1]).abs().max().item<double>() / grad[0].abs().max().item<double>();
    check(worst < 1e-5 && gdiff < 1e-5, "default vs SIMD, divergence " + std::to_string(d));
  }
  kdfast::set_cpu_capability(kdfast::supported_cpu_capability());
}

}  // namespace

int main() {
  std::printf("supported capability: %s\n", kdfast::cpu_capability_name(kdfast::supported_cpu_capability()));
  identical_rows_give_zero();
  capabilities_agree();
  const std::string offsets = kdfast::check_large_row_offsets();
  check(offsets.empty(), "64-bit row offsets " + offsets);
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
