// CPU implementation of restore_adam_step_: restore + combine + a torch.optim.Adam / AdamW
// step in one pass over memory (schema in csrc/ops.cpp, spec in
// imbsam/backends/reference.py, the element math in csrc/adam_math.h). The step counts are
// CPU tensors here: read and incremented on the host, and each tensor's bias corrections
// computed there once, in double, as torch does.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../adam_args.h"
#include "../checks.h"
#include "multi_tensor_cpu.h"

namespace imbsam::cpu {
namespace {

// Per-tensor scalars of this step: lr / (1 - beta1^step) and sqrt(1 - beta2^step).
struct BiasCorrection {
  double step_size, bias_correction2_sqrt;
};

// The element loop over one block. Distinct tensors (the checks made them the
// parameters' twins, never one another): __restrict__ on the parameters lets each
// instantiation vectorise (GCC gives up on run-time alias checks between six or more arrays,
// and ignores restrict on local pointers). vmax is read and written only with kAmsgrad.
template <typename M, bool kHead, bool kAmsgrad, bool kDecoupled>
inline void adam_loop(M* __restrict__ w, const M* __restrict__ g, const M* __restrict__ backup, const M* __restrict__ h,
                      M* __restrict__ m, M* __restrict__ v, M* __restrict__ vmax, int64_t n, const AdamScalars<M> s) {
  M unused = 0;
  for (int64_t i = 0; i < n; ++i) {
    M d = g[i];
    if constexpr (kHead) d += h[i];
    w[i] = adam_element<M, kDecoupled, kAmsgrad>(s, backup[i], d, m[i], v[i], kAmsgrad ? vmax[i] : unused);
  }
}

// Lists x = (w, g, backup[, g_H], m, v[, vmax]) in math precision; w is only written.
template <typename T, bool kHead, bool kAmsgrad, bool kDecoupled>
void adam_math(math_t<T>* const* x, int64_t n, const AdamScalars<math_t<T>>& s) {
  using M = math_t<T>;
  constexpr int kM = 3 + kHead;
  adam_loop<M, kHead, kAmsgrad, kDecoupled>(x[0], x[1], x[2], kHead ? x[3] : nullptr, x[kM], x[kM + 1],
                                            kAmsgrad ? x[kM + 2] : nullptr, n, s);
}

template <typename T, bool kHead, bool kAmsgrad>
void adam_chunk(T* const (&lists)[7], int64_t n, const AdamScalars<math_t<T>>& s, bool decoupled) {
  using M = math_t<T>;
  constexpr int D = 5 + kHead + kAmsgrad;
  constexpr int kM = 3 + kHead;
  T* p[D];
  for (int d = 0; d < D; ++d) p[d] = lists[d];
  constexpr int kOut = 1 | (1 << kM) | (1 << (kM + 1)) | (kAmsgrad ? 1 << (kM + 2) : 0);
  constexpr int kIn = ((1 << D) - 1) & ~1;  // w is rewritten from its backup: never read
  in_math_precision<D, kOut, kIn>(p, n, [&](M* const* x, int64_t len) {
    if (decoupled) adam_math<T, kHead, kAmsgrad, true>(x, len, s);
    else adam_math<T, kHead, kAmsgrad, false>(x, len, s);
  });
}

double read_step(const at::Tensor& s) {
  return s.scalar_type() == at::kDouble ? *s.data_ptr<double>() : static_cast<double>(*s.data_ptr<float>());
}

void write_step(const at::Tensor& s, double value) {
  if (s.scalar_type() == at::kDouble) *s.data_ptr<double>() = value;
  else *s.data_ptr<float>() = static_cast<float>(value);
}

void restore_adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList backups,
                           at::TensorList head_grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                           at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, double beta1,
                           double beta2, double eps, double weight_decay, bool decoupled_weight_decay, bool amsgrad,
                           bool maximize, const std::optional<at::Tensor>& lr_tensor,
                           const std::optional<at::Tensor>& found_inf) {
  check_adam_step(params, grads, backups, head_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad,
                  lr_tensor, found_inf);
  const bool has_head = !head_grads.empty();
  // Reading these CPU scalars is no host-device synchronisation.
  if (found_inf && found_inf->item<double>() != 0.0) {  // skipped: w restored, the state as it was
    copy_lists(params, backups);
    return;
  }
  const double step_lr = lr_tensor ? lr_tensor->item<double>() : lr;
  const AdamArgs args{step_lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize};
  std::vector<BiasCorrection> corrections(params.size());
  for (size_t t = 0; t < params.size(); ++t) {
    const double step = read_step(state_steps[t]) + 1;
    write_step(state_steps[t], step);
    corrections[t] = {step_lr / (1 - std::pow(beta1, step)), std::sqrt(1 - std::pow(beta2, step))};
  }
  for_each_chunk(make_chunks(params), [&](int64_t, const Chunk& c) {
    dispatch_float(params[c.tensor].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using M = math_t<T>;
      const int64_t t = c.tensor;
      auto at = [&](at::TensorList l) { return ptr<T>(l[t]) + c.begin; };
      // (w, g, backup[, g_H], m, v[, vmax]): the lists in the order the kernels take them.
      T* lists[7] = {at(params), at(grads), at(backups)};
      int d = 3;
      if (has_head) lists[d++] = at(head_grads);
      lists[d++] = at(exp_avgs);
      lists[d++] = at(exp_avg_sqs);
      if (amsgrad) lists[d++] = at(max_exp_avg_sqs);
      const auto s = args.scalars<M>(corrections[t].step_size, corrections[t].bias_correction2_sqrt, step_lr);
      const int64_t n = c.end - c.begin;
      if (has_head && amsgrad) adam_chunk<T, true, true>(lists, n, s, decoupled_weight_decay);
      else if (has_head) adam_chunk<T, true, false>(lists, n, s, decoupled_weight_decay);
      else if (amsgrad) adam_chunk<T, false, true>(lists, n, s, decoupled_weight_decay);
      else adam_chunk<T, false, false>(lists, n, s, decoupled_weight_decay);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(imbsam, CPU, m) { m.impl("restore_adam_step_", &restore_adam_step_cpu); }

}  // namespace imbsam::cpu
