// Input validation shared by every device's implementation: a clear ValueError or
// TypeError that names the op, the argument and what is allowed, before any write.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

namespace imbsam {

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_same_length(const char* op, at::TensorList a, const char* a_name, at::TensorList b,
                              const char* b_name) {
  TORCH_CHECK_VALUE(a.size() == b.size(), "imbsam.", op, ": ", b_name, " has ", b.size(), " tensors but ", a_name,
                    " has ", a.size(), "; they must pair up one to one");
}

// `ref` is the parameter list; `other` must match it tensor for tensor: same device, dtype,
// shape and memory layout (the kernels walk all of them as one flat array).
inline void check_matches(const char* op, at::TensorList ref, const char* ref_name, at::TensorList other,
                          const char* other_name) {
  check_same_length(op, ref, ref_name, other, other_name);
  for (size_t i = 0; i < ref.size(); ++i) {
    const at::Tensor& r = ref[i];
    const at::Tensor& o = other[i];
    TORCH_CHECK_TYPE(o.layout() == at::kStrided, "imbsam.", op, ": ", other_name, "[", i,
                     "] is a sparse tensor; only dense (strided) tensors are supported");
    TORCH_CHECK_VALUE(o.device() == r.device(), "imbsam.", op, ": ", other_name, "[", i, "] is on ", o.device(),
                      " but ", ref_name, "[", i, "] is on ", r.device(),
                      "; all tensors of one call must be on one device");
    TORCH_CHECK_TYPE(o.scalar_type() == r.scalar_type(), "imbsam.", op, ": ", other_name, "[", i, "] is ",
                     o.scalar_type(), " but ", ref_name, "[", i, "] is ", r.scalar_type(),
                     "; each must have its parameter's dtype");
    TORCH_CHECK_VALUE(o.sizes() == r.sizes(), "imbsam.", op, ": ", other_name, "[", i, "] has shape ", o.sizes(),
                      " but ", ref_name, "[", i, "] has shape ", r.sizes());
    TORCH_CHECK_VALUE(o.numel() == 0 || o.strides() == r.strides(), "imbsam.", op, ": ", other_name, "[", i,
                      "] has strides ", o.strides(), " but ", ref_name, "[", i, "] has strides ", r.strides(),
                      "; each must share its parameter's memory layout");
  }
}

// The reference list itself: one device, a supported floating dtype, dense memory.
inline void check_list(const char* op, at::TensorList ts, const char* name) {
  if (ts.empty()) return;
  const auto device = ts[0].device();
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    TORCH_CHECK_TYPE(t.layout() == at::kStrided, "imbsam.", op, ": ", name, "[", i,
                     "] is a sparse tensor; only dense (strided) tensors are supported");
    TORCH_CHECK_VALUE(t.device() == device, "imbsam.", op, ": ", name, "[", i, "] is on ", t.device(), " but ", name,
                      "[0] is on ", device, "; all tensors of one call must be on one device");
    TORCH_CHECK_TYPE(is_supported_dtype(t.scalar_type()), "imbsam.", op, ": ", name, "[", i, "] has dtype ",
                     t.scalar_type(), "; supported dtypes are float32, float64, bfloat16 and float16");
    TORCH_CHECK_VALUE(t.numel() == 0 || t.is_non_overlapping_and_dense(), "imbsam.", op, ": ", name, "[", i,
                      "] is not dense in memory (a view with gaps or overlaps); pass dense tensors");
  }
}

inline void check_scalar_on(const char* op, const at::Tensor& s, const char* name, at::TensorList ref) {
  TORCH_CHECK_VALUE(s.numel() == 1, "imbsam.", op, ": ", name, " must hold one value, got shape ", s.sizes());
  if (!ref.empty()) {
    TORCH_CHECK_VALUE(s.device() == ref[0].device(), "imbsam.", op, ": ", name, " is on ", s.device(),
                      " but the tensors are on ", ref[0].device());
  }
}

