// Softmax / log-softmax, the scaled-masked-causal softmax of attention scores, and their backward: CUDA kernels
// registered as the CUDA implementations of fastlm::softmax_fwd_cuda, fastlm::masked_softmax_fwd_cuda and
// fastlm::softmax_bwd_cuda (schemas in csrc/ops.cpp). Same op contract as kernels/softmax.py (Triton).
//
// Written against the LibTorch stable ABI only (torch/csrc/stable, TORCH_TARGET_VERSION = 2.10).
// Templates: the element type T (float, __half, __nv_bfloat16) only; everything else is a runtime flag.
//
// Two work layouts:
//  * "rows" (softmax along a dim with unit stride): a row of R elements is cut into 16-byte chunks of
//    V = 16/sizeof(T) elements; a row group of blockDim.x threads (a multiple of 32) owns one row, thread tx owns
//    the chunks tx, tx + blockDim.x, ...; a block holds blockDim.y row groups. Forward: pass 1 reads the scores
//    and keeps a per-thread running (max, sum of exp) (online softmax, any R), the row group combines them, pass 2
//    writes y from a shared-memory copy of the scores (when the row fits) or from a re-read of x. A thread only
//    revisits its own chunks, so the cache needs no barrier. Backward: pass 1 forms sum(y * dy) (or sum(dy)),
//    pass 2 writes dx, from a shared-memory copy of (y, dy) when it fits.
//  * "strided" (softmax along a dim of a contiguous tensor with inner size > 1, no transpose copy): element j of
//    row (o, i) is at o * R * inner + j * inner + i. Block (bx, by): bx lanes over consecutive i (coalesced), by
//    threads split the R elements of each row (j = ty, ty + by, ...); the by partials are combined through shared
//    memory in a fixed order.
//
// Numerics: all math in fp32; the build uses --use_fast_math (exp/log via ex2/lg2.approx, approximate division;
// denormals flushed to zero). Combinations are in a fixed order set by the launch shape: deterministic.
#include "common.cuh"
#include "launch.h"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <vector>

