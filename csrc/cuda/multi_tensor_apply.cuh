// Multi-tensor apply, the host side: D parallel tensor lists are cut into chunks whose
// addresses travel in the kernel's arguments (packed by mta_plan.h), so one launch
// covers many tensors. The kernel and its chunk loop are device code (device/chunk.cuh).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <vector>

// Whether the 32 KiB layout's kernels are compiled: nvcc accepts them from CUDA 12.1,
// for Volta and newer (setup.py passes -DIMBSAM_MTA_LARGE_ARGS=0 for an older GPU).
#if !defined(IMBSAM_MTA_LARGE_ARGS)
#if CUDART_VERSION >= 12010
#define IMBSAM_MTA_LARGE_ARGS 1
#else
#define IMBSAM_MTA_LARGE_ARGS 0
#endif
#endif
#include "device/chunk.cuh"
#include "mta_plan.h"

namespace imbsam::cuda {

// Total blocks that multi_tensor_apply will run over `lists[0]` (the norm sizes its
// partial-sum buffer with this).
inline int64_t count_chunks(const std::vector<at::Tensor>& tensors) {
  int64_t n = 0;
  for (const auto& t : tensors) n += (t.numel() + kChunkSize - 1) / kChunkSize;
  return n;
}

// 32 KiB kernel arguments need them compiled, a driver of CUDA 12.1 or newer (a newer
// runtime may run on an older driver) and a Volta or newer GPU; PyTorch's own
// multi-tensor kernels decide the same way, at run time.
inline bool large_args_usable() {
#if IMBSAM_MTA_LARGE_ARGS
  static const int driver = [] {
    int v = 0;
    return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
  }();
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c10::cuda::current_device()));
  return driver >= 12010 && major >= 7;
#else
  return false;
#endif
}

template <int D, bool kLarge, typename Functor, typename... Args>
void launch_all(const std::vector<std::array<void*, D>>& addresses, const std::vector<int64_t>& numels, Functor f,
                Args... args) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  plan_launches<D, kLarge>(
      addresses, numels, [&](const TensorListMetadata<D, kLarge>& tl, int blocks, int64_t block_offset) {
        multi_tensor_kernel<D, kLarge><<<blocks, kBlockSize, 0, stream>>>(tl, block_offset, f, args...);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

// Launches Functor over D columns of addresses per tensor (numels: each tensor's length),
// packed as plan_launches (mta_plan.h) decides, in the largest layout this GPU takes.
template <int D, typename Functor, typename... Args>
void apply_to_addresses(const std::vector<std::array<void*, D>>& addresses, const std::vector<int64_t>& numels,
                        Functor f, Args... args) {
#if IMBSAM_MTA_LARGE_ARGS
  if (large_args_usable()) return launch_all<D, true>(addresses, numels, f, args...);
#endif
  launch_all<D, false>(addresses, numels, f, args...);
}

// Launches Functor over D lists of equal length (list 0 decides the sizes).
template <int D, typename Functor, typename... Args>
void multi_tensor_apply(const std::vector<std::vector<at::Tensor>>& lists, Functor f, Args... args) {
  std::vector<std::array<void*, D>> addresses(lists[0].size());
  std::vector<int64_t> numels(lists[0].size());
  for (size_t t = 0; t < lists[0].size(); ++t) {
    for (int d = 0; d < D; ++d) addresses[t][d] = lists[d][t].data_ptr();
    numels[t] = lists[0][t].numel();
  }
  apply_to_addresses<D>(addresses, numels, f, args...);
}

}  // namespace imbsam::cuda
