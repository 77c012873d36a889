// Weighting policies: the per-row weight w of the divergence term w * D(p || q).
//
// A weighting is a scalar per row, so it is chosen at run time (one switch per
// row, expanded from weighting_list.h), not compiled into the row skeleton:
// each policy says whether it needs the teacher's softmax at temperature 1 (the
// skeleton then gathers its log-normaliser and entropy in its exponential
// sweep) and computes w from what the row offers.  The formulas are
// those of docs/contract.md and kdfast.reference.WEIGHT_FORMULAS.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernel_api.h"

namespace kdfast {

// The teacher row at temperature 1: log sum_j exp(z_j - c) for a shift c (the
// row's max, up to the rounding of the kernel's shift times tau), and the
// entropy of its softmax.
struct TeacherAtT1 {
  double log_sum = 0.0, entropy = 0.0;
};

// What a weighting may read of a row.
struct WeightInputs {
  double log_sum_t = 0.0;  // log sum_j exp((z_j - c) / tau) of the teacher, the same c, natural units
  double tau = 1.0;        // teacher temperature
  int64_t vocab = 0;
  double given = 1.0;      // the caller's weight of the row (Given)
  TeacherAtT1 t1;          // filled only for a policy with kNeedsTeacherT1
};

namespace weighting {

struct None {
  static constexpr bool kNeedsTeacherT1 = false;
  static double weight(const WeightInputs&) { return 1.0; }
};

// U_{1/tau}(p1) = sum_j p1_j^(1/tau) = exp(LSE(z / tau) - LSE(z) / tau); both LSEs
// are shifted alike (c / tau and c), which cancels in the difference.
struct WTTM {
  static constexpr bool kNeedsTeacherT1 = true;
  static double weight(const WeightInputs& in) { return std::exp(in.log_sum_t - in.t1.log_sum / in.tau); }
};

// 1 - H(p1) / log V: 1 for a one-hot teacher, 0 for a uniform one (and 1 when V = 1).
struct Entropy {
  static constexpr bool kNeedsTeacherT1 = true;
  static double weight(const WeightInputs& in) {
    return in.vocab > 1 ? 1.0 - in.t1.entropy / std::log(double(in.vocab)) : 1.0;
  }
};

struct Given {
  static constexpr bool kNeedsTeacherT1 = false;
  static double weight(const WeightInputs& in) { return in.given; }
};

}  // namespace weighting

// f(policy{}) for the policy of `w` (the op has checked that `w` is one of the list).
template <class F>
inline auto with_weighting(Weighting w, F&& f) {
  switch (w) {
#define KDFAST_WEIGHTING_CASE(policy, name) \
    case Weighting::policy: return f(weighting::policy{});
    KDFAST_FOR_EACH_WEIGHTING(KDFAST_WEIGHTING_CASE)
#undef KDFAST_WEIGHTING_CASE
    default: return f(weighting::None{});
  }
}

}  // namespace kdfast
