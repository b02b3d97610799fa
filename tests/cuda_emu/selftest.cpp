// Kernels with the bugs the emulator exists to catch, each beside its correct form, so
// the tests show that cuda_emu.h reports them (tests/test_cuda_emulator.py).
#include "cuda_emu.h"

#include <cstdint>

namespace {

// Which bug a kernel plants.
enum Bug : int {
  kNone = 0,
  kDivergentBarrier = 1,  // only even threads reach __syncthreads()
  kEarlyExit = 2,         // thread 0 returns before the barrier
  kHalfWarpShuffle = 3,   // lanes 0..15 shuffle with a full mask
  kMissingBarrier = 4,    // the partner's shared slot is read without __syncthreads()
  kUnwrittenShared = 5,   // reads a shared slot no thread wrote
  kMisalignedVector = 6,  // a 16-byte load at a 4-byte aligned address
  kOutsideMask = 7,       // shuffles down from a lane the mask leaves out
};

__global__ void planted(int bug, float* out, const float* in) {
  __shared__ float slots[1024];
  const unsigned t = threadIdx.x;
  float v = in[t];
  if (bug == kEarlyExit && t == 0) return;
  if (bug != kUnwrittenShared || t != 5) slots[t] = v;
  if (bug == kDivergentBarrier) {
    if (t % 2 == 0) __syncthreads();
  } else if (bug != kMissingBarrier) {
    __syncthreads();
  }
  v += slots[(t + 1) % blockDim.x];  // the next thread's value: needs the barrier
  if (bug == kHalfWarpShuffle) {
    if (t % 32 < 16) v += __shfl_down_sync(0xffffffffu, v, 1);
  } else if (bug == kOutsideMask) {
    if (t % 32 < 16) v += __shfl_down_sync(0x0000ffffu, v, 15);  // lane 1 reads lane 16
  } else {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  if (bug == kMisalignedVector && t == 0) {
    const uint4 bits = *reinterpret_cast<const uint4*>(in + 1);
    v += static_cast<float>(bits.x != 0);
  }
  out[blockIdx.x * blockDim.x + t] = v;
}

}  // namespace

extern "C" {
int selftest_run(int bug, int order, uint64_t seed, int threads, float* out, const float* in) {
  cuda_emu::configure(static_cast<cuda_emu::Order>(order), seed);
  cuda_emu::clear_error();
  cuda_emu::launch(dim3(2), dim3(static_cast<unsigned>(threads)), planted, bug, out, in);
  return cuda_emu::last_error().empty() ? 0 : -1;
}
const char* selftest_error() { return cuda_emu::last_error().c_str(); }
}
