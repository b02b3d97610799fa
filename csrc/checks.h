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

}  // namespace imbsam
