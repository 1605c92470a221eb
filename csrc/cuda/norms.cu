// LayerNorm / RMSNorm with an optional fused residual add: forward and backward CUDA kernels, registered as
// the CUDA implementations of fastlm::norm_fwd_cuda and fastlm::norm_bwd_cuda (schemas in csrc/ops.cpp).
//
// Written against the LibTorch stable ABI only (torch/csrc/stable, TORCH_TARGET_VERSION = 2.10).
// Templates: element type T (float, __half, __nv_bfloat16) x weight type W (T or float): 5 combinations per
// kernel. Everything else (rms, residual, weight, bias, dh) is a runtime flag.
//
// Work layout shared by both directions: a row of N elements is cut into 16-byte chunks of V = 16/sizeof(T)
// elements; a "row group" of blockDim.x threads (a multiple of 32) owns one row, thread tx owns the chunks
// tx, tx + blockDim.x, ... ; a block holds blockDim.y row groups. Because a thread always revisits only its
// own chunks, per-thread caches and accumulators need no barriers; the only barriers are in the row
// reductions and before the backward's final cross-row-group sum.
//
// Numerics: all math in fp32; the build uses --use_fast_math (approximate division and rsqrt, ~2 ulp;
// denormals flushed to zero).
#include "common.cuh"
#include "launch.h"
#include "norm_checks.h"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

