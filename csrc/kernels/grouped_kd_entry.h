// Defines grouped_kd_rows (grouped_kd_api.h) for the capability of the including
// translation unit.  The baseline TU (KDFAST_GROUPED_KD_BASELINE) also takes
// float64, the only path the dispatcher sends float64 logits to.
#pragma once

#include "grouped_kd_kernel.h"

namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

void grouped_kd_rows(const GroupedKdParams& p, const GroupedKdBatch& b, int64_t begin, int64_t end) {
#ifdef KDFAST_GROUPED_KD_BASELINE
  if (b.teacher_dtype == DType::Float64 && b.student_dtype == DType::Float64)
    return grouped_kd_run_rows<VecD, double, double>(p, b, begin, end);
#endif
  const bool known = with_dtype_pair(b.teacher_dtype, b.student_dtype, [&](auto tt, auto ts) {
    grouped_kd_run_rows<VecF, typename decltype(tt)::type, typename decltype(ts)::type>(p, b, begin, end);
  });
  if (!known)
    for (int64_t i = begin; i < end; ++i) b.row_status[i] = -1;
}

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
