// The plain-C++ interface of the fused DKD row kernel (csrc/correlation_ops.cpp
// calls it; dkd_kernel.h implements it once per CPU capability).
//
// Per row with target t: T^2 (alpha TCKD + beta NCKD), TCKD the KL of the
// binary (target, rest) distributions, NCKD the KL of the distributions over
// the non-target classes.  One pass of exponentials gives every sum; the
// non-target sums mask the target lane instead of subtracting it, so a target
// of probability ~1 loses nothing to cancellation.
#pragma once

#include <cstdint>

#include "kernel_api.h"

namespace kdfast {

struct DkdParams {
  double tau = 4.0, alpha = 1.0, beta = 8.0;
  double inv_denom = 1.0;  // 1 / number of valid rows (0 when none)
};

struct DkdBatch {
  int64_t rows = 0, vocab = 0;
  const void* teacher = nullptr;
  const void* student = nullptr;
  int64_t teacher_row_stride = 0, student_row_stride = 0;
  DType teacher_dtype = DType::Float32, student_dtype = DType::Float32;
  const int64_t* labels = nullptr;  // (rows,), checked: in [0, vocab) or ignore_index
  int64_t ignore_index = -100;
  void* grad = nullptr;             // (rows, vocab), student dtype; null: no gradient
  double* row_loss = nullptr;       // (rows,) T^2 (alpha TCKD + beta NCKD), 0 on ignored rows
  int32_t* row_status = nullptr;
};

namespace cpu_default { void dkd_rows(const DkdParams&, const DkdBatch&, int64_t begin, int64_t end); }
namespace avx2 { void dkd_rows(const DkdParams&, const DkdBatch&, int64_t begin, int64_t end); }
namespace avx512 { void dkd_rows(const DkdParams&, const DkdBatch&, int64_t begin, int64_t end); }
namespace avx512_bf16 { void dkd_rows(const DkdParams&, const DkdBatch&, int64_t begin, int64_t end); }
void dkd_rows(const DkdParams&, const DkdBatch&, int64_t begin, int64_t end);

}  // namespace kdfast
