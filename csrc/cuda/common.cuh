// Small device helpers shared by the fastlm CUDA kernels: fp32 <-> storage type conversion, 16-byte chunk
// loads/stores with a scalar fallback, and deterministic row reductions.
//
// cpp_extension compiles with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__, so every
// conversion goes through the explicit intrinsics below.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastlm {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The value v takes once stored as T (round to nearest even), back in fp32.
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// Elements of T per 16-byte chunk: the unit of work of every kernel (4 for fp32, 8 for fp16/bf16).
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// Loads the V elements [col0, col0 + V) of a row of n elements of type E, widened to fp32.
// vec == true promises: p + col0 is 16-byte aligned and col0 + V <= n (the host checks n % V == 0 and the
// alignment of every row). Otherwise element-wise loads, and elements at or beyond n read as 0.
template <int V, typename E>
__device__ __forceinline__ void load_chunk(const E* __restrict__ p, int col0, int n, bool vec, float (&out)[V]) {
  static_assert((V * sizeof(E)) % 16 == 0, "a chunk must be a whole number of 16-byte words");
  if (vec) {
    constexpr int kWords = V * static_cast<int>(sizeof(E)) / 16;
    uint4 raw[kWords];
    const uint4* src = reinterpret_cast<const uint4*>(p + col0);
#pragma unroll
    for (int i = 0; i < kWords; ++i) raw[i] = src[i];
    E e[V];
    memcpy(e, raw, sizeof(e));  // not a reinterpret_cast: keeps clear of strict aliasing
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = to_float(e[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = (col0 + k < n) ? to_float(p[col0 + k]) : 0.f;
  }
}

// Stores V fp32 values rounded to E at [col0, col0 + V), same contract as load_chunk (nothing is written at
// or beyond n).
template <int V, typename E>
__device__ __forceinline__ void store_chunk(E* __restrict__ p, int col0, int n, bool vec, const float (&in)[V]) {
  static_assert((V * sizeof(E)) % 16 == 0, "a chunk must be a whole number of 16-byte words");
  if (vec) {
    constexpr int kWords = V * static_cast<int>(sizeof(E)) / 16;
    E e[V];
#pragma unroll
    for (int k = 0; k < V; ++k) e[k] = from_float<E>(in[k]);
    uint4 raw[kWords];
    memcpy(raw, e, sizeof(e));
    uint4* dst = reinterpret_cast<uint4*>(p + col0);
#pragma unroll
    for (int i = 0; i < kWords; ++i) dst[i] = raw[i];
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (col0 + k < n) p[col0 + k] = from_float<E>(in[k]);
    }
  }
}

// Butterfly sum over a full warp. Every lane ends with the same bits (a + b == b + a exactly in IEEE), so all
// threads of a row see identical statistics.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the blockDim.x threads that share threadIdx.y (one "row group"); the result lands in all of them.
// Requirements: blockDim.x is a multiple of 32 (a warp never spans two row groups), blockDim.x * blockDim.y
// <= 1024, scratch is __shared__ with >= 32 entries, and every thread of the block calls it (it may
// __syncthreads). The order of additions is fixed by the launch shape: deterministic.
__device__ __forceinline__ float row_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int nw = blockDim.x >> 5;
  if (nw == 1) return v;  // uniform over the block, so no thread skips a barrier another one waits at
  const int lane = threadIdx.x & 31;
  const int warp = (threadIdx.y * blockDim.x + threadIdx.x) >> 5;
  __syncthreads();  // the previous call's readers of scratch are done
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const float r = lane < nw ? scratch[threadIdx.y * nw + lane] : 0.f;
  return warp_sum(r);
}

// Two sums at once (one pair of barriers instead of two); same contract as row_sum, scratch has >= 32 float2.
__device__ __forceinline__ void row_sum2(float& a, float& b, float2* scratch) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int nw = blockDim.x >> 5;
  if (nw == 1) return;
  const int lane = threadIdx.x & 31;
  const int warp = (threadIdx.y * blockDim.x + threadIdx.x) >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = make_float2(a, b);
  __syncthreads();
  const float2 r = lane < nw ? scratch[threadIdx.y * nw + lane] : make_float2(0.f, 0.f);
  a = warp_sum(r.x);
  b = warp_sum(r.y);
}

// Max over a full warp (fmaxf: a NaN operand is dropped, so callers that need NaN propagation carry it in a
// sum, as the softmax kernels do through their sum of exponentials). Order-independent, hence deterministic.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Max over the blockDim.x threads that share threadIdx.y; same contract as row_sum (and may share its scratch).
__device__ __forceinline__ float row_max(float v, float* scratch) {
  v = warp_max(v);
  const int nw = blockDim.x >> 5;
  if (nw == 1) return v;
  const int lane = threadIdx.x & 31;
  const int warp = (threadIdx.y * blockDim.x + threadIdx.x) >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const float r = lane < nw ? scratch[threadIdx.y * nw + lane] : -INFINITY;
  return warp_max(r);
}

// The shift used for exp(v - shift) in a softmax whose running max is m: m itself, or 0 when m == -inf (no
// finite value seen yet), so that exp(-inf - shift) is 0 and never exp(-inf + inf) = NaN.
__device__ __forceinline__ float softmax_shift(float m) { return m == -INFINITY ? 0.f : m; }

// 16-byte aligned dynamic shared memory, shared by all kernels of a translation unit.
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char fastlm_dyn_smem[];
  return fastlm_dyn_smem;
}

}  // namespace fastlm
