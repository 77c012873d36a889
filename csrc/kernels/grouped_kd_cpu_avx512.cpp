// Grouped KD rows with AVX-512F+DQ+BW, enabled for this translation unit only
// (as distill_cpu_avx512.cpp; the dispatcher calls it only on CPUs that have them).
#include "std_prelude.h"
// the kernel's other standard headers, also before the ISA pragma (see std_prelude.h)
#include <algorithm>
#include <utility>
#define KDFAST_CPU_CAPABILITY avx512
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx2,fma,f16c")
#define KDFAST_ISA_AVX512 1
#endif
#include "grouped_kd_entry.h"
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC pop_options
#endif
