// The scalar arguments of the fused Adam(W) step, one definition for every device. Plain
// C++ (no torch), so the CUDA device code that takes it also compiles for the emulator.
#pragma once

#include "adam_math.h"

namespace imbsam {

struct AdamArgs {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled_weight_decay, amsgrad, maximize;
  // Device-side scalars, as the CUDA kernels read them (float32, or null). The CPU kernel
  // reads its 0-d CPU tensors on the host instead and leaves these null.
  const float* lr_ptr = nullptr;         // replaces lr in AdamW's decay 1 - lr * wd
  const float* found_inf_ptr = nullptr;  // nonzero: restore only

  // The scalars of one tensor, given its lr / (1 - beta1^step) and sqrt(1 - beta2^step)
  // (computed in double) and the lr to decay with.
  template <typename M>
  IMBSAM_HOST_DEVICE AdamScalars<M> scalars(double step_size, double bias_correction2_sqrt, double step_lr) const {
    return {static_cast<M>(1.0 - beta1), static_cast<M>(beta2),        static_cast<M>(1.0 - beta2),
            static_cast<M>(eps),         static_cast<M>(weight_decay), static_cast<M>(1.0 - step_lr * weight_decay),
            maximize ? M(-1) : M(1),     static_cast<M>(-step_size),   static_cast<M>(bias_correction2_sqrt)};
  }
};

}  // namespace imbsam
