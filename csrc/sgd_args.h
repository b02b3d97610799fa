// The scalar arguments of the fused SGD step, one definition for every device. Plain C++
// (no torch), so the CUDA device code that takes it also compiles for the tests' emulator.
#pragma once

namespace imbsam {

struct SgdArgs {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_momentum_step;
  // Device-side scalars, as the CUDA kernels read them (float32, or null). The CPU kernel
  // reads its 0-d CPU tensors on the host instead and leaves these null.
  const float* lr_ptr = nullptr;         // replaces lr when not null
  const float* found_inf_ptr = nullptr;  // nonzero: restore only
};

}  // namespace imbsam
