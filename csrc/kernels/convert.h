// Loading logits of any supported dtype into float lanes, and storing the
// gradient back in the student's dtype.  bf16/fp16 are read directly (no
// upcast copy of the row), accumulation is always in the lanes' type.
#pragma once

#include <type_traits>
#include <utility>

#include "vec.h"

namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

// Storage types for the 16-bit floats (layout-compatible with c10::BFloat16 / c10::Half).
struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };

inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }
inline float to_float(BF16 x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_float(F16 h) {
  // IEEE half -> float, including subnormals, inf and NaN.
  uint32_t sign = uint32_t(h.bits & 0x8000) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1f;
  uint32_t man = h.bits & 0x3ff;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal half: normalise
      int e = -1;
      do { man <<= 1; ++e; } while ((man & 0x400) == 0);
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <class T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline BF16 from_float<BF16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (std::isnan(x)) return {uint16_t(0x7fc0 | (u >> 16 & 0x8000))};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {uint16_t(u >> 16)};
}
template <> inline F16 from_float<F16>(float x) {
  // float -> IEEE half, round to nearest even, overflow to inf.
  uint32_t u;
  std::memcpy(&u, &x, 4);
  uint16_t sign = uint16_t((u >> 16) & 0x8000);
  uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return {uint16_t(sign | 0x7c00 | (a > 0x7f800000u ? 0x200 : 0))};
  if (a >= 0x477ff000u) return {uint16_t(sign | 0x7c00)};  // rounds above 65504
  if (a < 0x38800000u) {  // result is subnormal half (or zero)
    if (a < 0x33000000u) return {sign};
    uint32_t e = a >> 23;
    uint32_t m = (a & 0x7fffff) | 0x800000;
    uint32_t shift = 126 - e;  // 14 + (112 - e) ... places the value in units of 2^-24
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) ++q;
    return {uint16_t(sign | q)};
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round to nearest even at bit 13
  return {uint16_t(sign | (((r >> 13) - (112u << 10)) & 0xffff))};
}
template <> inline double from_float<double>(float x) { return x; }

// ---------------------------------------------------------------------------
// Full-width loads/stores.  The generic version goes through a float buffer;
// the ISA-specific overloads below convert in registers.
// ---------------------------------------------------------------------------
template <class Vec, class T>
struct Convert {
  using S = typename Vec::value_type;
  static Vec load(const T* p) {
    alignas(64) S t[Vec::size];
    for (int i = 0; i < Vec::size; ++i) t[i] = S(to_float(p[i]));
    return Vec::load(t);
  }
  static void store(T* p, Vec v) {
    alignas(64) S t[Vec::size];
    v.store(t);
    for (int i = 0; i < Vec::size; ++i) p[i] = from_float<T>(float(t[i]));
  }
};
template <class Vec>
struct Convert<Vec, typename Vec::value_type> {
  using S = typename Vec::value_type;
  static Vec load(const S* p) { return Vec::load(p); }
  static void store(S* p, Vec v) { v.store(p); }
};

#if defined(KDFAST_ISA_AVX2)
template <>
struct Convert<VecF, BF16> {
  static VecF load(const BF16* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  // round to nearest even, NaN kept quiet
  static __m128i bits(VecF v) {
    __m256i b = _mm256_castps_si256(v.v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m256 nan = _mm256_cmp_ps(v.v, v.v, _CMP_UNORD_Q);
    r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r),
                                             _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0)), nan));
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  }
  static void store(BF16* p, VecF v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bits(v)); }
  static void stream(BF16* p, VecF v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), bits(v)); }
};
template <>
struct Convert<VecF, F16> {
  static VecF load(const F16* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  static __m128i bits(VecF v) { return _mm256_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT); }
  static void store(F16* p, VecF v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bits(v)); }
  static void stream(F16* p, VecF v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), bits(v)); }
};
inline void stream_store(float* p, VecF v) { _mm256_stream_ps(p, v.v); }
#endif

#if defined(KDFAST_ISA_AVX512)
template <>
struct Convert<VecF, BF16> {
  // One permute (AVX512BW) moves each bf16 into the high half of its float
  // lane and zeroes the low half: 1 instruction where widen + shift take 2,
  // in sweeps that are bound by their instruction count.
  static VecF load(const BF16* p) {
    const __m512i to_high_halves = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0,
                                                    7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
    const __m512i w = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAA, to_high_halves, w))};
  }
  // round to nearest even, NaN kept quiet
  static __m256i bits(VecF v) {
#if defined(KDFAST_ISA_AVX512_BF16)
    // the same rounding in one instruction, except that it flushes subnormal
    // results (|x| < 2^-126, far below any gradient that matters) to zero
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v.v));
#else
    __m512i b = _mm512_castps_si512(v.v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v.v, v.v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
#endif
  }
  static void store(BF16* p, VecF v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits(v)); }
  static void stream(BF16* p, VecF v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bits(v)); }
};
template <>
struct Convert<VecF, F16> {
  static VecF load(const F16* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  static __m256i bits(VecF v) { return _mm512_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT); }
  static void store(F16* p, VecF v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits(v)); }
  static void stream(F16* p, VecF v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bits(v)); }
};
inline void stream_store(float* p, VecF v) { _mm512_stream_ps(p, v.v); }
#endif