// Everything restore_sgd_step_ requires of its lists and options, on any device.
inline void check_sgd_step(at::TensorList params, at::TensorList grads, at::TensorList backups,
                           at::TensorList head_grads, at::TensorList momentum_buffers, double momentum,
                           double dampening, bool nesterov, const std::optional<at::Tensor>& lr_tensor,
                           const std::optional<at::Tensor>& found_inf) {
  const char* op = "restore_sgd_step_";
  check_list(op, params, "params");
  check_matches(op, params, "params", grads, "grads");
  check_matches(op, params, "params", backups, "backups");
  if (!head_grads.empty()) check_matches(op, params, "params", head_grads, "head_grads");
  if (momentum != 0.0) check_matches(op, params, "params", momentum_buffers, "momentum_buffers");
  TORCH_CHECK_VALUE(momentum != 0.0 || momentum_buffers.empty(), "imbsam.", op,
                    ": momentum is 0 but momentum_buffers were given; pass an empty list");
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0 && dampening == 0), "imbsam.", op,
                    ": nesterov needs momentum > 0 and dampening == 0");
  if (lr_tensor) check_scalar_on(op, *lr_tensor, "lr_tensor", params);
  if (found_inf) check_scalar_on(op, *found_inf, "found_inf", params);
}

// The step counts of restore_adam_step_: one 0-d float32/float64 tensor per parameter, all
// on the parameters' device or all on the CPU (where torch.optim.Adam keeps them unless
// capturable or fused). Steps on the CPU for device parameters cannot be left unchanged
// by a flag on the device without a host sync: found_inf must be absent then.
inline void check_adam_steps(const char* op, at::TensorList params, at::TensorList steps,
                             const std::optional<at::Tensor>& found_inf) {
  check_same_length(op, params, "params", steps, "state_steps");
  if (params.empty()) return;
  const auto device = steps[0].device();
  TORCH_CHECK_VALUE(device == params[0].device() || device.is_cpu(), "imbsam.", op, ": state_steps[0] is on ", device,
                    " but the parameters are on ", params[0].device(),
                    "; the step counts must be on the parameters' device or on the CPU");
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK_VALUE(s.device() == device, "imbsam.", op, ": state_steps[", i, "] is on ", s.device(),
                      " but state_steps[0] is on ", device, "; all step counts of one call must be on one device");
    TORCH_CHECK_TYPE(s.layout() == at::kStrided && s.numel() == 1 &&
                         (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                     "imbsam.", op, ": state_steps[", i, "] must be one float32 or float64 value, got a ",
                     s.scalar_type(), " tensor of shape ", s.sizes());
  }
  TORCH_CHECK_VALUE(!found_inf || device == params[0].device(), "imbsam.", op,
                    ": found_inf was given but the step counts are on the CPU and the parameters on ",
                    params[0].device(),
                    "; a skip decided on the device cannot leave a CPU step count unchanged without a host sync: "
                    "keep the steps on the device (Adam's capturable=True or fused=True) or skip on the host");
}

// Everything restore_adam_step_ requires of its lists and options, on any device.
inline void check_adam_step(at::TensorList params, at::TensorList grads, at::TensorList backups,
                            at::TensorList head_grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::TensorList max_exp_avg_sqs, at::TensorList state_steps, bool amsgrad,
                            const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& found_inf) {
  const char* op = "restore_adam_step_";
  check_list(op, params, "params");
  check_matches(op, params, "params", grads, "grads");
  check_matches(op, params, "params", backups, "backups");
  if (!head_grads.empty()) check_matches(op, params, "params", head_grads, "head_grads");
  check_matches(op, params, "params", exp_avgs, "exp_avgs");
  check_matches(op, params, "params", exp_avg_sqs, "exp_avg_sqs");
  if (amsgrad) check_matches(op, params, "params", max_exp_avg_sqs, "max_exp_avg_sqs");
  TORCH_CHECK_VALUE(amsgrad || max_exp_avg_sqs.empty(), "imbsam.", op,
                    ": amsgrad is off but max_exp_avg_sqs were given; pass an empty list");
  if (lr_tensor) check_scalar_on(op, *lr_tensor, "lr_tensor", params);
  if (found_inf) check_scalar_on(op, *found_inf, "found_inf", params);
  check_adam_steps(op, params, state_steps, found_inf);
}

}  // namespace imbsam
