// CPU implementations of the elementwise imbsam ops: perturb, restore, the head-gradient
// combine and the fused restore + combine + SGD step (schemas in csrc/ops.cpp, spec in
// imbsam/backends/reference.py; the norm is in grad_norm.cpp, as on CUDA). Each op is one
// pass over memory, parallel over chunks of all tensors; the inner loops are plain
// fp32/fp64 loops that the compiler vectorises.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "../checks.h"
#include "../sgd_args.h"
#include "multi_tensor_cpu.h"

namespace imbsam::cpu {
namespace {

void restore_cpu(at::TensorList params, at::TensorList backups) {
  check_list("restore_", params, "params");
  check_matches("restore_", params, "params", backups, "backups");
  copy_lists(params, backups);
}

void perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& norm,
                 double rho, double eta_a, bool adaptive) {
  check_list("perturb_", params, "params");
  check_matches("perturb_", params, "params", grads, "grads");
  check_matches("perturb_", params, "params", backups, "backups");
  check_scalar_on("perturb_", norm, "norm", params);
  const double n = norm.item<double>();  // a CPU tensor: no device synchronisation
  if (!std::isfinite(n)) {
    // 0 * NaN is NaN: with a non-finite norm the weights stay as they are (backups still written).
    copy_lists(backups, params);
    return;
  }
  const double scale = rho / (n + 1e-16);
  for_each_chunk(make_chunks(params), [&](int64_t, const Chunk& c) {
    dispatch_float(params[c.tensor].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using M = math_t<T>;
      T* w = ptr<T>(params[c.tensor]) + c.begin;
      std::memcpy(ptr<T>(backups[c.tensor]) + c.begin, w, (c.end - c.begin) * sizeof(T));
      T* p[2] = {w, ptr<T>(grads[c.tensor]) + c.begin};
      const M s = static_cast<M>(scale), eta = static_cast<M>(eta_a);
      in_math_precision<2, 0b01>(p, c.end - c.begin, [&](M* const* x, int64_t len) {
        M* wx = x[0];
        const M* gx = x[1];
        if (adaptive) {
          for (int64_t i = 0; i < len; ++i) {
            const M t = std::abs(wx[i]) + eta;
            wx[i] = wx[i] + (s * gx[i]) * (t * t);
          }
        } else {
          for (int64_t i = 0; i < len; ++i) wx[i] = wx[i] + s * gx[i];
        }
      });
    });
  });
}

void add_head_grads_cpu(at::TensorList grads, at::TensorList head_grads) {
  check_list("add_head_grads_", grads, "grads");
  check_matches("add_head_grads_", grads, "grads", head_grads, "head_grads");
  for_each_chunk(make_chunks(grads), [&](int64_t, const Chunk& c) {
    dispatch_float(grads[c.tensor].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using M = math_t<T>;
      T* p[2] = {ptr<T>(grads[c.tensor]) + c.begin, ptr<T>(head_grads[c.tensor]) + c.begin};
      in_math_precision<2, 0b01>(p, c.end - c.begin, [](M* const* x, int64_t n) {
        for (int64_t i = 0; i < n; ++i) x[0][i] = x[0][i] + x[1][i];
      });
    });
  });
}

// restore + combine + SGD on math-precision arrays x = (w, g, backup[, g_H][, buf]), in
// torch.optim.SGD's order of operations; T is the storage type. SGD steps with the
// momentum buffer as stored in T: for bf16/fp16 a first loop writes d (into g's
// scratch) and the buffer, the buffer block is rounded, and a second loop steps.
// The options are template flags so each loop is branch-free.
template <typename T, bool kHead, bool kMomentum, bool kFirst, bool kNesterov>
void sgd_math(math_t<T>* const* x, int64_t n, const SgdArgs& a) {
  using M = math_t<T>;
  constexpr bool kExactBuffer = std::is_same_v<T, float> || std::is_same_v<T, double>;
  const M lr = static_cast<M>(a.lr), mom = static_cast<M>(a.momentum), wd = static_cast<M>(a.weight_decay);
  const M keep = static_cast<M>(1.0 - a.dampening);
  const M sign = a.maximize ? M(-1) : M(1);
  M* w = x[0];
  M* g = x[1];
  const M* backup = x[2];
  const M* h = kHead ? x[3] : nullptr;
  M* buf = kMomentum ? x[3 + kHead] : nullptr;
  if constexpr (!kMomentum || kExactBuffer) {
    for (int64_t i = 0; i < n; ++i) {
      const M wi = backup[i];
      M d = g[i];
      if constexpr (kHead) d += h[i];
      d = sign * d + wd * wi;
      if constexpr (kMomentum) {
        buf[i] = kFirst ? d : mom * buf[i] + keep * d;
        d = kNesterov ? d + mom * buf[i] : buf[i];
      }
      w[i] = wi - lr * d;
    }
  } else {
    M* d = g;  // g is float scratch here, free to overwrite
    for (int64_t i = 0; i < n; ++i) {
      M di = g[i];
      if constexpr (kHead) di += h[i];
      di = sign * di + wd * backup[i];
      d[i] = di;
      buf[i] = kFirst ? di : mom * buf[i] + keep * di;
    }
    round_block<T>(buf, n);
    for (int64_t i = 0; i < n; ++i) w[i] = backup[i] - lr * (kNesterov ? d[i] + mom * buf[i] : buf[i]);
  }
}

