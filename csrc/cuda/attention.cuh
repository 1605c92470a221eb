// Shared device and host code of the fastlm flash-attention CUDA kernels (attention_fwd.cu, attention_bwd.cu):
// cp.async tile loaders into swizzled shared memory, ldmatrix / mma.sync m16n8k16 wrappers, fragment helpers,
// and the host side common to the forward and the backward (argument checks, kernel parameters, dispatch).
//
// Conventions (all kernels): 4 warps (128 threads) per block; a warp owns 16 rows of the "M" side of its
// matmuls. mma.sync m16n8k16 fragment layout (g = lane / 4, t = lane % 4):
//   A (16x16, row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, k-major):    b0 = (k = 2t..2t+1, n = g), b1 = (k = 2t+8..2t+9, n = g)
//   C (16x8, fp32):       c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// Shared-memory tiles are (rows, D) row-major with D in {64, 128} elements (8 or 16 16-byte chunks per row);
// chunk c of row r lives at chunk (c ^ (r & 7)): the 8 rows an ldmatrix reads at one logical chunk hit 8
// distinct 16-byte bank groups (no bank conflicts), and cp.async writes stay 16-byte aligned.
#pragma once

#include "checks.h"
#include "common.cuh"
#include "launch.h"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <optional>

namespace fastlm {
namespace attn {

constexpr int kThreads = 128;  // 4 warps
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+).
// ------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; when !valid, 16 zero bytes are written and nothing is read (the
// source must still be a valid address: callers pass the tensor's base).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}

// 4-byte async copy (zero-filled when !valid).
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// c += a * b, m16n8k16, fp32 accumulate; T selects f16 or bf16 inputs.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two fp32 -> one 32-bit register of two T (lo in the low half: the element with the smaller column index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, 4);
  return r;
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, 4);
  return r;
}

// ------------------------------------------------------------------------------------------------------------
// Swizzled (rows, D) tiles.
// ------------------------------------------------------------------------------------------------------------

// Element offset of (row, 8-element chunk c) in a swizzled tile of row length D.
template <int D>
__device__ __forceinline__ int swz(int row, int c) {
  return row * D + ((c ^ (row & 7)) << 3);
}

// Async load of rows [0, ROWS) of a tile whose row r is at src + r * stride (elements); rows r >= valid are
// zero-filled. All kThreads threads call it; the caller commits the group.
template <int ROWS, int D, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* __restrict__ src, int64_t stride, int valid) {
  constexpr int kChunks = D / 8;
  constexpr int kTotal = ROWS * kChunks;
  static_assert(kTotal % kThreads == 0, "tile chunks must split evenly over the block");
  const uint32_t base = smem_u32(smem);
#pragma unroll
  for (int i = 0; i < kTotal / kThreads; ++i) {
    const int idx = i * kThreads + static_cast<int>(threadIdx.x);
    const int r = idx / kChunks;
    const int c = idx % kChunks;
    const bool ok = r < valid;
    const T* p = ok ? src + r * stride + c * 8 : src;
    cp_async16(base + swz<D>(r, c) * static_cast<int>(sizeof(T)), p, ok);
  }
}

// ldmatrix address for the A operand (16 rows x 16 cols, row-major in the tile) at (row0, col0): lanes 0-7
// rows 0-7 / cols 0-7, lanes 8-15 rows 8-15 / cols 0-7, lanes 16-23 rows 0-7 / cols 8-15, lanes 24-31 rows
// 8-15 / cols 8-15, giving a0..a3 with ldsm_x4.
template <int D, typename T>
__device__ __forceinline__ uint32_t a_addr(uint32_t base, int row0, int col0, int lane) {
  const int r = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int c = (col0 >> 3) + (lane >> 4);
  return base + swz<D>(r, c) * static_cast<int>(sizeof(T));
}

