// Run-time choice of the kernel capability, as ATen does with CPU_CAPABILITY.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "correlation_api.h"
#include "dist_api.h"
#include "dkd_api.h"
#include "grouped_kd_api.h"
#include "kernel_api.h"
#include "ltkd_api.h"
#include "topk_api.h"

namespace kdfast {

CpuCapability supported_cpu_capability() {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return __builtin_cpu_supports("avx512bf16") ? CpuCapability::AVX512_BF16 : CpuCapability::AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuCapability::AVX2;
#endif
  return CpuCapability::Default;
}

const char* cpu_capability_name(CpuCapability c) {
  switch (c) {
    case CpuCapability::AVX512_BF16: return "avx512_bf16";
    case CpuCapability::AVX512: return "avx512";
    case CpuCapability::AVX2: return "avx2";
    default: return "default";
  }
}

bool parse_cpu_capability(const char* name, CpuCapability* out) {
  for (CpuCapability c : {CpuCapability::Default, CpuCapability::AVX2, CpuCapability::AVX512, CpuCapability::AVX512_BF16}) {
    if (std::strcmp(name, cpu_capability_name(c)) == 0) {
      *out = c;
      return true;
    }
  }
  return false;
}

// KDFAST_CPU_CAPABILITY can only lower the level (an unsupported request would
// crash); an unknown name leaves the best level.
static CpuCapability resolve_capability() {
  const CpuCapability best = supported_cpu_capability();
  const char* env = std::getenv("KDFAST_CPU_CAPABILITY");
  CpuCapability want = best;
  if (!env || !*env || !parse_cpu_capability(env, &want)) return best;
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

static std::atomic<int> g_capability{-1};

// Measured on 2026-12-01 (bf16 4096 x 32000 fwd+bwd): on an Intel Xeon at
// the AVX-512 levels reloading was 3-9 % faster (jsd 56 against 58 ms, renyi
// 50 against 55); at its avx2 level keeping was (jsd 78 against 83 ms: there
// the kept t's floor is the exponential's own clamp, and the conversion has
// no AVX-512 instructions).  On the AMD EPYC of the earlier sessions keeping
// was the faster at avx512 (2026-11-30: jsd 1.69x -> 1.60x KL); its 512-bit
// operations take two 256-bit halves.
static bool cpu_is_intel() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return intel;
#else
  return false;
#endif
}

// 0 or 1 from KDFAST_KEEP_SHIFTED_LOGITS, else -1 (the CPU's default)
static int keep_shifted_logits_from_env() {
  const char* env = std::getenv("KDFAST_KEEP_SHIFTED_LOGITS");
  if (env && (std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0)) return env[0] == '1';
  return -1;
}

static std::atomic<int> g_keep_shifted_logits{-2};  // -2: the environment not read yet; -1: the default

bool keep_shifted_logits() {
  int k = g_keep_shifted_logits.load();
  if (k == -2) {
    k = keep_shifted_logits_from_env();
    g_keep_shifted_logits.store(k);
  }
  if (k >= 0) return k == 1;
  return !(cpu_is_intel() && static_cast<int>(active_cpu_capability()) >= static_cast<int>(CpuCapability::AVX512));
}

bool set_keep_shifted_logits(int keep) {
  g_keep_shifted_logits.store(keep < 0 ? keep_shifted_logits_from_env() : (keep ? 1 : 0));
  return keep_shifted_logits();
}

CpuCapability active_cpu_capability() {
  int c = g_capability.load();
  if (c < 0) {
    c = static_cast<int>(resolve_capability());
    g_capability.store(c);
  }
  return static_cast<CpuCapability>(c);
}

CpuCapability set_cpu_capability(CpuCapability want) {
  const CpuCapability best = supported_cpu_capability();
  const CpuCapability got = static_cast<int>(want) < static_cast<int>(best) ? want : best;
  g_capability.store(static_cast<int>(got));
  return got;
}


// Whether a batch computes in float64, which only the baseline does.
template <class Batch>
bool computes_in_float64(const Batch& b) {
  return b.teacher_dtype == DType::Float64 || b.student_dtype == DType::Float64;
}
// The top-k kernel reads log-probs of any dtype into lanes of the student's type.
inline bool computes_in_float64(const TopkBatch& b) { return b.student_dtype == DType::Float64; }

// Every kernel entry point: float64 always takes the baseline (its only double
// path), other dtypes the active capability.
#define KDFAST_CAPABILITY_DISPATCH(stage, Params, Batch)                                      \
  void stage(const Params& p, const Batch& b, int64_t begin, int64_t end) {                  \
    if (computes_in_float64(b))                                                               \
      return cpu_default::stage(p, b, begin, end);                                            \
    switch (active_cpu_capability()) {                                                        \
      case CpuCapability::AVX512_BF16: return avx512_bf16::stage(p, b, begin, end);           \
      case CpuCapability::AVX512: return avx512::stage(p, b, begin, end);                     \
      case CpuCapability::AVX2: return avx2::stage(p, b, begin, end);                         \
      default: return cpu_default::stage(p, b, begin, end);                                   \
    }                                                                                         \
  }
KDFAST_CAPABILITY_DISPATCH(distill_rows, DistillParams, DistillBatch)
KDFAST_CAPABILITY_DISPATCH(dist_row_stats, DistParams, DistBatch)
KDFAST_CAPABILITY_DISPATCH(dist_column_stats, DistParams, DistBatch)
KDFAST_CAPABILITY_DISPATCH(dist_grad_rows, DistParams, DistBatch)
KDFAST_CAPABILITY_DISPATCH(dkd_rows, DkdParams, DkdBatch)
KDFAST_CAPABILITY_DISPATCH(grouped_kd_rows, GroupedKdParams, GroupedKdBatch)
KDFAST_CAPABILITY_DISPATCH(correlation_rows, CorrelationParams, CorrelationBatch)
KDFAST_CAPABILITY_DISPATCH(topk_rows, DistillParams, TopkBatch)
KDFAST_CAPABILITY_DISPATCH(ltkd_rows, LtkdParams, LtkdBatch)
KDFAST_CAPABILITY_DISPATCH(ltkd_teacher_groups_rows, LtkdParams, LtkdBatch)
#undef KDFAST_CAPABILITY_DISPATCH

CpuCapability vector_math(CpuCapability want, VectorFn fn, const float* x, float* y, int64_t n) {
  const CpuCapability best = supported_cpu_capability();
  const CpuCapability got = static_cast<int>(want) < static_cast<int>(best) ? want : best;
  switch (got) {
    case CpuCapability::AVX512_BF16: avx512_bf16::vector_math(fn, x, y, n); break;
    case CpuCapability::AVX512: avx512::vector_math(fn, x, y, n); break;
    case CpuCapability::AVX2: avx2::vector_math(fn, x, y, n); break;
    default: cpu_default::vector_math(fn, x, y, n); break;
  }
  return got;
}

}  // namespace kdfast
