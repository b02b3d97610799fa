// A CUDA emulator for the tests: the CUDA built-ins that imbsam's device code uses
// (csrc/cuda/device/), for an ordinary C++20 compiler, so the same source lines that
// nvcc compiles run on the CPU. Include it before any device header.
//
// Every launch runs each block in turn; each CUDA thread of a block is a fiber
// (ucontext) with its own stack below a guard page. Fibers run until they finish or
// wait at __syncthreads() or a warp shuffle; the scheduler then releases a barrier
// only when every thread of the block waits at it, and completes a shuffle only when
// every lane its mask names has arrived. Anything else (a thread that exited or waits
// elsewhere, a lane reading a lane outside the mask, a misaligned 16-byte access)
// aborts the launch with a message that cuda_emu::last_error() returns.
//
// What it cannot show: real concurrency (threads interleave only at barriers and
// shuffles), the GPU's memory ordering and caches, timing, occupancy, and the GPU's
// own floating-point contraction (nvcc's --fmad; the SASS tests read that instead).
#pragma once

// __shared__ places statics in a section of its own (below); GCC 12 drops section
// attributes of statics in templates, clang keeps them.
#ifndef __clang__
#error "cuda_emu.h needs clang++ (GCC ignores the section attribute that __shared__ relies on)"
#endif

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_EMU_ASAN 1
#endif
#endif
#ifdef CUDA_EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __grid_constant__
// Block-shared variables are statics in a section of their own: blocks run one after
// another, and the scheduler poisons the whole section before each block starts.
#define __shared__ static __attribute__((section("cuda_emu_shared")))

// CUDA's math functions have float overloads; make sure float arguments get them here too.
using std::fabs;
using std::isfinite;
using std::sqrt;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_emu {
[[noreturn]] inline void fail(const std::string& what);
inline void check_aligned16(const void* p, const char* access) {
  // The address comes from a uint4 reference, which the compiler may assume aligned and
  // fold this check away: hide where it came from.
  uintptr_t address = reinterpret_cast<uintptr_t>(p);
  asm volatile("" : "+r"(address));
  if (address % 16 != 0) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "misaligned 16-byte %s at %p (a GPU faults on it)", access, p);
    fail(msg);
  }
}
}  // namespace cuda_emu

// The device code moves 16 bytes through uint4: copying one from or to memory checks
// the address is 16-byte aligned, as the GPU's ld/st.v4 requires.
struct alignas(16) uint4 {
  unsigned x, y, z, w;
  uint4() = default;
  uint4(const uint4& o) {
    cuda_emu::check_aligned16(&o, "load");
    std::memcpy(static_cast<void*>(this), &o, 16);
  }
  uint4& operator=(const uint4& o) {
    cuda_emu::check_aligned16(this, "store");
    std::memcpy(static_cast<void*>(this), &o, 16);
    return *this;
  }
};

extern "C" {
// The linker defines these for a section whose name is a C identifier (weak: a program
// without __shared__ variables has no such section).
extern char __start_cuda_emu_shared[] __attribute__((weak));
extern char __stop_cuda_emu_shared[] __attribute__((weak));
}

namespace cuda_emu {

// The order in which ready threads run between two synchronisation points.
enum class Order : int { kForward = 0, kReverse = 1, kRandom = 2 };

struct Settings {
  Order order = Order::kForward;
  uint64_t seed = 0;
  size_t stack_bytes = 256 * 1024;  // a 32 KiB kernel argument is copied onto every thread's stack
};

enum class State { kReady, kBarrier, kShuffle, kDone };
enum class Shfl { kDown, kUp, kXor, kIdx };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // the usable stack, above its guard page
  dim3 tid;
  unsigned lane = 0, warp = 0;
  State state = State::kReady;
  // The shuffle this thread waits in.
  Shfl kind = Shfl::kDown;
  unsigned mask = 0;
  int arg = 0, width = 32;
  size_t size = 0;
  unsigned char value[8] = {}, result[8] = {};
};

