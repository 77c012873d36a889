// The LTKD kernels at the avx512_bf16 level: AVX-512 plus vcvtneps2bf16 for bf16 gradient stores
// (see distill_cpu_avx512_bf16.cpp).
#include "std_prelude.h"
#define KDFAST_CPU_CAPABILITY avx512_bf16
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512bf16,avx2,fma,f16c")
#define KDFAST_ISA_AVX512 1
#define KDFAST_ISA_AVX512_BF16 1
#endif
#include "ltkd_entry.h"
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC pop_options
#endif
