// restore_adam_step_ on the GPU, the host side: checks, the step counts and their bias
// corrections (torch ops on the device: no host sync), dtype dispatch and one
// multi-tensor pass of device/adam_step.cuh's functor per dtype.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "device/adam_step.cuh"
#include "dispatch.cuh"
#include "multi_tensor_apply.cuh"

namespace imbsam::cuda {
namespace {

// state_steps += 1, or += (found_inf == 0): one foreach add per step dtype.
void increment_steps(at::TensorList state_steps, const at::Tensor& inf_f) {
  for (const auto& [dtype, idx] : group_by_dtype(state_steps)) {
    std::vector<at::Tensor> steps;
    for (size_t i : idx) steps.push_back(state_steps[i]);
    if (inf_f.defined()) at::_foreach_add_(steps, inf_f.eq(0).to(dtype));
    else at::_foreach_add_(steps, 1);
  }
}

// Per tensor, on the device in double: (lr / (1 - beta1^step), sqrt(1 - beta2^step)),
// as an (n, 2) tensor. CPU step counts (plain Adam's) travel in one copy.
at::Tensor bias_corrections(at::TensorList state_steps, const at::Device& device, double lr,
                            const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2) {
  at::Tensor steps = at::stack(state_steps).to(at::kDouble);
  if (!steps.is_cuda()) steps = steps.pin_memory().to(device, /*non_blocking=*/true);
  const at::Tensor step_size =
      (lr_tensor ? lr_tensor->to(at::kDouble) : at::scalar_tensor(lr, steps.options())) / (1 - at::pow(beta1, steps));
  return at::stack({step_size, at::sqrt(1 - at::pow(beta2, steps))}, 1).contiguous();
}

template <typename T, bool kHead, bool kAmsgrad>
void launch_adam(const std::vector<std::vector<at::Tensor>>& lists, const at::Tensor& coefs,
                 const std::vector<size_t>& idx, const AdamArgs& args) {
  constexpr int kLists = 5 + kHead + kAmsgrad;
  std::vector<std::array<void*, kLists + 1>> addresses(idx.size());
  std::vector<int64_t> numels(idx.size());
  double* coef = coefs.data_ptr<double>();
  for (size_t t = 0; t < idx.size(); ++t) {
    for (int d = 0; d < kLists; ++d) addresses[t][d] = lists[d][t].data_ptr();
    addresses[t][kLists] = coef + 2 * idx[t];  // this tensor's bias corrections
    numels[t] = lists[0][t].numel();
  }
  if (args.decoupled_weight_decay)
    apply_to_addresses<kLists + 1>(addresses, numels, AdamFunctor<T, kHead, kAmsgrad, true>{}, args);
  else apply_to_addresses<kLists + 1>(addresses, numels, AdamFunctor<T, kHead, kAmsgrad, false>{}, args);
}

void restore_adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups,
                            at::TensorList head_grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, double beta1,
                            double beta2, double eps, double weight_decay, bool decoupled_weight_decay, bool amsgrad,
                            bool maximize, const std::optional<at::Tensor>& lr_tensor,
                            const std::optional<at::Tensor>& found_inf) {
  check_adam_step(params, grads, backups, head_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad,
                  lr_tensor, found_inf);
  if (params.empty()) return;
  const bool has_head = !head_grads.empty();
  const c10::cuda::CUDAGuard guard(params[0].device());
  const Float32Scalar lr_f(lr_tensor), inf_f(found_inf);
  increment_steps(state_steps, inf_f.value);
  const at::Tensor coefs = bias_corrections(state_steps, params[0].device(), lr, lr_tensor, beta1, beta2);
  const AdamArgs args{lr,      beta1,    beta2,      eps,        weight_decay, decoupled_weight_decay,
                      amsgrad, maximize, lr_f.ptr(), inf_f.ptr()};
  for (const auto& group : group_by_dtype(params)) {
    const std::vector<size_t>& idx = group.second;  // lambdas capture structured bindings only from C++20
    dispatch_float(group.first, [&](auto tag) {
      using T = decltype(tag);
      if (has_head && amsgrad)
        launch_adam<T, true, true>(
            pick({params, grads, backups, head_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, idx), coefs, idx, args);
      else if (has_head)
        launch_adam<T, true, false>(pick({params, grads, backups, head_grads, exp_avgs, exp_avg_sqs}, idx), coefs, idx,
                                    args);
      else if (amsgrad)
        launch_adam<T, false, true>(pick({params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, idx), coefs,
                                    idx, args);
      else launch_adam<T, false, false>(pick({params, grads, backups, exp_avgs, exp_avg_sqs}, idx), coefs, idx, args);
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(imbsam, CUDA, m) { m.impl("restore_adam_step_", &restore_adam_step_cuda); }

}  // namespace imbsam::cuda
