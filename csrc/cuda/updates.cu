// The elementwise imbsam ops on the GPU, the host side: checks, dtype dispatch and one
// multi-tensor pass each of the functors in device/updates.cuh.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../checks.h"
#include "device/updates.cuh"
#include "dispatch.cuh"
#include "multi_tensor_apply.cuh"

namespace imbsam::cuda {
namespace {

inline DeviceScalar device_scalar(const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                   "imbsam: device scalars must be float32 or float64, got ", t.scalar_type());
  return {t.data_ptr(), t.scalar_type() == at::kDouble};
}

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
  const Float32Scalar lr_f(lr_tensor), inf_f(found_inf);
  const SgdArgs args{lr,         momentum,   dampening, weight_decay, nesterov, maximize, first_momentum_step,
                     lr_f.ptr(), inf_f.ptr()};
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
      else multi_tensor_apply<3>(pick({params, grads, backups}, idx), SgdFunctor<T, false, false>{}, args);
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
