// A minimal SIMD abstraction for the row kernels.
//
// The same kernel source is compiled once per CPU capability (default, avx2,
// avx512), each time inside its own namespace `kdfast::KDFAST_CPU_CAPABILITY`,
// so that inline functions compiled for a wider ISA can never be picked by the
// linker for a narrower one (the ODR trap ATen avoids the same way).  The
// capability is chosen by the translation unit (KDFAST_ISA_*), not by
// __AVX2__, because the wide TUs enable their ISA with `#pragma GCC target`.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(KDFAST_ISA_AVX2) || defined(KDFAST_ISA_AVX512)
#include <immintrin.h>
#endif

#ifndef KDFAST_CPU_CAPABILITY
#error "KDFAST_CPU_CAPABILITY must name the capability namespace"
#endif

namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

constexpr double kLog2eD = 1.44269504088896340736, kLn2D = 0.693147180559945309417;

// ---------------------------------------------------------------------------
// Scalar lanes: the portable baseline, and the float64 path used by gradcheck.
// ---------------------------------------------------------------------------
template <class T>
struct ScalarVec {
  using value_type = T;
  using Mask = bool;
  static constexpr int size = 1;
  T v;

  static ScalarVec broadcast(T x) { return {x}; }
  static ScalarVec zero() { return {T(0)}; }
  static ScalarVec load(const T* p) { return {*p}; }
  void store(T* p) const { *p = v; }
  T reduce_add() const { return v; }
  T reduce_max() const { return v; }
  T lane(int) const { return v; }
  // the mask of the lanes whose bits are set (lane i: bit i)
  static Mask from_bits(uint32_t bits) { return (bits & 1u) != 0; }
};

template <class T> inline ScalarVec<T> operator+(ScalarVec<T> a, ScalarVec<T> b) { return {a.v + b.v}; }
template <class T> inline ScalarVec<T> operator-(ScalarVec<T> a, ScalarVec<T> b) { return {a.v - b.v}; }
template <class T> inline ScalarVec<T> operator*(ScalarVec<T> a, ScalarVec<T> b) { return {a.v * b.v}; }
template <class T> inline ScalarVec<T> operator/(ScalarVec<T> a, ScalarVec<T> b) { return {a.v / b.v}; }
template <class T> inline ScalarVec<T> fmadd(ScalarVec<T> a, ScalarVec<T> b, ScalarVec<T> c) { return {a.v * b.v + c.v}; }
// Fused for float lanes, as the vector ISAs' FMA is: the kernels scale
// logits as z * (log2(e) / tau) + shift, where a rounded product of a 1e4-size
// logit would be off by 1e-3 before the shift brings it near 0.  A float
// product is exact in double, so this needs no (slow, software) std::fma.
inline ScalarVec<float> fmadd(ScalarVec<float> a, ScalarVec<float> b, ScalarVec<float> c) {
  return {float(double(a.v) * double(b.v) + double(c.v))};
}
template <class T> inline ScalarVec<T> vmax(ScalarVec<T> a, ScalarVec<T> b) { return {a.v > b.v ? a.v : b.v}; }
template <class T> inline ScalarVec<T> vmin(ScalarVec<T> a, ScalarVec<T> b) { return {a.v < b.v ? a.v : b.v}; }
template <class T> inline ScalarVec<T> vabs(ScalarVec<T> a) { return {std::fabs(a.v)}; }
template <class T> inline ScalarVec<T> vsqrt(ScalarVec<T> a) { return {std::sqrt(a.v)}; }
template <class T> inline bool gt(ScalarVec<T> a, ScalarVec<T> b) { return a.v > b.v; }
template <class T> inline bool eq(ScalarVec<T> a, ScalarVec<T> b) { return a.v == b.v; }
inline bool mask_and(bool a, bool b) { return a && b; }
inline bool any_lane(bool m) { return m; }
template <class T> inline ScalarVec<T> select(bool m, ScalarVec<T> a, ScalarVec<T> b) { return m ? a : b; }
// exp/log of the scalar lanes use libm: exact enough to be the baseline.
template <class T> inline ScalarVec<T> vexp(ScalarVec<T> x) { return {std::exp(x.v)}; }
template <class T> inline ScalarVec<T> vexp_nonpositive(ScalarVec<T> x) { return {std::exp(x.v)}; }
template <class T> inline ScalarVec<T> vexp2_nonpositive(ScalarVec<T> t) { return {std::exp2(t.v)}; }
template <class T> inline ScalarVec<T> vexp2_nonpositive_coarse(ScalarVec<T> t) { return {std::exp2(t.v)}; }
// t with -inf raised to the lowest finite value (2^t is 0 at both; see the vector version)
template <class T> inline ScalarVec<T> exp2_arg_floor(ScalarVec<T> t) {
  return {std::max(t.v, std::numeric_limits<T>::lowest())};
}
// c ? a * b + d : d
template <class T> inline ScalarVec<T> fmadd_where(bool c, ScalarVec<T> a, ScalarVec<T> b, ScalarVec<T> d) {
  return c ? fmadd(a, b, d) : d;
}
// log of a value known to be positive and normal (the kernels only take the log
// of 1 + y with y in [0, 1]).
template <class T> inline ScalarVec<T> vlog2_positive(ScalarVec<T> x) { return {std::log2(x.v)}; }
template <class T> inline ScalarVec<T> vrecip(ScalarVec<T> x) { return {T(1) / x.v}; }

