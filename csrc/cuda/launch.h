// Host helpers shared by every CUDA C++ op: CUDA error checks and torch's current stream.
//
// Portable across the stable-ABI range (torch 2.10 and newer): the shim's error codes are checked with
// TORCH_ERROR_CODE_CHECK (torch/headeronly, present since 2.10), not STABLE_TORCH_ERROR_CODE_CHECK, which
// torch 2.11's headers lack (it came in the 2.12 cycle). Written in C++17: torch 2.11's cpp_extension compiles
// with -std=c++17, newer ones with C++20.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cuda_runtime.h>

#include <cstdint>

namespace fastlm {

inline void check_cuda(cudaError_t e, const char* what) {
  STD_TORCH_CHECK(e == cudaSuccess, "fastlm: ", what, " failed: ", cudaGetErrorString(e));
}

// torch's current CUDA stream on device `dev` (the aoti shim: available to a torch 2.10 target; needs -DUSE_CUDA).
inline cudaStream_t current_stream(int32_t dev) {
  void* s = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(dev, &s));
  return static_cast<cudaStream_t>(s);
}

}  // namespace fastlm