namespace fastlm {
namespace {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

// Widest row (elements): keeps every column index and chunk count in int.
constexpr int64_t kMaxR = INT_MAX / 2;
// Shared memory kept free of the dynamic cache (static smem <= 2 KiB plus the 1 KiB sm_90 reserves per block).
constexpr size_t kSmemMargin = 4096;
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

// ------------------------------------------------------------------------------------------------------------
// Host side.
// ------------------------------------------------------------------------------------------------------------
const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Double: return "float64";
    case ScalarType::Bool: return "bool";
    default: return "an unsupported dtype";
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Offsets `stride * k` (elements) keep 16-byte alignment, or the dim has a single index.
bool stride_aligned(int64_t size, int64_t stride, size_t elem) {
  return size <= 1 || (stride * static_cast<int64_t>(elem)) % 16 == 0;
}

int smem_optin(int dev) {
  int v = 0;
  check_cuda(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "cudaDeviceGetAttribute");
  return v;
}

template <typename K>
void allow_dynamic_smem(K* kernel, size_t bytes) {
  if (bytes > 40 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
}

int round_up(int v, int m) { return (v + m - 1) / m * m; }

int pow2_ceil(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p <<= 1;
  return p;
}

// Threads per row: about 4 chunks each, a multiple of 32 in [32, 1024]; rows per block: up to 256 threads.
void row_shape(int nchunks, int& tpr, int& rpb) {
  tpr = std::min(1024, std::max(32, round_up((nchunks + 3) / 4, 32)));
  rpb = std::max(1, 256 / tpr);
}

// Strided block: bx lanes over the inner index, by threads over the softmax dim, bx * by <= kStridedThreads.
void strided_shape(int64_t inner, int64_t R, int& bx, int& by) {
  bx = std::min(32, pow2_ceil(inner));
  by = std::max(1, std::min(kStridedThreads / bx, pow2_ceil(R)));
}

void check_float_tensor(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.is_cuda(), "fastlm: ", name, " must be a CUDA tensor");
  const ScalarType dt = t.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::Half || dt == ScalarType::BFloat16, "fastlm: ",
                  name, " must be float32, float16 or bfloat16, got ", dtype_name(dt));
}

template <typename F>
void dispatch_type(ScalarType t, F&& f) {
  switch (t) {
    case ScalarType::Float: f(float{}); return;
    case ScalarType::Half: f(__half{}); return;
    case ScalarType::BFloat16: f(__nv_bfloat16{}); return;
    default: STD_TORCH_CHECK(false, "fastlm: unsupported dtype ", dtype_name(t));
  }
}

// Launches the rows forward kernel for a.rows rows of a.R elements (a.x, a.y, strides, mask set by the caller).
template <typename T>
void launch_fwd_rows(FwdRowsArgs<T> a, int dev, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const int nchunks = (a.R + V - 1) / V;
  int tpr, rpb;
  row_shape(nchunks, tpr, rpb);
  const size_t cache_bytes = static_cast<size_t>(rpb) * nchunks * V * sizeof(float);
  a.cache = cache_bytes + kSmemMargin <= static_cast<size_t>(smem_optin(dev));
  const size_t smem = a.cache ? cache_bytes : 0;
  const int64_t blocks = (a.rows + rpb - 1) / rpb;
  STD_TORCH_CHECK(blocks <= INT_MAX, "fastlm: too many rows (", a.rows, ")");
  allow_dynamic_smem(softmax_fwd_rows_kernel<T>, smem);
  softmax_fwd_rows_kernel<T><<<static_cast<unsigned>(blocks), dim3(tpr, rpb), smem, stream>>>(a);
  check_cuda(cudaGetLastError(), "softmax_fwd_rows_kernel launch");
}

template <typename T>
void launch_strided(StridedArgs<T> a, bool backward, cudaStream_t stream) {
  int bx, by;
  strided_shape(a.inner, a.R, bx, by);
  a.nib = (a.inner + bx - 1) / bx;
  STD_TORCH_CHECK(a.outer <= INT_MAX / a.nib, "fastlm: tensor too large for the strided softmax launch");
  const unsigned blocks = static_cast<unsigned>(a.outer * a.nib);
  if (backward) {
    softmax_bwd_strided_kernel<T><<<blocks, dim3(bx, by), 0, stream>>>(a);
    check_cuda(cudaGetLastError(), "softmax_bwd_strided_kernel launch");
  } else {
    softmax_fwd_strided_kernel<T><<<blocks, dim3(bx, by), 0, stream>>>(a);
    check_cuda(cudaGetLastError(), "softmax_fwd_strided_kernel launch");
  }
}

// (outer, R, inner) of a tensor along dim.
void split_dims(const Tensor& t, int64_t dim, int64_t& outer, int64_t& R, int64_t& inner) {
  outer = 1;
  inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= t.size(d);
  for (int64_t d = dim + 1; d < t.dim(); ++d) inner *= t.size(d);
  R = t.size(dim);
}

int64_t normalize_dim(const Tensor& t, int64_t dim, const char* name) {
  const int64_t nd = t.dim();
  STD_TORCH_CHECK(nd >= 1, "fastlm: ", name, " must have at least 1 dimension");
  STD_TORCH_CHECK(dim >= -nd && dim < nd, "fastlm: dim ", dim, " is out of range for ", name, " with ", nd,
                  " dimensions");
  return dim < 0 ? dim + nd : dim;
}

Tensor softmax_fwd_cuda(const Tensor& x, int64_t dim_in, bool log) {
  check_float_tensor(x, "x");
  const int64_t dim = normalize_dim(x, dim_in, "x");
  const int32_t dev = x.get_device_index();
  const bool rows2d = x.dim() == 2 && dim == 1;
  if (rows2d) {
    STD_TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "fastlm: x must have unit stride along dim 1, got stride ",
                    x.stride(1));
    STD_TORCH_CHECK(x.size(0) <= 1 || x.stride(0) >= 0, "fastlm: x has a negative row stride");
  } else {
    STD_TORCH_CHECK(x.is_contiguous(), "fastlm: x must be contiguous (or 2-D with unit last stride and dim == 1)");
  }
  int64_t outer, R, inner;
  split_dims(x, dim, outer, R, inner);
  STD_TORCH_CHECK(R <= kMaxR, "fastlm: softmax size ", R, " along dim ", dim, " exceeds ", kMaxR);

  torch::stable::accelerator::DeviceGuard guard(dev);
  Tensor y = torch::stable::new_empty(x, x.sizes());
  if (x.numel() == 0) return y;
  const cudaStream_t stream = current_stream(dev);
  dispatch_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec<T>;
    if (inner == 1) {
      FwdRowsArgs<T> a{};
      a.x = static_cast<const T*>(x.data_ptr());
      a.y = static_cast<T*>(y.data_ptr());
      a.mask = nullptr;
      a.rows = outer;
      a.Sq = 1;
      a.H = 1;
      a.s0 = rows2d ? x.stride(0) : R;
      a.R = static_cast<int>(R);
      a.mask_kind = kMaskNone;
      a.scale = 1.f;
      a.causal = false;
      a.log = log;
      a.zero_empty = false;
      a.vec = R % V == 0 && aligned16(a.x) && stride_aligned(outer, a.s0, sizeof(T)) && aligned16(a.y);
      launch_fwd_rows(a, dev, stream);
    } else {
      StridedArgs<T> a{};
      a.x = static_cast<const T*>(x.data_ptr());
      a.out = static_cast<T*>(y.data_ptr());
      a.outer = outer;
      a.inner = inner;
      a.R = static_cast<int>(R);
      a.log = log;
      launch_strided(a, false, stream);
    }
  });
  return y;
}

