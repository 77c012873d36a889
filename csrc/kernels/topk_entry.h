// Defines topk_rows (topk_api.h) for the capability of the including
// translation unit: the baseline also takes float64 students (the gradcheck
// path); a wide capability on a target without its ISA forwards to the baseline.
#pragma once

#if defined(KDFAST_ISA_AVX2) || defined(KDFAST_ISA_AVX512) || defined(KDFAST_DIST_BASELINE)
#include "topk_kernel.h"
namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {
void topk_rows(const DistillParams& p, const TopkBatch& b, int64_t begin, int64_t end) {
  switch (b.student_dtype) {
#ifdef KDFAST_DIST_BASELINE
    case DType::Float64: return TopkRows<VecD, double>::run(p, b, begin, end);
#endif
    case DType::Float32: return TopkRows<VecF, float>::run(p, b, begin, end);
    case DType::BFloat16: return TopkRows<VecF, BF16>::run(p, b, begin, end);
    case DType::Float16: return TopkRows<VecF, F16>::run(p, b, begin, end);
    default: break;
  }
  for (int64_t i = begin; i < end; ++i) b.row_status[i] = -1;  // the op checks the dtypes first
}
}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
#else
#include "topk_api.h"
namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {
void topk_rows(const DistillParams& p, const TopkBatch& b, int64_t begin, int64_t end) {
  cpu_default::topk_rows(p, b, begin, end);
}
}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
#endif
