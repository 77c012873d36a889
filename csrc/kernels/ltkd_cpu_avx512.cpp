// The LTKD kernels with AVX-512F+DQ+BW, enabled for this translation unit only (see distill_cpu_avx512.cpp).
#include "std_prelude.h"
#define KDFAST_CPU_CAPABILITY avx512
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx2,fma,f16c")
#define KDFAST_ISA_AVX512 1
#endif
#include "ltkd_entry.h"
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC pop_options
#endif
