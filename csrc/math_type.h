// The precision the ops compute in, one definition for every device: fp32 math for
// bf16/fp16/fp32 storage, fp64 math for fp64 storage. Plain C++ (no torch), so the
// CUDA device code that uses it also compiles on the host for the tests' emulator.
#pragma once

#include <type_traits>

namespace imbsam {

template <typename T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

}  // namespace imbsam
