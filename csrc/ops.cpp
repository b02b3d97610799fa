// The one place where every imbsam op's schema is declared. Each device registers its
// own implementation of these names in cpu/ and cuda/, one file per op family under the
// same name on both (grad_norm, updates, adam_step); cuda/probe.cu adds a CUDA-only helper that is
// not a tensor op. Python adds the fake kernels (imbsam/backends/compiled.py) so
// torch.compile and CUDA graphs can trace them.
#include <Python.h>
#include <torch/library.h>

// Importing imbsam._C runs the static registrations below; the module itself is empty
// (no pybind11), which keeps the binary small and the build fast.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(imbsam, m) {
  // sqrt(sum ||g||^2 + sum ||(|w| + eta_a) g||^2): a 0-d tensor on the device, no host sync.
  m.def("grad_norm(Tensor[] grads, Tensor[] adaptive_grads, Tensor[] adaptive_params, float eta_a) -> Tensor");
  // backups <- params; params <- params + rho * T^2 * grads / (norm + 1e-16).
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor norm, float rho, "
      "float eta_a, bool adaptive) -> ()");
  // params <- backups (bitwise exact).
  m.def("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()");
  // ImbSAM's combine: grads <- grads + head_grads.
  m.def("add_head_grads_(Tensor(a!)[] grads, Tensor[] head_grads) -> ()");
  // restore + combine + torch.optim.SGD step, one pass over memory.
  m.def(
      "restore_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, Tensor[] head_grads, "
      "Tensor(b!)[] momentum_buffers, float lr, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool first_momentum_step, Tensor? lr_tensor=None, "
      "Tensor? found_inf=None) -> ()");
  // restore + combine + torch.optim.Adam / AdamW step (state_steps += 1 unless skipped), one pass.
  m.def(
      "restore_adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, Tensor[] head_grads, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, "
      "bool amsgrad, bool maximize, Tensor? lr_tensor=None, Tensor? found_inf=None) -> ()");
}