struct Emulator {
  Settings settings;
  std::vector<Fiber> fibers;
  std::vector<char*> maps;  // the stacks' mappings, kept between launches
  ucontext_t scheduler;
  const void* scheduler_bottom = nullptr;
  size_t scheduler_size = 0;
  Fiber* current = nullptr;
  dim3 block_idx, block_dim, grid_dim;
  std::function<void()> body;
  std::string error;
  std::mt19937_64 rng;
  int64_t launches = 0, blocks_run = 0;
};

inline Emulator& emu() {
  static Emulator e;
  return e;
}

inline Settings& settings() { return emu().settings; }
// Sets the thread order (and the random order's seed) for the launches that follow.
inline void configure(Order order, uint64_t seed) {
  emu().settings.order = order, emu().settings.seed = seed;
  emu().rng.seed(seed);
}
inline const std::string& last_error() { return emu().error; }
inline void clear_error() { emu().error.clear(); }
inline int64_t launches() { return emu().launches; }

inline const dim3& thread_idx() { return emu().current->tid; }
inline const dim3& block_idx() { return emu().block_idx; }
inline const dim3& block_dim() { return emu().block_dim; }
inline const dim3& grid_dim() { return emu().grid_dim; }

// Switches from `from` to `to`, telling AddressSanitizer about the stack change.
inline void switch_to(ucontext_t* from, ucontext_t* to, const void* to_bottom, size_t to_size, bool exiting) {
#ifdef CUDA_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake, to_bottom, to_size);
  swapcontext(from, to);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  (void)to_bottom, (void)to_size, (void)exiting;
  swapcontext(from, to);
#endif
}

// Gives control back to the scheduler; returns when this thread is resumed.
inline void yield(bool exiting = false) {
  Emulator& e = emu();
  switch_to(&e.current->ctx, &e.scheduler, e.scheduler_bottom, e.scheduler_size, exiting);
}

// Records the first error of a launch, with where it happened; the launch then stops.
inline void report(const std::string& what) {
  Emulator& e = emu();
  if (!e.error.empty()) return;
  char where[96];
  if (e.current != nullptr)
    std::snprintf(where, sizeof where, " (block %u, thread %u)", e.block_idx.x, e.current->tid.x);
  else std::snprintf(where, sizeof where, " (block %u)", e.block_idx.x);
  e.error = "cuda_emu: " + what + where;
}

// Reports from a thread and ends it; the scheduler sees the error and abandons the launch.
[[noreturn]] inline void fail(const std::string& what) {
  Emulator& e = emu();
  report(what);
  if (e.current == nullptr) throw std::logic_error(e.error);  // only threads call fail()
  e.current->state = State::kDone;
  yield(true);
  __builtin_unreachable();  // an aborted thread is never resumed
}

inline void fiber_entry() {
  Emulator& e = emu();
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &e.scheduler_bottom, &e.scheduler_size);
#endif
  e.body();
  e.current->state = State::kDone;
  yield(true);
}

inline void poison_shared() {
  if (__start_cuda_emu_shared != nullptr)
    std::memset(__start_cuda_emu_shared, 0xFF, static_cast<size_t>(__stop_cuda_emu_shared - __start_cuda_emu_shared));
}

inline void ensure_fibers(size_t n) {
  Emulator& e = emu();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (e.maps.size() < n) {
    const size_t bytes = e.settings.stack_bytes + page;
    void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map a thread stack");
    mprotect(m, page, PROT_NONE);  // stacks grow down: an overflow hits this page and faults
    e.maps.push_back(static_cast<char*>(m));
  }
  e.fibers.resize(n);
  for (size_t i = 0; i < n; ++i) e.fibers[i].stack = e.maps[i] + page;
}

inline bool report_false(const std::string& what) {
  report(what);
  return false;
}

