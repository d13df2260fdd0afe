// Launch-error checking for the CUDA kernels (included by kernels/cuda/*.cu only).
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace flowsteer {
namespace cuda {

// Throws (pybind11 turns it into a Python RuntimeError) when the last launch failed.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("flowsteer CUDA ") + kernel + ": " + cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace flowsteer
