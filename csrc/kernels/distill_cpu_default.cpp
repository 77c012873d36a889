// Baseline capability: scalar lanes; also the float64 path (gradcheck).
#define KDFAST_CPU_CAPABILITY cpu_default
#define KDFAST_DIST_BASELINE 1
#include "distill_rows_impl.h"
#include "correlation_entry.h"
#include "topk_entry.h"
#include "vector_math_entry.h"

namespace kdfast {
namespace cpu_default {

template <template <class> class Div>
static void run_double(const DistillParams& prm, const DistillBatch& b, int64_t begin, int64_t end) {
  run_rows<Div, VecD, double, double>(prm, b, begin, end);
}

void distill_rows(const DistillParams& prm, const DistillBatch& b, int64_t begin, int64_t end) {
  if (b.teacher_dtype != DType::Float64 && b.student_dtype != DType::Float64) return dispatch<VecF>(prm, b, begin, end);
  switch (prm.divergence) {
#define KDFAST_RUN_DOUBLE(policy, name) \
    case Divergence::policy: return run_double<policy>(prm, b, begin, end);
    KDFAST_FOR_EACH_DIVERGENCE(KDFAST_RUN_DOUBLE)
#undef KDFAST_RUN_DOUBLE
    default: break;
  }
  for (int64_t i = begin; i < end; ++i) b.row_status[i] = -1;
}

}  // namespace cpu_default
}  // namespace kdfast
