// The elementwise imbsam ops on the GPU: perturb, restore, combine and the fused
// restore + combine + SGD step. Each is one multi-tensor pass; the norm, lr and
// found_inf are read from device memory, so a whole step can be captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../checks.h"
#include "dispatch.cuh"
#include "multi_tensor_apply.cuh"

namespace imbsam::cuda {
namespace {

// Lists (w, g, backup): backup <- w; w <- w + rho/(norm + 1e-16) * g [* (|w| + eta)^2].
// A non-finite norm leaves w as it is (0 * NaN would be NaN).
template <typename T, bool kAdaptive>
struct PerturbFunctor {
  __device__ void operator()(const TensorListMetadata<3>& tl, int64_t, DeviceScalar norm, double rho,
                             double eta_a) const {
    using M = math_t<T>;
    T* p[3];
    const int64_t n = chunk_pointers<3, T>(tl, p);
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
  __device__ void operator()(const TensorListMetadata<2>& tl, int64_t) const {
    using M = math_t<T>;
    T* p[2];
    const int64_t n = chunk_pointers<2, T>(tl, p);
    elementwise_chunk<2, 0b01, 0b10>(p, n, [](M(&x)[2]) { x[0] = x[1]; });  // dst is only written
  }
};

// Lists (g, g_H): g <- g + g_H.
template <typename T>
struct AddFunctor {
  __device__ void operator()(const TensorListMetadata<2>& tl, int64_t) const {
    using M = math_t<T>;
    T* p[2];
    const int64_t n = chunk_pointers<2, T>(tl, p);
    elementwise_chunk<2, 0b01>(p, n, [](M(&x)[2]) { x[0] += x[1]; });
  }
};

struct SgdArgs {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_momentum_step;
  const float* lr_ptr;         // replaces lr when not null
  const float* found_inf_ptr;  // nonzero: restore only
};

// Lists (w, g, backup[, g_H][, buf]): torch.optim.SGD's update from the restored weight.
template <typename T, bool kHead, bool kMomentum>
struct SgdFunctor {
  static constexpr int D = 3 + kHead + kMomentum;
  __device__ void operator()(const TensorListMetadata<D>& tl, int64_t, SgdArgs a) const {
    using M = math_t<T>;
    T* p[D];
    const int64_t n = chunk_pointers<D, T>(tl, p);
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

void perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& norm,
                  double rho, double eta_a, bool adaptive) {
  check_list("perturb_", params, "params");
  check_matches("perturb_", params, "params", grads, "grads");
  check_matches("perturb_", params, "params", backups, "backups");
  check_scalar_on("perturb_", norm, "norm", params);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const DeviceScalar nrm = device_scalar(norm);
  for (const auto& [dtype, idx] : group_by_dtype(params)) {
    const auto lists = pick({params, grads, backups}, idx);
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      if (adaptive) multi_tensor_apply<3>(lists, PerturbFunctor<T, true>{}, nrm, rho, eta_a);
      else multi_tensor_apply<3>(lists, PerturbFunctor<T, false>{}, nrm, rho, eta_a);
    });
  }
}

template <template <typename> class F>
void binary_apply(at::TensorList a, at::TensorList b) {
  const c10::cuda::CUDAGuard guard(a[0].device());
  for (const auto& [dtype, idx] : group_by_dtype(a)) {
    const auto lists = pick({a, b}, idx);
    dispatch_float(dtype, [&](auto tag) { multi_tensor_apply<2>(lists, F<decltype(tag)>{}); });
  }
}

void restore_cuda(at::TensorList params, at::TensorList backups) {
  check_list("restore_", params, "params");
  check_matches("restore_", params, "params", backups, "backups");
  if (!params.empty()) binary_apply<CopyFunctor>(params, backups);
}

void add_head_grads_cuda(at::TensorList grads, at::TensorList head_grads) {
  check_list("add_head_grads_", grads, "grads");
  check_matches("add_head_grads_", grads, "grads", head_grads, "head_grads");
  if (!grads.empty()) binary_apply<AddFunctor>(grads, head_grads);
}

void restore_sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups,
                           at::TensorList head_grads, at::TensorList momentum_buffers, double lr, double momentum,
                           double dampening, double weight_decay, bool nesterov, bool maximize,
                           bool first_momentum_step, const std::optional<at::Tensor>& lr_tensor,
                           const std::optional<at::Tensor>& found_inf) {
  check_sgd_step(params, grads, backups, head_grads, momentum_buffers, momentum, dampening, nesterov, lr_tensor,
                 found_inf);
  const bool has_head = !head_grads.empty();
  const bool has_momentum = momentum != 0.0;
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  // The kernels read float32 scalars; other dtypes are converted on the device.
  const at::Tensor lr_f = lr_tensor ? lr_tensor->to(at::kFloat) : at::Tensor();
  const at::Tensor inf_f = found_inf ? found_inf->to(at::kFloat) : at::Tensor();
  const SgdArgs args{lr, momentum, dampening, weight_decay, nesterov, maximize, first_momentum_step,
                     lr_tensor ? lr_f.data_ptr<float>() : nullptr, found_inf ? inf_f.data_ptr<float>() : nullptr};
  for (const auto& group : group_by_dtype(params)) {
    const std::vector<size_t>& idx = group.second;  // lambdas capture structured bindings only from C++20
    dispatch_float(group.first, [&](auto tag) {
      using T = decltype(tag);
      if (has_head && has_momentum)
        multi_tensor_apply<5>(pick({params, grads, backups, head_grads, momentum_buffers}, idx),
                              SgdFunctor<T, true, true>{}, args);
      else if (has_head)
        multi_tensor_apply<4>(pick({params, grads, backups, head_grads}, idx), SgdFunctor<T, true, false>{}, args);
      else if (has_momentum)
        multi_tensor_apply<4>(pick({params, grads, backups, momentum_buffers}, idx), SgdFunctor<T, false, true>{},
                              args);
      else
        multi_tensor_apply<3>(pick({params, grads, backups}, idx), SgdFunctor<T, false, false>{}, args);
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(imbsam, CUDA, m) {
  m.impl("perturb_", &perturb_cuda);
  m.impl("restore_", &restore_cuda);
  m.impl("add_head_grads_", &add_head_grads_cuda);
  m.impl("restore_sgd_step_", &restore_sgd_step_cuda);
}

}  // namespace imbsam::cuda
