// The CUDA kernels of csrc/cuda/device/, built by an ordinary C++ compiler against
// cuda_emu.h and exposed to the tests (tests/emulated_cuda.py) through a C interface.
//
// Each entry point runs one dtype's launch sequence as the .cu glue does: the lists'
// addresses and sizes packed by plan_launches (csrc/cuda/mta_plan.h, the same header
// the GPU build uses), each launch run by the emulator. Returns 0, or -1 with the
// emulator's message in emu_last_error().
#include "cuda_emu.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <vector>

#include "cuda/device/adam_step.cuh"
#include "cuda/device/norm.cuh"
#include "cuda/device/updates.cuh"

namespace {

using namespace imbsam::cuda;

// The kernel-argument layout of this build (emulated_cuda.py builds both); on a GPU the
// glue picks one at run time.
constexpr bool kLarge = IMBSAM_MTA_LARGE_ARGS;

enum Dtype : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

template <typename F>
int with_dtype(int dtype, const F& f) {
  switch (dtype) {
    case kF32: return f(float{});
    case kF64: return f(double{});
    case kBF16: return f(c10::BFloat16{});
    case kF16: return f(c10::Half{});
    default: cuda_emu::emu().error = "emu: unknown dtype code " + std::to_string(dtype); return -1;
  }
}

// multi_tensor_apply (csrc/cuda/multi_tensor_apply.cuh) with the emulator's launch.
template <int D, typename Functor, typename... Args>
int apply(void** const (&lists)[D], int n, const int64_t* numels, Functor f, Args... args) {
  std::vector<std::array<void*, D>> addresses(n);
  std::vector<int64_t> sizes(numels, numels + n);
  for (int t = 0; t < n; ++t)
    for (int d = 0; d < D; ++d) addresses[t][d] = lists[d][t];
  plan_launches<D, kLarge>(
      addresses, sizes, [&](const TensorListMetadata<D, kLarge>& tl, int blocks, int64_t block_offset) {
        cuda_emu::launch(dim3(blocks), dim3(kBlockSize), multi_tensor_kernel<D, kLarge, Functor, Args...>, tl,
                         block_offset, f, args...);
      });
  return cuda_emu::last_error().empty() ? 0 : -1;
}

// The Adam step's lists (w, g, backup[, g_H], m, v[, vmax]) and the bias-correction
// column, as adam_step.cu packs them.
template <typename T, bool kHead, bool kAmsgrad>
int apply_adam(void** const (&in)[7], void** coefs, int n, const int64_t* numels, const imbsam::AdamArgs& a) {
  constexpr int K = 5 + kHead + kAmsgrad;
  void** lists[K + 1];
  int d = 0;
  for (int i = 0; i < 7; ++i)
    if (in[i] != nullptr) lists[d++] = in[i];
  lists[K] = coefs;
  if (a.decoupled_weight_decay) return apply<K + 1>(lists, n, numels, AdamFunctor<T, kHead, kAmsgrad, true>{}, a);
  return apply<K + 1>(lists, n, numels, AdamFunctor<T, kHead, kAmsgrad, false>{}, a);
}

}  // namespace

extern "C" {

// The thread order (0 forward, 1 reverse, 2 seeded random) for the launches that follow.
void emu_configure(int order, uint64_t seed) { cuda_emu::configure(static_cast<cuda_emu::Order>(order), seed); }
// The message of the last aborted launch ("" if none), and a way to start afresh.
const char* emu_last_error() { return cuda_emu::last_error().c_str(); }
void emu_clear_error() { cuda_emu::clear_error(); }
// Launches run so far, and the build's metadata variant (1: 32 KiB kernel arguments).
int64_t emu_launches() { return cuda_emu::launches(); }
int emu_large_args() { return IMBSAM_MTA_LARGE_ARGS; }
int64_t emu_chunk_size() { return kChunkSize; }
int emu_max_blocks() { return ArgLimits<kLarge>::kMaxBlocks; }

// Stage 1 of the norm over one dtype's tensors: partials[i] for each chunk i, in order.
// adaptive != 0: lists (g, w) and the ASAM-scaled sum.
int emu_sum_squares(int dtype, int n, void** g, void** w, const int64_t* numels, double eta, int adaptive,
                    double* partials) {
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (adaptive) {
      void** const lists[2] = {g, w};
      return apply<2>(lists, n, numels, SumSquaresFunctor<T, 2>{}, partials, eta);
    }
    void** const lists[1] = {g};
    return apply<1>(lists, n, numels, SumSquaresFunctor<T, 1>{}, partials, eta);
  });
}