Tensor masked_softmax_fwd_cuda(const Tensor& x, const std::optional<Tensor>& mask, double scale, bool causal) {
  check_float_tensor(x, "x");
  STD_TORCH_CHECK(x.dim() == 4, "fastlm: x must be 4-D (B, H, Sq, Sk), got ", x.dim(), " dimensions");
  const int32_t dev = x.get_device_index();
  const int64_t B = x.size(0), H = x.size(1), Sq = x.size(2), Sk = x.size(3);
  STD_TORCH_CHECK(Sk <= 1 || x.stride(3) == 1, "fastlm: x must have unit stride along the last dim, got stride ",
                  x.stride(3));
  for (int d = 0; d < 3; ++d) {
    STD_TORCH_CHECK(x.size(d) <= 1 || x.stride(d) >= 0, "fastlm: x has a negative stride");
  }
  STD_TORCH_CHECK(Sk <= kMaxR, "fastlm: Sk = ", Sk, " exceeds ", kMaxR);
  int kind = kMaskNone;
  if (mask) {
    STD_TORCH_CHECK(mask->is_cuda(), "fastlm: mask must be a CUDA tensor");
    STD_TORCH_CHECK(mask->get_device_index() == dev, "fastlm: mask is on cuda:", mask->get_device_index(),
                    " but x is on cuda:", dev);
    STD_TORCH_CHECK(mask->dim() == 4 && mask->size(0) == B && mask->size(1) == H && mask->size(2) == Sq &&
                        mask->size(3) == Sk,
                    "fastlm: mask must be an expanded view of x's shape (B, H, Sq, Sk)");
    for (int d = 0; d < 4; ++d) {
      STD_TORCH_CHECK(mask->size(d) <= 1 || mask->stride(d) >= 0, "fastlm: mask has a negative stride");
    }
    switch (mask->scalar_type()) {
      case ScalarType::Bool: kind = kMaskBool; break;
      case ScalarType::Half: kind = kMaskHalf; break;
      case ScalarType::BFloat16: kind = kMaskBF16; break;
      case ScalarType::Float: kind = kMaskFloat; break;
      case ScalarType::Double: kind = kMaskDouble; break;
      default:
        STD_TORCH_CHECK(false, "fastlm: mask must be bool (True = keep) or floating point (additive), got ",
                        dtype_name(mask->scalar_type()));
    }
  }

  torch::stable::accelerator::DeviceGuard guard(dev);
  Tensor y = torch::stable::new_empty(x, {B, H, Sq, Sk});
  if (x.numel() == 0) return y;
  const cudaStream_t stream = current_stream(dev);
  dispatch_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec<T>;
    FwdRowsArgs<T> a{};
    a.x = static_cast<const T*>(x.data_ptr());
    a.y = static_cast<T*>(y.data_ptr());
    a.mask = mask ? mask->data_ptr() : nullptr;
    a.rows = B * H * Sq;
    a.Sq = Sq;
    a.H = H;
    a.s0 = x.stride(0);
    a.s1 = x.stride(1);
    a.s2 = x.stride(2);
    if (mask) {
      a.m0 = mask->stride(0);
      a.m1 = mask->stride(1);
      a.m2 = mask->stride(2);
      a.m3 = mask->stride(3);
    }
    a.R = static_cast<int>(Sk);
    a.mask_kind = kind;
    a.scale = static_cast<float>(scale);
    a.causal = causal;
    a.log = false;
    a.zero_empty = true;
    a.vec = Sk % V == 0 && aligned16(a.x) && stride_aligned(B, a.s0, sizeof(T)) &&
            stride_aligned(H, a.s1, sizeof(T)) && stride_aligned(Sq, a.s2, sizeof(T)) && aligned16(a.y);
    launch_fwd_rows(a, dev, stream);
  });
  return y;
}

