// Sums of squares for the gradient norm, in double, for fp32 and fp64 math arrays.
#pragma once

#include <cstdint>

namespace imbsam::cpu {

// sum g[i]^2, or sum (g[i] * (|w[i]| + eta))^2 when w is not null.
double sum_squares(const float* g, const float* w, float eta, int64_t n);
double sum_squares(const double* g, const double* w, double eta, int64_t n);

}  // namespace imbsam::cpu
