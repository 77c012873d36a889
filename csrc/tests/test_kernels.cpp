// C++ unit tests of the row kernels (ctest): no Python, torch only for the
// op-level check.  Built by CMakeLists.txt.
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "kernels/kernel_api.h"
#include "kernels/selftest.h"
#include "kernels/topk_api.h"

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

// The top-k kernel with the whole vocabulary as its support (k = V, in a
// shuffled order) and an empty bucket is the dense loss, at every capability.
void topk_of_the_whole_vocabulary_is_the_dense_loss() {
  const int64_t N = 2, V = 301;
  auto s = torch::randn({N, V}) * 3, t = torch::randn({N, V}) * 3;
  auto order = torch::randperm(V).to(torch::kLong).expand({N, V}).contiguous();
  // k == V: the kernel itself makes the bucket empty (-inf).
  auto teacher_logprobs = torch::log_softmax(t, -1).gather(1, order).contiguous();
  kdfast::DistillParams prm;
  prm.tau = 1.5;
  prm.tau_s = 1.5;
  std::vector<double> dense_loss(N), topk_loss(N);
  std::vector<int32_t> status(N);
  auto dense_grad = torch::empty({N, V}), topk_grad = torch::empty({N, V});
  for (auto cap : {kdfast::CpuCapability::Default, kdfast::CpuCapability::AVX2, kdfast::CpuCapability::AVX512}) {
    const auto got = kdfast::set_cpu_capability(cap);
    kdfast::DistillBatch d;
    d.rows = N;
    d.vocab = V;
    d.teacher = t.data_ptr();
    d.student = s.data_ptr();
    d.teacher_row_stride = d.student_row_stride = V;
    d.grad = dense_grad.data_ptr();
    d.row_loss = dense_loss.data();
    d.row_status = status.data();
    kdfast::distill_rows(prm, d, 0, N);
    kdfast::TopkBatch b;
    b.rows = N;
    b.vocab = V;
    b.k = V;
    b.student = s.data_ptr();
    b.student_row_stride = V;
    b.indices = order.data_ptr<int64_t>();
    b.logprobs = teacher_logprobs.data_ptr();
    b.mass_tolerance = 1e-4;
    b.bucket = true;
    b.grad = topk_grad.data_ptr();
    b.row_loss = topk_loss.data();
    b.row_status = status.data();
    kdfast::topk_rows(prm, b, 0, N);
    double worst = 0;
    for (int64_t i = 0; i < N; ++i) worst = std::max(worst, std::fabs(dense_loss[i] - topk_loss[i]) / dense_loss[i]);
    const double gdiff = (dense_grad - topk_grad).abs().max().item<double>() / dense_grad.abs().max().item<double>();
    check(status[0] == 0 && status[1] == 0 && worst < 1e-5 && gdiff < 1e-5,
          std::string("top-k of the whole vocabulary = dense, capability ") + kdfast::cpu_capability_name(got));
  }
  kdfast::set_cpu_capability(kdfast::supported_cpu_capability());
}

}  // namespace

int main() {
  std::printf("supported capability: %s\n", kdfast::cpu_capability_name(kdfast::supported_cpu_capability()));
  identical_rows_give_zero();
  capabilities_agree();
  topk_of_the_whole_vocabulary_is_the_dense_loss();
  const std::string offsets = kdfast::check_large_row_offsets();
  check(offsets.empty(), "64-bit row offsets " + offsets);
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
