// Global gradient L2 norm on the GPU in two stages: one partial sum of squares per
// chunk (a fixed slot each, so the result is deterministic), then one block adds the
// partials in double and writes sqrt into a 0-d device tensor. No host sync.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../checks.h"
#include "dispatch.cuh"
#include "multi_tensor_apply.cuh"

namespace imbsam::cuda {
namespace {

template <typename M>
__device__ __forceinline__ M block_sum(M v) {
  __shared__ M warp_sums[kBlockSize / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : M(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  return v;
}

// D = 1: sum g^2.  D = 2 (ASAM): sum ((|w| + eta) g)^2 over lists (g, w).
template <typename T, int D>
struct SumSquaresFunctor {
  __device__ void operator()(const TensorListMetadata<D>& tl, int64_t block_offset, double* partials,
                             double eta_a) const {
    using M = math_t<T>;
    T* p[D];
    const int64_t n = chunk_pointers<D, T>(tl, p);
    const M eta = static_cast<M>(eta_a);
    M acc = 0;
    elementwise_chunk<D, 0>(p, n, [&](M(&x)[D]) {
      M v = x[0];
      if constexpr (D == 2) v *= (fabs(x[1]) + eta);
      acc += v * v;
    });
    acc = block_sum(acc);
    if (threadIdx.x == 0) partials[block_offset + blockIdx.x] = static_cast<double>(acc);
  }
};

template <typename Out>
__global__ void finalize_norm_kernel(const double* partials, int64_t n, Out* out) {
  __shared__ double sums[1024 / 32];
  double v = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v += partials[i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  if (threadIdx.x % 32 == 0) sums[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = sums[threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    if (threadIdx.x == 0) *out = static_cast<Out>(sqrt(v));
  }
}

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
