// Decode-sized linear layers on the CPU: y = x W^T (+ b) for the few rows of x that one decoding step feeds a
// layer (batch x 1 token), registered as the CPU implementation of fastlm::linear_rows_cpu (schema in csrc/ops.cpp;
// contract and routing in fastlm/ops/linear_rows.py). Inference only: no backward.
//
// Why: with a few rows the layer is a pass over the weight (N x K elements, each used M times), so its speed is
// the memory bandwidth the pass reaches. torch's F.linear sends x (M, K) @ W^T to MKL's sgemm with a transposed
// right-hand side, which for 2 <= M <= 16 ran at 6-7 GB/s on the 2-core EPYC dev machine (a (4, 512) x 32000-row LM
// head: 10-12 ms; the copy ceiling is 42 GB/s), and torch.mv at M = 1 at 11 GB/s: the LM head alone was 46 % of a
// greedy decode. This kernel streams W once, row by row.
//
// Work layout: items are blocks of kRowsPerItem output features (rows of W), run in parallel on torch's intra-op
// threads. An item reads its W rows once (kRowsPerItem rows stay in L1 across the M rows of x) and writes its
// (M, kRowsPerItem) block of y. x is converted to fp32 once per call (M x K floats, shared read-only by every
// thread). Every output element is one fp32 dot product over K in a fixed order (the SIMD lanes' partial sums, then
// their sum), computed by one thread: results do not depend on the thread count.
//
// Bytes: N K sizeof(T) (W) + M K sizeof(T) (x) + M N sizeof(T) (y) + N sizeof(T) (bias); FLOPs 2 M N K.
#pragma GCC optimize("no-trapping-math")

#include "checks.h"
#include "cpu/common.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace fastlm::cpu {
namespace {

constexpr int64_t kRowsPerItem = 4;  // W rows per inner block: x is read once per block of 4 dot products

template <typename T>
struct Args {
  const float* x;  // (M, K) fp32 copy of x, contiguous
  const T* w;      // (N, K), row stride sw
  const T* b;      // (N,) or nullptr
  T* y;            // (M, N) contiguous
  int64_t M, K, N, sw;
};

template <typename T>
FASTLM_CPU_CLONES void rows_items(const Args<T>& a, int64_t begin, int64_t end) {
  const int64_t n_end = std::min(end * kRowsPerItem, a.N);
  for (int64_t n = begin * kRowsPerItem; n < n_end; n += kRowsPerItem) {
    if (n + kRowsPerItem <= a.N) {
      const T* __restrict__ w0 = a.w + n * a.sw;
      const T* __restrict__ w1 = w0 + a.sw;
      const T* __restrict__ w2 = w1 + a.sw;
      const T* __restrict__ w3 = w2 + a.sw;
      for (int64_t m = 0; m < a.M; ++m) {
        const float* __restrict__ xr = a.x + m * a.K;
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t k = 0; k < a.K; ++k) {
          const float v = xr[k];
          s0 += v * to_float(w0[k]);
          s1 += v * to_float(w1[k]);
          s2 += v * to_float(w2[k]);
          s3 += v * to_float(w3[k]);
        }
        T* yr = a.y + m * a.N + n;
        if (a.b != nullptr) {
          s0 += to_float(a.b[n]);
          s1 += to_float(a.b[n + 1]);
          s2 += to_float(a.b[n + 2]);
          s3 += to_float(a.b[n + 3]);
        }
        yr[0] = from_float<T>(s0);
        yr[1] = from_float<T>(s1);
        yr[2] = from_float<T>(s2);
        yr[3] = from_float<T>(s3);
      }
    } else {  // the last, partial block: one W row at a time
      for (int64_t j = n; j < a.N; ++j) {
        const T* __restrict__ wr = a.w + j * a.sw;
        for (int64_t m = 0; m < a.M; ++m) {
          const float* __restrict__ xr = a.x + m * a.K;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t k = 0; k < a.K; ++k) s += xr[k] * to_float(wr[k]);
          if (a.b != nullptr) s += to_float(a.b[j]);
          a.y[m * a.N + j] = from_float<T>(s);
        }
      }
    }
  }
}

template <typename T>
FASTLM_CPU_CLONES void widen_rows(const T* x, int64_t sx, int64_t M, int64_t K, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const T* __restrict__ xr = x + m * sx;
    float* __restrict__ o = out + m * K;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) o[k] = to_float(xr[k]);
  }
}

void check_rows_matrix(const Tensor& t, const char* name, const char* shape) {
  check_cpu_float(t, name);
  STD_TORCH_CHECK(t.dim() == 2, "fastlm: ", name, " must be 2-D ", shape, ", got ", t.dim(), " dimensions");
  STD_TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "fastlm: ", name,
                  " must have unit stride along its last dimension, got stride ", t.stride(1));
}

Tensor linear_rows_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  check_rows_matrix(x, "x", "(M, K)");
  check_rows_matrix(weight, "weight", "(N, K)");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  STD_TORCH_CHECK(weight.size(1) == K, "fastlm: weight must be (N, K) with K = x.size(1) = ", K, ", got (", N, ", ",
                  weight.size(1), ")");
  STD_TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "fastlm: weight must have x's dtype (",
                  dtype_name(x.scalar_type()), "), got ", dtype_name(weight.scalar_type()));
  if (bias) {
    check_cpu(*bias, "bias");
    STD_TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && (N <= 1 || bias->stride(0) == 1),
                    "fastlm: bias must be a contiguous (N,) tensor with N = weight.size(0) = ", N);
    STD_TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "fastlm: bias must have x's dtype (",
                    dtype_name(x.scalar_type()), "), got ", dtype_name(bias->scalar_type()));
  }
  Tensor y = torch::stable::new_empty(x, {M, N});
  poison(y);
  if (M == 0 || N == 0) return y;  // K = 0: every dot product is empty, y is the bias (or 0)
  dispatch_float<half, bf16>(x.scalar_type(), [&](auto t_tag) {
    using T = decltype(t_tag);
    Scratch xf(M * K);
    widen_rows<T>(static_cast<const T*>(x.data_ptr()), M > 1 ? x.stride(0) : K, M, K, xf.get());
    Args<T> a{xf.get(),
              static_cast<const T*>(weight.data_ptr()),
              bias ? static_cast<const T*>(bias->data_ptr()) : nullptr,
              static_cast<T*>(y.data_ptr()),
              M,
              K,
              N,
              N > 1 ? weight.stride(0) : K};
    const int64_t items = (N + kRowsPerItem - 1) / kRowsPerItem;
    // an item reads kRowsPerItem W rows: chunks of >= ~64 KiB of W
    const int64_t grain = grain_for(kRowsPerItem * K * static_cast<int64_t>(sizeof(T)));
    parallel_rows(items, grain, [&](int64_t begin, int64_t end) { rows_items<T>(a, begin, end); });
  });
  return y;
}

}  // namespace
}  // namespace fastlm::cpu

STABLE_TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("linear_rows_cpu", TORCH_BOX(&fastlm::cpu::linear_rows_cpu)); }
