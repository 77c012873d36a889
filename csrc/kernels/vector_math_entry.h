// The SIMD math functions of vec.h, one call per array, for the tests
// (tests/test_vector_math.py through _C._vector_math): each capability's
// translation unit includes this once, so every level's code is what is tested.
#pragma once

#include "kernel_api.h"
#include "vec.h"

namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

void vector_math(VectorFn fn, const float* x, float* y, int64_t n) {
  int64_t j = 0;
  auto apply = [&](auto f) {
    for (; j + VecF::size <= n; j += VecF::size) f(VecF::load(x + j)).store(y + j);
    if (j < n) {  // the tail through a padded vector
      alignas(64) float in[VecF::size] = {}, out[VecF::size];
      for (int64_t i = j; i < n; ++i) in[i - j] = x[i];
      f(VecF::load(in)).store(out);
      for (int64_t i = j; i < n; ++i) y[i] = out[i - j];
    }
  };
  switch (fn) {
#define KDFAST_VECTOR_FN_CASE(name, text, function) \
    case VectorFn::name: return apply([](VecF v) { return function(v); });
    KDFAST_FOR_EACH_VECTOR_FN(KDFAST_VECTOR_FN_CASE)
#undef KDFAST_VECTOR_FN_CASE
    default: break;
  }
}

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
