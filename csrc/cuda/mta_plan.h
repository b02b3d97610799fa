// How multi_tensor_apply packs tensor lists into launches, in plain C++ (no CUDA), so
// the packing is tested on the host (tests/test_mta_plan.py).
//
// Tensor addresses and the block -> (tensor, chunk) map travel in the kernel's
// arguments. A launch is emitted when its block map or tensor table is full, and a
// tensor whose chunks do not all fit continues in the next launch as entry 0.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace imbsam::cuda {

// 64 Ki elements a block: PyTorch's multi-tensor-apply choice, enough work per block
// to hide launch and tail effects.
constexpr int64_t kChunkSize = 1 << 16;
// Kernel arguments are limited to 4 KiB before CUDA 12.1; from 12.1 (runtime and driver)
// on Volta and newer GPUs to 32 KiB. Both layouts exist; the CUDA glue picks one at run
// time (multi_tensor_apply.cuh). With the large caps a ResNet-34 list (110 tensors,
// 410 chunks) is one launch per op instead of two to four partly filled ones.
template <bool kLarge>
struct ArgLimits;
template <>
struct ArgLimits<false> {
  static constexpr int kMaxTensors[8] = {110, 64, 48, 36, 30, 26, 22, 20};
  static constexpr int kMaxBlocks = 320;
  static constexpr size_t kMaxArgBytes = 4096;
};
template <>
struct ArgLimits<true> {
  static constexpr int kMaxTensors[8] = {255, 255, 255, 200, 160, 140, 120, 110};  // block_to_tensor is one byte
  static constexpr int kMaxBlocks = 1024;
  static constexpr size_t kMaxArgBytes = 32764;
};

template <int D, bool kLarge>
struct TensorListMetadata {
  static constexpr int kTensors = ArgLimits<kLarge>::kMaxTensors[D - 1];
  static constexpr int kBlocks = ArgLimits<kLarge>::kMaxBlocks;
  void* addresses[D][kTensors];
  int64_t sizes[kTensors];
  unsigned char block_to_tensor[kBlocks];
  int block_to_chunk[kBlocks];
};

// The metadata plus the other kernel arguments (block offset, functor, scalars) must fit.
template <bool kLarge>
constexpr bool fits() {
  constexpr size_t room = ArgLimits<kLarge>::kMaxArgBytes - 256;
  return sizeof(TensorListMetadata<1, kLarge>) <= room && sizeof(TensorListMetadata<2, kLarge>) <= room &&
         sizeof(TensorListMetadata<3, kLarge>) <= room && sizeof(TensorListMetadata<4, kLarge>) <= room &&
         sizeof(TensorListMetadata<5, kLarge>) <= room && sizeof(TensorListMetadata<6, kLarge>) <= room &&
         sizeof(TensorListMetadata<7, kLarge>) <= room && sizeof(TensorListMetadata<8, kLarge>) <= room;
}
static_assert(fits<false>() && fits<true>(), "metadata too large for its kernel-argument limit");

// Calls launch(metadata, n_blocks, block_offset) for each launch; block_offset counts
// the blocks of earlier launches, so a kernel can give each chunk its own output slot.
// Empty tensors get no block.
template <int D, bool kLarge, typename Launch>
void plan_launches(const std::vector<std::array<void*, D>>& addresses, const std::vector<int64_t>& numels,
                   Launch&& launch) {
  static_assert(D >= 1 && D <= 8, "depth 1..8");
  using Meta = TensorListMetadata<D, kLarge>;
  Meta tl;
  int tensors = 0, blocks = 0;
  int64_t block_offset = 0;
  const size_t n_tensors = numels.size();
  for (size_t t = 0; t < n_tensors; ++t) {
    const int64_t numel = numels[t];
    if (numel == 0) continue;
    for (int d = 0; d < D; ++d) tl.addresses[d][tensors] = addresses[t][d];
    tl.sizes[tensors] = numel;
    ++tensors;
    const int64_t chunks = (numel + kChunkSize - 1) / kChunkSize;
    for (int64_t c = 0; c < chunks; ++c) {
      tl.block_to_tensor[blocks] = static_cast<unsigned char>(tensors - 1);
      tl.block_to_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      const bool blocks_full = blocks == Meta::kBlocks;
      const bool tensors_full = tensors == Meta::kTensors && last_chunk;
      if (blocks_full || tensors_full) {
        launch(tl, blocks, block_offset);
        block_offset += blocks;
        blocks = 0;
        if (last_chunk) {
          tensors = 0;
        } else {  // this tensor continues in the next launch, as entry 0
          for (int d = 0; d < D; ++d) tl.addresses[d][0] = tl.addresses[d][tensors - 1];
          tl.sizes[0] = tl.sizes[tensors - 1];
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) launch(tl, blocks, block_offset);
}

}  // namespace imbsam::cuda
