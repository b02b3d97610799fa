// The storage dtypes the ops support, and a switch from a dtype to its C++ type.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "math_type.h"  // math_t: the precision each storage type computes in

namespace imbsam {

// Calls f(T{}) with the storage type of `dtype`; checks.h has rejected the others.
template <typename F>
void dispatch_float(c10::ScalarType dtype, const F& f) {
  switch (dtype) {
    case c10::kFloat: f(float{}); break;
    case c10::kDouble: f(double{}); break;
    case c10::kBFloat16: f(c10::BFloat16{}); break;
    case c10::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "imbsam: unsupported dtype ", dtype);
  }
}

}  // namespace imbsam
