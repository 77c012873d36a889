// Grouped KD rows at the AVX512_BF16 level (as distill_cpu_avx512_bf16.cpp: a bf16
// gradient is stored with vcvtneps2bf16); the dispatcher calls it only on CPUs that have it.
#include "std_prelude.h"
// the kernel's other standard headers, also before the ISA pragma (see std_prelude.h)
#include <algorithm>
#include <utility>
#define KDFAST_CPU_CAPABILITY avx512_bf16
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512bf16,avx2,fma,f16c")
#define KDFAST_ISA_AVX512 1
#define KDFAST_ISA_AVX512_BF16 1
#endif
#include "grouped_kd_entry.h"
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC pop_options
#endif
