// The plain-C++ interface of the fused DIST kernels (csrc/correlation_ops.cpp calls
// them; dist_kernel.h implements them once per CPU capability).
//
// DIST = tau^2 (beta (1 - mean_i rho_row_i) + gamma (1 - mean_j rho_col_j)),
// rho = Pearson of the softmaxes y = softmax(z / tau) along rows / columns.
// Three parallel stages, each deterministic whatever the thread split:
//   1. rows:    softmax normalisers, row Pearson, the row terms of dL/dy_s;
//   2. columns: (blocks of kDistColumnBlock columns) column moments over all
//               rows, column Pearson, the column terms of dL/dy_s;
//   3. rows:    dL/dz_s = y_s (g - <g, y_s>) / tau, g = dL/dy_s.
// Nothing of size N x V is allocated but the gradient.
#pragma once

#include <cstdint>

#include "kernel_api.h"

namespace kdfast {

constexpr int64_t kDistColumnBlock = 256;

struct DistParams {
  double tau = 1.0, beta = 1.0, gamma = 1.0;
  double eps = 1e-8;  // torchdistill: each centred norm is clamped below by eps
};

struct DistBatch {
  int64_t rows = 0, vocab = 0;
  const void* teacher = nullptr;
  const void* student = nullptr;
  int64_t teacher_row_stride = 0, student_row_stride = 0;
  DType teacher_dtype = DType::Float32, student_dtype = DType::Float32;
  // per row (rows entries), written by stage 1: y = exp((z - max) / tau - log_sum)
  double* max_t = nullptr;
  double* max_s = nullptr;
  double* log_sum_t = nullptr;
  double* log_sum_s = nullptr;
  double* row_rho = nullptr;
  double* row_coef_t = nullptr;  // dL/dy_s[i, j] row part: coef_t (y_t - 1/V) + coef_s (y_s - 1/V)
  double* row_coef_s = nullptr;
  int32_t* row_status = nullptr;  // RowStatus (all -inf rows)
  // per column, written by stage 2: dL/dy_s[i, j] column part = u_j (y_t - mean_t_j) + v_j (y_s - mean_s_j),
  // stored in the accumulation type (float, or double for float64 inputs) as 6 x vocab: u, v, and the
  // means as first-row value + offset (first_s, first_t, offset_s, offset_t)
  void* col_coef = nullptr;
  double* block_rho = nullptr;  // sum of the column rho of each column block
  void* grad = nullptr;         // (rows, vocab), student dtype; null: no gradient
};

namespace cpu_default {
void dist_row_stats(const DistParams&, const DistBatch&, int64_t begin, int64_t end);
void dist_column_stats(const DistParams&, const DistBatch&, int64_t block_begin, int64_t block_end);
void dist_grad_rows(const DistParams&, const DistBatch&, int64_t begin, int64_t end);
}  // namespace cpu_default
namespace avx2 {
void dist_row_stats(const DistParams&, const DistBatch&, int64_t begin, int64_t end);
void dist_column_stats(const DistParams&, const DistBatch&, int64_t block_begin, int64_t block_end);
void dist_grad_rows(const DistParams&, const DistBatch&, int64_t begin, int64_t end);
}  // namespace avx2
namespace avx512 {
void dist_row_stats(const DistParams&, const DistBatch&, int64_t begin, int64_t end);
void dist_column_stats(const DistParams&, const DistBatch&, int64_t block_begin, int64_t block_end);
void dist_grad_rows(const DistParams&, const DistBatch&, int64_t begin, int64_t end);
}  // namespace avx512
namespace avx512_bf16 {
void dist_row_stats(const DistParams&, const DistBatch&, int64_t begin, int64_t end);
void dist_column_stats(const DistParams&, const DistBatch&, int64_t block_begin, int64_t block_end);
void dist_grad_rows(const DistParams&, const DistBatch&, int64_t begin, int64_t end);
}  // namespace avx512_bf16

// Dispatched on the active capability (float64 inputs take the scalar double path).
void dist_row_stats(const DistParams&, const DistBatch&, int64_t begin, int64_t end);
void dist_column_stats(const DistParams&, const DistBatch&, int64_t block_begin, int64_t block_end);
void dist_grad_rows(const DistParams&, const DistBatch&, int64_t begin, int64_t end);

}  // namespace kdfast
