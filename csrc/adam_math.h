// One element of the fused Adam(W) step, one definition for every device: the CPU loop
// (cpu/adam_step.cpp), the CUDA functor (cuda/device/adam_step.cuh) and, through the
// latter, the tests' emulator. Plain C++ (no torch); math in M (fp32, or fp64 for fp64).
//
// The order of operations is torch.optim.Adam's single-tensor step (torch/optim/adam.py),
// so fp32 results agree with it to rounding: the gradient negated for maximize, then
// coupled decay (Adam) or w * (1 - lr * wd) (AdamW), m = lerp(m, d, 1 - beta1) as ATen's
// lerp rounds, v = v * beta2 + (1 - beta2) * d * d, denom = sqrt(v or max v) / sqrt(bc2)
// + eps, w = w + (-lr / bc1) * m / denom. The scalars arrive rounded to M, as torch's
// tensor-scalar ops round their Python scalars.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__device__)  // nvcc, or the emulator's empty __device__
#define IMBSAM_HOST_DEVICE __host__ __device__
#else
#define IMBSAM_HOST_DEVICE
#endif

namespace imbsam {

// The step's scalars in math precision; step_size and bias_correction2_sqrt are the
// tensor's own (each parameter has its own step count).
template <typename M>
struct AdamScalars {
  M lerp_weight;      // 1 - beta1
  M beta2;            // v's decay
  M one_minus_beta2;  // 1 - beta2
  M eps;
  M weight_decay;           // Adam: added to the gradient as wd * w
  M decay;                  // AdamW: w * (1 - lr * wd)
  M sign;                   // -1 with maximize
  M neg_step_size;          // -lr / (1 - beta1^step)
  M bias_correction2_sqrt;  // sqrt(1 - beta2^step)
};

// ATen's lerp (ATen/native/Lerp.h): the form that is exact at each end of the weight.
template <typename M>
IMBSAM_HOST_DEVICE inline M aten_lerp(M self, M end, M weight) {
  return (weight < M(0.5) && weight > M(-0.5)) ? self + weight * (end - self) : end - (end - self) * (M(1) - weight);
}

// torch.maximum: NaN in either operand gives NaN.
template <typename M>
IMBSAM_HOST_DEVICE inline M nan_max(M a, M b) {
  return (a > b || a != a) ? a : b;
}

// w0: the restored weight, d: the (combined) gradient; m, v, vmax updated in place
// (vmax only with kAmsgrad); returns the new weight.
template <typename M, bool kDecoupled, bool kAmsgrad>
IMBSAM_HOST_DEVICE inline M adam_element(const AdamScalars<M>& s, M w0, M d, M& m, M& v, M& vmax) {
  using std::sqrt;
  d = s.sign * d;
  if constexpr (kDecoupled) {
    w0 = w0 * s.decay;
  } else if (s.weight_decay != M(0)) {  // as torch: no wd * w term at all (0 * inf would be NaN)
    d = d + s.weight_decay * w0;
  }
  m = aten_lerp(m, d, s.lerp_weight);
  v = v * s.beta2;
  v = v + s.one_minus_beta2 * d * d;
  M second = v;
  if constexpr (kAmsgrad) {
    vmax = nan_max(vmax, v);
    second = vmax;
  }
  const M denom = sqrt(second) / s.bias_correction2_sqrt + s.eps;
  return w0 + s.neg_step_size * m / denom;
}

}  // namespace imbsam
