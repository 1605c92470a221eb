// LayerNorm / RMSNorm with an optional fused residual add: forward and backward CPU kernels, registered as the
// CPU implementations of fastlm::norm_fwd_cpu and fastlm::norm_bwd_cpu (schemas and contract in csrc/ops.cpp;
// the CUDA twin is csrc/cuda/norms.cu).
//
// Templates: element type T (float, half, bf16) x weight type W (T or float): 5 combinations per kernel.
// Everything else (rms, residual, weight, bias, dh) is a runtime flag, tested once per row outside the loops.
//
// Work layout: rows are independent; torch's thread pool runs a cloned worker (FASTLM_CPU_CLONES) on a range of
// rows. A row is at most 65536 elements, so the worker keeps it (and the weight/bias as fp32) in a per-range
// scratch buffer that stays in L1/L2 between the passes over the row: each element is read from memory once.
// All math is fp32; the inner loops are plain fp32 loops over the row (`#pragma omp simd` for the sums).
#include "cpu/common.h"
#include "norm_checks.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <tuple>
#include <type_traits>

namespace fastlm::cpu {
namespace {

// Lambdas are not cloned: the ones in the hot loops must be inlined into the (cloned) caller.
#define FASTLM_INLINE_LAMBDA __attribute__((always_inline))

// The weight / bias as fp32: the caller's pointer when W is float, else converted into buf (once per range).
template <typename W>
FASTLM_INLINE const float* as_f32(const W* p, float* buf, int64_t N) {
  if (p == nullptr) return nullptr;
  if constexpr (std::is_same_v<W, float>) {
    return p;
  } else {
    for (int64_t j = 0; j < N; ++j) buf[j] = to_float(p[j]);
    return buf;
  }
}

// sum over j in [0, N) of f(j). A single running sum (what `#pragma omp simd reduction` gives) makes the loop
// latency-bound on the vector add chain; kAcc independent partial sums (4 zmm or 8 ymm registers) keep it
// throughput-bound, which matters for the passes that re-read a row from L1. The partials are combined by a fixed
// tree, so the result does not depend on the clone's vector width (only on FMA contraction).
constexpr int kAcc = 64;

template <typename F>
FASTLM_INLINE float row_sum(int64_t N, const F& f) {
  float acc[kAcc];
  for (int k = 0; k < kAcc; ++k) acc[k] = 0.f;
  int64_t j = 0;
  for (; j + kAcc <= N; j += kAcc) {
#pragma omp simd
    for (int k = 0; k < kAcc; ++k) acc[k] += f(j + k);
  }
  for (int k = 0; j < N; ++j, ++k) acc[k] += f(j);
  for (int width = kAcc / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) acc[k] += acc[k + width];
  }
  return acc[0];
}

// Two sums at once: f(j, a, b) adds its terms to a and b.
template <typename F>
FASTLM_INLINE void row_sum2(int64_t N, const F& f, float& out_a, float& out_b) {
  float a[kAcc], b[kAcc];
  for (int k = 0; k < kAcc; ++k) a[k] = b[k] = 0.f;
  int64_t j = 0;
  for (; j + kAcc <= N; j += kAcc) {
#pragma omp simd
    for (int k = 0; k < kAcc; ++k) f(j + k, a[k], b[k]);
  }
  for (int k = 0; j < N; ++j, ++k) f(j, a[k], b[k]);
  for (int width = kAcc / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) {
      a[k] += a[k + width];
      b[k] += b[k + width];
    }
  }
  out_a = a[0];
  out_b = b[0];
}

