// The global gradient norm's device code, in two stages: one partial sum of squares
// per chunk (a fixed slot each, so the result is deterministic), then one block adds
// the partials in double and writes the square root.
#pragma once

#include <cmath>
#include <cstdint>

#include "chunk.cuh"

namespace imbsam::cuda {

// The sum of v over the block, valid in thread 0.
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
  template <bool kLarge>
  __device__ void operator()(const TensorListMetadata<D, kLarge>& tl, int64_t block_offset, double* partials,
                             double eta_a) const {
    using M = math_t<T>;
    T* p[D];
    const int64_t n = chunk_pointers(tl, p);
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

// One block of 1024 threads: *out = sqrt(sum of the n partials), added in double.
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

}  // namespace imbsam::cuda
