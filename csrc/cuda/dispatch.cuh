// Host-side helpers shared by the CUDA ops: grouping a call's tensors by dtype (one
// launch sequence per storage type), picking those groups' lists, and the fused steps'
// device scalars.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <optional>
#include <vector>

#include "../dtypes.h"

namespace imbsam::cuda {

// Indices of `ts` per dtype, in the order the dtypes first appear.
inline std::vector<std::pair<at::ScalarType, std::vector<size_t>>> group_by_dtype(at::TensorList ts) {
  std::vector<std::pair<at::ScalarType, std::vector<size_t>>> groups;
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto dt = ts[i].scalar_type();
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == dt; });
    if (it == groups.end()) groups.push_back({dt, {i}});
    else it->second.push_back(i);
  }
  return groups;
}

// The lists picked at `idx`, in the shape multi_tensor_apply takes.
inline std::vector<std::vector<at::Tensor>> pick(std::initializer_list<at::TensorList> lists,
                                                 const std::vector<size_t>& idx) {
  std::vector<std::vector<at::Tensor>> out;
  for (const auto& l : lists) {
    std::vector<at::Tensor> v;
    v.reserve(idx.size());
    for (size_t i : idx) v.push_back(l[i]);
    out.push_back(std::move(v));
  }
  return out;
}

// A fused step's optional 0-d scalar (lr_tensor, found_inf) as the kernels read it: a
// float32 copy on the device (other dtypes converted there), or none (a null pointer).
struct Float32Scalar {
  at::Tensor value;
  explicit Float32Scalar(const std::optional<at::Tensor>& t) : value(t ? t->to(at::kFloat) : at::Tensor()) {}
  const float* ptr() const { return value.defined() ? value.data_ptr<float>() : nullptr; }
};

}  // namespace imbsam::cuda