#if defined(KDFAST_ISA_AVX2) || defined(KDFAST_ISA_AVX512)
// ---------------------------------------------------------------------------
// Float exp/log shared by the vector ISAs (bounds tested at every level by
// tests/test_vector_math.py).  2^t (t <= 0) is accurate to 2.5 ulp down to
// 2^-124; exp(x) = 2^(x log2 e) adds the rounding of that product, so its
// relative error is <= 3e-7 + 9e-8 |x| on [-86.5, 88.7]; below it goes to
// 0 (AVX2 flushes at -86.5, AVX-512 through denormals at -103), so
// exp(-inf) == 0; above 88.7 it is +inf, and NaN gives NaN.
// ---------------------------------------------------------------------------
namespace cephes {
constexpr float kExpLo = -86.5f;
constexpr float kExpHi = 88.7f;
constexpr float kLog2e = 1.44269504088896341f;
// 1.5 * 2^23: adding it rounds to an integer that lands in the low mantissa bits.
constexpr float kShifter = 12582912.0f;
// exp(r) ~ 1 + r (c1 + r (c2 + ...)) on |r| <= ln2 / 2, relative-error minimax
// (Lawson iteration, degree 5 with p(0) = 1): max error 9.5e-8 with float coefficients.
constexpr double kExpC1 = 0.999999707185771, kExpC2 = 0.49999149523356046, kExpC3 = 0.166676362019904,
                 kExpC4 = 0.04189793026082907, kExpC5 = 0.00829031464218091;
// The same polynomial in f = r / ln2 on |f| <= 1/2: 2^f ~ 1 + f (c1 ln2 + f (c2 ln2^2 + ...)).
// Base 2 lets the callers fold log2(e) into the scale of their logits, and
// the reduction f = t - round(t) is exact.
constexpr float kExp2C1 = float(kExpC1 * kLn2D), kExp2C2 = float(kExpC2 * kLn2D * kLn2D),
                kExp2C3 = float(kExpC3 * kLn2D * kLn2D * kLn2D), kExp2C4 = float(kExpC4 * kLn2D * kLn2D * kLn2D * kLn2D),
                kExp2C5 = float(kExpC5 * kLn2D * kLn2D * kLn2D * kLn2D * kLn2D);
constexpr float kExp2Lo = float(double(kExpLo) * kLog2eD);  // 2^t below: 0 on AVX2
// 2^f on [0, 1), for AVX-512's reduction f = t - floor(t): the same degree-5
// relative minimax with p(0) = 1, refitted there (7.4e-8 with exact
// coefficients; 1.6e-7 in float arithmetic, as the centred one above).
constexpr float kExp2UnitC1 = 0x1.62e4b2p-1f, kExp2UnitC2 = 0x1.ebdc78p-3f, kExp2UnitC3 = 0x1.c91184p-5f,
                kExp2UnitC4 = 0x1.27a7e0p-7f, kExp2UnitC5 = 0x1.e8e84cp-10f;
// Degree 4, for sweeps whose results are 16-bit (relative error 3e-6, 1/80 of a float16 ulp): the
// same relative minimax with p(0) = 1 (Lawson iteration), on [0, 1) and on |f| <= 1/2.
constexpr float kExp2UnitCoarseC1 = 0x1.62d6c6p-1f, kExp2UnitCoarseC2 = 0x1.ee243cp-3f,
                kExp2UnitCoarseC3 = 0x1.abf922p-5f, kExp2UnitCoarseC4 = 0x1.b7f564p-7f;
constexpr float kExp2CoarseC1 = 0x1.62e12cp-1f, kExp2CoarseC2 = 0x1.ec0378p-3f, kExp2CoarseC3 = 0x1.c9fc1ep-5f,
                kExp2CoarseC4 = 0x1.3a0282p-7f;
}  // namespace cephes
#endif

