// CPU implementations of the imbsam ops (schemas in csrc/ops.cpp, spec in
// imbsam/reference.py). Each op is one pass over memory, parallel over chunks of all
// tensors; the inner loops are plain contiguous loops the compiler vectorises.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "../checks.h"
#include "multi_tensor_cpu.h"

namespace imbsam::cpu {
namespace {

// Sum of squares of x[0..n) (scaled by (|w| + eta_a) when w is given), in double.
// Float lanes over short blocks vectorise; each block is flushed to a double so long
// tensors keep their precision.
template <typename T>
double sum_squares(const T* x, const T* w, double eta_a, int64_t n) {
  using M = math_t<T>;
  constexpr int64_t kLanes = 16;
  constexpr int64_t kBlock = 1024;
  const M eta = static_cast<M>(eta_a);
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    M lanes[kLanes] = {};
    int64_t i = b;
    if (w == nullptr) {
      for (; i + kLanes <= e; i += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) {
          const M v = static_cast<M>(x[i + j]);
          lanes[j] += v * v;
        }
      for (; i < e; ++i) {
        const M v = static_cast<M>(x[i]);
        lanes[0] += v * v;
      }
    } else {
      for (; i + kLanes <= e; i += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) {
          const M v = static_cast<M>(x[i + j]) * (std::abs(static_cast<M>(w[i + j])) + eta);
          lanes[j] += v * v;
        }
      for (; i < e; ++i) {
        const M v = static_cast<M>(x[i]) * (std::abs(static_cast<M>(w[i])) + eta);
        lanes[0] += v * v;
      }
    }
    for (int64_t j = 0; j < kLanes; ++j) total += static_cast<double>(lanes[j]);
  }
  return total;
}

bool any_double(at::TensorList a, at::TensorList b) {
  for (const auto& t : a) if (t.scalar_type() == at::kDouble) return true;
  for (const auto& t : b) if (t.scalar_type() == at::kDouble) return true;
  return false;
}

at::Tensor grad_norm_cpu(at::TensorList grads, at::TensorList adaptive_grads, at::TensorList adaptive_params,
                         double eta_a) {
  check_matches("grad_norm", adaptive_params, "adaptive_params", adaptive_grads, "adaptive_grads");
  // One work list over both lists; partial sums land in a fixed slot per chunk and are
  // added in order, so the norm does not depend on the thread count.
  std::vector<at::Tensor> all(grads.begin(), grads.end());
  all.insert(all.end(), adaptive_grads.begin(), adaptive_grads.end());
  check_list("grad_norm", all, "grads + adaptive_grads");
  const auto chunks = make_chunks(all);
  std::vector<double> partial(chunks.size(), 0.0);
  const auto n_plain = static_cast<int64_t>(grads.size());
  for_each_chunk(chunks, [&](int64_t slot, const Chunk& c) {
    const at::Tensor& g = all[c.tensor];
    const bool scaled = c.tensor >= n_plain;
    dispatch_float(g.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* w = scaled ? ptr<T>(adaptive_params[c.tensor - n_plain]) + c.begin : nullptr;
      partial[slot] = sum_squares<T>(ptr<T>(g) + c.begin, w, eta_a, c.end - c.begin);
    });
  });
  double total = 0.0;
  for (double p : partial) total += p;
  const auto dtype = any_double(grads, adaptive_grads) ? at::kDouble : at::kFloat;
  return at::scalar_tensor(std::sqrt(total), at::TensorOptions().dtype(dtype));
}

void restore_cpu(at::TensorList params, at::TensorList backups) {
  check_list("restore_", params, "params");
  check_matches("restore_", params, "params", backups, "backups");
  for_each_chunk(make_chunks(params), [&](int64_t, const Chunk& c) {
    const auto size = params[c.tensor].element_size();
    std::memcpy(static_cast<char*>(params[c.tensor].data_ptr()) + c.begin * size,
                static_cast<const char*>(backups[c.tensor].data_ptr()) + c.begin * size, (c.end - c.begin) * size);
  });
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
    restore_cpu(backups, params);
    return;
  }
  const double scale = rho / (n + 1e-16);
  for_each_chunk(make_chunks(params), [&](int64_t, const Chunk& c) {
    dispatch_float(params[c.tensor].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using M = math_t<T>;
      T* w = ptr<T>(params[c.tensor]) + c.begin;
      const T* g = ptr<T>(grads[c.tensor]) + c.begin;
      T* b = ptr<T>(backups[c.tensor]) + c.begin;
      const int64_t n = c.end - c.begin;
      const M s = static_cast<M>(scale);
      const M eta = static_cast<M>(eta_a);
      if (adaptive) {
        for (int64_t i = 0; i < n; ++i) {
          const M wi = static_cast<M>(w[i]);
          const M t = std::abs(wi) + eta;
          b[i] = w[i];
          w[i] = static_cast<T>(wi + (s * static_cast<M>(g[i])) * (t * t));
        }
      } else {
        for (int64_t i = 0; i < n; ++i) {
          const M wi = static_cast<M>(w[i]);
          b[i] = w[i];
          w[i] = static_cast<T>(wi + s * static_cast<M>(g[i]));
        }
      }
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
      T* g = ptr<T>(grads[c.tensor]) + c.begin;
      const T* h = ptr<T>(head_grads[c.tensor]) + c.begin;
      const int64_t n = c.end - c.begin;
      for (int64_t i = 0; i < n; ++i) g[i] = static_cast<T>(static_cast<M>(g[i]) + static_cast<M>(h[i]));
    });
  });
}

