// Defines the LTKD stages (ltkd_api.h) for the capability of the including
// translation unit: the baseline also takes float64 (the gradcheck path); a
// wide capability on a target without its ISA forwards to the baseline.
#pragma once

#if defined(KDFAST_ISA_AVX2) || defined(KDFAST_ISA_AVX512) || defined(KDFAST_DIST_BASELINE)
#include "ltkd_kernel.h"
namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

// Calls stage(TypeTag<vector>, TypeTag<teacher type>, TypeTag<student type>) for the batch's dtypes; marks the
// rows -1 (the op's internal error) for a pair the kernels do not take.
template <class Stage>
inline void ltkd_run(const LtkdBatch& b, int64_t begin, int64_t end, Stage&& stage) {
#ifdef KDFAST_DIST_BASELINE
  if (b.teacher_dtype == DType::Float64 || b.student_dtype == DType::Float64) {
    if (b.teacher_dtype == b.student_dtype) return stage(TypeTag<VecD>{}, TypeTag<double>{}, TypeTag<double>{});
    for (int64_t i = begin; i < end; ++i) b.row_status[i] = -1;
    return;
  }
#endif
  const bool known = with_dtype_pair(b.teacher_dtype, b.student_dtype, [&](auto tt, auto ts) {
    stage(TypeTag<VecF>{}, tt, ts);
  });
  if (!known)
    for (int64_t i = begin; i < end; ++i) b.row_status[i] = -1;
}

void ltkd_rows(const LtkdParams& p, const LtkdBatch& b, int64_t begin, int64_t end) {
  ltkd_run(b, begin, end, [&](auto v, auto tt, auto ts) {
    ltkd_run_rows<typename decltype(v)::type, typename decltype(tt)::type, typename decltype(ts)::type>(
        p, b, begin, end);
  });
}

void ltkd_teacher_groups_rows(const LtkdParams& p, const LtkdBatch& b, int64_t begin, int64_t end) {
  ltkd_run(b, begin, end, [&](auto v, auto tt, auto ts) {
    ltkd_run_teacher_groups<typename decltype(v)::type, typename decltype(tt)::type, typename decltype(ts)::type>(
        p, b, begin, end);
  });
}

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
#else
#include "ltkd_api.h"
namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {
void ltkd_rows(const LtkdParams& p, const LtkdBatch& b, int64_t begin, int64_t end) {
  cpu_default::ltkd_rows(p, b, begin, end);
}
void ltkd_teacher_groups_rows(const LtkdParams& p, const LtkdBatch& b, int64_t begin, int64_t end) {
  cpu_default::ltkd_teacher_groups_rows(p, b, begin, end);
}
}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
#endif
