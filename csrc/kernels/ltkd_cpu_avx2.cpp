// The LTKD kernels with AVX2 + FMA + F16C, enabled for this translation unit only (see distill_cpu_avx2.cpp).
#include "std_prelude.h"
#define KDFAST_CPU_CAPABILITY avx2
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define KDFAST_ISA_AVX2 1
#endif
#include "ltkd_entry.h"
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC pop_options
#endif