struct SgdArgs {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_momentum_step;
};

// One element of restore + combine + SGD, in torch.optim.SGD's order of operations.
// The options are template flags so every combination compiles to a branch-free loop.
template <typename T, bool kHead, bool kMomentum>
void sgd_chunk(T* w, const T* g, const T* backup, const T* h, T* buf, int64_t n, const SgdArgs& a) {
  using M = math_t<T>;
  const M lr = static_cast<M>(a.lr), mom = static_cast<M>(a.momentum), wd = static_cast<M>(a.weight_decay);
  const M keep = static_cast<M>(1.0 - a.dampening);
  const M sign = a.maximize ? M(-1) : M(1);
  for (int64_t i = 0; i < n; ++i) {
    const M wi = static_cast<M>(backup[i]);
    M d = static_cast<M>(g[i]);
    if constexpr (kHead) d += static_cast<M>(h[i]);
    d = sign * d + wd * wi;
    if constexpr (kMomentum) {
      const M nb = a.first_momentum_step ? d : mom * static_cast<M>(buf[i]) + keep * d;
      const T stored = static_cast<T>(nb);
      buf[i] = stored;
      d = a.nesterov ? d + mom * static_cast<M>(stored) : static_cast<M>(stored);
    }
    w[i] = static_cast<T>(wi - lr * d);
  }
}

void restore_sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList backups,
                          at::TensorList head_grads, at::TensorList momentum_buffers, double lr, double momentum,
                          double dampening, double weight_decay, bool nesterov, bool maximize,
                          bool first_momentum_step, const std::optional<at::Tensor>& lr_tensor,
                          const std::optional<at::Tensor>& found_inf) {
  const char* op = "restore_sgd_step_";
  check_list(op, params, "params");
  check_matches(op, params, "params", grads, "grads");
  check_matches(op, params, "params", backups, "backups");
  const bool has_head = !head_grads.empty();
  if (has_head) check_matches(op, params, "params", head_grads, "head_grads");
  const bool has_momentum = momentum != 0.0;
  if (has_momentum) check_matches(op, params, "params", momentum_buffers, "momentum_buffers");
  TORCH_CHECK_VALUE(has_momentum || momentum_buffers.empty(), "imbsam.", op,
                    ": momentum is 0 but momentum_buffers were given; pass an empty list");
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0 && dampening == 0), "imbsam.", op,
                    ": nesterov needs momentum > 0 and dampening == 0");
  if (lr_tensor) check_scalar_on(op, *lr_tensor, "lr_tensor", params);
  if (found_inf) check_scalar_on(op, *found_inf, "found_inf", params);

  // Reading these CPU scalars is no host-device synchronisation.
  if (found_inf && found_inf->item<double>() != 0.0) {
    restore_cpu(params, backups);
    return;
  }
  const SgdArgs args{lr_tensor ? lr_tensor->item<double>() : lr, momentum, dampening, weight_decay,
                     nesterov, maximize, first_momentum_step};
  for_each_chunk(make_chunks(params), [&](int64_t, const Chunk& c) {
    dispatch_float(params[c.tensor].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      T* w = ptr<T>(params[c.tensor]) + c.begin;
      const T* g = ptr<T>(grads[c.tensor]) + c.begin;
      const T* b = ptr<T>(backups[c.tensor]) + c.begin;
      const T* h = has_head ? ptr<T>(head_grads[c.tensor]) + c.begin : nullptr;
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
  m.impl("grad_norm", &grad_norm_cpu);
  m.impl("perturb_", &perturb_cpu);
  m.impl("restore_", &restore_cpu);
  m.impl("add_head_grads_", &add_head_grads_cpu);
  m.impl("restore_sgd_step_", &restore_sgd_step_cpu);
}

}  // namespace imbsam::cpu
