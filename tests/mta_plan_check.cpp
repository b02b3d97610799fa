// Host check of csrc/cuda/mta_plan.h, compiled and run by test_mta_plan.py: every chunk
// of every non-empty tensor lands in exactly one block, with the right addresses and
// sizes, within the per-launch limits, and block offsets count the earlier blocks.
#include <cstdint>
#include <cstdio>
#include <map>
#include <random>
#include <utility>

#include "cuda/mta_plan.h"

using namespace imbsam::cuda;

// The layout this build checks (test_mta_plan.py builds both).
constexpr bool kLarge = IMBSAM_MTA_LARGE_ARGS;
constexpr int kMaxBlocks = ArgLimits<kLarge>::kMaxBlocks;
constexpr const int* kMaxTensors = ArgLimits<kLarge>::kMaxTensors;

static int failures = 0;
#define EXPECT(cond, ...)                            \
  do {                                               \
    if (!(cond)) {                                   \
      if (failures++ < 10) std::printf(__VA_ARGS__); \
    }                                                \
  } while (0)

template <int D>
void check(const std::vector<int64_t>& numels) {
  std::vector<std::array<void*, D>> addrs(numels.size());
  std::map<void*, size_t> index_of;
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int d = 0; d < D; ++d) addrs[t][d] = reinterpret_cast<void*>((t + 1) * 4096 + d * (1ull << 40));
    index_of[addrs[t][0]] = t;
  }
  std::map<std::pair<size_t, int64_t>, int> seen;
  int64_t next_offset = 0;
  plan_launches<D, kLarge>(addrs, numels, [&](const TensorListMetadata<D, kLarge>& tl, int blocks, int64_t offset) {
    EXPECT(offset == next_offset, "offset %lld, expected %lld\n", (long long)offset, (long long)next_offset);
    EXPECT(blocks >= 1 && blocks <= kMaxBlocks, "blocks %d\n", blocks);
    next_offset += blocks;
    for (int b = 0; b < blocks; ++b) {
      const int e = tl.block_to_tensor[b];
      EXPECT(e < kMaxTensors[D - 1], "entry %d out of range\n", e);
      auto it = index_of.find(tl.addresses[0][e]);
      EXPECT(it != index_of.end(), "unknown address\n");
      if (it == index_of.end()) continue;
      const size_t t = it->second;
      for (int d = 0; d < D; ++d) EXPECT(tl.addresses[d][e] == addrs[t][d], "list %d address of tensor %zu\n", d, t);
      EXPECT(tl.sizes[e] == numels[t], "size of tensor %zu\n", t);
      const int64_t c = tl.block_to_chunk[b];
      EXPECT(c >= 0 && c * kChunkSize < numels[t], "chunk %lld of tensor %zu\n", (long long)c, t);
      seen[std::make_pair(t, c)]++;
    }
  });
  int64_t total = 0;
  for (size_t t = 0; t < numels.size(); ++t) {
    const int64_t chunks = (numels[t] + kChunkSize - 1) / kChunkSize;
    total += chunks;
    for (int64_t c = 0; c < chunks; ++c)
      EXPECT(seen[std::make_pair(t, c)] == 1, "D=%d tensor %zu chunk %lld seen %d times\n", D, t, (long long)c,
             seen[std::make_pair(t, c)]);
  }
  EXPECT(next_offset == total, "D=%d: %lld blocks for %lld chunks\n", D, (long long)next_offset, (long long)total);
}

template <int D>
void check_all(std::mt19937_64& rng) {
  check<D>({});
  check<D>({0, 0});
  check<D>({1, 7, 65537, 278011, 0});
  constexpr int64_t kFull = kChunkSize * kMaxBlocks;  // the elements one launch holds
  check<D>(std::vector<int64_t>(333, 1000));          // more tensors than one launch holds
  check<D>({25'000'000});
  check<D>({2 * kFull + 12345});              // more chunks than one launch holds
  check<D>({5, 2 * kFull - 7, 3, 0, kFull});  // carry-over mid-tensor, exact fill
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<int64_t> numels(rng() % 400);
    for (auto& n : numels) {
      const int kind = rng() % 10;
      n = kind == 0 ? 0 : kind < 7 ? int64_t(rng() % 5000) : int64_t(rng() % (40 * kChunkSize));
    }
    check<D>(numels);
  }
}

int main() {
  std::mt19937_64 rng(0);
  check_all<1>(rng);
  check_all<2>(rng);
  check_all<3>(rng);
  check_all<4>(rng);
  check_all<5>(rng);
  check_all<6>(rng);
  check_all<7>(rng);
  check_all<8>(rng);
  std::printf("failures %d\n", failures);
  return failures == 0 ? 0 : 1;
}
