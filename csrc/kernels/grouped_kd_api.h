// The plain-C++ interface of the fused Grouped KD row kernel (csrc/grouped_kd_op.cpp
// calls it; grouped_kd_kernel.h implements it once per CPU capability).
//
// Per row (kdfast/reference/grouped_kd.py is the formula): the primary group P
// is the teacher's classes at or above the threshold logit z*, whose
// cumulative mass at the group temperature reaches primary_mass, plus the
// label; the row's value is T^2 (binary_weight Binary-KD + primary_weight
// Primary-KD), Binary-KD the KL of the two groups' masses, Primary-KD the KL
// of the distributions inside P.
#pragma once

#include <cstdint>

#include "kernel_api.h"

namespace kdfast {

struct GroupedKdParams {
  double tau = 4.0, group_tau = 1.0, primary_mass = 0.93;
  double primary_weight = 4.0, binary_weight = 1.0;
  double inv_denom = 1.0;  // the reduction's scale of the gradient: 1 / valid rows for batchmean, else 1
};

struct GroupedKdBatch {
  int64_t rows = 0, vocab = 0;
  const void* teacher = nullptr;
  const void* student = nullptr;
  int64_t teacher_row_stride = 0, student_row_stride = 0;
  DType teacher_dtype = DType::Float32, student_dtype = DType::Float32;
  const int64_t* labels = nullptr;  // (rows,), checked: in [0, vocab) or ignore_index; null: no label forced in
  int64_t ignore_index = -100;
  void* grad = nullptr;             // (rows, vocab), student dtype; null: no gradient
  bool stream_grad = false;         // write grad with non-temporal stores (a gradient larger than the caches)
  double* row_loss = nullptr;       // (rows,) T^2 (bw Binary-KD + pw Primary-KD), 0 on ignored rows
  int32_t* row_status = nullptr;
};

namespace cpu_default {
void grouped_kd_rows(const GroupedKdParams&, const GroupedKdBatch&, int64_t begin, int64_t end);
}
namespace avx2 {
void grouped_kd_rows(const GroupedKdParams&, const GroupedKdBatch&, int64_t begin, int64_t end);
}
namespace avx512 {
void grouped_kd_rows(const GroupedKdParams&, const GroupedKdBatch&, int64_t begin, int64_t end);
}
namespace avx512_bf16 {
void grouped_kd_rows(const GroupedKdParams&, const GroupedKdBatch&, int64_t begin, int64_t end);
}
void grouped_kd_rows(const GroupedKdParams&, const GroupedKdBatch&, int64_t begin, int64_t end);

}  // namespace kdfast
