// Multi-tensor work splitting on the CPU: every tensor of a list is cut into fixed-size
// chunks, and at::parallel_for spreads all chunks of all tensors over the threads, so
// 300 small tensors and one huge one load the cores alike.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../dtypes.h"
#include "convert.h"

namespace imbsam::cpu {

// 64 Ki elements: big enough that per-chunk overhead vanishes, small enough that two
// cores share a list of a few large tensors evenly and a chunk's four streams stay in L2.
constexpr int64_t kChunkElems = 1 << 16;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

inline std::vector<Chunk> make_chunks(at::TensorList ts) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < ts.size(); ++t) {
    const int64_t n = ts[t].numel();
    for (int64_t b = 0; b < n; b += kChunkElems)
      chunks.push_back({static_cast<int64_t>(t), b, std::min(n, b + kChunkElems)});
  }
  return chunks;
}

// Below this many elements in a whole list the chunks run on the calling thread: waking
// the pool and meeting at its barrier costs more than the work (tens of microseconds, and
// milliseconds when another process has descheduled a worker), as torch's own elementwise
// ops stay serial below their grain (at::internal::GRAIN_SIZE, 32 Ki elements per op).
constexpr int64_t kSerialBelowElems = 1 << 18;

template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, const F& f) {
  const int64_t n = static_cast<int64_t>(chunks.size());
  int64_t elems = 0;
  for (const Chunk& c : chunks) elems += c.end - c.begin;
  // A grain of every chunk keeps at::parallel_for on this thread.
  const int64_t grain = elems < kSerialBelowElems ? std::max<int64_t>(n, 1) : 1;
  at::parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) f(i, chunks[i]);
  });
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// bf16/fp16 chunks are processed in blocks this long: D float scratch arrays of it stay in L1.
constexpr int64_t kBlockElems = 512;

// Runs kernel(x, n) over a chunk in math precision, x[d] pointing at list d's values.
// fp32/fp64 kernels work on the tensors' own memory; bf16/fp16 ones on float scratch
// blocks: the lists whose bit is set in kInMask are converted in (a list the kernel only
// writes is not read), those in kOutMask rounded back afterwards.
template <int D, int kOutMask, int kInMask = (1 << D) - 1, typename T, typename Kernel>
void in_math_precision(T* const (&p)[D], int64_t n, const Kernel& kernel) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    kernel(p, n);
  } else {
    float scratch[D][kBlockElems];
    float* x[D];
    for (int d = 0; d < D; ++d) x[d] = scratch[d];
    for (int64_t b = 0; b < n; b += kBlockElems) {
      const int64_t m = std::min(kBlockElems, n - b);
      for (int d = 0; d < D; ++d)
        if (kInMask & (1 << d)) to_float(p[d] + b, scratch[d], m);
      kernel(x, m);
      for (int d = 0; d < D; ++d)
        if (kOutMask & (1 << d)) from_float(scratch[d], p[d] + b, m);
    }
  }
}

// dst <- src for matching lists: a raw copy, bitwise exact in every dtype.
inline void copy_lists(at::TensorList dst, at::TensorList src) {
  for_each_chunk(make_chunks(dst), [&](int64_t, const Chunk& c) {
    const auto size = dst[c.tensor].element_size();
    std::memcpy(static_cast<char*>(dst[c.tensor].data_ptr()) + c.begin * size,
                static_cast<const char*>(src[c.tensor].data_ptr()) + c.begin * size, (c.end - c.begin) * size);
  });
}

}  // namespace imbsam::cpu
