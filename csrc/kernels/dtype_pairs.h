// The (teacher, student) dtype pairs the kernels are instantiated for, listed once
// (per capability namespace, like the BF16 / F16 storage types).
#pragma once

#include "convert.h"
#include "kernel_api.h"

namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

template <class T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<storage type>) for one dtype (float64 included).
template <class F>
inline void with_dtype(DType d, F&& f) {
  switch (d) {
    case DType::Float32: return f(TypeTag<float>{});
    case DType::BFloat16: return f(TypeTag<BF16>{});
    case DType::Float16: return f(TypeTag<F16>{});
    case DType::Float64: return f(TypeTag<double>{});
  }
}

// Calls f(TypeTag<teacher type>, TypeTag<student type>) for a float32/bfloat16/float16
// pair; false (nothing called) for any other pair.
template <class F>
inline bool with_dtype_pair(DType teacher, DType student, F&& f) {
#define KDFAST_PAIR(TD, SD, TT, TS)                  \
  if (teacher == DType::TD && student == DType::SD) { \
    f(TypeTag<TT>{}, TypeTag<TS>{});                 \
    return true;                                     \
  }
  KDFAST_PAIR(Float32, Float32, float, float)
  KDFAST_PAIR(BFloat16, BFloat16, BF16, BF16)
  KDFAST_PAIR(Float16, Float16, F16, F16)
  KDFAST_PAIR(Float32, BFloat16, float, BF16)
  KDFAST_PAIR(BFloat16, Float32, BF16, float)
  KDFAST_PAIR(Float32, Float16, float, F16)
  KDFAST_PAIR(Float16, Float32, F16, float)
  KDFAST_PAIR(BFloat16, Float16, BF16, F16)
  KDFAST_PAIR(Float16, BFloat16, F16, BF16)
#undef KDFAST_PAIR
  return false;
}

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
