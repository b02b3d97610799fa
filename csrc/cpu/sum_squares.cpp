#include "sum_squares.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

// An AVX2 clone next to the baseline one, picked at load time (see convert.cpp).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define IMBSAM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define IMBSAM_CPU_CLONES
#endif

namespace imbsam::cpu {
namespace {

// 32-byte vectors (GCC/Clang vector extensions: two SSE registers in the baseline
// clone, one AVX register in the AVX2 one), two accumulators to hide the add latency.
// Every 1 Ki elements the lanes are flushed into a double so long tensors keep their
// precision; lanes never mix, so nothing is reassociated beyond that.
template <typename M>
inline double sum_squares_impl(const M* g, const M* w, M eta, int64_t n) {
  constexpr int kWidth = 32 / sizeof(M);
  typedef M Vec __attribute__((vector_size(32)));
  typedef std::conditional_t<sizeof(M) == 4, uint32_t, uint64_t> Bits;
  typedef Bits BitVec __attribute__((vector_size(32)));
  const BitVec abs_mask = BitVec{} + (~Bits(0) >> 1);  // clears the sign bit
  const Vec eta_v = Vec{} + eta;
  auto load = [](const M* p) {
    Vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  };
  auto term = [&](const M* gp, const M* wp) {
    Vec v = load(gp);
    if (wp != nullptr) v *= reinterpret_cast<Vec>(reinterpret_cast<BitVec>(load(wp)) & abs_mask) + eta_v;
    return v * v;
  };
  constexpr int64_t kFlush = 1024;
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kFlush) {
    const int64_t e = std::min(n, b + kFlush);
    Vec acc0 = {}, acc1 = {};
    int64_t i = b;
    for (; i + 2 * kWidth <= e; i += 2 * kWidth) {
      acc0 += term(g + i, w ? w + i : nullptr);
      acc1 += term(g + i + kWidth, w ? w + i + kWidth : nullptr);
    }
    M tail = 0;
    for (; i < e; ++i) {
      const M v = w ? g[i] * (std::abs(w[i]) + eta) : g[i];
      tail += v * v;
    }
    const Vec acc = acc0 + acc1;
    for (int j = 0; j < kWidth; ++j) total += static_cast<double>(acc[j]);
    total += static_cast<double>(tail);
  }
  return total;
}

}  // namespace

IMBSAM_CPU_CLONES double sum_squares(const float* g, const float* w, float eta, int64_t n) {
  return sum_squares_impl(g, w, eta, n);
}

IMBSAM_CPU_CLONES double sum_squares(const double* g, const double* w, double eta, int64_t n) {
  return sum_squares_impl(g, w, eta, n);
}

}  // namespace imbsam::cpu