namespace fastlm {
namespace {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

// Shared memory kept free of dynamic allocations: the kernels' static smem (<= 256 B) plus the 1 KiB that
// sm_90 counts as reserved per block, with room to spare.
constexpr size_t kSmemMargin = 4096;

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

// ------------------------------------------------------------------------------------------------------------
// Host side.
// ------------------------------------------------------------------------------------------------------------
using norm_checks::dtype_name;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// A row of a (rows, N) tensor with row stride `stride` can be read in 16-byte chunks.
bool rows_aligned(const void* p, int64_t rows, int64_t stride, size_t elem) {
  return aligned16(p) && (rows <= 1 || (stride * static_cast<int64_t>(elem)) % 16 == 0);
}

struct DeviceInfo {
  int sms;
  int smem_optin;  // max shared memory per block with opt-in, bytes
};

DeviceInfo device_info(int dev) {
  DeviceInfo d{};
  check_cuda(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
             "cudaDeviceGetAttribute");
  return d;
}

// Above 48 KiB of dynamic shared memory a kernel must opt in. The limit is always set to the same value (the
// most any launch here asks for), so concurrent host threads launching with different sizes cannot undo it.
template <typename K>
void allow_dynamic_smem(K* kernel, size_t bytes, const DeviceInfo& di) {
  if (bytes > 40 * 1024) {
    const int limit = di.smem_optin - static_cast<int>(kSmemMargin);
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
}

int round_up(int v, int m) { return (v + m - 1) / m * m; }

// Threads per row: about `per_thread` chunks each, a multiple of 32 in [32, 1024]. Rows per block: enough to
// reach 256 threads for narrow rows.
void row_shape(int nchunks, int per_thread, int& tpr, int& rpb) {
  tpr = std::min(1024, std::max(32, round_up((nchunks + per_thread - 1) / per_thread, 32)));
  rpb = std::max(1, 256 / tpr);
}

void check_cuda_tensor(const Tensor& t, const char* name, int32_t dev) {
  STD_TORCH_CHECK(t.is_cuda(), "fastlm: ", name, " must be a CUDA tensor");
  STD_TORCH_CHECK(t.get_device_index() == dev, "fastlm: ", name, " is on cuda:", t.get_device_index(),
                  " but x is on cuda:", dev, "; all tensors must be on the same device");
}

// The device is checked here; everything else by the checks shared with the CPU kernels (csrc/norm_checks.h).
void check_matrix(const Tensor& t, const char* name, const Tensor& x, int32_t dev) {
  check_cuda_tensor(t, name, dev);
  norm_checks::check_matrix(t, name, x);
}

void check_param(const Tensor& t, const char* name, const Tensor& x, int32_t dev) {
  check_cuda_tensor(t, name, dev);
  norm_checks::check_param(t, name, x);
}

void check_stat(const Tensor& t, const char* name, int64_t M, int32_t dev) {
  check_cuda_tensor(t, name, dev);
  norm_checks::check_stat(t, name, M);
}

void check_x(const Tensor& x, const char* name) {
  STD_TORCH_CHECK(x.is_cuda(), "fastlm: ", name, " must be a CUDA tensor");
  norm_checks::check_x(x, name);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_cuda(const Tensor& x, const std::optional<Tensor>& residual,
                                                         const std::optional<Tensor>& weight,
                                                         const std::optional<Tensor>& bias_in, double eps,
                                                         bool rms) {
  check_x(x, "x");
  const int32_t dev = x.get_device_index();
  const int64_t M = x.size(0);
  const int N = static_cast<int>(x.size(1));
  const ScalarType xt = x.scalar_type();
  if (residual) check_matrix(*residual, "residual", x, dev);
  if (weight) check_param(*weight, "weight", x, dev);
  const std::optional<Tensor> bias = rms ? std::nullopt : bias_in;  // RMSNorm has no bias: ignored
  if (bias) check_param(*bias, "bias", x, dev);
  if (weight && bias) {
    STD_TORCH_CHECK(weight->scalar_type() == bias->scalar_type(), "fastlm: weight (",
                    dtype_name(weight->scalar_type()), ") and bias (", dtype_name(bias->scalar_type()),
                    ") must have the same dtype");
  }
  const ScalarType wt = weight ? weight->scalar_type() : bias ? bias->scalar_type() : xt;

  torch::stable::accelerator::DeviceGuard guard(dev);
  Tensor y = torch::stable::new_empty(x, {M, static_cast<int64_t>(N)});
  Tensor h = residual ? torch::stable::new_empty(x, {M, static_cast<int64_t>(N)}) : torch::stable::new_empty(x, {0});
  Tensor mean = torch::stable::new_empty(x, {rms ? 0 : M}, ScalarType::Float);
  Tensor rstd = torch::stable::new_empty(x, {M}, ScalarType::Float);
  if (M == 0) return {y, h, mean, rstd};

  const DeviceInfo di = device_info(dev);
  const cudaStream_t stream = current_stream(dev);
  norm_checks::dispatch_types<__half, __nv_bfloat16>(xt, wt, [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    constexpr int V = kVec<T>;
    FwdArgs<T, W> a{};
    a.x = static_cast<const T*>(x.data_ptr());
    a.res = residual ? static_cast<const T*>(residual->data_ptr()) : nullptr;
    a.w = weight ? static_cast<const W*>(weight->data_ptr()) : nullptr;
    a.b = bias ? static_cast<const W*>(bias->data_ptr()) : nullptr;
    a.y = static_cast<T*>(y.data_ptr());
    a.h = residual ? static_cast<T*>(h.data_ptr()) : nullptr;
    a.mean = rms ? nullptr : static_cast<float*>(mean.data_ptr());
    a.rstd = static_cast<float*>(rstd.data_ptr());
    a.M = M;
    a.sx = x.stride(0);
    a.sr = residual ? residual->stride(0) : 0;
    a.N = N;
    a.eps = static_cast<float>(eps);
    a.rms = rms;
    a.vec = N % V == 0 && rows_aligned(a.x, M, a.sx, sizeof(T)) &&
            (!a.res || rows_aligned(a.res, M, a.sr, sizeof(T))) && (!a.w || aligned16(a.w)) &&
            (!a.b || aligned16(a.b)) && aligned16(a.y) && (!a.h || aligned16(a.h));

    const int nchunks = (N + V - 1) / V;
    int tpr, rpb;
    row_shape(nchunks, 4, tpr, rpb);
    const size_t cache_bytes = static_cast<size_t>(rpb) * nchunks * 16;
    a.cache = cache_bytes + kSmemMargin <= static_cast<size_t>(di.smem_optin);
    const size_t smem = a.cache ? cache_bytes : 0;
    const int64_t blocks = (M + rpb - 1) / rpb;
    STD_TORCH_CHECK(blocks <= 0x7fffffff, "fastlm: too many rows (", M, ")");
    allow_dynamic_smem(norm_fwd_kernel<T, W>, smem, di);
    norm_fwd_kernel<T, W><<<static_cast<unsigned>(blocks), dim3(tpr, rpb), smem, stream>>>(a);
    check_cuda(cudaGetLastError(), "norm_fwd_kernel launch");
  });
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_cuda(const Tensor& dy, const Tensor& x,
                                                 const std::optional<Tensor>& weight, const Tensor& mean,
                                                 const Tensor& rstd, const std::optional<Tensor>& dh, bool rms,
                                                 bool has_bias) {
  check_x(x, "x");
  const int32_t dev = x.get_device_index();
  const int64_t M = x.size(0);
  const int N = static_cast<int>(x.size(1));
  const ScalarType xt = x.scalar_type();
  check_matrix(dy, "dy", x, dev);
  if (dh) check_matrix(*dh, "dh", x, dev);
  if (weight) check_param(*weight, "weight", x, dev);
  if (!rms) check_stat(mean, "mean", M, dev);
  check_stat(rstd, "rstd", M, dev);
  const ScalarType wt = weight ? weight->scalar_type() : xt;
  const bool need_dw = weight.has_value();
  const bool need_db = has_bias && !rms;
  // db takes the weight's dtype; without a weight it stays float32 (the caller casts it to the bias dtype).
  const ScalarType out_t = weight ? wt : ScalarType::Float;

  torch::stable::accelerator::DeviceGuard guard(dev);
  Tensor dx = torch::stable::new_empty(x, {M, static_cast<int64_t>(N)});
  Tensor dw = torch::stable::new_empty(x, {need_dw ? static_cast<int64_t>(N) : 0}, out_t);  // (0,) fp32 without weight
  Tensor db = torch::stable::new_empty(x, {need_db ? static_cast<int64_t>(N) : 0}, out_t);
  if (M == 0) {
    torch::stable::zero_(dw);
    torch::stable::zero_(db);
    return {dx, dw, db};
  }

  const DeviceInfo di = device_info(dev);
  const cudaStream_t stream = current_stream(dev);
  norm_checks::dispatch_types<__half, __nv_bfloat16>(xt, wt, [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    constexpr int V = kVec<T>;
    const int nchunks = (N + V - 1) / V;
    const int npad = nchunks * V;
    const int nacc = (need_dw ? 1 : 0) + (need_db ? 1 : 0);
    int tpr, rpb;
    row_shape(nchunks, 2, tpr, rpb);
    const size_t acc_bytes = static_cast<size_t>(rpb) * nacc * npad * sizeof(float);
    const bool smem_acc = nacc > 0 && acc_bytes + kSmemMargin <= static_cast<size_t>(di.smem_optin);
    // Without shared-memory accumulators each block's workspace row must belong to one row group.
    if (nacc > 0 && !smem_acc) rpb = 1;
    // G blocks: enough to fill every SM with 2048 threads, never more than there are row groups. G depends
    // only on (M, N, dtypes, SM count), so the partial-sum layout, hence dw/db, are reproducible.
    const int64_t groups = (M + rpb - 1) / rpb;
    const int64_t per_sm = std::max(1, 2048 / (tpr * rpb));
    const int64_t G = std::min<int64_t>(groups, static_cast<int64_t>(di.sms) * per_sm);
    STD_TORCH_CHECK(G <= 0x7fffffff, "fastlm: too many rows (", M, ")");
    Tensor ws_dw = torch::stable::new_empty(x, {need_dw ? G : 0, need_dw ? npad : 0}, ScalarType::Float);
    Tensor ws_db = torch::stable::new_empty(x, {need_db ? G : 0, need_db ? npad : 0}, ScalarType::Float);

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
    a.sdy = dy.stride(0);
    a.sx = x.stride(0);
    a.sdh = dh ? dh->stride(0) : 0;
    a.N = N;
    a.rms = rms;
    a.vec = N % V == 0 && rows_aligned(a.dy, M, a.sdy, sizeof(T)) && rows_aligned(a.x, M, a.sx, sizeof(T)) &&
            (!a.dh || rows_aligned(a.dh, M, a.sdh, sizeof(T))) && (!a.w || aligned16(a.w)) && aligned16(a.dx);
    // Accumulator chunks are accessed as whole 16-byte words: the workspaces come from the caching allocator
    // (>= 256-byte aligned) and npad * 4 is a multiple of 16.
    STD_TORCH_CHECK((!a.pdw || aligned16(a.pdw)) && (!a.pdb || aligned16(a.pdb)), "fastlm: misaligned workspace");
    a.smem_acc = smem_acc;
    const size_t smem = smem_acc ? acc_bytes : 0;
    allow_dynamic_smem(norm_bwd_kernel<T, W>, smem, di);
    norm_bwd_kernel<T, W><<<static_cast<unsigned>(G), dim3(tpr, rpb), smem, stream>>>(a);
    check_cuda(cudaGetLastError(), "norm_bwd_kernel launch");

    if (nacc == 0) return;
    const float* ws0 = need_dw ? a.pdw : a.pdb;
    const float* ws1 = need_dw && need_db ? a.pdb : nullptr;
    const dim3 grid((N + 31) / 32, nacc);
    auto launch_col_sum = [&](auto o_tag) {
      using O = decltype(o_tag);
      O* out0 = static_cast<O*>(need_dw ? dw.data_ptr() : db.data_ptr());
      O* out1 = need_dw && need_db ? static_cast<O*>(db.data_ptr()) : nullptr;
      col_sum_kernel<O><<<grid, dim3(32, 32), 0, stream>>>(ws0, ws1, out0, out1, G, N, npad);
      check_cuda(cudaGetLastError(), "col_sum_kernel launch");
    };
    // dw and db share one dtype: the weight's (W), or float32 when there is no weight (then only db exists).
    if (weight) {
      launch_col_sum(W{});
    } else {
      launch_col_sum(float{});
    }
  });
  return {dx, dw, db};
}

}  // namespace
}  // namespace fastlm

STABLE_TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("norm_fwd_cuda", TORCH_BOX(&fastlm::norm_fwd_cuda));
  m.impl("norm_bwd_cuda", TORCH_BOX(&fastlm::norm_bwd_cuda));
}
