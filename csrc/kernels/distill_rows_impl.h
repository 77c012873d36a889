// Instantiates the row skeleton for every divergence and dtype pair and
// defines `distill_rows` for the capability of the including translation unit.
#pragma once

#include <cstdlib>

#include "row_kernel.h"

namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

template <template <class> class Div, class V, class TT, class TS>
void run_rows(const DistillParams& prm, const DistillBatch& b, int64_t begin, int64_t end) {
  using S = typename V::value_type;
  const int64_t padded = (b.vocab + V::size - 1) / V::size * V::size;
  // One scratch pair per call (= per thread chunk): O(threads * V), never O(N * V).
  const size_t bytes = ((2 * padded * sizeof(S)) + 63) / 64 * 64;
  S* scratch = static_cast<S*>(std::aligned_alloc(64, bytes));
  if (!scratch) {
    for (int64_t i = begin; i < end; ++i) b.row_status[i] = -1;
    return;
  }
  const DivConsts dc = make_div_consts(prm);
  for (int64_t i = begin; i < end; ++i) RowKernel<Div, V, TT, TS>::run(prm, dc, b, i, scratch, scratch + padded);
  std::free(scratch);
}

template <template <class> class Div, class V>
void dispatch_dtypes(const DistillParams& prm, const DistillBatch& b, int64_t begin, int64_t end) {
#define KDFAST_PAIR(TD, SD, TT, TS) \
  if (b.teacher_dtype == DType::TD && b.student_dtype == DType::SD) return run_rows<Div, V, TT, TS>(prm, b, begin, end);
  KDFAST_PAIR(Float32, Float32, float, float)
  KDFAST_PAIR(BFloat16, BFloat16, BF16, BF16)
  KDFAST_PAIR(Float16, Float16, F16, F16)
  KDFAST_PAIR(Float32, BFloat16, float, BF16)
  KDFAST_PAIR(BFloat16, Float32, BF16, float)
  KDFAST_PAIR(Float32, Float16, float, F16)
  KDFAST_PAIR(Float16, Float32, F16, float)
  KDFAST_PAIR(BFloat16, Float16, BF16, F16)
  KDFAST_PAIR(Float16, BFloat16, F16, BF16)
#undef KDFAST_PAIR
  for (int64_t i = begin; i < end; ++i) b.row_status[i] = -1;  // unsupported pair: the op checks first
}

template <class V>
void dispatch(const DistillParams& prm, const DistillBatch& b, int64_t begin, int64_t end) {
  switch (prm.divergence) {
    case Divergence::KL: return dispatch_dtypes<KL, V>(prm, b, begin, end);
    case Divergence::ReverseKL: return dispatch_dtypes<ReverseKL, V>(prm, b, begin, end);
    case Divergence::JSD: return dispatch_dtypes<JSD, V>(prm, b, begin, end);
    case Divergence::TVD: return dispatch_dtypes<TVD, V>(prm, b, begin, end);
    case Divergence::Renyi: return dispatch_dtypes<Renyi, V>(prm, b, begin, end);
    case Divergence::AB: return dispatch_dtypes<AB, V>(prm, b, begin, end);
    case Divergence::SkewKL: return dispatch_dtypes<SkewKL, V>(prm, b, begin, end);
    case Divergence::SkewReverseKL: return dispatch_dtypes<SkewReverseKL, V>(prm, b, begin, end);
    default: break;
  }
  for (int64_t i = begin; i < end; ++i) b.row_status[i] = -1;
}

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
