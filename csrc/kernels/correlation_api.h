// The plain-C++ interface of the fused Pearson + Spearman correlation row
// kernel (CMKD; csrc/correlation_ops.cpp calls it, correlation_kernel.h
// implements it once per CPU capability).
//
// Per row: rho_P = Pearson(softmax(z_s / tau), softmax(z_t / tau)) and
// rho_S = Pearson(soft ranks of z_s / tau, exact ranks of z_t), the loss
// pearson_weight w (1 - rho_P) + spearman_weight (1 - w) (1 - rho_S) (w = 1 in
// both terms without weights), and its gradient.  Both ranks come from one
// pairwise loop over the row: exact rank_j = 1/2 + sum_k H(z_j - z_k) with
// H(0) = 1/2 (ties share their average rank), soft rank_j = 1/2 + sum_k
// sigmoid((x_j - x_k) / strength) -- O(V^2) per row, hence the caller's cap on V.
#pragma once

#include <cstdint>

#include "kernel_api.h"

namespace kdfast {

struct CorrelationParams {
  double tau = 1.0, pearson_weight = 1.0, spearman_weight = 1.0, strength = 1.0;
  double inv_rows = 1.0;  // 1 / N: the loss is the mean over rows
};

struct CorrelationBatch {
  int64_t rows = 0, vocab = 0;
  const void* teacher = nullptr;
  const void* student = nullptr;
  int64_t teacher_row_stride = 0, student_row_stride = 0;
  DType teacher_dtype = DType::Float32, student_dtype = DType::Float32;
  const double* weights = nullptr;  // (rows,) in [0, 1]; null: both terms in full
  void* grad = nullptr;             // (rows, vocab), student dtype; null: no gradient
  double* row_loss = nullptr;       // (rows,) the row's loss (before the mean)
  int32_t* row_status = nullptr;
};

namespace cpu_default { void correlation_rows(const CorrelationParams&, const CorrelationBatch&, int64_t, int64_t); }
namespace avx2 { void correlation_rows(const CorrelationParams&, const CorrelationBatch&, int64_t, int64_t); }
namespace avx512 { void correlation_rows(const CorrelationParams&, const CorrelationBatch&, int64_t, int64_t); }
namespace avx512_bf16 { void correlation_rows(const CorrelationParams&, const CorrelationBatch&, int64_t, int64_t); }
void correlation_rows(const CorrelationParams&, const CorrelationBatch&, int64_t begin, int64_t end);

}  // namespace kdfast