#if defined(KDFAST_ISA_AVX2) || defined(KDFAST_ISA_AVX512)
// The op (max or min) of the 8 int16 lanes of x, or of two such vectors, in
// registers (a store to an array would keep a loop's accumulator in memory).
struct MaxI16 {
  __m128i operator()(__m128i a, __m128i b) const { return _mm_max_epi16(a, b); }
};
struct MinI16 {
  __m128i operator()(__m128i a, __m128i b) const { return _mm_min_epi16(a, b); }
};
template <class Op>
inline int16_t reduce_i16(__m128i x, Op op) {
  x = op(x, _mm_shuffle_epi32(x, 0x4e));
  x = op(x, _mm_shuffle_epi32(x, 0xb1));
  x = op(x, _mm_shufflelo_epi16(x, 0xb1));
  return int16_t(_mm_extract_epi16(x, 0));
}
// (a struct, not std::pair: a template argument would drop __m128i's attributes)
struct I16Halves { __m128i lo, hi; };
template <class Op>
inline int16_t reduce_i16(I16Halves x, Op op) { return reduce_i16(op(x.lo, x.hi), op); }
#endif

#if defined(KDFAST_ISA_AVX2)
// ---------------------------------------------------------------------------
// AVX2 + FMA: 8 float lanes.
// ---------------------------------------------------------------------------
struct VecF {
  using value_type = float;
  using Mask = __m256;
  static constexpr int size = 8;
  __m256 v;

