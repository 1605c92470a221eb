// Fused cross-entropy forward (loss and gradient in one pass over the logits; the softmax is never stored): CUDA
// kernels registered as the CUDA implementation of fastlm::cross_entropy_fwd_cuda (schema in csrc/ops.cpp). Same
// op contract as the Triton op in fastlm/ops/cross_entropy.py (kernels/cross_entropy.py).
//
// Written against the LibTorch stable ABI only (torch/csrc/stable, TORCH_TARGET_VERSION = 2.10).
// Templates: the element type T (float, __half, __nv_bfloat16) only; everything else is a runtime flag.
//
// For a row of logits x (C classes), target t, class weights w (1 without), smoothing eps:
//   lse  = log(sum(exp(x)))   (online max and sum)
//   loss = (1 - eps) * w_t * (lse - x_t) + eps / C * (W * lse - sum_c w_c x_c),   W = sum_c w_c (C without weights)
//   grad = (1 - eps) * w_t * (p_c - [c == t]) + eps / C * (W * p_c - w_c),  p = softmax(x), times 1 / denom (mean)
// Rows with t == ignore_index: loss 0, grad 0; other t outside [0, C): loss and grad NaN (no device assert).
//
// Launches, all on the current stream, no host sync:
//  1. (mean) ce_denom_kernel, one block: denom = sum over non-ignored rows of w[clamp(t, 0, C - 1)] (count
//     without weights), as the Triton op's torch expression.
//  2. ce_rows_kernel (input (N, C) with unit class stride) or ce_strided_kernel (contiguous (N, C, D), D > 1):
//     per-row loss (float32, not divided) and, if asked, the gradient (which reads denom).
//  3. (mean / sum) ce_reduce_kernel, one block: the fixed-order sum of the per-row losses (/ denom).
// Every reduction has a fixed order set by the launch shape: the loss and the gradient are bitwise reproducible.
//
// Work layouts: as csrc/cuda/softmax.cu. Rows: a row group of blockDim.x threads per row, thread tx owns the
// 16-byte chunks tx, tx + blockDim.x, ...; pass 1 (statistics) and pass 2 (gradient) both read the logits from
// global memory (pass 2 mostly hits L2). Strided: block (bx, by), bx lanes over consecutive d (coalesced), by
// threads split the classes of each row, partials combined through shared memory in a fixed order.
// Bytes moved per row: reads C * sizeof(T) (x) twice when the gradient is asked for [+ C * 4 weights, L2-resident],
// writes C * sizeof(T) (grad) + 4 (loss).
//
// Numerics: all math in fp32; the build uses --use_fast_math (exp/log via ex2/lg2.approx). The mean's division
// and 1 / denom are IEEE-rounded (__fdiv_rn / __frcp_rn): 0 / 0 = NaN as torch; eps / C comes from the host.
#include "checks.h"
#include "common.cuh"
#include "launch.h"

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace fastlm {
namespace {

constexpr int64_t kMaxC = INT_MAX / 2;  // keeps class indices and chunk counts in int
constexpr int kStridedThreads = 256;
constexpr int kReduceThreads = 1024;

template <typename T>
struct CeArgs {
  const T* x;
  const int64_t* target;  // (rows,)
  const float* w;         // (C,) or nullptr
  float* losses;          // (rows,)
  T* grad;                // input's shape, contiguous; nullptr: no gradient
  const float* denom;     // (1,) device scalar for the mean; nullptr otherwise
  int64_t rows;           // N * D
  int64_t D;              // trailing size: row r = (n, d) = (r / D, r % D); classes D apart
  int64_t sn;             // x stride of n (elements)
  int64_t nib;            // strided: blocks per n, ceil(D / blockDim.x)
  int64_t ignore_index;
  int C;
  float eps;
  float eps_c;  // eps / C (computed on the host)
  bool smooth;  // eps > 0: the smoothing terms are computed
  bool vec;     // rows layout: every x row, grad and w 16-byte aligned and C % V == 0
};

// The per-row loss from the row statistics (identical in every thread of the row).
struct RowLoss {
  float loss;
  float w_t;
  float W;
  bool valid;
  bool ignored;
};

template <typename T>
__device__ __forceinline__ RowLoss row_loss(const CeArgs<T>& a, const T* xr, int64_t t, float lse, float sx,
                                            float sw) {
  RowLoss o;
  o.ignored = t == a.ignore_index;
  o.valid = t >= 0 && t < a.C;
  const int64_t ts = o.valid ? t : 0;
  const float x_t = to_float(xr[ts * a.D]);
  o.w_t = a.w ? a.w[ts] : 1.f;
  o.W = a.w ? sw : static_cast<float>(a.C);
  float loss = (1.f - a.eps) * o.w_t * (lse - x_t);
  if (a.smooth) loss += a.eps_c * (o.W * lse - sx);
  if (!o.valid) loss = NAN;
  if (o.ignored) loss = 0.f;
  o.loss = loss;
  return o;
}

// The gradient of element c (logit xc, class weight wc) of a row.
template <typename T>
__device__ __forceinline__ float grad_elem(const CeArgs<T>& a, const RowLoss& rl, int64_t t, float lse, float coef,
                                           float smc, int c, float xc, float wc) {
  const float p = __expf(xc - lse);
  float g = coef * (p - (c == t ? 1.f : 0.f));
  if (a.smooth) g += smc * (rl.W * p - wc);
  if (!rl.valid) g = NAN;
  if (rl.ignored) g = 0.f;
  return g;
}

// ------------------------------------------------------------------------------------------------------------
// Rows layout: input (N, C), unit class stride, row n at n * sn; grad row at n * C. One row group per row.
// ------------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(1024) ce_rows_kernel(const CeArgs<T> a) {
  constexpr int V = kVec<T>;
  __shared__ float scratch[32];
  __shared__ float2 scratch2[32];
  const int C = a.C;
  const int nchunks = (C + V - 1) / V;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < a.rows;
  // Rows past the end (last block) skip the loops but still take part in the reductions (they hold barriers).
  const int end = active ? nchunks : 0;
  const int64_t r = active ? row : 0;
  const T* xr = a.x + r * a.sn;
  const bool load_w = a.smooth && a.w != nullptr;

  // Pass 1: running max and sum of exp; with smoothing, sum_c w_c x_c and sum_c w_c.
  float m = -INFINITY, l = 0.f, sx = 0.f, sw = 0.f;
  for (int c = threadIdx.x; c < end; c += blockDim.x) {
    const int col0 = c * V;
    float v[V];
    load_chunk<V>(xr, col0, C, a.vec, v);
    if (a.smooth) {
      float wv[V];
      if (load_w) {
        load_chunk<V>(a.w, col0, C, a.vec, wv);  // 0 beyond C
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) wv[k] = col0 + k < C ? 1.f : 0.f;
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (col0 + k < C) {
          sx += wv[k] * v[k];
          sw += wv[k];
        }
      }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (col0 + k >= C) v[k] = -INFINITY;
    }
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
  const float shift = softmax_shift(M);
  float L = l * __expf(m - shift);
  // a.smooth is uniform over the block: every thread takes the same branch (barriers inside).
  if (a.smooth) {
    row_sum2(L, sx, scratch2);
    sw = row_sum(sw, scratch);
  } else {
    L = row_sum(L, scratch);
  }
  const float lse = shift + __logf(L);
  const int64_t t = a.target[r];
  const RowLoss rl = row_loss(a, xr, t, lse, sx, sw);
  if (active && threadIdx.x == 0) a.losses[r] = rl.loss;
  if (a.grad == nullptr) return;

  // Pass 2: the gradient.
  const float scale = a.denom ? __frcp_rn(*a.denom) : 1.f;
  const float coef = (1.f - a.eps) * rl.w_t * scale;
  const float smc = a.eps_c * scale;
  T* gr = a.grad + r * C;
  for (int c = threadIdx.x; c < end; c += blockDim.x) {
    const int col0 = c * V;
    float v[V];
    load_chunk<V>(xr, col0, C, a.vec, v);
    float wv[V];
    if (load_w) {
      load_chunk<V>(a.w, col0, C, a.vec, wv);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) wv[k] = 1.f;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = grad_elem(a, rl, t, lse, coef, smc, col0 + k, v[k], wv[k]);
    store_chunk<V>(gr, col0, C, a.vec, v);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Strided layout: input contiguous (N, C, D), element (n, c, d) at n * sn + c * D + d (sn = C * D); grad likewise.
// ------------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kStridedThreads) ce_strided_kernel(const CeArgs<T> a) {
  __shared__ float4 part[kStridedThreads];
  const int64_t n = blockIdx.x / a.nib;
  const int64_t d = (blockIdx.x % a.nib) * blockDim.x + threadIdx.x;
  const bool active = d < a.D;
  const int C = a.C;
  const int cend = active ? C : 0;
  const int64_t base = n * a.sn + (active ? d : 0);
  const T* xr = a.x + base;

  float m = -INFINITY, l = 0.f, sx = 0.f, sw = 0.f;
  for (int c = threadIdx.y; c < cend; c += blockDim.y) {
    const float xc = to_float(xr[c * a.D]);
    if (a.smooth) {
      const float wc = a.w ? a.w[c] : 1.f;
      sx += wc * xc;
      sw += wc;
    }
    const float mn = fmaxf(m, xc);
    const float sh = softmax_shift(mn);
    l = l * __expf(m - sh) + __expf(xc - sh);
    m = mn;
  }
  part[threadIdx.y * blockDim.x + threadIdx.x] = make_float4(m, l, sx, sw);
  __syncthreads();
  // Every thread of lane tx combines the blockDim.y partials in the same order: identical results.
  float M = -INFINITY;
  for (int i = 0; i < static_cast<int>(blockDim.y); ++i) M = fmaxf(M, part[i * blockDim.x + threadIdx.x].x);
  const float shift = softmax_shift(M);
  float L = 0.f;
  sx = 0.f;
  sw = 0.f;
  for (int i = 0; i < static_cast<int>(blockDim.y); ++i) {
    const float4 p = part[i * blockDim.x + threadIdx.x];
    L += p.y * __expf(p.x - shift);
    sx += p.z;
    sw += p.w;
  }
  const float lse = shift + __logf(L);
  const int64_t r = n * a.D + (active ? d : 0);
  const int64_t t = a.target[r];
  const RowLoss rl = row_loss(a, xr, t, lse, sx, sw);
  if (active && threadIdx.y == 0) a.losses[r] = rl.loss;
  if (a.grad == nullptr) return;

  const float scale = a.denom ? __frcp_rn(*a.denom) : 1.f;
  const float coef = (1.f - a.eps) * rl.w_t * scale;
  const float smc = a.eps_c * scale;
  T* gr = a.grad + base;
  for (int c = threadIdx.y; c < cend; c += blockDim.y) {
    const float xc = to_float(xr[c * a.D]);
    const float wc = a.w ? a.w[c] : 1.f;
    gr[c * a.D] = from_float<T>(grad_elem(a, rl, t, lse, coef, smc, c, xc, wc));
  }
}

// ------------------------------------------------------------------------------------------------------------
// Single-block reductions (blockDim = (kReduceThreads, 1)): deterministic, no atomics.
// ------------------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kReduceThreads)
    ce_denom_kernel(const int64_t* __restrict__ target, const float* __restrict__ w, int64_t rows, int C,
                    int64_t ignore_index, float* __restrict__ denom) {
  __shared__ float scratch[32];
  float acc = 0.f;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    const int64_t t = target[r];
    if (t != ignore_index) acc += w ? w[std::min<int64_t>(std::max<int64_t>(t, 0), C - 1)] : 1.f;
  }
  acc = row_sum(acc, scratch);
  if (threadIdx.x == 0) *denom = acc;
}

__global__ void __launch_bounds__(kReduceThreads)
    ce_reduce_kernel(const float* __restrict__ losses, int64_t rows, const float* __restrict__ denom,
                     float* __restrict__ out) {
  __shared__ float scratch[32];
  float acc = 0.f;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) acc += losses[r];
  acc = row_sum(acc, scratch);
  if (threadIdx.x == 0) *out = denom ? __fdiv_rn(acc, *denom) : acc;
}

