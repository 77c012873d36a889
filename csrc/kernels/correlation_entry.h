// Defines the DIST stages (dist_api.h), the DKD rows (dkd_api.h) and the correlation rows (correlation_api.h) for the
// capability of the including translation unit.  The baseline TU also takes float64 (the gradcheck path);
// a wide capability on a target without its ISA forwards to the baseline.
#pragma once

#if defined(KDFAST_ISA_AVX2) || defined(KDFAST_ISA_AVX512) || defined(KDFAST_DIST_BASELINE)
#include "correlation_kernel.h"
#include "dist_kernel.h"
#include "dkd_kernel.h"
namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

template <class Stage>
inline void dist_run(const DistBatch& b, Stage&& stage) {
#ifdef KDFAST_DIST_BASELINE
  if (b.teacher_dtype == DType::Float64 || b.student_dtype == DType::Float64)
    return stage(DistRows<VecD, double, double>{});
#endif
  dist_dtypes<VecF, DistRows>(b, stage);
}

void dist_row_stats(const DistParams& p, const DistBatch& b, int64_t begin, int64_t end) {
  dist_run(b, [&](auto k) { decltype(k)::row_stats(p, b, begin, end); });
}
void dist_column_stats(const DistParams& p, const DistBatch& b, int64_t begin, int64_t end) {
  dist_run(b, [&](auto k) { decltype(k)::column_stats(p, b, begin, end); });
}
void dist_grad_rows(const DistParams& p, const DistBatch& b, int64_t begin, int64_t end) {
  dist_run(b, [&](auto k) { decltype(k)::grad_rows(p, b, begin, end); });
}

void dkd_rows(const DkdParams& p, const DkdBatch& b, int64_t begin, int64_t end) {
#ifdef KDFAST_DIST_BASELINE
  if (b.teacher_dtype == DType::Float64 || b.student_dtype == DType::Float64)
    return dkd_run_rows<VecD, double, double>(p, b, begin, end);
#endif
  with_dtype_pair(b.teacher_dtype, b.student_dtype, [&](auto tt, auto ts) {
    dkd_run_rows<VecF, typename decltype(tt)::type, typename decltype(ts)::type>(p, b, begin, end);
  });
}

void correlation_rows(const CorrelationParams& p, const CorrelationBatch& b, int64_t begin, int64_t end) {
#ifdef KDFAST_DIST_BASELINE
  if (b.teacher_dtype == DType::Float64 || b.student_dtype == DType::Float64)
    return correlation_run_rows<VecD, double, double>(p, b, begin, end);
#endif
  with_dtype_pair(b.teacher_dtype, b.student_dtype, [&](auto tt, auto ts) {
    correlation_run_rows<VecF, typename decltype(tt)::type, typename decltype(ts)::type>(p, b, begin, end);
  });
}

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
#else
#include "correlation_api.h"
#include "dist_api.h"
#include "dkd_api.h"
namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {
void dist_row_stats(const DistParams& p, const DistBatch& b, int64_t begin, int64_t end) {
  cpu_default::dist_row_stats(p, b, begin, end);
}
void dist_column_stats(const DistParams& p, const DistBatch& b, int64_t begin, int64_t end) {
  cpu_default::dist_column_stats(p, b, begin, end);
}
void dist_grad_rows(const DistParams& p, const DistBatch& b, int64_t begin, int64_t end) {
  cpu_default::dist_grad_rows(p, b, begin, end);
}
void dkd_rows(const DkdParams& p, const DkdBatch& b, int64_t begin, int64_t end) {
  cpu_default::dkd_rows(p, b, begin, end);
}
void correlation_rows(const CorrelationParams& p, const CorrelationBatch& b, int64_t begin, int64_t end) {
  cpu_default::correlation_rows(p, b, begin, end);
}
}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
#endif