Tensor softmax_bwd_cuda(const Tensor& dy, const Tensor& y, int64_t dim_in, bool log, double scale) {
  check_float_tensor(y, "y");
  check_float_tensor(dy, "dy");
  const int64_t dim = normalize_dim(y, dim_in, "y");
  const int32_t dev = y.get_device_index();
  STD_TORCH_CHECK(dy.get_device_index() == dev, "fastlm: dy is on cuda:", dy.get_device_index(),
                  " but y is on cuda:", dev);
  STD_TORCH_CHECK(dy.scalar_type() == y.scalar_type(), "fastlm: dy (", dtype_name(dy.scalar_type()),
                  ") must have y's dtype (", dtype_name(y.scalar_type()), ")");
  STD_TORCH_CHECK(dy.dim() == y.dim(), "fastlm: dy must have y's shape");
  for (int64_t d = 0; d < y.dim(); ++d) {
    STD_TORCH_CHECK(dy.size(d) == y.size(d), "fastlm: dy must have y's shape (mismatch at dim ", d, ")");
  }
  const bool rows2d = y.dim() == 2 && dim == 1;
  if (rows2d) {
    STD_TORCH_CHECK(y.size(1) <= 1 || (y.stride(1) == 1 && dy.stride(1) == 1),
                    "fastlm: y and dy must have unit stride along dim 1");
    STD_TORCH_CHECK(y.size(0) <= 1 || (y.stride(0) >= 0 && dy.stride(0) >= 0),
                    "fastlm: y and dy must have non-negative row strides");
  } else {
    STD_TORCH_CHECK(y.is_contiguous(), "fastlm: y must be contiguous (or 2-D with unit last stride and dim == 1)");
    STD_TORCH_CHECK(dy.is_contiguous(), "fastlm: dy must be contiguous (or 2-D with unit last stride and dim == 1)");
  }
  int64_t outer, R, inner;
  split_dims(y, dim, outer, R, inner);
  STD_TORCH_CHECK(R <= kMaxR, "fastlm: softmax size ", R, " along dim ", dim, " exceeds ", kMaxR);

  torch::stable::accelerator::DeviceGuard guard(dev);
  Tensor dx = torch::stable::new_empty(y, y.sizes());
  if (y.numel() == 0) return dx;
  const cudaStream_t stream = current_stream(dev);
  dispatch_type(y.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec<T>;
    if (inner == 1) {
      BwdRowsArgs<T> a{};
      a.y = static_cast<const T*>(y.data_ptr());
      a.dy = static_cast<const T*>(dy.data_ptr());
      a.dx = static_cast<T*>(dx.data_ptr());
      a.rows = outer;
      a.sy = rows2d ? y.stride(0) : R;
      a.sdy = rows2d ? dy.stride(0) : R;
      a.R = static_cast<int>(R);
      a.scale = static_cast<float>(scale);
      a.log = log;
      a.vec = R % V == 0 && aligned16(a.y) && aligned16(a.dy) && aligned16(a.dx) &&
              stride_aligned(outer, a.sy, sizeof(T)) && stride_aligned(outer, a.sdy, sizeof(T));
      const int nchunks = (a.R + V - 1) / V;
      int tpr, rpb;
      row_shape(nchunks, tpr, rpb);
      const size_t cache_bytes = static_cast<size_t>(rpb) * 2 * nchunks * V * sizeof(float);
      a.cache = cache_bytes + kSmemMargin <= static_cast<size_t>(smem_optin(dev));
      const size_t smem = a.cache ? cache_bytes : 0;
      const int64_t blocks = (outer + rpb - 1) / rpb;
      STD_TORCH_CHECK(blocks <= INT_MAX, "fastlm: too many rows (", outer, ")");
      allow_dynamic_smem(softmax_bwd_rows_kernel<T>, smem);
      softmax_bwd_rows_kernel<T><<<static_cast<unsigned>(blocks), dim3(tpr, rpb), smem, stream>>>(a);
      check_cuda(cudaGetLastError(), "softmax_bwd_rows_kernel launch");
    } else {
      StridedArgs<T> a{};
      a.x = static_cast<const T*>(y.data_ptr());
      a.dy = static_cast<const T*>(dy.data_ptr());
      a.out = static_cast<T*>(dx.data_ptr());
      a.outer = outer;
      a.inner = inner;
      a.R = static_cast<int>(R);
      a.scale = static_cast<float>(scale);
      a.log = log;
      launch_strided(a, true, stream);
    }
  });
  return dx;
}

}  // namespace
}  // namespace fastlm

STABLE_TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("softmax_fwd_cuda", TORCH_BOX(&fastlm::softmax_fwd_cuda));
  m.impl("masked_softmax_fwd_cuda", TORCH_BOX(&fastlm::masked_softmax_fwd_cuda));
  m.impl("softmax_bwd_cuda", TORCH_BOX(&fastlm::softmax_bwd_cuda));
}
