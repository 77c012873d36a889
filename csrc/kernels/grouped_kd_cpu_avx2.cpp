// Grouped KD rows with AVX2 + FMA + F16C, enabled for this translation unit only
// (as distill_cpu_avx2.cpp; the dispatcher calls it only on CPUs that have AVX2).
#include "std_prelude.h"
// the kernel's other standard headers, also before the ISA pragma (see std_prelude.h)
#include <algorithm>
#include <utility>
#define KDFAST_CPU_CAPABILITY avx2
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define KDFAST_ISA_AVX2 1
#endif
#include "grouped_kd_entry.h"
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC pop_options
#endif