// Non-temporal stores of a full vector of the gradient (where the ISA has
// them): the gradient is written once and read by the caller long after, so
// it bypasses the caches, and DRAM does not first read every line it is about
// to overwrite.  p must be aligned to the stored bytes (kStreamAlign); after
// them, stream_fence() orders these weakly-ordered stores before later ones.
#if defined(KDFAST_ISA_AVX2) || defined(KDFAST_ISA_AVX512)
inline void stream_store(BF16* p, VecF v) { Convert<VecF, BF16>::stream(p, v); }
inline void stream_store(F16* p, VecF v) { Convert<VecF, F16>::stream(p, v); }
inline void stream_fence() { _mm_sfence(); }
#else
inline void stream_fence() {}
#endif
// Every other (storage, lanes) pair: no streaming (the overload exists only to be detected as deleted).
template <class T, class V>
void stream_store(T*, V) = delete;
// Whether stream_store(T*, V) exists for these lanes and storage type (C++17 detection).
template <class V, class T, class = void>
struct HasStreamStore : std::false_type {};
template <class V, class T>
struct HasStreamStore<V, T, std::void_t<decltype(stream_store(std::declval<T*>(), std::declval<V>()))>>
    : std::true_type {};
template <class V, class T>
inline constexpr bool Streamable = HasStreamStore<V, T>::value;
template <class V, class T>
inline constexpr int64_t kStreamAlign = int64_t(V::size * sizeof(T));

// Tails (the last V % Vec::size entries): padded with `fill` on load, only the
// first n lanes written on store.
template <class Vec, class T>
inline Vec load_tail(const T* p, int n, float fill) {
  using S = typename Vec::value_type;
  alignas(64) S t[Vec::size];
  for (int i = 0; i < Vec::size; ++i) t[i] = i < n ? S(to_float(p[i])) : S(fill);
  return Vec::load(t);
}
template <class Vec, class T>
inline void store_tail(T* p, Vec v, int n) {
  if constexpr (Vec::size > 1) {  // the full vector's conversion, so that a tail rounds as the rest of its row
    T t[Vec::size];
    Convert<Vec, T>::store(t, v);
    for (int i = 0; i < n; ++i) p[i] = t[i];
  } else {
    for (int i = 0; i < n; ++i) p[i] = from_float<T>(float(v.lane(i)));
  }
}
template <class Vec>
inline void store_tail(double* p, Vec v, int n) {
  alignas(64) double t[Vec::size];
  v.store(t);
  for (int i = 0; i < n; ++i) p[i] = t[i];
}

// Masked loads and stores for the tails where the ISA has them: a row of
// V = 100 has a tail in every sweep, and a scalar loop per tail cost as much
// as the rest of the row.  Masked-off lanes are never touched (no fault past
// the row's end).
#if defined(KDFAST_ISA_AVX512)
inline __mmask16 tail_mask(int n) { return __mmask16((1u << n) - 1u); }
template <>
inline VecF load_tail<VecF, float>(const float* p, int n, float fill) {
  return {_mm512_mask_loadu_ps(_mm512_set1_ps(fill), tail_mask(n), p)};
}
// 16-bit storage: a masked load of the 16-bit lanes (AVX512BW), widened as the full loads are.
inline __m256i load_tail_u16(const void* p, int n) {
  return _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(__mmask32(tail_mask(n)), p));
}
template <>
inline VecF load_tail<VecF, BF16>(const BF16* p, int n, float fill) {
  const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load_tail_u16(p, n)), 16));
  return {_mm512_mask_blend_ps(tail_mask(n), _mm512_set1_ps(fill), v)};
}
template <>
inline VecF load_tail<VecF, F16>(const F16* p, int n, float fill) {
  return {_mm512_mask_blend_ps(tail_mask(n), _mm512_set1_ps(fill), _mm512_cvtph_ps(load_tail_u16(p, n)))};
}
template <>
inline void store_tail<VecF, float>(float* p, VecF v, int n) { _mm512_mask_storeu_ps(p, tail_mask(n), v.v); }
template <>
inline void store_tail<VecF, BF16>(BF16* p, VecF v, int n) {
  _mm512_mask_storeu_epi16(p, __mmask32(tail_mask(n)), _mm512_castsi256_si512(Convert<VecF, BF16>::bits(v)));
}
template <>
inline void store_tail<VecF, F16>(F16* p, VecF v, int n) {
  _mm512_mask_storeu_epi16(p, __mmask32(tail_mask(n)), _mm512_castsi256_si512(Convert<VecF, F16>::bits(v)));
}
#elif defined(KDFAST_ISA_AVX2)
// float only: AVX2 has no 16-bit masked moves (bf16 and fp16 tails keep the loop).
inline __m256i tail_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
template <>
inline VecF load_tail<VecF, float>(const float* p, int n, float fill) {
  const __m256i m = tail_mask(n);
  return {_mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m))};
}
template <>
inline void store_tail<VecF, float>(float* p, VecF v, int n) { _mm256_maskstore_ps(p, tail_mask(n), v.v); }
#endif

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