// ldmatrix (non-transposed) address for B = tile^T, i.e. B[k][n] = tile[n][k] (tile rows are the n index):
// two n-blocks of 8 (n0, n0 + 8) x k16 at k0. ldsm_x4 gives b0, b1 of n-block n0, then b0, b1 of n0 + 8.
template <int D, typename T>
__device__ __forceinline__ uint32_t bt_addr(uint32_t base, int n0, int k0, int lane) {
  const int r = n0 + (lane & 7) + (lane >> 4) * 8;
  const int c = (k0 >> 3) + ((lane >> 3) & 1);
  return base + swz<D>(r, c) * static_cast<int>(sizeof(T));
}

// ldmatrix.trans address for B = tile, i.e. B[k][n] = tile[k][n] (tile rows are the k index): k16 at k0 x two
// n-blocks of 8 (n0, n0 + 8). ldsm_x4_t gives b0, b1 of n-block n0, then b0, b1 of n0 + 8.
template <int D, typename T>
__device__ __forceinline__ uint32_t b_addr(uint32_t base, int k0, int n0, int lane) {
  const int r = k0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int c = (n0 >> 3) + (lane >> 4);
  return base + swz<D>(r, c) * static_cast<int>(sizeof(T));
}

// Butterfly over the 4 lanes of a quad (the lanes that share an accumulator row).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ------------------------------------------------------------------------------------------------------------
// Host helpers (inline: this header is included by several translation units).
// ------------------------------------------------------------------------------------------------------------

// The cases the CUDA kernels do not handle (the Python side routes them to Triton).
inline void check_scope(const std::optional<Tensor>& mask, const std::optional<Tensor>& cu_q,
                        const std::optional<Tensor>& cu_k, double dropout_p) {
  STD_TORCH_CHECK(!cu_q.has_value() && !cu_k.has_value(),
                  "fastlm: unsupported case: varlen (cu_q / cu_k) attention in the CUDA backend");
  STD_TORCH_CHECK(!mask.has_value(), "fastlm: unsupported case: attn_mask in the CUDA attention backend");
  STD_TORCH_CHECK(dropout_p == 0.0, "fastlm: unsupported case: dropout (dropout_p = ", dropout_p,
                  ") in the CUDA attention backend");
}

// The score modifiers of issue 18 (window, softcap, sinks, ALiBi, the mask's gradient): the CUDA C++ kernels have
// none; only their defaults pass (fastlm.dispatch.LACKS keeps such calls away from this backend under auto).
inline void check_no_modifiers(int64_t window_left, int64_t window_right, double softcap,
                               const std::optional<Tensor>& sinks, const std::optional<Tensor>& alibi,
                               bool mask_grad = false) {
  STD_TORCH_CHECK(window_left == -1 && window_right == -1, "fastlm: unsupported case: a sliding window (",
                  window_left, ", ", window_right, ") in the CUDA attention backend");
  STD_TORCH_CHECK(softcap == 0.0, "fastlm: unsupported case: softcap (", softcap, ") in the CUDA attention backend");
  STD_TORCH_CHECK(!sinks.has_value(), "fastlm: unsupported case: attention sinks in the CUDA attention backend");
  STD_TORCH_CHECK(!alibi.has_value(), "fastlm: unsupported case: ALiBi slopes in the CUDA attention backend");
  STD_TORCH_CHECK(!mask_grad, "fastlm: unsupported case: the mask's gradient in the CUDA attention backend");
}

// A 4-D (B, heads, S, D) tensor of dtype dt on device dev, unit last stride, 16-byte aligned rows (cp.async).
inline void check_bhsd(const Tensor& t, const char* name, ScalarType dt, int32_t dev) {
  CudaDevice{dev, "q", kSameDevice}(t, name);
  STD_TORCH_CHECK(t.dim() == 4, "fastlm: ", name, " must be 4-D (B, H, S, D), got ", t.dim(), " dimensions");
  STD_TORCH_CHECK(t.scalar_type() == dt, "fastlm: ", name, " must be ", dtype_name(dt), ", got ",
                  dtype_name(t.scalar_type()));
  STD_TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, "fastlm: ", name,
                  " must have unit stride along the head dim, got stride ", t.stride(3));
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3; ++i) ok = ok && (t.size(i) <= 1 || (t.stride(i) % 8 == 0 && t.stride(i) >= 0));
  STD_TORCH_CHECK(ok, "fastlm: unsupported case: ", name,
                  " must have a 16-byte aligned base and non-negative strides that are multiples of 8 elements "
                  "for the CUDA attention kernels");
}