template <typename T, bool kHead, bool kMomentum>
void sgd_chunk(T* w, T* g, T* backup, T* h, T* buf, int64_t n, const SgdArgs& a) {
  using M = math_t<T>;
  constexpr int D = 3 + kHead + kMomentum;
  T* p[D];
  p[0] = w, p[1] = g, p[2] = backup;
  if constexpr (kHead) p[3] = h;
  if constexpr (kMomentum) p[3 + kHead] = buf;
  constexpr int kOut = 1 | (kMomentum ? 1 << (D - 1) : 0);
  constexpr int kIn = ((1 << D) - 1) & ~1;  // w is rewritten from its backup: never read
  in_math_precision<D, kOut, kIn>(p, n, [&](M* const* x, int64_t len) {
    if (!kMomentum) sgd_math<T, kHead, kMomentum, false, false>(x, len, a);
    else if (a.first_momentum_step && a.nesterov) sgd_math<T, kHead, kMomentum, true, true>(x, len, a);
    else if (a.first_momentum_step) sgd_math<T, kHead, kMomentum, true, false>(x, len, a);
    else if (a.nesterov) sgd_math<T, kHead, kMomentum, false, true>(x, len, a);
    else sgd_math<T, kHead, kMomentum, false, false>(x, len, a);
  });
}

void restore_sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList backups,
                          at::TensorList head_grads, at::TensorList momentum_buffers, double lr, double momentum,
                          double dampening, double weight_decay, bool nesterov, bool maximize, bool first_momentum_step,
                          const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& found_inf) {
  check_sgd_step(params, grads, backups, head_grads, momentum_buffers, momentum, dampening, nesterov, lr_tensor,
                 found_inf);
  const bool has_head = !head_grads.empty();
  const bool has_momentum = momentum != 0.0;

  // Reading these CPU scalars is no host-device synchronisation.
  if (found_inf && found_inf->item<double>() != 0.0) {
    copy_lists(params, backups);
    return;
  }
  const SgdArgs args{lr_tensor ? lr_tensor->item<double>() : lr,
                     momentum,
                     dampening,
                     weight_decay,
                     nesterov,
                     maximize,
                     first_momentum_step};
  for_each_chunk(make_chunks(params), [&](int64_t, const Chunk& c) {
    dispatch_float(params[c.tensor].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      T* w = ptr<T>(params[c.tensor]) + c.begin;
      T* g = ptr<T>(grads[c.tensor]) + c.begin;
      T* b = ptr<T>(backups[c.tensor]) + c.begin;
      T* h = has_head ? ptr<T>(head_grads[c.tensor]) + c.begin : nullptr;
      T* buf = has_momentum ? ptr<T>(momentum_buffers[c.tensor]) + c.begin : nullptr;
      const int64_t n = c.end - c.begin;
      if (has_head && has_momentum) sgd_chunk<T, true, true>(w, g, b, h, buf, n, args);
      else if (has_head) sgd_chunk<T, true, false>(w, g, b, h, buf, n, args);
      else if (has_momentum) sgd_chunk<T, false, true>(w, g, b, h, buf, n, args);
      else sgd_chunk<T, false, false>(w, g, b, h, buf, n, args);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(imbsam, CPU, m) {
  m.impl("perturb_", &perturb_cpu);
  m.impl("restore_", &restore_cpu);
  m.impl("add_head_grads_", &add_head_grads_cpu);
  m.impl("restore_sgd_step_", &restore_sgd_step_cpu);
}

}  // namespace imbsam::cpu