// Stage 2: *out = sqrt(sum of n partials), out float64 when out_double else float32.
int emu_finalize_norm(const double* partials, int64_t n, int out_double, void* out) {
  if (out_double)
    cuda_emu::launch(dim3(1), dim3(1024), finalize_norm_kernel<double>, partials, n, static_cast<double*>(out));
  else cuda_emu::launch(dim3(1), dim3(1024), finalize_norm_kernel<float>, partials, n, static_cast<float*>(out));
  return cuda_emu::last_error().empty() ? 0 : -1;
}

int emu_perturb(int dtype, int n, void** w, void** g, void** b, const int64_t* numels, const void* norm,
                int norm_double, double rho, double eta, int adaptive) {
  const DeviceScalar nrm{norm, norm_double != 0};
  void** const lists[3] = {w, g, b};
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (adaptive) return apply<3>(lists, n, numels, PerturbFunctor<T, true>{}, nrm, rho, eta);
    return apply<3>(lists, n, numels, PerturbFunctor<T, false>{}, nrm, rho, eta);
  });
}

int emu_restore(int dtype, int n, void** dst, void** src, const int64_t* numels) {
  void** const lists[2] = {dst, src};
  return with_dtype(dtype, [&](auto tag) { return apply<2>(lists, n, numels, CopyFunctor<decltype(tag)>{}); });
}

int emu_add_head_grads(int dtype, int n, void** g, void** h, const int64_t* numels) {
  void** const lists[2] = {g, h};
  return with_dtype(dtype, [&](auto tag) { return apply<2>(lists, n, numels, AddFunctor<decltype(tag)>{}); });
}

// head / bufs may be null (no head gradients / no momentum); lr_ptr and found_inf_ptr
// are float32 scalars or null, as the .cu glue passes them.
int emu_restore_sgd_step(int dtype, int n, void** w, void** g, void** b, void** head, void** bufs,
                         const int64_t* numels, double lr, double momentum, double dampening, double weight_decay,
                         int nesterov, int maximize, int first_momentum_step, const float* lr_ptr,
                         const float* found_inf_ptr) {
  const imbsam::SgdArgs a{
      lr,     momentum,     dampening, weight_decay, nesterov != 0, maximize != 0, first_momentum_step != 0,
      lr_ptr, found_inf_ptr};
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (head && bufs) {
      void** const lists[5] = {w, g, b, head, bufs};
      return apply<5>(lists, n, numels, SgdFunctor<T, true, true>{}, a);
    }
    if (head) {
      void** const lists[4] = {w, g, b, head};
      return apply<4>(lists, n, numels, SgdFunctor<T, true, false>{}, a);
    }
    if (bufs) {
      void** const lists[4] = {w, g, b, bufs};
      return apply<4>(lists, n, numels, SgdFunctor<T, false, true>{}, a);
    }
    void** const lists[3] = {w, g, b};
    return apply<3>(lists, n, numels, SgdFunctor<T, false, false>{}, a);
  });
}

// head / vmax may be null (SAM / no amsgrad); coefs: two doubles per tensor, its
// lr / (1 - beta1^step) and sqrt(1 - beta2^step), as the glue computes them on the device.
int emu_restore_adam_step(int dtype, int n, void** w, void** g, void** b, void** head, void** m, void** v, void** vmax,
                          const int64_t* numels, double* coefs, double lr, double beta1, double beta2, double eps,
                          double weight_decay, int decoupled, int amsgrad, int maximize, const float* lr_ptr,
                          const float* found_inf_ptr) {
  const imbsam::AdamArgs a{lr,           beta1,         beta2,  eps,          weight_decay, decoupled != 0,
                           amsgrad != 0, maximize != 0, lr_ptr, found_inf_ptr};
  std::vector<void*> column(n);
  for (int t = 0; t < n; ++t) column[t] = coefs + 2 * t;
  void** const in[7] = {w, g, b, head, m, v, amsgrad ? vmax : nullptr};
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (head && amsgrad) return apply_adam<T, true, true>(in, column.data(), n, numels, a);
    if (head) return apply_adam<T, true, false>(in, column.data(), n, numels, a);
    if (amsgrad) return apply_adam<T, false, true>(in, column.data(), n, numels, a);
    return apply_adam<T, false, false>(in, column.data(), n, numels, a);
  });
}

}  // extern "C"
