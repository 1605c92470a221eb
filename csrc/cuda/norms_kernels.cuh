// LayerNorm / RMSNorm CUDA kernels: norm_fwd_kernel, norm_bwd_kernel (stage 1) and col_sum_kernel (stage 2) with
// their arguments. Included by csrc/cuda/norms.cu only (the op's overview and host side are there).
#pragma once

#include "common.cuh"

#include <cstdint>

namespace fastlm {
namespace {

// ------------------------------------------------------------------------------------------------------------
// Forward.
//   h = x (+ residual, rounded to T);  LN: mean = sum(h)/N, var = sum((h - mean)^2)/N (two passes);
//   RMS: var = sum(h^2)/N;  rstd = rsqrt(var + eps);  y = (h - mean) * rstd * w + b.
// One row group per row. Bytes moved per row: reads N*sizeof(T) (x) [+ N*sizeof(T) residual] + weight/bias
// (L2-resident), writes N*sizeof(T) (y) [+ N*sizeof(T) h] + 8 (stats). h is read from global memory once:
// pass 1 keeps it in shared memory (`cache`, as T, which holds the rounded h exactly) when it fits, else
// passes 2/3 re-read x (and residual) from global memory (L2) and recompute the same rounded h.
// ------------------------------------------------------------------------------------------------------------
template <typename T, typename W>
struct FwdArgs {
  const T* x;
  const T* res;  // nullptr: no residual
  const W* w;    // nullptr: no weight
  const W* b;    // nullptr: no bias
  T* y;
  T* h;  // (M, N) contiguous, nullptr iff res == nullptr
  float* mean;  // (M,), nullptr for rms
  float* rstd;  // (M,)
  int64_t M;
  int64_t sx;  // row strides in elements
  int64_t sr;
  int N;
  float eps;
  bool rms;
  bool vec;    // all rows of all tensors 16-byte aligned and N % V == 0
  bool cache;  // dynamic smem holds blockDim.y * nchunks * 16 bytes
};

template <typename T, typename W>
__global__ void __launch_bounds__(1024) norm_fwd_kernel(const FwdArgs<T, W> a) {
  constexpr int V = kVec<T>;
  __shared__ float scratch[32];
  const int N = a.N;
  const int nchunks = (N + V - 1) / V;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < a.M;
  // Rows past M (last block) skip the loops but still take part in the reductions (they hold barriers).
  const int end = active ? nchunks : 0;
  const int64_t r = active ? row : 0;
  const T* xr = a.x + r * a.sx;
  const T* rr = a.res ? a.res + r * a.sr : nullptr;
  T* hr = a.h ? a.h + r * N : nullptr;
  T* cache = a.cache ? reinterpret_cast<T*>(dynamic_smem()) + threadIdx.y * (nchunks * V) : nullptr;

  auto load_h = [&](int col0, float (&v)[V]) {
    load_chunk<V>(xr, col0, N, a.vec, v);
    if (rr) {
      float t[V];
      load_chunk<V>(rr, col0, N, a.vec, t);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = round_to<T>(v[k] + t[k]);
    }
  };
  auto reload_h = [&](int col0, float (&v)[V]) {
    if (a.cache) {
      load_chunk<V>(cache, col0, nchunks * V, true, v);  // padded row: always whole, aligned chunks
    } else {
      load_h(col0, v);
    }
  };

  // Pass 1: h, its optional store, sum(h) (LN) or sum(h^2) (RMS).
  float s = 0.f;
  for (int c = threadIdx.x; c < end; c += blockDim.x) {
    const int col0 = c * V;
    float v[V];
    load_h(col0, v);
    if (hr) store_chunk<V>(hr, col0, N, a.vec, v);
    if (a.cache) store_chunk<V>(cache, col0, nchunks * V, true, v);  // v is exact in T
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (col0 + k < N) s += a.rms ? v[k] * v[k] : v[k];
    }
  }
  s = row_sum(s, scratch);

  float mean = 0.f;
  float var;
  if (a.rms) {
    var = s / static_cast<float>(N);
  } else {
    mean = s / static_cast<float>(N);
    // Pass 2: centred second moment (no E[h^2] - mean^2 cancellation). Padding columns must be masked: they
    // would add mean^2.
    float q = 0.f;
    for (int c = threadIdx.x; c < end; c += blockDim.x) {
      const int col0 = c * V;
      float v[V];
      reload_h(col0, v);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float d = v[k] - mean;
        if (col0 + k < N) q += d * d;
      }
    }
    q = row_sum(q, scratch);
    var = q / static_cast<float>(N);
  }
  const float rstd = rsqrtf(var + a.eps);
  if (active && threadIdx.x == 0) {
    if (a.mean) a.mean[r] = mean;
    a.rstd[r] = rstd;
  }

