// Argument checks of the norm ops (fastlm::norm_fwd_* / norm_bwd_*) that do not depend on the device, shared by
// csrc/cuda/norms.cu and csrc/cpu/norms.cpp: each backend checks the device of a tensor first, then calls these
// (same contract, same messages on both backends). Plain host C++ on the LibTorch stable ABI (nvcc compiles it too).
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>

namespace fastlm::norm_checks {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

constexpr int64_t kMaxN = 65536;  // widest normalised row of the fused kernels (both backends)

inline const char* dtype_name(ScalarType t) {
  return t == ScalarType::Float      ? "float32"
         : t == ScalarType::Half     ? "float16"
         : t == ScalarType::BFloat16 ? "bfloat16"
         : t == ScalarType::Double   ? "float64"
         : t == ScalarType::Long     ? "int64"
         : t == ScalarType::Int      ? "int32"
         : t == ScalarType::Bool     ? "bool"
                                     : "an unsupported dtype";
}

// x: (M, N) float32 / float16 / bfloat16, 1 <= N <= kMaxN, unit column stride (any row stride).
inline void check_x(const Tensor& x, const char* name) {
  STD_TORCH_CHECK(x.dim() == 2, "fastlm: ", name, " must be 2-D (M, N), got ", x.dim(), " dimensions");
  const ScalarType dt = x.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::Half || dt == ScalarType::BFloat16, "fastlm: ",
                  name, " must be float32, float16 or bfloat16, got ", dtype_name(dt));
  STD_TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= kMaxN, "fastlm: the normalised size N = ", x.size(1),
                  " must be in [1, ", kMaxN, "]");
  STD_TORCH_CHECK(x.size(1) == 1 || x.stride(1) == 1, "fastlm: ", name,
                  " must have unit stride along the last dimension, got stride ", x.stride(1));
}

// (M, N) matrix of x's dtype with unit column stride (any row stride: rows are only read).
inline void check_matrix(const Tensor& t, const char* name, const Tensor& x) {
  STD_TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), "fastlm: ", name,
                  " must have the shape of x (", x.size(0), ", ", x.size(1), ")");
  STD_TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastlm: ", name, " must have x's dtype (",
                  dtype_name(x.scalar_type()), "), got ", dtype_name(t.scalar_type()));
  STD_TORCH_CHECK(t.size(1) == 1 || t.stride(1) == 1, "fastlm: ", name,
                  " must have unit stride along the last dimension, got stride ", t.stride(1));
}

// (N,) vector of x's dtype or float32, unit stride.
inline void check_param(const Tensor& t, const char* name, const Tensor& x) {
  const int64_t N = x.size(1);
  STD_TORCH_CHECK(t.dim() == 1 && t.size(0) == N, "fastlm: ", name, " must be 1-D of size N = ", N);
  STD_TORCH_CHECK(N == 1 || t.stride(0) == 1, "fastlm: ", name, " must be contiguous");
  STD_TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == ScalarType::Float, "fastlm: ", name,
                  " must have x's dtype (", dtype_name(x.scalar_type()), ") or float32, got ",
                  dtype_name(t.scalar_type()));
}

// (M,) float32 statistics, unit stride.
inline void check_stat(const Tensor& t, const char* name, int64_t M) {
  STD_TORCH_CHECK(t.dim() == 1 && t.size(0) == M, "fastlm: ", name, " must be 1-D of size M = ", M);
  STD_TORCH_CHECK(t.scalar_type() == ScalarType::Float, "fastlm: ", name, " must be float32, got ",
                  dtype_name(t.scalar_type()));
  STD_TORCH_CHECK(M <= 1 || t.stride(0) == 1, "fastlm: ", name, " must be contiguous");
}

// Calls f(T{}, W{}) for the five supported (element, weight) type pairs, with the backend's 16-bit types Half and
// BF16 (CUDA's __half / __nv_bfloat16, the CPU kernels' half / bf16).
template <typename Half, typename BF16, typename F>
void dispatch_types(ScalarType xt, ScalarType wt, F&& f) {
  const bool wf = wt == ScalarType::Float;
  switch (xt) {
    case ScalarType::Float: f(float{}, float{}); return;
    case ScalarType::Half: wf ? f(Half{}, float{}) : f(Half{}, Half{}); return;
    case ScalarType::BFloat16: wf ? f(BF16{}, float{}) : f(BF16{}, BF16{}); return;
    default: STD_TORCH_CHECK(false, "fastlm: unsupported dtype ", dtype_name(xt));
  }
}

}  // namespace fastlm::norm_checks
