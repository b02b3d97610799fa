// Multi-tensor apply, the host side: D parallel tensor lists are cut into chunks whose
// addresses travel in the kernel's arguments (packed by mta_plan.h), so one launch
// covers many tensors. The kernel and its chunk loop are device code (device/chunk.cuh).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <vector>

// 32 KiB kernel arguments from CUDA 12.1 (Volta and newer; setup.py passes
// -DIMBSAM_MTA_LARGE_ARGS=0 when asked to build for an older GPU).
#if !defined(IMBSAM_MTA_LARGE_ARGS) && CUDART_VERSION >= 12010
#define IMBSAM_MTA_LARGE_ARGS 1
#endif
#include "mta_plan.h"
#include "device/chunk.cuh"

namespace imbsam::cuda {

// Total blocks that multi_tensor_apply will run over `lists[0]` (the norm sizes its
// partial-sum buffer with this).
inline int64_t count_chunks(const std::vector<at::Tensor>& tensors) {
  int64_t n = 0;
  for (const auto& t : tensors) n += (t.numel() + kChunkSize - 1) / kChunkSize;
  return n;
}

// Launches Functor over D lists of equal length (list 0 decides the sizes), packed
// as plan_launches (mta_plan.h) decides.
template <int D, typename Functor, typename... Args>
void multi_tensor_apply(const std::vector<std::vector<at::Tensor>>& lists, Functor f, Args... args) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  std::vector<std::array<void*, D>> addresses(lists[0].size());
  std::vector<int64_t> numels(lists[0].size());
  for (size_t t = 0; t < lists[0].size(); ++t) {
    for (int d = 0; d < D; ++d) addresses[t][d] = lists[d][t].data_ptr();
    numels[t] = lists[0][t].numel();
  }
  plan_launches<D>(addresses, numels, [&](const TensorListMetadata<D>& tl, int blocks, int64_t block_offset) {
    multi_tensor_kernel<D><<<blocks, kBlockSize, 0, stream>>>(tl, block_offset, f, args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace imbsam::cuda
