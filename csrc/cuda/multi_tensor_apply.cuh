// Multi-tensor apply: D parallel tensor lists are cut into chunks whose addresses
// travel in the kernel's arguments (packed by mta_plan.h), so one launch covers many
// tensors. Each block handles one chunk of one tensor.
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

namespace imbsam::cuda {

constexpr int kBlockSize = 512;

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T val[V];
};

// 16-byte accesses through uint4, which the compiler keeps as one ld/st.global.v4: a
// plain Vec copy may be split into element loads once the values are used one by one
// (it was, for restore's source, in the PTX of nvcc 13.0).
template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load16(const T* p) {
  static_assert(sizeof(Vec<T, V>) == sizeof(uint4), "16-byte vectors");
  const uint4 bits = *reinterpret_cast<const uint4*>(p);
  Vec<T, V> v;
  memcpy(&v, &bits, sizeof(v));
  return v;
}

template <typename T, int V>
__device__ __forceinline__ void store16(T* p, const Vec<T, V>& v) {
  uint4 bits;
  memcpy(&bits, &v, sizeof(bits));
  *reinterpret_cast<uint4*>(p) = bits;
}

// fp32 math for bf16/fp16/fp32 storage, fp64 math for fp64 storage.
template <typename T>
struct MathType {
  using type = float;
};
template <>
struct MathType<double> {
  using type = double;
};
template <typename T>
using math_t = typename MathType<T>::type;

// Pointers and length of the chunk this block owns.
template <int D, typename T>
__device__ __forceinline__ int64_t chunk_pointers(const TensorListMetadata<D>& tl, T* (&ptrs)[D]) {
  const int t = tl.block_to_tensor[blockIdx.x];
  const int64_t offset = static_cast<int64_t>(tl.block_to_chunk[blockIdx.x]) * kChunkSize;
  for (int d = 0; d < D; ++d) ptrs[d] = static_cast<T*>(tl.addresses[d][t]) + offset;
  const int64_t left = tl.sizes[t] - offset;
  return left < kChunkSize ? left : kChunkSize;
}

// Applies op(x) to every element of the chunk, x[d] holding list d's value in math
// precision; lists whose bit is set in kInMask are read (the others start at 0: an
// output the op only writes costs no read), those in kOutMask written back. 16-byte
// vector accesses where every pointer is aligned, then a guarded scalar tail.
template <int D, int kOutMask, int kInMask = (1 << D) - 1, typename T, typename Op>
__device__ __forceinline__ void elementwise_chunk(T* const (&p)[D], int64_t n, const Op& op) {
  using M = math_t<T>;
  constexpr int V = 16 / sizeof(T);
  bool aligned = true;
  for (int d = 0; d < D; ++d) aligned &= (reinterpret_cast<uintptr_t>(p[d]) % 16 == 0);
  int64_t vec_end = aligned ? (n / V) * V : 0;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * V; i < vec_end; i += static_cast<int64_t>(blockDim.x) * V) {
    Vec<T, V> r[D];
#pragma unroll
    for (int d = 0; d < D; ++d)
      if (kInMask & (1 << d)) r[d] = load16<T, V>(p[d] + i);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      M x[D];
#pragma unroll
      for (int d = 0; d < D; ++d) x[d] = (kInMask & (1 << d)) ? static_cast<M>(r[d].val[v]) : M(0);
      op(x);
#pragma unroll
      for (int d = 0; d < D; ++d)
        if (kOutMask & (1 << d)) r[d].val[v] = static_cast<T>(x[d]);
    }
#pragma unroll
    for (int d = 0; d < D; ++d)
      if (kOutMask & (1 << d)) store16<T, V>(p[d] + i, r[d]);
  }
  for (int64_t i = vec_end + threadIdx.x; i < n; i += blockDim.x) {
    M x[D];
#pragma unroll
    for (int d = 0; d < D; ++d) x[d] = (kInMask & (1 << d)) ? static_cast<M>(p[d][i]) : M(0);
    op(x);
#pragma unroll
    for (int d = 0; d < D; ++d)
      if (kOutMask & (1 << d)) p[d][i] = static_cast<T>(x[d]);
  }
}

template <int D, typename Functor, typename... Args>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_kernel(const __grid_constant__ TensorListMetadata<D> tl, int64_t block_offset, Functor f,
                        Args... args) {
  f(tl, block_offset, args...);
}

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
