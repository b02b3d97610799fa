// The elementwise update functors: perturb, restore, combine and the fused restore +
// combine + SGD step. The norm, lr and found_inf are read from device memory, so a
// whole step can be captured in a CUDA graph.
#pragma once

#include <cmath>
#include <cstdint>

#include "../../sgd_args.h"
#include "chunk.cuh"

namespace imbsam::cuda {

// A 0-d float32 or float64 device scalar read inside kernels, so nothing syncs.
struct DeviceScalar {
  const void* ptr = nullptr;
  bool is_double = false;
  __device__ __forceinline__ double get() const {
    return is_double ? *static_cast<const double*>(ptr) : static_cast<double>(*static_cast<const float*>(ptr));
  }
};

// Lists (w, g, backup): backup <- w; w <- w + rho/(norm + 1e-16) * g [* (|w| + eta)^2].
// A non-finite norm leaves w as it is (0 * NaN would be NaN).
template <typename T, bool kAdaptive>
struct PerturbFunctor {
  template <bool kLarge>
  __device__ void operator()(const TensorListMetadata<3, kLarge>& tl, int64_t, DeviceScalar norm, double rho,
                             double eta_a) const {
    using M = math_t<T>;
    T* p[3];
    const int64_t n = chunk_pointers(tl, p);
    const double nv = norm.get();
    const bool finite = isfinite(nv);
    const M scale = static_cast<M>(rho / (nv + 1e-16));
    const M eta = static_cast<M>(eta_a);
    elementwise_chunk<3, 0b101, 0b011>(p, n, [&](M(&x)[3]) {  // reads w, g; writes w, backup
      const M w = x[0];
      x[2] = w;
      if (finite) {
        M e = scale * x[1];
        if constexpr (kAdaptive) {
          const M t = fabs(w) + eta;
          e = e * (t * t);
        }
        x[0] = w + e;
      }
    });
  }
};

// Lists (dst, src): dst <- src. The round trip through math precision is exact.
template <typename T>
struct CopyFunctor {
  template <bool kLarge>
  __device__ void operator()(const TensorListMetadata<2, kLarge>& tl, int64_t) const {
    using M = math_t<T>;
    T* p[2];
    const int64_t n = chunk_pointers(tl, p);
    elementwise_chunk<2, 0b01, 0b10>(p, n, [](M(&x)[2]) { x[0] = x[1]; });  // dst is only written
  }
};

// Lists (g, g_H): g <- g + g_H.
template <typename T>
struct AddFunctor {
  template <bool kLarge>
  __device__ void operator()(const TensorListMetadata<2, kLarge>& tl, int64_t) const {
    using M = math_t<T>;
    T* p[2];
    const int64_t n = chunk_pointers(tl, p);
    elementwise_chunk<2, 0b01>(p, n, [](M(&x)[2]) { x[0] += x[1]; });
  }
};

// Lists (w, g, backup[, g_H][, buf]): torch.optim.SGD's update from the restored weight.
template <typename T, bool kHead, bool kMomentum>
struct SgdFunctor {
  static constexpr int D = 3 + kHead + kMomentum;
  template <bool kLarge>
  __device__ void operator()(const TensorListMetadata<D, kLarge>& tl, int64_t, SgdArgs a) const {
    using M = math_t<T>;
    T* p[D];
    const int64_t n = chunk_pointers(tl, p);
    if (a.found_inf_ptr != nullptr && *a.found_inf_ptr != 0.0f) {
      elementwise_chunk<D, 0b1, 0b100>(p, n, [](M(&x)[D]) { x[0] = x[2]; });
      return;
    }
    const M lr = static_cast<M>(a.lr_ptr != nullptr ? static_cast<double>(*a.lr_ptr) : a.lr);
    const M mom = static_cast<M>(a.momentum), wd = static_cast<M>(a.weight_decay);
    const M keep = static_cast<M>(1.0 - a.dampening);
    const M sign = a.maximize ? M(-1) : M(1);
    constexpr int kBuf = D - 1;
    constexpr int kOut = 1 | (kMomentum ? (1 << kBuf) : 0);
    constexpr int kIn = ((1 << D) - 1) & ~1;  // w is rewritten from its backup: never read
    elementwise_chunk<D, kOut, kIn>(p, n, [&](M(&x)[D]) {
      const M w = x[2];
      M d = x[1];
      if constexpr (kHead) d += x[3];
      d = sign * d + wd * w;
      if constexpr (kMomentum) {
        const M nb = a.first_momentum_step ? d : mom * x[kBuf] + keep * d;
        const M stored = static_cast<M>(static_cast<T>(nb));  // SGD steps with the buffer as stored
        x[kBuf] = stored;
        d = a.nesterov ? d + mom * stored : stored;
      }
      x[0] = w - lr * d;
    });
  }
};

}  // namespace imbsam::cuda
