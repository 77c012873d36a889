#include "selftest.h"

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernel_api.h"

namespace kdfast {

std::string check_large_row_offsets() {
  const int64_t V = 1000;
  // A row index whose offset in elements is far past 2^31 (and past 2^32).
  const int64_t row = (int64_t(3) << 31) / V + 7;
  std::vector<float> teacher(V), student(V), grad0(V), grad1(V);
  for (int64_t j = 0; j < V; ++j) {
    teacher[j] = float(std::sin(0.37 * double(j)) * 4.0);
    student[j] = float(std::cos(0.11 * double(j)) * 3.0);
  }
  int64_t label = 17;
  double loss0 = 0, loss1 = 0;
  int32_t status0 = -1, status1 = -1;

  DistillParams prm;
  prm.divergence = Divergence::JSD;
  prm.div.beta = 0.5;
  prm.div.log_w_p = prm.div.log_w_q = std::log(0.5);
  prm.tau = 2.0;
  prm.tau_s = 2.0;
  prm.hard_weight = 0.5;

  DistillBatch b;
  b.vocab = V;
  b.teacher_row_stride = V;
  b.student_row_stride = V;
  b.teacher = teacher.data();
  b.student = student.data();
  b.labels = &label;
  b.grad = grad0.data();
  b.row_loss = &loss0;
  b.row_status = &status0;
  b.rows = 1;
  distill_rows(prm, b, 0, 1);

  // Same data seen as row `row` of a huge virtual batch: every per-row pointer
  // is shifted back so that base + row * stride lands on the same memory.  The
  // addresses are only formed through uintptr_t arithmetic, never dereferenced
  // outside the buffers unless the kernel's index arithmetic is 32-bit.
  auto shift = [&](const void* p, int64_t elem_bytes, int64_t per_row) {
    return reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p) - uintptr_t(row * per_row * elem_bytes));
  };
  b.rows = row + 1;
  b.teacher = shift(teacher.data(), sizeof(float), V);
  b.student = shift(student.data(), sizeof(float), V);
  b.labels = static_cast<const int64_t*>(shift(&label, sizeof(int64_t), 1));
  b.grad = shift(grad1.data(), sizeof(float), V);
  b.row_loss = static_cast<double*>(shift(&loss1, sizeof(double), 1));
  b.row_status = static_cast<int32_t*>(shift(&status1, sizeof(int32_t), 1));
  distill_rows(prm, b, row, row + 1);

  if (status0 != kRowOk || status1 != kRowOk) return "row status not ok";
  if (!(loss0 == loss1) || !std::isfinite(loss0)) return "row losses differ";
  for (int64_t j = 0; j < V; ++j)
    if (!(grad0[j] == grad1[j])) return "gradients differ at entry " + std::to_string(j);
  return "";
}

}  // namespace kdfast
