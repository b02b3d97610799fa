// Global gradient L2 norm on the GPU, the host side: the two stages' launches
// (device/norm.cuh) into a 0-d device tensor. No host sync.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../checks.h"
#include "device/norm.cuh"
#include "dispatch.cuh"
#include "multi_tensor_apply.cuh"

namespace imbsam::cuda {
namespace {

at::Tensor grad_norm_cuda(at::TensorList grads, at::TensorList adaptive_grads, at::TensorList adaptive_params,
                          double eta_a) {
  check_matches("grad_norm", adaptive_params, "adaptive_params", adaptive_grads, "adaptive_grads");
  std::vector<at::Tensor> all(grads.begin(), grads.end());
  all.insert(all.end(), adaptive_grads.begin(), adaptive_grads.end());
  check_list("grad_norm", all, "grads + adaptive_grads");
  const c10::cuda::CUDAGuard guard(all[0].device());

  bool any_double = false;
  for (const auto& t : all) any_double |= t.scalar_type() == at::kDouble;
  const auto opts = all[0].options();
  const int64_t n_partials = count_chunks(all);
  at::Tensor partials = at::empty({std::max<int64_t>(n_partials, 1)}, opts.dtype(at::kDouble));
  at::Tensor out = at::empty({}, opts.dtype(any_double ? at::kDouble : at::kFloat));

  // Each launch sequence writes its chunks' slots after those of the previous ones.
  int64_t slot = 0;
  double* base = partials.data_ptr<double>();
  for (const auto& [dtype, idx] : group_by_dtype(grads)) {
    auto lists = pick({grads}, idx);
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      multi_tensor_apply<1>(lists, SumSquaresFunctor<T, 1>{}, base + slot, eta_a);
    });
    slot += count_chunks(lists[0]);
  }
  for (const auto& [dtype, idx] : group_by_dtype(adaptive_grads)) {
    auto lists = pick({adaptive_grads, adaptive_params}, idx);
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      multi_tensor_apply<2>(lists, SumSquaresFunctor<T, 2>{}, base + slot, eta_a);
    });
    slot += count_chunks(lists[0]);
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (any_double) finalize_norm_kernel<<<1, 1024, 0, stream>>>(base, n_partials, out.data_ptr<double>());
  else finalize_norm_kernel<<<1, 1024, 0, stream>>>(base, n_partials, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(imbsam, CUDA, m) { m.impl("grad_norm", &grad_norm_cuda); }

}  // namespace imbsam::cuda