  static VecF broadcast(float x) { return {_mm256_set1_ps(x)}; }
  static VecF zero() { return {_mm256_setzero_ps()}; }
  static VecF load(const float* p) { return {_mm256_loadu_ps(p)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  float reduce_add() const {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    __m128 s = _mm_add_ps(lo, hi);
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float reduce_max() const {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    __m128 s = _mm_max_ps(lo, hi);
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float lane(int i) const { alignas(32) float t[8]; _mm256_store_ps(t, v); return t[i]; }
  static Mask from_bits(uint32_t bits) {
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(bits)), lane), lane));
  }
};
inline VecF operator+(VecF a, VecF b) { return {_mm256_add_ps(a.v, b.v)}; }
inline VecF operator-(VecF a, VecF b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline VecF operator*(VecF a, VecF b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline VecF operator/(VecF a, VecF b) { return {_mm256_div_ps(a.v, b.v)}; }
inline VecF fmadd(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
// max/min return the second operand when either is NaN; callers put the
// running value second so that a NaN input propagates only through sums.
inline VecF vmax(VecF a, VecF b) { return {_mm256_max_ps(a.v, b.v)}; }
inline VecF vmin(VecF a, VecF b) { return {_mm256_min_ps(a.v, b.v)}; }
inline VecF vabs(VecF a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
inline VecF vsqrt(VecF a) { return {_mm256_sqrt_ps(a.v)}; }  // correctly rounded
// 1/x to 12 bits (relative error <= 1.5 * 2^-12), for vrecip's Newton step
inline VecF rcp_estimate(VecF x) { return {_mm256_rcp_ps(x.v)}; }
inline __m256 gt(VecF a, VecF b) { return _mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ); }
inline __m256 eq(VecF a, VecF b) { return _mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ); }
inline __m256 mask_and(__m256 a, __m256 b) { return _mm256_and_ps(a, b); }
inline bool any_lane(__m256 m) { return _mm256_movemask_ps(m) != 0; }
inline VecF select(__m256 m, VecF a, VecF b) { return {_mm256_blendv_ps(b.v, a.v, m)}; }

// ISA primitives of the shared exp/log below.
inline VecF fnmadd(VecF a, VecF b, VecF c) { return {_mm256_fnmadd_ps(a.v, b.v, c.v)}; }
inline VecF fmadd_where(__m256 c, VecF a, VecF b, VecF d) { return select(c, fmadd(a, b, d), d); }
// x = (1 + f) 2^k with 1 + f in [0.699, 1.398): musl's logf reduction (the
// exponent of x shifted by the bits of 0.699, so that the mantissa lands
// around 1), for positive normal x.
inline void log_reduce(VecF x, VecF& f, VecF& k) {
  const __m256i bits = _mm256_castps_si256(x.v);
  const __m256i tmp = _mm256_sub_epi32(bits, _mm256_set1_epi32(0x3f330000));
  k = {_mm256_cvtepi32_ps(_mm256_srai_epi32(tmp, 23))};
  const __m256i z = _mm256_sub_epi32(bits, _mm256_and_si256(tmp, _mm256_set1_epi32(int32_t(0xff800000u))));
  f = VecF{_mm256_castsi256_ps(z)} - VecF::broadcast(1.0f);
}
// log2(1 + f) / f on f's range here, [-0.301, 0.399]: the degree-8 relative
// minimax (Lawson iteration; 2.6e-8 with exact coefficients), c0 first.
constexpr float kLog2Poly[] = {1.4426950070925064f,  -0.7213470786271852f, 0.48090943458763996f,
                               -0.3607316006562213f, 0.28799365961775597f, -0.23824567529865961f,
                               0.21400418134857363f, -0.21217778860690534f, 0.13781365390668002f};
// 16-bit integer lanes, one per float lane: the bf16 max sweep compares raw bits.
struct VecI16 {
  __m128i v;
  static VecI16 broadcast(int16_t x) { return {_mm_set1_epi16(x)}; }
  static VecI16 load(const void* p) { return {_mm_loadu_si128(static_cast<const __m128i*>(p))}; }
  int16_t reduce_max() const { return reduce_i16(v, MaxI16{}); }
  int16_t reduce_min() const { return reduce_i16(v, MinI16{}); }
};
inline VecI16 vmax(VecI16 a, VecI16 b) { return {_mm_max_epi16(a.v, b.v)}; }
inline VecI16 vmin(VecI16 a, VecI16 b) { return {_mm_min_epi16(a.v, b.v)}; }
#endif  // KDFAST_ISA_AVX2

#if defined(KDFAST_ISA_AVX512)
// ---------------------------------------------------------------------------
// AVX-512F: 16 float lanes, masks in k-registers.
// ---------------------------------------------------------------------------
struct VecF {
  using value_type = float;
  using Mask = __mmask16;
  static constexpr int size = 16;
  __m512 v;

  static VecF broadcast(float x) { return {_mm512_set1_ps(x)}; }
  static VecF zero() { return {_mm512_setzero_ps()}; }
  static VecF load(const float* p) { return {_mm512_loadu_ps(p)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }
  float lane(int i) const { alignas(64) float t[16]; _mm512_store_ps(t, v); return t[i]; }
  static Mask from_bits(uint32_t bits) { return __mmask16(bits); }
};
inline VecF operator+(VecF a, VecF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline VecF operator-(VecF a, VecF b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline VecF operator*(VecF a, VecF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VecF operator/(VecF a, VecF b) { return {_mm512_div_ps(a.v, b.v)}; }
inline VecF fmadd(VecF a, VecF b, VecF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VecF vmax(VecF a, VecF b) { return {_mm512_max_ps(a.v, b.v)}; }
inline VecF vmin(VecF a, VecF b) { return {_mm512_min_ps(a.v, b.v)}; }
inline VecF vabs(VecF a) { return {_mm512_abs_ps(a.v)}; }
inline VecF vsqrt(VecF a) { return {_mm512_sqrt_ps(a.v)}; }  // correctly rounded
// 1/x to 14 bits (relative error <= 2^-14), for vrecip's Newton step
inline VecF rcp_estimate(VecF x) { return {_mm512_rcp14_ps(x.v)}; }
inline __mmask16 gt(VecF a, VecF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }
inline __mmask16 eq(VecF a, VecF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ); }
inline __mmask16 mask_and(__mmask16 a, __mmask16 b) { return a & b; }
inline bool any_lane(__mmask16 m) { return m != 0; }
inline VecF select(__mmask16 m, VecF a, VecF b) { return {_mm512_mask_blend_ps(m, b.v, a.v)}; }

inline VecF fnmadd(VecF a, VecF b, VecF c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
inline VecF fmadd_where(__mmask16 c, VecF a, VecF b, VecF d) { return {_mm512_mask3_fmadd_ps(a.v, b.v, d.v, c)}; }
// x = (1 + f) 2^k with 1 + f in [0.75, 1.5), for normal x below 2^127: vgetmantps
// gives 1 + f, and vgetexpps of x (4/3) gives k (x (4/3) reaches 2^(k+1) where
// the mantissa reaches 1.5: checked on every normal float below 2^127, where x (4/3)
// cannot overflow).  4 instructions against the integer reduction's 6 (AVX2's,
// below), which on Zen 4 also took the vector pipes that the polynomial needs.
inline void log_reduce(VecF x, VecF& f, VecF& k) {
  f = VecF{_mm512_getmant_ps(x.v, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src)} - VecF::broadcast(1.0f);
  k = {_mm512_getexp_ps(_mm512_mul_ps(x.v, _mm512_set1_ps(4.0f / 3.0f)))};
}
// log2(1 + f) / f on f's range here, [-0.25, 0.5): the degree-8 relative minimax
// (Lawson iteration; 2.7e-8 with exact coefficients), c0 first.
constexpr float kLog2Poly[] = {0x1.715476p+0f,  -0x1.715496p-1f, 0x1.ec7198p-2f,  -0x1.713ad0p-2f, 0x1.271bacp-2f,
                               -0x1.f11908p-3f, 0x1.bb088cp-3f,  -0x1.64d2d8p-3f, 0x1.3fc2f0p-4f};
// 16-bit integer lanes, one per float lane (AVX2 instructions on 256 bits).
struct VecI16 {
  __m256i v;
  static VecI16 broadcast(int16_t x) { return {_mm256_set1_epi16(x)}; }
  static VecI16 load(const void* p) { return {_mm256_loadu_si256(static_cast<const __m256i*>(p))}; }
  int16_t reduce_max() const { return reduce_i16(halves(), MaxI16{}); }
  int16_t reduce_min() const { return reduce_i16(halves(), MinI16{}); }

 private:
  // the two 128-bit halves side by side, as reduce_i16 takes them
  I16Halves halves() const { return {_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)}; }
};
inline VecI16 vmax(VecI16 a, VecI16 b) { return {_mm256_max_epi16(a.v, b.v)}; }
inline VecI16 vmin(VecI16 a, VecI16 b) { return {_mm256_min_epi16(a.v, b.v)}; }
#endif  // KDFAST_ISA_AVX512

#if defined(KDFAST_ISA_AVX2) || defined(KDFAST_ISA_AVX512)
// ---------------------------------------------------------------------------
// exp and log written once over the ISA primitives above.
// ---------------------------------------------------------------------------
// c1 + f (c2 + f (c3 + ...)), by Horner's rule.
inline VecF horner(VecF, float c) { return VecF::broadcast(c); }
template <class... C>
inline VecF horner(VecF f, float c, C... rest) {
  return fmadd(horner(f, rest...), f, VecF::broadcast(c));
}
// 1 + f (c1 + f (c2 + ...)), the polynomial part of 2^t.
template <class... C>
inline VecF exp2_poly(VecF f, C... c) {
  return fmadd(horner(f, c...), f, VecF::broadcast(1.0f));
}

// 2^t for t <= 0 (or -inf, or NaN): the sweeps' shifted logits.  The hot
// sweeps call this one with log2(e) folded into the scale of their logits
// (one multiply fewer per exp).
// vexp2_nonpositive_coarse: the same at degree 4 (relative error 3e-6, one
// FMA fewer), for compute-bound sweeps whose results are 16-bit.
#if defined(KDFAST_ISA_AVX512)
// f = t - floor(t) in [0, 1) is one vreduceps (exact; +0 for t = -inf), and
// vscalefps multiplies by 2^floor(t) itself, flushing to 0 below the float
// range: no clamp, no rounding instruction, no select.  In the compute-bound
// exponential sweep that is 2 instructions of 9 fewer per exp.  NaN stays NaN.
template <class... C>
inline VecF exp2_nonpositive_of(VecF t, C... c) {
  VecF f = {_mm512_reduce_ps(t.v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)};
  return {_mm512_scalef_ps(exp2_poly(f, c...).v, t.v)};
}
// the polynomials on f's range here, [0, 1)
constexpr float kExp2Degree5[] = {cephes::kExp2UnitC1, cephes::kExp2UnitC2, cephes::kExp2UnitC3,
                                  cephes::kExp2UnitC4, cephes::kExp2UnitC5};
constexpr float kExp2Degree4[] = {cephes::kExp2UnitCoarseC1, cephes::kExp2UnitCoarseC2, cephes::kExp2UnitCoarseC3,
                                  cephes::kExp2UnitCoarseC4};
#else
// AVX2 rounds with kShifter (n lands in the low mantissa bits of `nf`) and
// scales by adding n to the exponent field, which is only right while the
// result is normal: inputs are clamped at kExp2Lo and anything below returns
// 0 by a select.  NaN propagates because vmax returns its second operand.
template <class... C>
inline VecF exp2_nonpositive_of(VecF t, C... c) {
  using namespace cephes;
  const VecF lo = VecF::broadcast(kExp2Lo), shifter = VecF::broadcast(kShifter);
  VecF tc = vmax(lo, t);
  VecF nf = tc + shifter;
  VecF f = tc - (nf - shifter);  // exact, in [-1/2, 1/2]
  VecF p = exp2_poly(f, c...);
  __m256i e = _mm256_slli_epi32(_mm256_castps_si256(nf.v), 23);
  VecF scaled = {_mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p.v), e))};
  return select(gt(lo, t), VecF::zero(), scaled);  // 2^(t < lo) == 0
}
// the polynomials on f's range here, [-1/2, 1/2]
constexpr float kExp2Degree5[] = {cephes::kExp2C1, cephes::kExp2C2, cephes::kExp2C3, cephes::kExp2C4,
                                  cephes::kExp2C5};
constexpr float kExp2Degree4[] = {cephes::kExp2CoarseC1, cephes::kExp2CoarseC2, cephes::kExp2CoarseC3,
                                  cephes::kExp2CoarseC4};
#endif
inline VecF vexp2_nonpositive(VecF t) {
  const auto& c = kExp2Degree5;
  return exp2_nonpositive_of(t, c[0], c[1], c[2], c[3], c[4]);
}
inline VecF vexp2_nonpositive_coarse(VecF t) {
  const auto& c = kExp2Degree4;
  return exp2_nonpositive_of(t, c[0], c[1], c[2], c[3]);
}
// t floored at kExp2Lo: a term e (t - c), e = 2^t, is then 0 wherever e is, t = -inf included,
// with no select.  At AVX2 vexp2_nonpositive gives 0 below kExp2Lo and the floor is its own first
// instruction (the same operands in the same order), so a caller that takes both pays for it once;
// at AVX-512 it has no clamp (its subnormal results below kExp2Lo move such a term by under 1e-36).
inline VecF exp2_arg_floor(VecF t) { return vmax(VecF::broadcast(cephes::kExp2Lo), t); }

inline VecF vexp_nonpositive(VecF x) { return vexp2_nonpositive(x * VecF::broadcast(cephes::kLog2e)); }

// exp on the whole line: +inf above 88.7.
inline VecF vexp(VecF x) {
  const VecF hi = VecF::broadcast(cephes::kExpHi);
  return select(gt(x, hi), VecF::broadcast(INFINITY), vexp_nonpositive(vmin(hi, x)));
}

// log2 x for positive normal x below 2^127 (the mixture divergences' log of
// m = w_p p + w_q q, clamped at float's smallest normal by the caller): the
// reduction of log_reduce, x = (1 + f) 2^k with 1 + f around 1, and
// log2(1 + f) = f P(f), P the ISA's kLog2Poly: no division, relative accuracy
// near 1, absolute error <= 5e-8 + 2^-24 |log2 x| (tests/test_vector_math.py).
// 13 instructions at AVX-512, 15 at AVX2.
inline VecF vlog2_positive(VecF x) {
  VecF f, k;
  log_reduce(x, f, k);
  const auto& c = kLog2Poly;
  return fmadd(horner(f, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8]), f, k);
}

// 1/x for positive normal x: the ISA's estimate and one Newton step,
// e' = e (2 - x e); relative error below 2^-22 (AVX2) or 2^-24 (AVX-512).
inline VecF vrecip(VecF x) {
  const VecF e = rcp_estimate(x);
  return e * fnmadd(x, e, VecF::broadcast(2.0f));
}
#endif

#if !defined(KDFAST_ISA_AVX2) && !defined(KDFAST_ISA_AVX512)
using VecF = ScalarVec<float>;
#endif
using VecD = ScalarVec<double>;

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