inline ScalarType check_q(const Tensor& q) {
  STD_TORCH_CHECK(q.is_cuda(), "fastlm: q must be a CUDA tensor");
  const ScalarType dt = q.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Half || dt == ScalarType::BFloat16,
                  "fastlm: unsupported case: the CUDA attention kernels take float16 or bfloat16, got ",
                  dtype_name(dt));
  STD_TORCH_CHECK(q.dim() == 4, "fastlm: q must be 4-D (B, H, Sq, D), got ", q.dim(), " dimensions");
  STD_TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128,
                  "fastlm: unsupported case: head dim ", q.size(3), " (the CUDA attention kernels take 64 or 128)");
  return dt;
}

// The prologue of attention_fwd_cuda and attention_bwd_cuda: the scope, then q, k and v (dtype, head dim, device,
// layout; shapes shared with the CPU kernel's checks, csrc/checks.h; what the grids and int indices can hold).
inline Dims check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
                         const std::optional<Tensor>& cu_q, const std::optional<Tensor>& cu_k, double dropout_p) {
  check_scope(mask, cu_q, cu_k, dropout_p);
  const ScalarType dt = check_q(q);
  const int32_t dev = q.get_device_index();
  check_bhsd(q, "q", dt, dev);
  check_bhsd(k, "k", dt, dev);
  check_bhsd(v, "v", dt, dev);
  const Dims d = qkv_dims(q, k, v);
  check_heads(d);
  STD_TORCH_CHECK(d.Sq < (int64_t{1} << 31) && d.Sk < (int64_t{1} << 31), "fastlm: sequence too long");
  // Grids are (blocks along S, heads, batch): gridDim.y and gridDim.z are limited to 65535.
  STD_TORCH_CHECK(d.B <= 65535 && d.H <= 65535, "fastlm: batch size and head count must be <= 65535");
  return d;
}

// A (B, heads, S, ...) tensor as kernel parameters: its data and its batch, head and sequence strides (elements).
template <typename Ptr>
void set_bhs(const Tensor& t, Ptr& ptr, int64_t& sb, int64_t& sh, int64_t& ss) {
  ptr = static_cast<Ptr>(t.data_ptr());
  sb = t.stride(0);
  sh = t.stride(1);
  ss = t.stride(2);
}

// The kernel parameters FwdParams and BwdParams share: q, k, v and their strides, head counts, lengths, scale,
// causal.
template <typename P>
void set_qkv_params(P& p, const Tensor& q, const Tensor& k, const Tensor& v, const Dims& d, double scale,
                    bool causal) {
  set_bhs(q, p.q, p.q_sb, p.q_sh, p.q_ss);
  set_bhs(k, p.k, p.k_sb, p.k_sh, p.k_ss);
  set_bhs(v, p.v, p.v_sb, p.v_sh, p.v_ss);
  p.H = static_cast<int>(d.H);
  p.group = static_cast<int>(d.H / d.Hkv);
  p.Sq = static_cast<int>(d.Sq);
  p.Sk = static_cast<int>(d.Sk);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  p.causal = causal;
}

// Calls f(T{}, std::integral_constant<int, D>{}) for the element type T of dt (__half / __nv_bfloat16) and the head
// dim D (64 / 128): the kernels' instantiations.
template <typename F>
void dispatch_kernels(ScalarType dt, int64_t D, F&& f) {
  dispatch_half<__half, __nv_bfloat16>(dt, [&](auto t) {
    dispatch_int<64, 128>(D, "head dim", [&](auto d) { f(t, d); });
  });
}

}  // namespace attn
}  // namespace fastlm