  // Pass 3: y.
  T* yr = a.y + r * N;
  for (int c = threadIdx.x; c < end; c += blockDim.x) {
    const int col0 = c * V;
    float v[V];
    reload_h(col0, v);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = (v[k] - mean) * rstd;
    if (a.w) {
      float wv[V];
      load_chunk<V>(a.w, col0, N, a.vec, wv);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] *= wv[k];
    }
    if (a.b) {
      float bv[V];
      load_chunk<V>(a.b, col0, N, a.vec, bv);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] += bv[k];
    }
    store_chunk<V>(yr, col0, N, a.vec, v);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Backward, stage 1.
//   xhat = (x - mean) * rstd (LN) or x * rstd (RMS);  g = dy * w (dy without weight);
//   dx = rstd * (g - (xhat * mean(g * xhat) + mean(g)))   (the mean(g) term is LN only)   [+ dh]
//   per-block partials: pdw[b, col] = sum over block b's rows of dy * xhat, pdb[b, col] = sum of dy.
// Row group ty of block b handles rows b*R + ty + k*G*R (R = blockDim.y, G = gridDim.x, k = 0, 1, ...) in
// that order; at the end the block adds its R row-group partials in ty order and writes row b of the (G, npad)
// fp32 workspaces. No atomics: dw/db are bitwise reproducible for a given (M, N, dtypes, device).
// Accumulators live in dynamic shared memory when they fit (`smem_acc`); otherwise (very wide rows, where the
// host guarantees R == 1) directly in the block's workspace row, as thread-private read-modify-writes.
// Bytes moved per row: reads 2*N*sizeof(T) (dy, x; pass 2 re-reads them from L1/L2) [+ N*sizeof(T) dh]
// + weight (L2-resident) + 8 (stats), writes N*sizeof(T) (dx). Once per block: npad*4 per partial.
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
  float* pdw;   // (G, npad) workspace, nullptr: dw not wanted
  float* pdb;   // (G, npad) workspace, nullptr: db not wanted
  int64_t M;
  int64_t sdy;  // row strides in elements
  int64_t sx;
  int64_t sdh;
  int N;
  bool rms;
  bool vec;       // all rows 16-byte aligned and N % V == 0
  bool smem_acc;  // dynamic smem holds blockDim.y * (#partials) * npad floats; if false, blockDim.y == 1
};

// p[0, V) += v, for a 16-byte aligned fp32 accumulator chunk (npad * 4 and col0 * 4 are multiples of 16).
template <int V>
__device__ __forceinline__ void acc_chunk(float* p, const float (&v)[V]) {
  float t[V];
  load_chunk<V>(p, 0, V, true, t);
#pragma unroll
  for (int k = 0; k < V; ++k) t[k] += v[k];
  store_chunk<V>(p, 0, V, true, t);
}

template <int V>
__device__ __forceinline__ void zero_chunk(float* p) {
  float t[V];
#pragma unroll
  for (int k = 0; k < V; ++k) t[k] = 0.f;
  store_chunk<V>(p, 0, V, true, t);
}