// ------------------------------------------------------------------------------------------------------------
// Forward.
//   h = x (+ residual, rounded to T);  LN: mean = sum(h)/N, var = sum((h - mean)^2)/N (two passes over the
//   cached row: no E[h^2] - mean^2 cancellation);  RMS: var = sum(h^2)/N;  rstd = 1/sqrt(var + eps);
//   y = (h - mean) * rstd * w + b.
// Memory traffic per row: reads N*sizeof(T) (x) [+ N*sizeof(T) residual], writes N*sizeof(T) (y)
// [+ N*sizeof(T) h] + 8 bytes of statistics; the second and third passes read the fp32 row from L1/L2
// (for fp32 input: x itself, or the h just written).
// ------------------------------------------------------------------------------------------------------------
template <typename T, typename W>
struct FwdArgs {
  const T* x;
  const T* res;  // nullptr: no residual
  const W* w;    // nullptr: no weight
  const W* b;    // nullptr: no bias
  T* y;          // (M, N) contiguous
  T* h;          // (M, N) contiguous, nullptr iff res == nullptr
  float* mean;   // (M,), nullptr for rms
  float* rstd;   // (M,)
  int64_t N;
  int64_t sx;  // row strides in elements
  int64_t sr;
  float eps;
  bool rms;
};

