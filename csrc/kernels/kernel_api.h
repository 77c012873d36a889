// The plain-C++ interface between the torch op (csrc/distill_op.cpp) and the
// per-capability row kernels.  Nothing here depends on torch, so the kernels
// can be compiled with ISA pragmas and unit-tested without ATen.
#pragma once

#include <cstdint>

#include "divergence_list.h"
#include "weighting_list.h"

namespace kdfast {

#define KDFAST_DIVERGENCE_ENUMERATOR(policy, name) policy,
enum class Divergence : int32_t { KDFAST_FOR_EACH_DIVERGENCE(KDFAST_DIVERGENCE_ENUMERATOR) Count };
#undef KDFAST_DIVERGENCE_ENUMERATOR
#define KDFAST_WEIGHTING_ENUMERATOR(policy, name) policy,
enum class Weighting : int32_t { KDFAST_FOR_EACH_WEIGHTING(KDFAST_WEIGHTING_ENUMERATOR) Count };
#undef KDFAST_WEIGHTING_ENUMERATOR
enum class DType : int32_t { Float32 = 0, BFloat16, Float16, Float64 };

// Row status codes written by the kernel; the op turns them into errors.
enum RowStatus : int32_t { kRowOk = 0, kTeacherAllNegInf = 1, kStudentAllNegInf = 2 };

// The divergence's constants: the op's params vector, one field per entry of the list.
struct DivergenceParams {
#define KDFAST_KERNEL_PARAM_FIELD(name) double name = 0.0;
  KDFAST_FOR_EACH_KERNEL_PARAM(KDFAST_KERNEL_PARAM_FIELD)
#undef KDFAST_KERNEL_PARAM_FIELD
};
#define KDFAST_COUNT_KERNEL_PARAM(name) +1
constexpr int kKernelParamCount = 0 KDFAST_FOR_EACH_KERNEL_PARAM(KDFAST_COUNT_KERNEL_PARAM);
#undef KDFAST_COUNT_KERNEL_PARAM

struct DistillParams {
  Divergence divergence = Divergence::KL;
  DivergenceParams div;
  double tau = 1.0;     // teacher temperature
  double tau_s = 1.0;   // student temperature
  Weighting weighting = Weighting::None;
  double soft_coef = 1.0;   // soft_weight * scale
  double hard_weight = 0.0;
  double inv_denom = 1.0;   // 1 / (valid rows or normalizer); 1 for "sum"/"none"
  double label_revision = 0.0;  // eta of Label Revision in (0, 1); 0: off (needs labels)
};

struct DistillBatch {
  int64_t rows = 0, vocab = 0;
  const void* teacher = nullptr;  // row i starts at teacher + i * teacher_row_stride (elements)
  const void* student = nullptr;
  int64_t teacher_row_stride = 0, student_row_stride = 0;  // may be 0 (expanded rows)
  DType teacher_dtype = DType::Float32, student_dtype = DType::Float32;
  const int64_t* labels = nullptr;   // (rows,) or null; ignored rows have label == ignore_index
  int64_t ignore_index = -100;
  const double* weights = nullptr;   // (rows,) when weighting == Given
  void* grad = nullptr;              // (rows, vocab) contiguous, student dtype; null: forward only
  bool stream_grad = false;          // write grad with non-temporal stores (a gradient larger than the caches)
  double* row_loss = nullptr;        // (rows,) hard_weight * CE + soft_coef * w * D, unnormalised
  int32_t* row_status = nullptr;     // (rows,) RowStatus
  // 16-bit logits: keep the shifted logits t in scratch for the value sweep
  // (else it reloads and converts the logits): keep_shifted_logits().
  bool keep_shifted_logits = true;
};

// One definition per CPU capability; each processes rows [begin, end).
namespace cpu_default { void distill_rows(const DistillParams&, const DistillBatch&, int64_t begin, int64_t end); }
namespace avx2 { void distill_rows(const DistillParams&, const DistillBatch&, int64_t begin, int64_t end); }
namespace avx512 { void distill_rows(const DistillParams&, const DistillBatch&, int64_t begin, int64_t end); }
namespace avx512_bf16 { void distill_rows(const DistillParams&, const DistillBatch&, int64_t begin, int64_t end); }

// The capability the dispatcher uses: the best the CPU supports, lowered by
// the environment variable KDFAST_CPU_CAPABILITY=default|avx2|avx512|avx512_bf16.
// avx512_bf16 is avx512 plus AVX512_BF16's conversion for bf16 gradients.
enum class CpuCapability : int32_t { Default = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3 };
CpuCapability supported_cpu_capability();
CpuCapability active_cpu_capability();
// Sets the capability (clamped to what the CPU supports) and returns it; for tests and benchmarks.
CpuCapability set_cpu_capability(CpuCapability);
const char* cpu_capability_name(CpuCapability);
// The capability of a name ("default", "avx2", ...); false for an unknown name.
bool parse_cpu_capability(const char* name, CpuCapability* out);
// Whether the row kernels keep a 16-bit row's shifted logits in scratch for
// their value sweep (true) or reload and convert the logits there (false):
// the faster of the two depends on the CPU (row_kernel.h).  Default: true
// except on Intel CPUs at the AVX-512 levels; KDFAST_KEEP_SHIFTED_LOGITS=0|1
// overrides it.
bool keep_shifted_logits();
// Sets it (0 or 1), or restores the default (-1); returns the one in effect.  For tests and benchmarks.
bool set_keep_shifted_logits(int keep);
void distill_rows(const DistillParams&, const DistillBatch&, int64_t begin, int64_t end);

// The SIMD math functions of the kernels (vec.h), exposed for the tests:
// X(enumerator, "name", function of vec.h).
#define KDFAST_FOR_EACH_VECTOR_FN(X)                          \
  X(Exp, "exp", vexp)                                         \
  X(Exp2Nonpositive, "exp2_nonpositive", vexp2_nonpositive)   \
  X(Exp2NonpositiveCoarse, "exp2_nonpositive_coarse", vexp2_nonpositive_coarse) \
  X(Log2Positive, "log2_positive", vlog2_positive)           \
  X(Recip, "recip", vrecip)                                   \
  X(Sqrt, "sqrt", vsqrt)
#define KDFAST_VECTOR_FN_ENUMERATOR(name, text, function) name,
enum class VectorFn : int32_t { KDFAST_FOR_EACH_VECTOR_FN(KDFAST_VECTOR_FN_ENUMERATOR) Count };
#undef KDFAST_VECTOR_FN_ENUMERATOR
namespace cpu_default { void vector_math(VectorFn, const float* x, float* y, int64_t n); }
namespace avx2 { void vector_math(VectorFn, const float* x, float* y, int64_t n); }
namespace avx512 { void vector_math(VectorFn, const float* x, float* y, int64_t n); }
namespace avx512_bf16 { void vector_math(VectorFn, const float* x, float* y, int64_t n); }
// y = fn(x) on the code of `capability` (clamped to what the CPU supports); returns the level used.
CpuCapability vector_math(CpuCapability capability, VectorFn fn, const float* x, float* y, int64_t n);

}  // namespace kdfast
