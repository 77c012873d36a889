// The AVX-512 kernels again, built with AVX512_BF16 for one instruction: a
// bf16 gradient is stored with vcvtneps2bf16 instead of an 8-instruction
// integer rounding (convert.h), in sweeps bound by their instruction count.
// Called by the dispatcher only on CPUs that have it (Cooper Lake, Sapphire
// Rapids, Zen 4 and later); everything else is the avx512 level's code.
#include "std_prelude.h"
#define KDFAST_CPU_CAPABILITY avx512_bf16
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512bf16,avx2,fma,f16c")
#define KDFAST_ISA_AVX512 1
#define KDFAST_ISA_AVX512_BF16 1
#endif
#include "distill_rows_entry.h"
#include "correlation_entry.h"
#include "topk_entry.h"
#include "vector_math_entry.h"
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC pop_options
#endif