// Completes every shuffle whose named lanes have all arrived; false if none could.
inline bool complete_shuffles(size_t n_threads) {
  Emulator& e = emu();
  bool any = false;
  for (size_t w0 = 0; w0 < n_threads; w0 += 32) {
    Fiber* warp = &e.fibers[w0];
    const unsigned lanes = static_cast<unsigned>(std::min<size_t>(32, n_threads - w0));
    for (unsigned l = 0; l < lanes; ++l) {
      if (warp[l].state != State::kShuffle) continue;
      const unsigned mask = warp[l].mask;
      bool ready = true;
      for (unsigned m = 0; m < 32 && ready; ++m) {
        if (!(mask >> m & 1)) continue;
        if (m >= lanes)
          return report_false("__shfl_*_sync mask names lane " + std::to_string(m) + ", past the block's last thread");
        const Fiber& f = warp[m];
        if (f.state == State::kDone)
          return report_false("__shfl_*_sync: lane " + std::to_string(m) + " of warp " + std::to_string(w0 / 32) +
                              " is named in the mask but has exited");
        if (f.state != State::kShuffle) ready = false;
        else if (f.mask != mask || f.kind != warp[l].kind || f.size != warp[l].size)
          return report_false("__shfl_*_sync: lanes " + std::to_string(l) + " and " + std::to_string(m) + " of warp " +
                              std::to_string(w0 / 32) + " wait in different shuffles");
      }
      if (!ready) continue;
      for (unsigned m = 0; m < 32; ++m) {
        if (!(mask >> m & 1)) continue;
        Fiber& f = warp[m];
        const int width = f.width;
        const int base = static_cast<int>(m) / width * width, in_seg = static_cast<int>(m) % width;
        int src = static_cast<int>(m);
        switch (f.kind) {
          case Shfl::kDown: src = in_seg + f.arg < width ? static_cast<int>(m) + f.arg : static_cast<int>(m); break;
          case Shfl::kUp: src = in_seg - f.arg >= 0 ? static_cast<int>(m) - f.arg : static_cast<int>(m); break;
          case Shfl::kXor: {
            const int x = static_cast<int>(m) ^ f.arg;
            src = x / width == static_cast<int>(m) / width ? x : static_cast<int>(m);
            break;
          }
          case Shfl::kIdx: src = base + ((f.arg % width) + width) % width; break;
        }
        if (!(mask >> src & 1))
          return report_false("__shfl_*_sync: lane " + std::to_string(m) + " of warp " + std::to_string(w0 / 32) +
                              " reads lane " + std::to_string(src) +
                              ", which the mask does not name (its value is undefined on a GPU)");
        std::memcpy(f.result, warp[src].value, f.size);
      }
      for (unsigned m = 0; m < 32; ++m)
        if (mask >> m & 1) warp[m].state = State::kReady;
      any = true;
    }
  }
  return any;
}

inline std::string census(size_t n) {
  size_t done = 0, barrier = 0, shuffle = 0;
  for (size_t i = 0; i < n; ++i) {
    const State s = emu().fibers[i].state;
    done += s == State::kDone, barrier += s == State::kBarrier, shuffle += s == State::kShuffle;
  }
  return std::to_string(barrier) + " of " + std::to_string(n) + " threads wait at __syncthreads(), " +
         std::to_string(shuffle) + " in a shuffle, " + std::to_string(done) + " have exited";
}

