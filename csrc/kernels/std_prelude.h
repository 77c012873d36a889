// Standard headers of the kernels, included by each capability TU *before*
// its `#pragma GCC target`, so that library inline code is compiled for the
// baseline ISA and only kdfast's own (namespaced) code gets the wide ISA.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
