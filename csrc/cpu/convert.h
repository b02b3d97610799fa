// Block conversions between bf16/fp16 storage and fp32 math. The CPU kernels convert a
// short block into float scratch, run their fp32 loop on it, and convert the outputs
// back: two simple loops that vectorise, instead of one loop that does not.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace imbsam::cpu {

void to_float(const c10::BFloat16* in, float* out, int64_t n);
void to_float(const c10::Half* in, float* out, int64_t n);
// Round to nearest even; NaN stays NaN.
void from_float(const float* in, c10::BFloat16* out, int64_t n);
void from_float(const float* in, c10::Half* out, int64_t n);

// Rounds a float block to T's precision and back (SGD keeps its momentum buffer in T).
template <typename T>
void round_block(float* x, int64_t n) {
  T tmp[512];
  for (int64_t b = 0; b < n; b += 512) {
    const int64_t m = n - b < 512 ? n - b : 512;
    from_float(x + b, tmp, m);
    to_float(tmp, x + b, m);
  }
}

}  // namespace imbsam::cpu
