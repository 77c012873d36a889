// AVX2 + FMA + F16C kernels.  The ISA is enabled for this translation unit
// only (never -mavx2 on the command line), so one build runs on any x86-64;
// the dispatcher calls these kernels only on CPUs that have AVX2.
#include "std_prelude.h"
#define KDFAST_CPU_CAPABILITY avx2
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define KDFAST_ISA_AVX2 1
#endif
#include "distill_rows_entry.h"
#include "correlation_entry.h"
#include "topk_entry.h"
#include "vector_math_entry.h"
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC pop_options
#endif
