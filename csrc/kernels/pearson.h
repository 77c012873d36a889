// torchdistill's Pearson correlation of two centred vectors a, b, from their
// sums <a,b>, |a|^2, |b|^2: rho = <a,b> / (max(|a|, eps) max(|b|, eps)), and
// its gradient d rho / d a = coef_b * b - coef_a * a.  One definition for
// DIST's rows and columns and the correlation loss.
#pragma once

#include <algorithm>
#include <cmath>

namespace kdfast {

constexpr double kPearsonEps = 1e-8;

struct CentredPearson {
  double rho = 0, coef_b = 0, coef_a = 0;

  CentredPearson(double ab, double aa, double bb, double eps = kPearsonEps) {
    const double na = std::sqrt(std::max(aa, 0.0)), nb = std::sqrt(std::max(bb, 0.0));
    const double ca = std::max(na, eps), cb = std::max(nb, eps);
    rho = ab / (ca * cb);
    // Each part is 0 when it cannot matter: b exactly 0 (the clamp would make
    // its coefficient huge times an exact 0), or |a| clamped (a constant norm).
    coef_b = nb > 0 ? 1.0 / (ca * cb) : 0.0;
    coef_a = na > eps ? rho / (ca * ca) : 0.0;
  }
};

}  // namespace kdfast
