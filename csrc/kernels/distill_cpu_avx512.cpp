// AVX-512F+DQ+BW kernels (16 float lanes), enabled for this translation unit only;
// called by the dispatcher only on CPUs that have AVX-512F, DQ and BW (every AVX-512 CPU but Xeon Phi).
#include "std_prelude.h"
#define KDFAST_CPU_CAPABILITY avx512
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx2,fma,f16c")
#define KDFAST_ISA_AVX512 1
#endif
#include "distill_rows_entry.h"
#include "correlation_entry.h"
#include "topk_entry.h"
#include "vector_math_entry.h"
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC pop_options
#endif
