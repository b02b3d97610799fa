// The fused restore + combine + torch.optim.Adam / AdamW step on the GPU: the functor of
// one multi-tensor pass (the element math is csrc/adam_math.h, shared with the CPU).
// Every scalar that changes between steps is read from device memory, so a whole step
// can be captured in a CUDA graph.
#pragma once

#include <cstdint>

#include "../../adam_args.h"
#include "chunk.cuh"

namespace imbsam::cuda {

// Lists (w, g, backup[, g_H], m, v[, vmax]) walked elementwise, and a last column that
// points at each tensor's two doubles (lr / (1 - beta1^step), sqrt(1 - beta2^step)),
// computed on the device by the glue after the step counts were incremented.
template <typename T, bool kHead, bool kAmsgrad, bool kDecoupled>
struct AdamFunctor {
  static constexpr int kLists = 5 + kHead + kAmsgrad;
  static constexpr int D = kLists + 1;
  template <bool kLarge>
  __device__ void operator()(const TensorListMetadata<D, kLarge>& tl, int64_t, AdamArgs a) const {
    using M = math_t<T>;
    T* p[kLists];
    const int64_t n = chunk_pointers(tl, p);
    if (a.found_inf_ptr != nullptr && *a.found_inf_ptr != 0.0f) {  // skipped: w restored, m and v as they were
      elementwise_chunk<kLists, 0b1, 0b100>(p, n, [](M(&x)[kLists]) { x[0] = x[2]; });
      return;
    }
    const double* coef = static_cast<const double*>(tensor_address(tl, kLists));
    const double step_lr = a.lr_ptr != nullptr ? static_cast<double>(*a.lr_ptr) : a.lr;
    const AdamScalars<M> s = a.scalars<M>(coef[0], coef[1], step_lr);
    constexpr int kM = 3 + kHead;
    constexpr int kVmax = kAmsgrad ? kM + 2 : kM + 1;  // without amsgrad: never touched
    constexpr int kOut = 1 | (1 << kM) | (1 << (kM + 1)) | (kAmsgrad ? 1 << kVmax : 0);
    constexpr int kIn = ((1 << kLists) - 1) & ~1;  // w is rewritten from its backup: never read
    elementwise_chunk<kLists, kOut, kIn>(p, n, [&](M(&x)[kLists]) {
      M d = x[1];
      if constexpr (kHead) d += x[3];
      x[0] = adam_element<M, kDecoupled, kAmsgrad>(s, x[2], d, x[kM], x[kM + 1], x[kVmax]);
    });
  }
};

}  // namespace imbsam::cuda