template <typename T, typename W>
FASTLM_CPU_CLONES void norm_fwd_rows(const FwdArgs<T, W>& a, int64_t begin, int64_t end) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  const int64_t N = a.N;
  const float inv_n = 1.0f / static_cast<float>(N);
  // Layout: [row cache (16-bit T only) | weight | bias], each padded to 16 floats (64 bytes).
  const int64_t np = (N + 15) / 16 * 16;
  Scratch scratch(3 * np);
  float* const cache = scratch.get();
  const float* const w = as_f32(a.w, cache + np, N);
  const float* const b = as_f32(a.b, cache + 2 * np, N);

  for (int64_t r = begin; r < end; ++r) {
    const T* __restrict__ xr = a.x + r * a.sx;
    T* __restrict__ yr = a.y + r * N;
    // Pass 1: h (stored when there is a residual) and its fp32 copy `hv` (for fp32 input: x itself, or the h
    // just written); then sum(h) (LN) or sum(h^2) (RMS) over the L1-resident row. Two simple loops rather than
    // one: GCC does not vectorise the fused load/convert/store/reduce loop for 16-bit T.
    const float* hv;
    if (a.res) {
      const T* __restrict__ rr = a.res + r * a.sr;
      T* __restrict__ hr = a.h + r * N;
      if constexpr (kF32) {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) hr[j] = xr[j] + rr[j];
        hv = reinterpret_cast<const float*>(hr);
      } else {
        float* __restrict__ c = cache;
        // Two loops again (store h, then widen it from L1): the vectoriser gives up on the fused form.
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) hr[j] = from_float<T>(to_float(xr[j]) + to_float(rr[j]));
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) c[j] = to_float(hr[j]);
        hv = c;
      }
    } else if constexpr (kF32) {
      hv = reinterpret_cast<const float*>(xr);
    } else {
      float* __restrict__ c = cache;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) c[j] = to_float(xr[j]);
      hv = c;
    }
    float mean = 0.f;
    float var;
    if (a.rms) {
      var = row_sum(N, [&](int64_t j) FASTLM_INLINE_LAMBDA { return hv[j] * hv[j]; }) * inv_n;
    } else {
      // Both moments in one pass over the row shifted by its first element K ("shifted data" variance):
      // var = E[d^2] - E[d]^2 with d = h - K. Its rounding error is about eps * (var + E[d]^2) / var, small while K
      // lies within a few standard deviations of the mean, as a sample of the row does. When it does not (an
      // outlier first element: E[d]^2 > 16 var), the centred second pass runs instead (no E[h^2] - mean^2
      // cancellation either way; test_large_offset_is_stable and the outlier test check both branches).
      const float K = hv[0];
      float s1, s2;
      row_sum2(
          N,
          [&](int64_t j, float& acc1, float& acc2) FASTLM_INLINE_LAMBDA {
            const float d = hv[j] - K;
            acc1 += d;
            acc2 += d * d;
          },
          s1, s2);
      const float dm = s1 * inv_n;
      mean = K + dm;
      var = s2 * inv_n - dm * dm;
      if (!(dm * dm <= 16.f * var)) {  // also a zero or negative (rounded) variance
        const float q = row_sum(N, [&](int64_t j) FASTLM_INLINE_LAMBDA {
          const float d = hv[j] - mean;
          return d * d;
        });
        var = q * inv_n;
      }
    }
    const float rstd = 1.0f / std::sqrt(var + a.eps);
    if (a.mean) a.mean[r] = mean;
    a.rstd[r] = rstd;

    // Pass 3: y. RMS has mean == 0, so one loop serves both (h - 0 is exact).
    if (w && b) {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) yr[j] = from_float<T>((hv[j] - mean) * rstd * w[j] + b[j]);
    } else if (w) {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) yr[j] = from_float<T>((hv[j] - mean) * rstd * w[j]);
    } else if (b) {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) yr[j] = from_float<T>((hv[j] - mean) * rstd + b[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) yr[j] = from_float<T>((hv[j] - mean) * rstd);
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Backward.
//   xhat = (x - mean) * rstd (LN) or x * rstd (RMS);  g = dy * w (dy without weight);
//   dx = rstd * (g - (xhat * c1 + c2)) [+ dh],  c1 = mean(g * xhat),  c2 = mean(g) (LN only).
//   dw = sum over rows of dy * xhat, db = sum of dy.
// Determinism: the rows are cut into S blocks of R consecutive rows, with S and R functions of (M, N) only
// (never of the thread count). Block s adds its rows, in order, into row s of an (S, N) fp32 partial buffer;
// then a second parallel loop over column ranges sums the S partials in block order. So dw/db are bitwise
// reproducible, and identical for any torch.get_num_threads().
// Memory traffic per row: reads 2*N*sizeof(T) (dy, x; pass 2 re-reads them from L1/L2) [+ N*sizeof(T) dh],
// writes N*sizeof(T) (dx); per block, the partial rows (N*4 bytes each, L2-resident while the block runs).
// ------------------------------------------------------------------------------------------------------------
template <typename T, typename W>
struct BwdArgs {
  const T* dy;
  const T* x;
  const W* w;         // nullptr: no weight
  const float* mean;  // nullptr for rms
  const float* rstd;
  const T* dh;  // nullptr: no residual gradient
  T* dx;        // (M, N) contiguous
  float* pdw;   // (S, N) partials, nullptr: dw not wanted
  float* pdb;   // (S, N) partials, nullptr: db not wanted
  int64_t M;
  int64_t N;
  int64_t rows_per_block;  // R
  int64_t sdy;             // row strides in elements
  int64_t sx;
  int64_t sdh;
  bool rms;
};

// Blocks [sbegin, send) of R rows each.
template <typename T, typename W>
FASTLM_CPU_CLONES void norm_bwd_blocks(const BwdArgs<T, W>& a, int64_t sbegin, int64_t send) {
  const int64_t N = a.N;
  const float inv_n = 1.0f / static_cast<float>(N);
  const int64_t np = (N + 15) / 16 * 16;
  Scratch scratch(np);
  const float* const w = as_f32(a.w, scratch.get(), N);

  for (int64_t s = sbegin; s < send; ++s) {
    float* __restrict__ pdw = a.pdw ? a.pdw + s * N : nullptr;
    float* __restrict__ pdb = a.pdb ? a.pdb + s * N : nullptr;
    const int64_t r0 = s * a.rows_per_block;
    const int64_t r1 = std::min(a.M, r0 + a.rows_per_block);
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict__ dyr = a.dy + r * a.sdy;
      const T* __restrict__ xr = a.x + r * a.sx;
      T* __restrict__ dxr = a.dx + r * N;
      const float mu = a.mean ? a.mean[r] : 0.f;
      const float rs = a.rstd[r];

      // Pass 1: sum(g * xhat) and sum(g).
      float sgx, sg;
      if (w) {
        row_sum2(
            N,
            [&](int64_t j, float& acc_gx, float& acc_g) FASTLM_INLINE_LAMBDA {
              const float g = to_float(dyr[j]) * w[j];
              acc_gx += g * ((to_float(xr[j]) - mu) * rs);
              acc_g += g;
            },
            sgx, sg);
      } else {
        row_sum2(
            N,
            [&](int64_t j, float& acc_gx, float& acc_g) FASTLM_INLINE_LAMBDA {
              const float g = to_float(dyr[j]);
              acc_gx += g * ((to_float(xr[j]) - mu) * rs);
              acc_g += g;
            },
            sgx, sg);
      }
      const float c1 = sgx * inv_n;
      const float c2 = a.rms ? 0.f : sg * inv_n;

      // Pass 2: dx, then the partials. The first row of a block initialises its partial row (no zeroing pass).
      const T* __restrict__ dhr = a.dh ? a.dh + r * a.sdh : nullptr;
      if (w && dhr) {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) {
          const float xh = (to_float(xr[j]) - mu) * rs;
          dxr[j] = from_float<T>(rs * (to_float(dyr[j]) * w[j] - (xh * c1 + c2)) + to_float(dhr[j]));
        }
      } else if (w) {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) {
          const float xh = (to_float(xr[j]) - mu) * rs;
          dxr[j] = from_float<T>(rs * (to_float(dyr[j]) * w[j] - (xh * c1 + c2)));
        }
      } else if (dhr) {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) {
          const float xh = (to_float(xr[j]) - mu) * rs;
          dxr[j] = from_float<T>(rs * (to_float(dyr[j]) - (xh * c1 + c2)) + to_float(dhr[j]));
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) {
          const float xh = (to_float(xr[j]) - mu) * rs;
          dxr[j] = from_float<T>(rs * (to_float(dyr[j]) - (xh * c1 + c2)));
        }
      }
      const bool first = r == r0;
      if (pdw && pdb) {
        if (first) {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) {
            const float d = to_float(dyr[j]);
            pdw[j] = d * ((to_float(xr[j]) - mu) * rs);
            pdb[j] = d;
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) {
            const float d = to_float(dyr[j]);
            pdw[j] += d * ((to_float(xr[j]) - mu) * rs);
            pdb[j] += d;
          }
        }
      } else if (pdw) {
        if (first) {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) pdw[j] = to_float(dyr[j]) * ((to_float(xr[j]) - mu) * rs);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) pdw[j] += to_float(dyr[j]) * ((to_float(xr[j]) - mu) * rs);
        }
      } else if (pdb) {
        if (first) {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) pdb[j] = to_float(dyr[j]);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) pdb[j] += to_float(dyr[j]);
        }
      }
    }
  }
}

