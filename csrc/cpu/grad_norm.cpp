// The CPU global gradient norm (schema in csrc/ops.cpp, spec in imbsam/backends/reference.py):
// one pass over every gradient, parallel over chunks, summed in fp64.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "multi_tensor_cpu.h"
#include "sum_squares.h"

namespace imbsam::cpu {
namespace {

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
  bool any_double = false;
  for (const auto& t : all) any_double |= t.scalar_type() == at::kDouble;
  for_each_chunk(chunks, [&](int64_t slot, const Chunk& c) {
    const at::Tensor& g = all[c.tensor];
    dispatch_float(g.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using M = math_t<T>;
      double sum = 0.0;
      if (c.tensor < n_plain) {
        T* p[1] = {ptr<T>(g) + c.begin};
        in_math_precision<1, 0>(p, c.end - c.begin, [&](M* const* x, int64_t n) {
          sum += sum_squares(x[0], static_cast<const M*>(nullptr), M(0), n);
        });
      } else {
        T* p[2] = {ptr<T>(g) + c.begin, ptr<T>(adaptive_params[c.tensor - n_plain]) + c.begin};
        in_math_precision<2, 0>(p, c.end - c.begin, [&](M* const* x, int64_t n) {
          sum += sum_squares(x[0], x[1], static_cast<M>(eta_a), n);
        });
      }
      partial[slot] = sum;
    });
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return at::scalar_tensor(std::sqrt(total), at::TensorOptions().dtype(any_double ? at::kDouble : at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(imbsam, CPU, m) { m.impl("grad_norm", &grad_norm_cpu); }

}  // namespace imbsam::cpu