// ------------------------------------------------------------------------------------------------------------
// Host side.
// ------------------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> cross_entropy_fwd_cuda(const Tensor& input, const Tensor& target,
                                                  const std::optional<Tensor>& weight, int64_t ignore_index,
                                                  double label_smoothing, int64_t reduction, bool compute_grad) {
  check_cuda_float(input, "input");
  const int32_t dev = input.get_device_index();
  const ce::Shape s = ce::input_shape(input);
  const int64_t N = s.N, C = s.C, D = s.D, rows = s.rows;
  STD_TORCH_CHECK(C >= 1 && C <= kMaxC, "fastlm: the number of classes C = ", C, " must be in [1, ", kMaxC, "]");
  ce::check_input_layout(input, s, true);
  ce::check_target_weight(target, weight, reduction, s, CudaDevice{dev, "input", ""});

  torch::stable::accelerator::DeviceGuard guard(dev);
  Tensor losses = torch::stable::new_empty(input, {rows}, ScalarType::Float);
  Tensor grad = compute_grad ? torch::stable::new_empty(input, input.sizes()) : torch::stable::new_empty(input, {0});
  Tensor loss = reduction == 0 ? losses : torch::stable::new_empty(input, std::vector<int64_t>{}, ScalarType::Float);
  Tensor denom = torch::stable::new_empty(input, {reduction == 1 ? 1 : 0}, ScalarType::Float);
  const cudaStream_t stream = current_stream(dev);
  const float* w = weight ? static_cast<const float*>(weight->data_ptr()) : nullptr;
  const int64_t* tp = static_cast<const int64_t*>(target.data_ptr());
  float* dp = reduction == 1 ? static_cast<float*>(denom.data_ptr()) : nullptr;

  if (reduction == 1) {
    ce_denom_kernel<<<1, kReduceThreads, 0, stream>>>(tp, w, rows, static_cast<int>(C), ignore_index, dp);
    check_cuda(cudaGetLastError(), "ce_denom_kernel launch");
  }
  if (rows > 0) {
    dispatch_float<__half, __nv_bfloat16>(input.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      constexpr int V = kVec<T>;
      CeArgs<T> a{};
      ce::set_args<T>(a, input, tp, w, static_cast<float*>(losses.data_ptr()),
                      compute_grad ? static_cast<T*>(grad.data_ptr()) : nullptr, s, ignore_index, label_smoothing);
      a.denom = dp;
      a.rows = rows;
      a.smooth = label_smoothing > 0.0;
      if (D == 1) {
        a.vec = C % V == 0 && aligned16(a.x) && stride_aligned(N, a.sn, sizeof(T)) && (!a.grad || aligned16(a.grad)) &&
                (!a.w || aligned16(a.w));
        // No row cache: pass 2 re-reads the logits (mostly from L2).
        const RowsLaunch l = rows_launch(rows, static_cast<int>((C + V - 1) / V), 4, 0, 0);
        ce_rows_kernel<T><<<l.blocks, l.block, 0, stream>>>(a);
        check_cuda(cudaGetLastError(), "ce_rows_kernel launch");
      } else {
        int bx, by;
        strided_shape(D, C, kStridedThreads, bx, by);
        a.nib = (D + bx - 1) / bx;
        STD_TORCH_CHECK(N <= INT_MAX / a.nib, "fastlm: input too large for the strided cross-entropy launch");
        ce_strided_kernel<T><<<static_cast<unsigned>(N * a.nib), dim3(bx, by), 0, stream>>>(a);
        check_cuda(cudaGetLastError(), "ce_strided_kernel launch");
      }
    });
  }
  if (reduction != 0) {
    ce_reduce_kernel<<<1, kReduceThreads, 0, stream>>>(static_cast<const float*>(losses.data_ptr()), rows, dp,
                                                       static_cast<float*>(loss.data_ptr()));
    check_cuda(cudaGetLastError(), "ce_reduce_kernel launch");
  }
  return {loss, grad};
}

}  // namespace
}  // namespace fastlm

STABLE_TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("cross_entropy_fwd_cuda", TORCH_BOX(&fastlm::cross_entropy_fwd_cuda));
}