// out[col] = sum over s < S of part[s, col], in s order, for col in [c0, c1).
template <typename O>
FASTLM_CPU_CLONES void col_sum(const float* part, O* out, int64_t S, int64_t N, int64_t c0, int64_t c1) {
  constexpr int64_t kTile = 256;  // columns per tile: the running sums stay in registers / L1
  float acc[kTile];
  for (int64_t t0 = c0; t0 < c1; t0 += kTile) {
    const int64_t n = std::min(kTile, c1 - t0);
    const float* __restrict__ p0 = part + t0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) acc[j] = p0[j];
    for (int64_t s = 1; s < S; ++s) {
      const float* __restrict__ p = part + s * N + t0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) acc[j] += p[j];
    }
    O* __restrict__ o = out + t0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] = from_float<O>(acc[j]);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Host side.
// ------------------------------------------------------------------------------------------------------------
// The device is checked here; everything else by the checks shared with the CUDA kernels (csrc/norm_checks.h).
void check_cpu(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.is_cpu(), "fastlm: ", name, " must be a CPU tensor for the cpu backend");
}

void check_x(const Tensor& x, const char* name) {
  check_cpu(x, name);
  norm_checks::check_x(x, name);
}

void check_matrix(const Tensor& t, const char* name, const Tensor& x) {
  check_cpu(t, name);
  norm_checks::check_matrix(t, name, x);
}