inline void run_block(size_t n_threads) {
  Emulator& e = emu();
  poison_shared();
  for (size_t i = 0; i < n_threads; ++i) {
    Fiber& f = e.fibers[i];
    f.tid = dim3(static_cast<unsigned>(i % e.block_dim.x), static_cast<unsigned>(i / e.block_dim.x % e.block_dim.y),
                 static_cast<unsigned>(i / (e.block_dim.x * e.block_dim.y)));
    f.lane = static_cast<unsigned>(i % 32), f.warp = static_cast<unsigned>(i / 32);
    f.state = State::kReady;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = e.settings.stack_bytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::vector<size_t> order(n_threads);
  while (e.error.empty()) {
    std::iota(order.begin(), order.end(), size_t{0});
    if (e.settings.order == Order::kReverse) std::reverse(order.begin(), order.end());
    if (e.settings.order == Order::kRandom) std::shuffle(order.begin(), order.end(), e.rng);
    bool ran = false;
    for (size_t i : order) {
      Fiber& f = e.fibers[i];
      if (f.state != State::kReady) continue;
      ran = true;
      e.current = &f;
      switch_to(&e.scheduler, &f.ctx, f.stack, e.settings.stack_bytes, false);
      e.current = nullptr;
      if (!e.error.empty()) return;
    }
    if (ran) continue;
    if (complete_shuffles(n_threads)) continue;
    if (!e.error.empty()) return;
    size_t at_barrier = 0, done = 0;
    for (size_t i = 0; i < n_threads; ++i) {
      at_barrier += e.fibers[i].state == State::kBarrier;
      done += e.fibers[i].state == State::kDone;
    }
    if (done == n_threads) return;
    if (at_barrier == n_threads) {
      for (size_t i = 0; i < n_threads; ++i) e.fibers[i].state = State::kReady;
      continue;
    }
    report("deadlock: " + census(n_threads) +
           " (every thread must reach each __syncthreads(), every lane "
           "named in a mask its shuffle)");
  }
}

// Runs kernel(args...) over grid x block threads; false (and last_error()) when aborted.
// Arguments are copied once per launch and passed by value to every thread, as CUDA does.
template <typename Kernel, typename... Args>
bool launch(dim3 grid, dim3 block, Kernel kernel, const Args&... args) {
  Emulator& e = emu();
  if (!e.error.empty()) return false;  // an earlier launch of this call failed
  ++e.launches;
  const size_t n_threads = static_cast<size_t>(block.x) * block.y * block.z;
  if (n_threads == 0 || n_threads > 1024) {
    e.error = "cuda_emu: a block of " + std::to_string(n_threads) + " threads (CUDA allows 1..1024)";
    return false;
  }
  ensure_fibers(n_threads);
  e.block_dim = block, e.grid_dim = grid;
  e.body = [&]() { kernel(args...); };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        e.block_idx = dim3(x, y, z);
        ++e.blocks_run;
        run_block(n_threads);
        if (!e.error.empty()) return false;
      }
  return true;
}

// The shuffles: this lane's value goes in, the source lane's comes out.
template <typename T>
T shuffle(Shfl kind, unsigned mask, T v, int arg, int width) {
  static_assert(sizeof(T) <= 8, "shuffles move up to 8 bytes");
  Emulator& e = emu();
  Fiber& f = *e.current;
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    fail("__shfl_*_sync width " + std::to_string(width) + " (a power of two up to 32)");
  if (!(mask >> f.lane & 1)) fail("__shfl_*_sync called by a lane its own mask does not name");
  f.kind = kind, f.mask = mask, f.arg = arg, f.width = width, f.size = sizeof(T);
  std::memcpy(f.value, &v, sizeof(T));
  f.state = State::kShuffle;
  yield();
  T out;
  std::memcpy(&out, f.result, sizeof(T));
  return out;
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())

inline void __syncthreads() {
  ::cuda_emu::emu().current->state = ::cuda_emu::State::kBarrier;
  ::cuda_emu::yield();
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return cuda_emu::shuffle(cuda_emu::Shfl::kDown, mask, v, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return cuda_emu::shuffle(cuda_emu::Shfl::kUp, mask, v, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return cuda_emu::shuffle(cuda_emu::Shfl::kXor, mask, v, lane_mask, width);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return cuda_emu::shuffle(cuda_emu::Shfl::kIdx, mask, v, src_lane, width);
}
