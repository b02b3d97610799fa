// Whether this build's kernels can run on a given GPU. Built for other architectures
// (and without PTX that the driver could compile for this one), every launch would fail
// with "no kernel image is available"; the Python side asks once per device and falls
// back with one warning instead.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <string>

namespace imbsam::cuda {
namespace {

// Compiled with the same architectures as every other kernel of the library.
__global__ void probe_kernel() {}

// "" when the kernels have an image for `device`, else the runtime's reason.
std::string cuda_kernel_image_error(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, probe_kernel);
  if (err == cudaSuccess) return "";
  (void)cudaGetLastError();  // not a sticky error: clear it so the next CUDA call does not report it
  return cudaGetErrorString(err);
}

}  // namespace

// Not a tensor op, so it is not among csrc/ops.cpp's schemas: it exists only in CUDA builds.
TORCH_LIBRARY_FRAGMENT(imbsam, m) { m.def("cuda_kernel_image_error(int device) -> str", &cuda_kernel_image_error); }

}  // namespace imbsam::cuda
