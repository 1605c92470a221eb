// Decode-sized linear layers on the CPU: y = x W^T (+ b) for the few rows of x that one decoding step feeds a
// layer (batch x 1 token), registered as the CPU implementation of fastlm::linear_rows_cpu (schema in csrc/ops.cpp;
// contract and routing in fastlm/ops/linear_rows.py). Inference only: no backward.
//
// Why: with a few rows the layer is a pass over the weight (N x K elements, each used M times), so its speed is
// the memory bandwidth the pass reaches. torch's F.linear sends x (M, K) @ W^T to MKL's sgemm with a transposed
// right-hand side, which for 2 <= M <= 16 ran at 6-7 GB/s on the 2-core EPYC dev machine (a (4, 512) x 32000-row LM
// head: 10-12 ms; the copy ceiling is 42 GB/s), and torch.mv at M = 1 at 11 GB/s: the LM head alone was 46 % of a
// greedy decode. This kernel streams W once, row by row. fastlm/ops/linear_rows.py routes fp32 calls only: for bf16
// / fp16 oneDNN's 16-bit GEMM measured level with or faster than this kernel from 2 rows on.
//
// Work layout: items are blocks of kRowsPerItem output features (rows of W), run in parallel on torch's intra-op
// threads. An item streams its W rows once per pair of x rows (for K <= ~2048 fp32 they stay in L1/L2 across the
// pairs) and writes its (M, kRowsPerItem) block of y. x is converted to fp32 once per call (M x K floats, shared
// read-only by every thread). Every output element is one fp32 dot product over K in a fixed order (the SIMD lanes'
// partial sums, then their sum), computed by one thread: results do not depend on the thread count.
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

// One dot product per output element, sum over k of x[m, k] * w[n, k] in fp32; `kx` rows of x (1 or 2) against 4 W
// rows per inner loop: 4 kx independent accumulators (two x rows: 8 FMA chains, each W element loaded and widened
// once for both rows).
template <typename T, int kx>
FASTLM_INLINE void block4(const Args<T>& a, int64_t n, int64_t m) {
  const T* __restrict__ w0 = a.w + n * a.sw;
  const T* __restrict__ w1 = w0 + a.sw;
  const T* __restrict__ w2 = w1 + a.sw;
  const T* __restrict__ w3 = w2 + a.sw;
  const float* __restrict__ x0 = a.x + m * a.K;
  const float* __restrict__ x1 = x0 + (kx > 1 ? a.K : 0);
  float s00 = 0.f, s01 = 0.f, s02 = 0.f, s03 = 0.f, s10 = 0.f, s11 = 0.f, s12 = 0.f, s13 = 0.f;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13)
  for (int64_t k = 0; k < a.K; ++k) {
    const float f0 = to_float(w0[k]), f1 = to_float(w1[k]), f2 = to_float(w2[k]), f3 = to_float(w3[k]);
    const float v0 = x0[k];
    s00 += v0 * f0;
    s01 += v0 * f1;
    s02 += v0 * f2;
    s03 += v0 * f3;
    if constexpr (kx > 1) {
      const float v1 = x1[k];
      s10 += v1 * f0;
      s11 += v1 * f1;
      s12 += v1 * f2;
      s13 += v1 * f3;
    }
  }
  float b0 = 0.f, b1 = 0.f, b2 = 0.f, b3 = 0.f;
  if (a.b != nullptr) {
    b0 = to_float(a.b[n]);
    b1 = to_float(a.b[n + 1]);
    b2 = to_float(a.b[n + 2]);
    b3 = to_float(a.b[n + 3]);
  }
  T* y0 = a.y + m * a.N + n;
  y0[0] = from_float<T>(s00 + b0);
  y0[1] = from_float<T>(s01 + b1);
  y0[2] = from_float<T>(s02 + b2);
  y0[3] = from_float<T>(s03 + b3);
  if constexpr (kx > 1) {
    T* y1 = y0 + a.N;
    y1[0] = from_float<T>(s10 + b0);
    y1[1] = from_float<T>(s11 + b1);
    y1[2] = from_float<T>(s12 + b2);
    y1[3] = from_float<T>(s13 + b3);
  }
}

template <typename T>
FASTLM_CPU_CLONES void rows_items(const Args<T>& a, int64_t begin, int64_t end) {
  const int64_t n_end = std::min(end * kRowsPerItem, a.N);
  for (int64_t n = begin * kRowsPerItem; n < n_end; n += kRowsPerItem) {
    if (n + kRowsPerItem <= a.N) {
      int64_t m = 0;
      for (; m + 2 <= a.M; m += 2) block4<T, 2>(a, n, m);
      if (m < a.M) block4<T, 1>(a, n, m);
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
