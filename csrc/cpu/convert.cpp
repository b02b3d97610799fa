#include "convert.h"

#include <c10/util/bit_cast.h>

// On x86-64 with GCC each conversion gets an AVX2/F16C clone picked at load time
// (vcvtph2ps for fp16, 8-wide shifts for bf16) and a baseline one for older CPUs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define IMBSAM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define IMBSAM_HAVE_F16C 1
#include <immintrin.h>
#else
#define IMBSAM_CPU_CLONES
#endif

namespace imbsam::cpu {

IMBSAM_CPU_CLONES void to_float(const c10::BFloat16* in, float* out, int64_t n) {
  const auto* bits = reinterpret_cast<const uint16_t*>(in);
  for (int64_t i = 0; i < n; ++i) out[i] = c10::bit_cast<float>(static_cast<uint32_t>(bits[i]) << 16);
}

IMBSAM_CPU_CLONES void from_float(const float* in, c10::BFloat16* out, int64_t n) {
  auto* bits = reinterpret_cast<uint16_t*>(out);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = c10::bit_cast<uint32_t>(in[i]);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    bits[i] = static_cast<uint16_t>(in[i] != in[i] ? 0x7FC0u : rounded);
  }
}

#ifdef IMBSAM_HAVE_F16C
// GCC does not vectorise _Float16 conversions: F16C intrinsics, 8 values an instruction,
// on CPUs that have them (checked once at load time).
__attribute__((target("avx,f16c"))) static void half_to_float_f16c(const uint16_t* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  for (; i < n; ++i) out[i] = _cvtsh_ss(in[i]);
}

__attribute__((target("avx,f16c"))) static void float_to_half_f16c(const float* in, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) out[i] = _cvtss_sh(in[i], _MM_FROUND_TO_NEAREST_INT);
}

static const bool kHasF16C = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
#endif

void to_float(const c10::Half* in, float* out, int64_t n) {
#ifdef IMBSAM_HAVE_F16C
  if (kHasF16C) return half_to_float_f16c(reinterpret_cast<const uint16_t*>(in), out, n);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

void from_float(const float* in, c10::Half* out, int64_t n) {
#ifdef IMBSAM_HAVE_F16C
  if (kHasF16C) return float_to_half_f16c(in, reinterpret_cast<uint16_t*>(out), n);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = c10::Half(in[i]);
}

}  // namespace imbsam::cpu
