// The multi-tensor kernel and what every functor of it shares: which chunk a block
// owns, and the elementwise loop over that chunk in math precision.
#pragma once

#include <cstdint>

#include "../../math_type.h"
#include "../mta_plan.h"
#include "vec.cuh"

namespace imbsam::cuda {

constexpr int kBlockSize = 512;

// Pointers and length of the chunk this block owns, in the first K of the D lists (the
// others may hold a per-tensor value instead of an array: tensor_address reads it).
template <int K, int D, bool kLarge, typename T>
__device__ __forceinline__ int64_t chunk_pointers(const TensorListMetadata<D, kLarge>& tl, T* (&ptrs)[K]) {
  static_assert(K <= D, "more pointers than lists");
  const int t = tl.block_to_tensor[blockIdx.x];
  const int64_t offset = static_cast<int64_t>(tl.block_to_chunk[blockIdx.x]) * kChunkSize;
  for (int d = 0; d < K; ++d) ptrs[d] = static_cast<T*>(tl.addresses[d][t]) + offset;
  const int64_t left = tl.sizes[t] - offset;
  return left < kChunkSize ? left : kChunkSize;
}

// List d's address for this block's tensor, not offset by the chunk.
template <int D, bool kLarge>
__device__ __forceinline__ const void* tensor_address(const TensorListMetadata<D, kLarge>& tl, int d) {
  return tl.addresses[d][tl.block_to_tensor[blockIdx.x]];
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

// One block per chunk; `tl` in either kernel-argument layout (mta_plan.h).
template <int D, bool kLarge, typename Functor, typename... Args>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_kernel(const __grid_constant__ TensorListMetadata<D, kLarge> tl, int64_t block_offset, Functor f,
                        Args... args) {
  f(tl, block_offset, args...);
}

}  // namespace imbsam::cuda
