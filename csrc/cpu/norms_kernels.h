// LayerNorm / RMSNorm CPU kernels: the row workers of norm_fwd_cpu / norm_bwd_cpu and the column sum of the
// backward's partials. Included by csrc/cpu/norms.cpp only (the op's overview and host side are there).
#pragma once

#include "cpu/common.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fastlm::cpu {
namespace {

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

// One row's first pass: returns sum(g * xhat) and sum(g), and adds dy * xhat to pdw and dy to pdb (the partials:
// their pass over dy and x is this one, while the row is read from memory). Flags: weight, dw and db wanted.
template <bool kW, bool kDw, bool kDb, typename T>
FASTLM_INLINE void bwd_row_sums(const T* __restrict__ dyr, const T* __restrict__ xr, const float* __restrict__ w,
                                float* __restrict__ pdw, float* __restrict__ pdb, int64_t N, float mu, float rs,
                                float& sgx, float& sg) {
  row_sum2(
      N,
      [&](int64_t j, float& acc_gx, float& acc_g) FASTLM_INLINE_LAMBDA {
        const float d = to_float(dyr[j]);
        const float xh = (to_float(xr[j]) - mu) * rs;
        const float g = kW ? d * w[j] : d;
        acc_gx += g * xh;
        acc_g += g;
        if constexpr (kDw) pdw[j] += d * xh;
        if constexpr (kDb) pdb[j] += d;
      },
      sgx, sg);
}

// Blocks [sbegin, send) of R rows each.
template <typename T, typename W>
FASTLM_CPU_CLONES void norm_bwd_blocks(const BwdArgs<T, W>& a, int64_t sbegin, int64_t send) {
  const int64_t N = a.N;
  const float inv_n = 1.0f / static_cast<float>(N);
  const int64_t np = (N + 15) / 16 * 16;
  Scratch scratch(np);
  const float* const w = as_f32(a.w, scratch.get(), N);
  // The first pass, one inlined instance per (weight, dw, db) combination, picked once per row (a function pointer
  // would call an uncloned, baseline-ISA copy).
  const int kind = (w ? 4 : 0) | (a.pdw ? 2 : 0) | (a.pdb ? 1 : 0);
  using std::false_type, std::true_type;
  auto sums = [&](auto kw, auto kdw, auto kdb, const T* dyr, const T* xr, float* pdw, float* pdb, float mu, float rs,
                  float& sgx, float& sg) FASTLM_INLINE_LAMBDA {
    bwd_row_sums<decltype(kw)::value, decltype(kdw)::value, decltype(kdb)::value>(dyr, xr, w, pdw, pdb, N, mu, rs, sgx,
                                                                                  sg);
  };

  for (int64_t s = sbegin; s < send; ++s) {
    float* __restrict__ pdw = a.pdw ? a.pdw + s * N : nullptr;
    float* __restrict__ pdb = a.pdb ? a.pdb + s * N : nullptr;
    if (pdw) std::fill(pdw, pdw + N, 0.f);
    if (pdb) std::fill(pdb, pdb + N, 0.f);
    const int64_t r0 = s * a.rows_per_block;
    const int64_t r1 = std::min(a.M, r0 + a.rows_per_block);
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict__ dyr = a.dy + r * a.sdy;
      const T* __restrict__ xr = a.x + r * a.sx;
      T* __restrict__ dxr = a.dx + r * N;
      const float mu = a.mean ? a.mean[r] : 0.f;
      const float rs = a.rstd[r];

      // Pass 1: sum(g * xhat) and sum(g), and the partials.
      float sgx, sg;
      switch (kind) {
        case 0: sums(false_type{}, false_type{}, false_type{}, dyr, xr, pdw, pdb, mu, rs, sgx, sg); break;
        case 1: sums(false_type{}, false_type{}, true_type{}, dyr, xr, pdw, pdb, mu, rs, sgx, sg); break;
        case 2: sums(false_type{}, true_type{}, false_type{}, dyr, xr, pdw, pdb, mu, rs, sgx, sg); break;
        case 3: sums(false_type{}, true_type{}, true_type{}, dyr, xr, pdw, pdb, mu, rs, sgx, sg); break;
        case 4: sums(true_type{}, false_type{}, false_type{}, dyr, xr, pdw, pdb, mu, rs, sgx, sg); break;
        case 5: sums(true_type{}, false_type{}, true_type{}, dyr, xr, pdw, pdb, mu, rs, sgx, sg); break;
        case 6: sums(true_type{}, true_type{}, false_type{}, dyr, xr, pdw, pdb, mu, rs, sgx, sg); break;
        default: sums(true_type{}, true_type{}, true_type{}, dyr, xr, pdw, pdb, mu, rs, sgx, sg); break;
      }
      const float c1 = sgx * inv_n;
      const float c2 = a.rms ? 0.f : sg * inv_n;

      // Pass 2: dx, over the row in L1/L2.
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

}  // namespace
}  // namespace fastlm::cpu