template <typename T, typename W>
__global__ void __launch_bounds__(1024) norm_bwd_kernel(const BwdArgs<T, W> a) {
  constexpr int V = kVec<T>;
  __shared__ float2 scratch[32];
  const int N = a.N;
  const int nchunks = (N + V - 1) / V;
  const int npad = nchunks * V;
  const int64_t rows_per_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  const int nacc = (a.pdw ? 1 : 0) + (a.pdb ? 1 : 0);
  // smem layout: row group ty owns floats [ty * nacc * npad, (ty + 1) * nacc * npad): dw partial, then db.
  float* sm = reinterpret_cast<float*>(dynamic_smem());

  float* adw = nullptr;
  float* adb = nullptr;
  if (a.smem_acc) {
    float* mine = sm + static_cast<int64_t>(threadIdx.y) * nacc * npad;
    if (a.pdw) adw = mine;
    if (a.pdb) adb = mine + (a.pdw ? npad : 0);
  } else {  // blockDim.y == 1: the block's workspace row belongs to this row group alone
    if (a.pdw) adw = a.pdw + static_cast<int64_t>(blockIdx.x) * npad;
    if (a.pdb) adb = a.pdb + static_cast<int64_t>(blockIdx.x) * npad;
  }
  // Zeroed even by blocks that get no row: stage 2 sums all G rows.
  for (int c = threadIdx.x; c < nchunks; c += blockDim.x) {
    if (adw) zero_chunk<V>(adw + c * V);
    if (adb) zero_chunk<V>(adb + c * V);
  }

  // The loop runs over row *groups* so that its trip count is the same for every thread of the block
  // (row_sum2 holds barriers); a row group whose row is past M idles through that iteration.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < a.M; base += rows_per_step) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < a.M;
    const int end = active ? nchunks : 0;
    const int64_t r = active ? row : 0;
    const float mu = (active && a.mean) ? a.mean[r] : 0.f;
    const float rs = active ? a.rstd[r] : 0.f;
    const T* dyr = a.dy + r * a.sdy;
    const T* xr = a.x + r * a.sx;
    const T* dhr = a.dh ? a.dh + r * a.sdh : nullptr;
    T* dxr = a.dx + r * N;

    // Pass 1: sum(g * xhat) and sum(g).
    float sgx = 0.f, sg = 0.f;
    for (int c = threadIdx.x; c < end; c += blockDim.x) {
      const int col0 = c * V;
      float xv[V], g[V];
      load_chunk<V>(xr, col0, N, a.vec, xv);
      load_chunk<V>(dyr, col0, N, a.vec, g);
      if (a.w) {
        float wv[V];
        load_chunk<V>(a.w, col0, N, a.vec, wv);
#pragma unroll
        for (int k = 0; k < V; ++k) g[k] *= wv[k];
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (col0 + k < N) {
          sgx += g[k] * ((xv[k] - mu) * rs);
          sg += g[k];
        }
      }
    }
    row_sum2(sgx, sg, scratch);
    const float c1 = sgx / static_cast<float>(N);
    const float c2 = a.rms ? 0.f : sg / static_cast<float>(N);

    // Pass 2: dx, and the partials.
    for (int c = threadIdx.x; c < end; c += blockDim.x) {
      const int col0 = c * V;
      float xh[V], dyv[V], d[V];
      load_chunk<V>(xr, col0, N, a.vec, xh);
      load_chunk<V>(dyr, col0, N, a.vec, dyv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        xh[k] = (xh[k] - mu) * rs;
        d[k] = dyv[k];
      }
      if (a.w) {
        float wv[V];
        load_chunk<V>(a.w, col0, N, a.vec, wv);
#pragma unroll
        for (int k = 0; k < V; ++k) d[k] *= wv[k];
      }
#pragma unroll
      for (int k = 0; k < V; ++k) d[k] = rs * (d[k] - (xh[k] * c1 + c2));
      if (dhr) {
        float t[V];
        load_chunk<V>(dhr, col0, N, a.vec, t);
#pragma unroll
        for (int k = 0; k < V; ++k) d[k] += t[k];
      }
      store_chunk<V>(dxr, col0, N, a.vec, d);
      // Padding columns (scalar path) load dy = 0, so they add exact zeros; they are never read back anyway.
      if (adw) {
#pragma unroll
        for (int k = 0; k < V; ++k) xh[k] *= dyv[k];
        acc_chunk<V>(adw + col0, xh);
      }
      if (adb) acc_chunk<V>(adb + col0, dyv);
    }
  }

  if (a.smem_acc) {
    // Block partial = sum of the row-group partials in ty order, chunk by chunk over all threads of the block.
    __syncthreads();  // other row groups' accumulators are complete
    const int nthreads = blockDim.x * blockDim.y;
    for (int c = threadIdx.y * blockDim.x + threadIdx.x; c < nchunks; c += nthreads) {
      const int col0 = c * V;
      for (int j = 0; j < nacc; ++j) {
        float t[V];
#pragma unroll
        for (int k = 0; k < V; ++k) t[k] = 0.f;
        for (int y = 0; y < static_cast<int>(blockDim.y); ++y) {
          float u[V];
          load_chunk<V>(sm + (static_cast<int64_t>(y) * nacc + j) * npad, col0, npad, true, u);
#pragma unroll
          for (int k = 0; k < V; ++k) t[k] += u[k];
        }
        float* ws = (j == 0 && a.pdw) ? a.pdw : a.pdb;
        store_chunk<V>(ws + static_cast<int64_t>(blockIdx.x) * npad, col0, npad, true, t);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Backward, stage 2: out[j][col] = sum over s < S of ws[j][s, col], j = blockIdx.y, in a fixed order (thread
// ty sums rows ty, ty + 32, ..., then thread ty == 0 adds the 32 partial sums in ty order). Block (32, 32).
// Bytes moved: reads S * N * 4 per output, writes N * sizeof(O).
// ------------------------------------------------------------------------------------------------------------
template <typename O>
__global__ void __launch_bounds__(1024)
    col_sum_kernel(const float* ws0, const float* ws1, O* out0, O* out1, int64_t S, int N, int npad) {
  __shared__ float part[32][32];
  const float* ws = blockIdx.y == 0 ? ws0 : ws1;
  O* out = blockIdx.y == 0 ? out0 : out1;
  const int col = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (col < N) {
    for (int64_t i = threadIdx.y; i < S; i += 32) s += ws[i * npad + col];
  }
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) t += part[i][threadIdx.x];
    out[col] = from_float<O>(t);
  }
}

}  // namespace
}  // namespace fastlm
