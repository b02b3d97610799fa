// Host-side helpers shared by the CUDA ops: grouping a call's tensors by dtype (one
// launch sequence per storage type) and mapping a dtype to its C++ type.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

// A 0-d float32 or float64 device scalar read inside kernels, so nothing syncs.
struct DeviceScalar {
  const void* ptr = nullptr;
  bool is_double = false;
  __device__ __forceinline__ double get() const {
    return is_double ? *static_cast<const double*>(ptr) : static_cast<double>(*static_cast<const float*>(ptr));
  }
};

inline DeviceScalar device_scalar(const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                   "imbsam: device scalars must be float32 or float64, got ", t.scalar_type());
  return {t.data_ptr(), t.scalar_type() == at::kDouble};
}

}  // namespace imbsam::cuda
