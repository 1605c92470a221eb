// Softmax CUDA kernels: the rows-layout forward (plain and masked) and backward, the strided-layout forward and
// backward, with their arguments. Included by csrc/cuda/softmax.cu only (the op's overview and host side are there).
#pragma once

#include "common.cuh"

#include <cstdint>

namespace fastlm {
namespace {

// Threads of a strided-layout block.
constexpr int kStridedThreads = 256;

// Mask kinds of the masked softmax (runtime flag; the mask's dtype is not a template parameter).
enum MaskKind : int { kMaskNone = 0, kMaskBool, kMaskHalf, kMaskBF16, kMaskFloat, kMaskDouble };

// s masked by element `off` of the mask: -inf where a bool mask is False, s + value for an additive mask.
__device__ __forceinline__ float apply_mask(float s, const void* m, int kind, int64_t off) {
  switch (kind) {
    case kMaskBool: return static_cast<const uint8_t*>(m)[off] != 0 ? s : -INFINITY;
    case kMaskHalf: return s + __half2float(static_cast<const __half*>(m)[off]);
    case kMaskBF16: return s + __bfloat162float(static_cast<const __nv_bfloat16*>(m)[off]);
    case kMaskFloat: return s + static_cast<const float*>(m)[off];
    case kMaskDouble: return s + static_cast<float>(static_cast<const double*>(m)[off]);
    default: return s;
  }
}

// ------------------------------------------------------------------------------------------------------------
// Forward, rows layout.
//   s = x * scale (+ mask, or -inf where masked; causal: -inf where k > q);  m = max(s), l = sum(exp(s - m));
//   softmax: y = exp(s - m) / l (0 where l == 0 when zero_empty);  log: y = s - m - log(l).
// Row r decomposes as q = r % Sq, h = (r / Sq) % H, b = r / (Sq * H) (for plain rows Sq = H = 1, so b = r); its x
// row starts at b * s0 + h * s1 + q * s2, its mask row at b * m0 + h * m1 + q * m2 (element k at + k * m3); y is
// contiguous (row r at r * R).
// Bytes moved per row: reads R * sizeof(T) (+ mask), writes R * sizeof(T); + R * sizeof(T) re-read of x when
// the row does not fit in shared memory (mostly L2 hits).
// ------------------------------------------------------------------------------------------------------------
template <typename T>
struct FwdRowsArgs {
  const T* x;
  T* y;
  const void* mask;  // nullptr iff mask_kind == kMaskNone
  int64_t rows;
  int64_t Sq, H;
  int64_t s0, s1, s2;      // x strides (elements) of b, h, q
  int64_t m0, m1, m2, m3;  // mask strides (elements) of b, h, q, k
  int R;
  int mask_kind;
  float scale;
  bool causal;
  bool log;
  bool zero_empty;  // l == 0 gives zeros (masked softmax) instead of NaN
  bool vec;         // every x row and y 16-byte aligned and R % V == 0
  bool cache;       // dynamic smem holds blockDim.y * npad floats
};

template <typename T>
__global__ void __launch_bounds__(1024) softmax_fwd_rows_kernel(const FwdRowsArgs<T> a) {
  constexpr int V = kVec<T>;
  __shared__ float scratch[32];
  const int R = a.R;
  const int nchunks = (R + V - 1) / V;
  const int npad = nchunks * V;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < a.rows;
  // Rows past the end (last block) skip the loops but still take part in the reductions (they hold barriers).
  const int end = active ? nchunks : 0;
  const int64_t r = active ? row : 0;
  const int64_t q = r % a.Sq;
  const int64_t bh = r / a.Sq;
  const int64_t h = bh % a.H;
  const int64_t b = bh / a.H;
  const T* xr = a.x + b * a.s0 + h * a.s1 + q * a.s2;
  const int64_t mrow = b * a.m0 + h * a.m1 + q * a.m2;
  float* cache = a.cache ? reinterpret_cast<float*>(dynamic_smem()) + static_cast<int64_t>(threadIdx.y) * npad
                         : nullptr;

  // The fp32 scores of chunk [col0, col0 + V); -inf beyond the row.
  auto scores = [&](int col0, float (&v)[V]) {
    load_chunk<V>(xr, col0, R, a.vec, v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = col0 + k;
      float s = v[k] * a.scale;
      if (c >= R) {
        s = -INFINITY;
      } else {
        if (a.mask_kind != kMaskNone) s = apply_mask(s, a.mask, a.mask_kind, mrow + c * a.m3);
        if (a.causal && c > q) s = -INFINITY;
      }
      v[k] = s;
    }
  };

  // Pass 1: per-thread running max and sum of exp.
  float m = -INFINITY;
  float l = 0.f;
  for (int c = threadIdx.x; c < end; c += blockDim.x) {
    const int col0 = c * V;
    float v[V];
    scores(col0, v);
    if (cache) store_chunk<V>(cache, col0, npad, true, v);
    float cm = v[0];
#pragma unroll
    for (int k = 1; k < V; ++k) cm = fmaxf(cm, v[k]);
    const float mn = fmaxf(m, cm);
    const float sh = softmax_shift(mn);
    float e = 0.f;
#pragma unroll
    for (int k = 0; k < V; ++k) e += __expf(v[k] - sh);
    l = l * __expf(m - sh) + e;
    m = mn;
  }
  const float M = row_max(m, scratch);
  const float sh = softmax_shift(M);
  const float L = row_sum(l * __expf(m - sh), scratch);
  const float inv = (a.zero_empty && !(L > 0.f)) ? 0.f : 1.f / L;
  const float lg = __logf(L);

  // Pass 2: y.
  T* yr = a.y + r * R;
  for (int c = threadIdx.x; c < end; c += blockDim.x) {
    const int col0 = c * V;
    float v[V];
    if (cache) {
      load_chunk<V>(cache, col0, npad, true, v);
    } else {
      scores(col0, v);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = a.log ? v[k] - sh - lg : __expf(v[k] - sh) * inv;
    store_chunk<V>(yr, col0, R, a.vec, v);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Forward, strided layout (plain softmax / log-softmax of a contiguous tensor along a dim with inner > 1).
// Bytes moved per row: reads R * sizeof(T) twice (the second mostly from L1/L2), writes R * sizeof(T).
// ------------------------------------------------------------------------------------------------------------
template <typename T>
struct StridedArgs {
  const T* x;   // forward: x; backward: y
  const T* dy;  // backward only
  T* out;       // forward: y; backward: dx (all contiguous, the same layout)
  int64_t outer;
  int64_t inner;
  int64_t nib;  // blocks per outer index: ceil(inner / blockDim.x)
  int R;
  float scale;  // backward only
  bool log;
};

template <typename T>
__global__ void __launch_bounds__(kStridedThreads) softmax_fwd_strided_kernel(const StridedArgs<T> a) {
  __shared__ float2 part[kStridedThreads];
  const int64_t o = blockIdx.x / a.nib;
  const int64_t i = (blockIdx.x % a.nib) * blockDim.x + threadIdx.x;
  const bool active = i < a.inner;
  const int R = a.R;
  const int jend = active ? R : 0;
  const int64_t base = o * R * a.inner + (active ? i : 0);

  float m = -INFINITY;
  float l = 0.f;
  for (int j = threadIdx.y; j < jend; j += blockDim.y) {
    const float s = to_float(a.x[base + j * a.inner]);
    const float mn = fmaxf(m, s);
    const float sh = softmax_shift(mn);
    l = l * __expf(m - sh) + __expf(s - sh);
    m = mn;
  }
  part[threadIdx.y * blockDim.x + threadIdx.x] = make_float2(m, l);
  __syncthreads();
  // Every thread of column tx combines the blockDim.y partials in the same order: identical results.
  float M = -INFINITY;
  for (int t = 0; t < static_cast<int>(blockDim.y); ++t) M = fmaxf(M, part[t * blockDim.x + threadIdx.x].x);
  const float sh = softmax_shift(M);
  float L = 0.f;
  for (int t = 0; t < static_cast<int>(blockDim.y); ++t) {
    const float2 p = part[t * blockDim.x + threadIdx.x];
    L += p.y * __expf(p.x - sh);
  }
  const float inv = 1.f / L;
  const float lg = __logf(L);
  for (int j = threadIdx.y; j < jend; j += blockDim.y) {
    const int64_t off = base + j * a.inner;
    const float s = to_float(a.x[off]);
    a.out[off] = from_float<T>(a.log ? s - sh - lg : __expf(s - sh) * inv);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Backward, rows layout.  softmax: dx = scale * y * (dy - sum(y * dy));  log: dx = scale * (dy - exp(y) * sum(dy)).
// Row r of y at r * sy, of dy at r * sdy, of dx at r * R.
// Bytes moved per row: reads 2 * R * sizeof(T), writes R * sizeof(T) (+ a re-read when the row does not fit).
// ------------------------------------------------------------------------------------------------------------
template <typename T>
struct BwdRowsArgs {
  const T* y;
  const T* dy;
  T* dx;
  int64_t rows;
  int64_t sy, sdy;  // row strides (elements)
  int R;
  float scale;
  bool log;
  bool vec;    // every y / dy row and dx 16-byte aligned and R % V == 0
  bool cache;  // dynamic smem holds blockDim.y * 2 * npad floats
};

template <typename T>
__global__ void __launch_bounds__(1024) softmax_bwd_rows_kernel(const BwdRowsArgs<T> a) {
  constexpr int V = kVec<T>;
  __shared__ float scratch[32];
  const int R = a.R;
  const int nchunks = (R + V - 1) / V;
  const int npad = nchunks * V;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < a.rows;
  const int end = active ? nchunks : 0;
  const int64_t r = active ? row : 0;
  const T* yr = a.y + r * a.sy;
  const T* dyr = a.dy + r * a.sdy;
  // smem: row group ty owns [ty * 2 * npad, (ty + 1) * 2 * npad): y, then dy.
  float* cy = a.cache ? reinterpret_cast<float*>(dynamic_smem()) + static_cast<int64_t>(threadIdx.y) * 2 * npad
                      : nullptr;
  float* cdy = a.cache ? cy + npad : nullptr;

  // Pass 1: the row's dot product. Elements beyond R load as 0 and add nothing.
  float dot = 0.f;
  for (int c = threadIdx.x; c < end; c += blockDim.x) {
    const int col0 = c * V;
    float vy[V], vd[V];
    load_chunk<V>(yr, col0, R, a.vec, vy);
    load_chunk<V>(dyr, col0, R, a.vec, vd);
    if (a.cache) {
      store_chunk<V>(cy, col0, npad, true, vy);
      store_chunk<V>(cdy, col0, npad, true, vd);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) dot += a.log ? vd[k] : vy[k] * vd[k];
  }
  dot = row_sum(dot, scratch);

  // Pass 2: dx.
  T* dxr = a.dx + r * R;
  for (int c = threadIdx.x; c < end; c += blockDim.x) {
    const int col0 = c * V;
    float vy[V], vd[V];
    if (a.cache) {
      load_chunk<V>(cy, col0, npad, true, vy);
      load_chunk<V>(cdy, col0, npad, true, vd);
    } else {
      load_chunk<V>(yr, col0, R, a.vec, vy);
      load_chunk<V>(dyr, col0, R, a.vec, vd);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      vy[k] = a.scale * (a.log ? vd[k] - __expf(vy[k]) * dot : vy[k] * (vd[k] - dot));
    }
    store_chunk<V>(dxr, col0, R, a.vec, vy);
  }
}

// Backward, strided layout (y, dy, dx all contiguous with the same shape).
template <typename T>
__global__ void __launch_bounds__(kStridedThreads) softmax_bwd_strided_kernel(const StridedArgs<T> a) {
  __shared__ float part[kStridedThreads];
  const int64_t o = blockIdx.x / a.nib;
  const int64_t i = (blockIdx.x % a.nib) * blockDim.x + threadIdx.x;
  const bool active = i < a.inner;
  const int R = a.R;
  const int jend = active ? R : 0;
  const int64_t base = o * R * a.inner + (active ? i : 0);

  float dot = 0.f;
  for (int j = threadIdx.y; j < jend; j += blockDim.y) {
    const int64_t off = base + j * a.inner;
    const float d = to_float(a.dy[off]);
    dot += a.log ? d : to_float(a.x[off]) * d;
  }
  part[threadIdx.y * blockDim.x + threadIdx.x] = dot;
  __syncthreads();
  dot = 0.f;
  for (int t = 0; t < static_cast<int>(blockDim.y); ++t) dot += part[t * blockDim.x + threadIdx.x];
  for (int j = threadIdx.y; j < jend; j += blockDim.y) {
    const int64_t off = base + j * a.inner;
    const float yv = to_float(a.x[off]);
    const float d = to_float(a.dy[off]);
    a.out[off] = from_float<T>(a.scale * (a.log ? d - __expf(yv) * dot : yv * (d - dot)));
  }
}

}  // namespace
}  // namespace fastlm
