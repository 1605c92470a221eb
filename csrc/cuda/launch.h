// Host helpers shared by every CUDA C++ op: CUDA error checks, torch's current stream, the CUDA side of the device
// checks (checks.h's on_device), device queries, the dynamic shared-memory opt-in and the launch shapes of the
// "rows" and "strided" work layouts.
//
// Portable across the stable-ABI range (torch 2.10 and newer): the shim's error codes are checked with
// TORCH_ERROR_CODE_CHECK (torch/headeronly, present since 2.10), not STABLE_TORCH_ERROR_CODE_CHECK, which
// torch 2.11's headers lack (it came in the 2.12 cycle). Written in C++17: torch 2.11's cpp_extension compiles
// with -std=c++17, newer ones with C++20.
#pragma once

#include "checks.h"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstddef>
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

// ------------------------------------------------------------------------------------------------------------
// Tensor checks.
// ------------------------------------------------------------------------------------------------------------

// Appended by the ops whose device-mismatch message says so (norms, attention).
constexpr const char* kSameDevice = "; all tensors must be on the same device";

// The device check of an op's tensors (checks.h's on_device): a CUDA tensor on device `dev`, the device of the op's
// reference tensor `ref` ("x", "q", "input", "y"); `tail` ends the mismatch message.
struct CudaDevice {
  int32_t dev;
  const char* ref;
  const char* tail;

  void operator()(const Tensor& t, const char* name) const {
    STD_TORCH_CHECK(t.is_cuda(), "fastlm: ", name, " must be a CUDA tensor");
    STD_TORCH_CHECK(t.get_device_index() == dev, "fastlm: ", name, " is on cuda:", t.get_device_index(), " but ", ref,
                    " is on cuda:", dev, tail);
  }
};

// A CUDA tensor of float32 / float16 / bfloat16.
inline void check_cuda_float(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.is_cuda(), "fastlm: ", name, " must be a CUDA tensor");
  check_float_dtype(t, name);
}

// ------------------------------------------------------------------------------------------------------------
// Device queries.
// ------------------------------------------------------------------------------------------------------------
inline int device_attribute(cudaDeviceAttr attr, int dev) {
  int v = 0;
  check_cuda(cudaDeviceGetAttribute(&v, attr, dev), "cudaDeviceGetAttribute");
  return v;
}

inline int sm_count(int dev) { return device_attribute(cudaDevAttrMultiProcessorCount, dev); }

// Most shared memory a block may have with the opt-in, bytes.
inline int smem_optin(int dev) { return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, dev); }

// ------------------------------------------------------------------------------------------------------------
// Dynamic shared memory and launch shapes.
// ------------------------------------------------------------------------------------------------------------

// Shared memory a kernel keeps free of its dynamic allocation: its static smem (<= 2 KiB here) plus the 1 KiB that
// sm_90 counts as reserved per block, with room to spare.
constexpr size_t kSmemMargin = 4096;

// Above 48 KiB of shared memory per block (static included) a kernel must opt in: done here for `bytes` of dynamic
// smem above 40 KiB. The limit set is `limit`, or `bytes` when 0. A caller whose launches of one kernel ask for
// different sizes passes one fixed limit (the most any of them asks for), so that concurrent host threads cannot
// undo each other's setting between the set and the launch.
template <typename K>
void allow_dynamic_smem(K* kernel, size_t bytes, int limit = 0) {
  if (bytes > 40 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    limit > 0 ? limit : static_cast<int>(bytes)),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
}

inline int round_up(int v, int m) { return (v + m - 1) / m * m; }

inline int pow2_ceil(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p <<= 1;
  return p;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Offsets `stride * k` (elements of `elem` bytes) keep 16-byte alignment, or the dim has a single index.
inline bool stride_aligned(int64_t size, int64_t stride, size_t elem) {
  return size <= 1 || (stride * static_cast<int64_t>(elem)) % 16 == 0;
}

// Every row of a (rows, N) tensor at p with row stride `stride` can be read in 16-byte chunks.
inline bool rows_aligned(const void* p, int64_t rows, int64_t stride, size_t elem) {
  return aligned16(p) && stride_aligned(rows, stride, elem);
}

// The "rows" layout: a row group of tpr threads (a multiple of 32 in [32, 1024], about `per_thread` 16-byte chunks
// each) per row, rpb row groups per block (enough to reach 256 threads for narrow rows).
inline void row_shape(int nchunks, int per_thread, int& tpr, int& rpb) {
  tpr = std::min(1024, std::max(32, round_up((nchunks + per_thread - 1) / per_thread, 32)));
  rpb = std::max(1, 256 / tpr);
}

// A rows-layout launch over `rows` rows: blocks of (tpr, rpb) threads. row_bytes: the dynamic smem one row group
// would like (a row cache, 0 for none); cache says whether rpb of them fit the device's opt-in limit (smem_optin)
// with kSmemMargin to spare, smem the bytes to launch with.
struct RowsLaunch {
  unsigned blocks;
  dim3 block;
  size_t smem;
  bool cache;
};

inline RowsLaunch rows_launch(int64_t rows, int nchunks, int per_thread, size_t row_bytes, int smem_optin) {
  int tpr, rpb;
  row_shape(nchunks, per_thread, tpr, rpb);
  const size_t cache_bytes = static_cast<size_t>(rpb) * row_bytes;
  const bool cache = row_bytes > 0 && cache_bytes + kSmemMargin <= static_cast<size_t>(smem_optin);
  const int64_t blocks = (rows + rpb - 1) / rpb;
  STD_TORCH_CHECK(blocks <= INT_MAX, "fastlm: too many rows (", rows, ")");
  return {static_cast<unsigned>(blocks), dim3(tpr, rpb), cache ? cache_bytes : 0, cache};
}

// The "strided" layout (a reduction along a dim of R elements with inner size > 1): blocks of (bx, by) threads, bx
// lanes over the inner index, by threads over the reduced dim, bx * by <= threads.
inline void strided_shape(int64_t inner, int64_t R, int threads, int& bx, int& by) {
  bx = std::min(32, pow2_ceil(inner));
  by = std::max(1, std::min(threads / bx, pow2_ceil(R)));
}

}  // namespace fastlm