void check_param(const Tensor& t, const char* name, const Tensor& x) {
  check_cpu(t, name);
  norm_checks::check_param(t, name, x);
}

void check_stat(const Tensor& t, const char* name, int64_t M) {
  check_cpu(t, name);
  norm_checks::check_stat(t, name, M);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_cpu(const Tensor& x, const std::optional<Tensor>& residual,
                                                        const std::optional<Tensor>& weight,
                                                        const std::optional<Tensor>& bias_in, double eps, bool rms) {
  check_x(x, "x");
  const int64_t M = x.size(0);
  const int64_t N = x.size(1);
  const ScalarType xt = x.scalar_type();
  if (residual) check_matrix(*residual, "residual", x);
  if (weight) check_param(*weight, "weight", x);
  const std::optional<Tensor> bias = rms ? std::nullopt : bias_in;  // RMSNorm has no bias: ignored
  if (bias) check_param(*bias, "bias", x);
  if (weight && bias) {
    STD_TORCH_CHECK(weight->scalar_type() == bias->scalar_type(), "fastlm: weight (",
                    dtype_name(weight->scalar_type()), ") and bias (", dtype_name(bias->scalar_type()),
                    ") must have the same dtype");
  }
  const ScalarType wt = weight ? weight->scalar_type() : bias ? bias->scalar_type() : xt;

  Tensor h = residual ? torch::stable::new_empty(x, {M, N}) : torch::stable::new_empty(x, {0});
  Tensor y = torch::stable::new_empty(x, {M, N});
  Tensor mean = torch::stable::new_empty(x, {rms ? 0 : M}, ScalarType::Float);
  Tensor rstd = torch::stable::new_empty(x, {M}, ScalarType::Float);
  if (M == 0) return {y, h, mean, rstd};

  norm_checks::dispatch_types<half, bf16>(xt, wt, [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    FwdArgs<T, W> a{};
    a.x = static_cast<const T*>(x.data_ptr());
    a.res = residual ? static_cast<const T*>(residual->data_ptr()) : nullptr;
    a.w = weight ? static_cast<const W*>(weight->data_ptr()) : nullptr;
    a.b = bias ? static_cast<const W*>(bias->data_ptr()) : nullptr;
    a.y = static_cast<T*>(y.data_ptr());
    a.h = residual ? static_cast<T*>(h.data_ptr()) : nullptr;
    a.mean = rms ? nullptr : static_cast<float*>(mean.data_ptr());
    a.rstd = static_cast<float*>(rstd.data_ptr());
    a.N = N;
    a.sx = x.stride(0);
    a.sr = residual ? residual->stride(0) : 0;
    a.eps = static_cast<float>(eps);
    a.rms = rms;
    // A chunk of rows moves >= ~64 KiB (x, residual, y, h), so that 256 rows of 4096 still feed every thread.
    const int64_t row_bytes = N * static_cast<int64_t>(sizeof(T)) * (residual ? 4 : 2);
    parallel_rows(M, grain_for(row_bytes), [&](int64_t begin, int64_t end) { norm_fwd_rows<T, W>(a, begin, end); });
  });
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_cpu(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight,
                                                const Tensor& mean, const Tensor& rstd, const std::optional<Tensor>& dh,
                                                bool rms, bool has_bias) {
  check_x(x, "x");
  const int64_t M = x.size(0);
  const int64_t N = x.size(1);
  const ScalarType xt = x.scalar_type();
  check_matrix(dy, "dy", x);
  if (dh) check_matrix(*dh, "dh", x);
  if (weight) check_param(*weight, "weight", x);
  if (!rms) check_stat(mean, "mean", M);
  check_stat(rstd, "rstd", M);
  const ScalarType wt = weight ? weight->scalar_type() : xt;
  const bool need_dw = weight.has_value();
  const bool need_db = has_bias && !rms;
  // db takes the weight's dtype; without a weight it stays float32 (the caller casts it to the bias dtype).
  const ScalarType out_t = weight ? wt : ScalarType::Float;

  Tensor dx = torch::stable::new_empty(x, {M, N});
  Tensor dw = torch::stable::new_empty(x, {need_dw ? N : 0}, out_t);  // (0,) float32 without a weight (the fake's)
  Tensor db = torch::stable::new_empty(x, {need_db ? N : 0}, out_t);
  if (M == 0) {
    torch::stable::zero_(dw);
    torch::stable::zero_(db);
    return {dx, dw, db};
  }

  // Blocks: at most kMaxBlocks (enough to balance the threads of a big machine, few enough that the partials'
  // extra traffic, S * N * 4 bytes each, stays small next to the M * N elements), and at least ~64 KiB of
  // input per block. Both bounds depend only on (M, N): the result does not depend on the thread count.
  constexpr int64_t kMaxBlocks = 32;
  const int64_t row_bytes = N * 4;
  const int64_t rows_per_block = std::max((M + kMaxBlocks - 1) / kMaxBlocks, grain_for(row_bytes, 64 * 1024));
  const int64_t S = (M + rows_per_block - 1) / rows_per_block;
  Tensor ws_dw = torch::stable::new_empty(x, {need_dw ? S : 0, need_dw ? N : 0}, ScalarType::Float);
  Tensor ws_db = torch::stable::new_empty(x, {need_db ? S : 0, need_db ? N : 0}, ScalarType::Float);

  norm_checks::dispatch_types<half, bf16>(xt, wt, [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    BwdArgs<T, W> a{};
    a.dy = static_cast<const T*>(dy.data_ptr());
    a.x = static_cast<const T*>(x.data_ptr());
    a.w = weight ? static_cast<const W*>(weight->data_ptr()) : nullptr;
    a.mean = rms ? nullptr : static_cast<const float*>(mean.data_ptr());
    a.rstd = static_cast<const float*>(rstd.data_ptr());
    a.dh = dh ? static_cast<const T*>(dh->data_ptr()) : nullptr;
    a.dx = static_cast<T*>(dx.data_ptr());
    a.pdw = need_dw ? static_cast<float*>(ws_dw.data_ptr()) : nullptr;
    a.pdb = need_db ? static_cast<float*>(ws_db.data_ptr()) : nullptr;
    a.M = M;
    a.N = N;
    a.rows_per_block = rows_per_block;
    a.sdy = dy.stride(0);
    a.sx = x.stride(0);
    a.sdh = dh ? dh->stride(0) : 0;
    a.rms = rms;
    parallel_rows(S, 1, [&](int64_t begin, int64_t end) { norm_bwd_blocks<T, W>(a, begin, end); });

    if (!need_dw && !need_db) return;
    auto reduce = [&](auto o_tag) {
      using O = decltype(o_tag);
      O* odw = need_dw ? static_cast<O*>(dw.data_ptr()) : nullptr;
      O* odb = need_db ? static_cast<O*>(db.data_ptr()) : nullptr;
      // Column ranges of >= ~64 KiB of partials each.
      parallel_rows(N, grain_for(S * 4 * ((need_dw ? 1 : 0) + (need_db ? 1 : 0))), [&](int64_t c0, int64_t c1) {
        if (odw) col_sum<O>(a.pdw, odw, S, N, c0, c1);
        if (odb) col_sum<O>(a.pdb, odb, S, N, c0, c1);
      });
    };
    // dw and db share one dtype: the weight's (W), or float32 when there is no weight (then only db exists).
    if (weight) {
      reduce(W{});
    } else {
      reduce(float{});
    }
  });
  return {dx, dw, db};
}

}  // namespace
}  // namespace fastlm::cpu

STABLE_TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("norm_fwd_cpu", TORCH_BOX(&fastlm::cpu::norm_fwd_cpu));
  m.impl("norm_bwd_cpu", TORCH_BOX(&fastlm::cpu::norm_bwd_cpu));
}
