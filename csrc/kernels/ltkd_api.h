// The plain-C++ interface of the fused long-tailed KD (LTKD) row kernels
// (csrc/ltkd_op.cpp calls them; ltkd_kernel.h implements them once per CPU
// capability).
//
// Per row, with a fixed class -> group map of G <= kLtkdMaxGroups groups:
//   tau^2 [ inter_weight KL(P~ || Q) + intra_weight sum_g w_g KL(p_{.|g} || q_{.|g}) ]
// (kdfast/longtail.py).  Every group has its own running maximum, so a tail
// group far below the row's maximum keeps its within-group distribution
// (which uniform weighting counts in full) instead of underflowing.
//
// Rebalancing by the batch needs the teacher's mean group distribution before
// any row's loss: ltkd_teacher_groups_rows writes every row's log P_g first
// (the op's caller averages them), and ltkd_rows takes the log prior as input.
#pragma once

#include <cstdint>

#include "kernel_api.h"

namespace kdfast {

// The group statistics live in fixed-size per-row arrays: the fused paths take
// up to this many groups (LTKD's head / medium / tail is 3); more fall back to
// the reference in Python.
constexpr int kLtkdMaxGroups = 16;

struct LtkdParams {
  double tau = 4.0, inter_weight = 1.0, intra_weight = 1.0;
  bool teacher_weighting = false;     // intra weights P_g (plain KD's) instead of 1
  const double* log_prior = nullptr;  // (groups,) log of the rebalancing prior; null: P~ = P
  double grad_scale = 1.0;            // 1 / the batchmean denominator; 1 for "sum" and "none"
};

struct LtkdBatch {
  int64_t rows = 0, vocab = 0;
  int groups = 0;                     // G, 1 <= G <= kLtkdMaxGroups
  const void* teacher = nullptr;      // row i at teacher + i * teacher_row_stride (elements)
  const void* student = nullptr;
  int64_t teacher_row_stride = 0, student_row_stride = 0;
  DType teacher_dtype = DType::Float32, student_dtype = DType::Float32;
  // (vocab,) the group id of each class as a float: compared on float lanes, no gather.
  const float* group_of = nullptr;
  void* grad = nullptr;                  // (rows, vocab), student dtype; null: no gradient
  bool stream_grad = false;              // write grad with non-temporal stores (a gradient larger than the caches)
  double* row_loss = nullptr;            // (rows,) ltkd_rows: the unreduced loss
  double* teacher_log_mass = nullptr;    // (rows, groups) ltkd_teacher_groups_rows: log P_g, NaN rows undefined
  int32_t* row_status = nullptr;         // (rows,) RowStatus
};

#define KDFAST_LTKD_STAGES(ns)                                                                     \
  namespace ns {                                                                                   \
  void ltkd_rows(const LtkdParams&, const LtkdBatch&, int64_t begin, int64_t end);                 \
  void ltkd_teacher_groups_rows(const LtkdParams&, const LtkdBatch&, int64_t begin, int64_t end);  \
  }
KDFAST_LTKD_STAGES(cpu_default)
KDFAST_LTKD_STAGES(avx2)
KDFAST_LTKD_STAGES(avx512)
KDFAST_LTKD_STAGES(avx512_bf16)
#undef KDFAST_LTKD_STAGES

// The loss rows and the gradient (row_loss, grad).
void ltkd_rows(const LtkdParams&, const LtkdBatch&, int64_t begin, int64_t end);
// The teacher's group log-masses (teacher_log_mass); a row with a NaN or +inf
// logit in either input gets NaN there (the batch prior leaves it out).  Only
// the teacher's all -inf rows are refused here (ltkd_rows refuses the student's).
void ltkd_teacher_groups_rows(const LtkdParams&, const LtkdBatch&, int64_t begin, int64_t end);

}  // namespace kdfast
