// Defines distill_rows for a wide capability TU (avx2 / avx512 / avx512_bf16).  On targets
// without that ISA the capability forwards to the baseline kernels.
#pragma once

#if defined(KDFAST_ISA_AVX2) || defined(KDFAST_ISA_AVX512)
#include "distill_rows_impl.h"
namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {
void distill_rows(const DistillParams& prm, const DistillBatch& b, int64_t begin, int64_t end) {
  dispatch<VecF>(prm, b, begin, end);
}
}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
#else
#include "kernel_api.h"
namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {
void distill_rows(const DistillParams& prm, const DistillBatch& b, int64_t begin, int64_t end) {
  cpu_default::distill_rows(prm, b, begin, end);
}
}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
#endif
