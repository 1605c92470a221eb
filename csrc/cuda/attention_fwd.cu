// Flash-attention forward (FlashAttention-2 scheme), registered as the CUDA implementation of
// fastlm::attention_fwd_cuda (schema in csrc/ops.cpp). Dense (B, H, S, D) layouts, GQA, top-left causal mask,
// fp16 / bf16, D in {64, 128}; masks, varlen and dropout raise "unsupported case" (the Python side routes them
// to the Triton kernels).
//
// One block of 4 warps owns BM = 64 queries of one (batch, head); warp w owns queries [16w, 16w + 16). Q is
// loaded once (cp.async -> shared -> ldmatrix -> registers); K/V tiles of BN = 64 keys stream through a
// double-buffered shared ring (cp.async of tile n + 1 overlaps the math of tile n). Per key tile:
//   s = (q k^T) * scale * log2(e)          (mma.sync m16n8k16, fp32 accumulate; masked entries -> -inf)
//   m_new = max(m, rowmax(s)); p = exp2(s - m_new); l = l * exp2(m - m_new) + rowsum(p)
//   acc = acc * exp2(m - m_new) + p v      (p rounded to T, as the A operand of the second mma)
// and at the end o = acc / l, lse = (m + log2 l) * ln 2 (natural log). A row with l == 0 (no visible key; it
// cannot happen with top-left causal and Sk >= 1, but is handled) gets o = 0 and lse = -inf.
// Causal (query i sees keys j <= i): key tiles entirely above the diagonal are never loaded; the masks cost
// only on the diagonal tiles and on a ragged last tile. m-blocks are scheduled heaviest first.
#include "attention.cuh"

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/ops.h>

#include <cmath>
#include <tuple>

namespace fastlm {
namespace attn {
namespace {

constexpr int kFwdBM = 64;
constexpr int kFwdBN = 64;

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;     // (B, H, Sq, D) contiguous
  float* lse;  // (B, H, Sq) contiguous
  int64_t q_sb, q_sh, q_ss;  // strides in elements
  int64_t k_sb, k_sh, k_ss;
  int64_t v_sb, v_sh, v_ss;
  int H;
  int group;  // H / Hkv
  int Sq;
  int Sk;
  float scale_log2;  // scale * log2(e)
  bool causal;
};

template <int D>
constexpr size_t fwd_smem_bytes() {
  return static_cast<size_t>(kFwdBM + 4 * kFwdBN) * D * 2;  // Q + 2 x K + 2 x V, 2-byte elements
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const FwdParams p) {
  constexpr int BM = kFwdBM;
  constexpr int BN = kFwdBN;
  constexpr int KD = D / 16;  // k-steps of q k^T
  constexpr int NB = BN / 8;  // 8-key column blocks of s
  constexpr int ND = D / 8;   // 8-wide column blocks of o
  T* sQ = reinterpret_cast<T*>(dynamic_smem());
  T* sK = sQ + BM * D;      // two buffers of BN x D
  T* sV = sK + 2 * BN * D;  // two buffers of BN x D

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int m_block = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x);  // heaviest first
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int hk = h / p.group;
  const int m0 = m_block * BM;
  const int Sq = p.Sq;
  const int Sk = p.Sk;

  const T* qp = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + static_cast<int64_t>(m0) * p.q_ss;
  const T* kp = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vp = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;

  int n_blocks = (Sk + BN - 1) / BN;
  if (p.causal) n_blocks = min(n_blocks, (min(m0 + BM, Sq) + BN - 1) / BN);  // >= 1: m0 < Sq, Sk >= 1

  // Group 0: Q and the first K/V tile.
  load_tile<BM, D>(sQ, qp, p.q_ss, Sq - m0);
  load_tile<BN, D>(sK, kp, p.k_ss, Sk);
  load_tile<BN, D>(sV, vp, p.v_ss, Sk);
  cp_async_commit();

  uint32_t qf[KD][4];
  float acc[ND][4];
#pragma unroll
  for (int j = 0; j < ND; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
  }
  float m_r[2] = {-INFINITY, -INFINITY};  // running max of the log2-scaled scores, rows g and g + 8
  float l_r[2] = {0.f, 0.f};              // this thread's partial row sums (quad-reduced at the end)
  const int wrow = warp * 16;             // first tile row of this warp
  const float sl2 = p.scale_log2;

  for (int n = 0; n < n_blocks; ++n) {
    if (n + 1 < n_blocks) {  // prefetch tile n + 1 into the other buffer (freed by the barrier ending n - 1)
      const int buf = (n + 1) & 1;
      const int64_t n1 = static_cast<int64_t>(n + 1) * BN;
      load_tile<BN, D>(sK + buf * BN * D, kp + n1 * p.k_ss, p.k_ss, Sk - (n + 1) * BN);
      load_tile<BN, D>(sV + buf * BN * D, vp + n1 * p.v_ss, p.v_ss, Sk - (n + 1) * BN);
    }
    cp_async_commit();  // possibly empty: keeps the group count uniform
    cp_async_wait<1>();  // everything but the newest group (tile n + 1) has landed
    __syncthreads();

    if (n == 0) {
      const uint32_t qb = smem_u32(sQ);
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        ldsm_x4(a_addr<D, T>(qb, wrow, kk * 16, lane), qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
      }
    }

    const uint32_t kb = smem_u32(sK + (n & 1) * BN * D);
    const uint32_t vb = smem_u32(sV + (n & 1) * BN * D);

    // s = q k^T
    float s[NB][4];
#pragma unroll
    for (int j = 0; j < NB; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
      for (int j2 = 0; j2 < NB / 2; ++j2) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4(bt_addr<D, T>(kb, j2 * 16, kk * 16, lane), b0, b1, b2, b3);
        mma16816<T>(s[2 * j2], qf[kk], b0, b1);
        mma16816<T>(s[2 * j2 + 1], qf[kk], b2, b3);
      }
    }

    // Scale to log2 units first (any sign of scale), then mask: keys past Sk, and causal keys j > i.
    const int n0 = n * BN;
#pragma unroll
    for (int j = 0; j < NB; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] *= sl2;
    }
    if (n0 + BN > Sk || (p.causal && n0 + BN - 1 > m0 + wrow)) {  // warp-uniform
#pragma unroll
      for (int j = 0; j < NB; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = n0 + j * 8 + 2 * t + (e & 1);
          const int row = m0 + wrow + g + (e >> 1) * 8;
          if (col >= Sk || (p.causal && col > row)) s[j][e] = -INFINITY;
        }
      }
    }

    // Online softmax, rows g (r = 0: elements 0, 1) and g + 8 (r = 1: elements 2, 3).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < NB; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      mx = quad_max(mx);
      const float m_new = fmaxf(m_r[r], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // all masked so far: keep exp2 finite (p = 0)
      const float alpha = exp2f(m_r[r] - m_use);             // m_r == -inf -> 0
      m_r[r] = m_new;
      float rs = 0.f;
#pragma unroll
      for (int j = 0; j < NB; ++j) {
        s[j][2 * r] = exp2f(s[j][2 * r] - m_use);
        s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - m_use);
        rs += s[j][2 * r] + s[j][2 * r + 1];
      }
      l_r[r] = l_r[r] * alpha + rs;
#pragma unroll
      for (int j = 0; j < ND; ++j) {
        acc[j][2 * r] *= alpha;
        acc[j][2 * r + 1] *= alpha;
      }
    }

    // acc += p v: the s accumulators of key blocks 2kk, 2kk + 1 are exactly the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int d2 = 0; d2 < ND / 2; ++d2) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4_t(b_addr<D, T>(vb, kk * 16, d2 * 16, lane), b0, b1, b2, b3);
        mma16816<T>(acc[2 * d2], a, b0, b1);
        mma16816<T>(acc[2 * d2 + 1], a, b2, b3);
      }
    }
    __syncthreads();  // all warps are done with buffer n & 1 before iteration n + 1 refills it
  }
  cp_async_wait<0>();  // the last (empty) group: nothing may be in flight at exit

  // Epilogue: normalise, stage this warp's 16 rows in its own rows of sQ (only it read them), then write them
  // out in 16-byte chunks; lse by the first lane of each quad.
  T* so = sQ;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_r[r]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = wrow + g + r * 8;
#pragma unroll
    for (int j = 0; j < ND; ++j) {
      const uint32_t v2 = pack2<T>(acc[j][2 * r] * inv, acc[j][2 * r + 1] * inv);
      *reinterpret_cast<uint32_t*>(so + swz<D>(row, j) + 2 * t) = v2;  // 4-byte aligned
    }
    const int grow = m0 + row;
    if (t == 0 && grow < Sq) {
      const float lse = l > 0.f ? (m_r[r] + log2f(l)) * kLn2 : -INFINITY;
      p.lse[(static_cast<int64_t>(b) * p.H + h) * Sq + grow] = lse;
    }
  }
  __syncwarp();
  T* op = static_cast<T*>(p.o) + ((static_cast<int64_t>(b) * p.H + h) * Sq + m0) * D;
#pragma unroll
  for (int i = 0; i < 16 * ND / 32; ++i) {
    const int idx = i * 32 + lane;
    const int r = wrow + idx / ND;
    const int c = idx % ND;
    if (m0 + r < Sq) {
      // 16-byte aligned on both sides: swizzled chunk; contiguous output rows of D elements
      *reinterpret_cast<uint4*>(op + static_cast<int64_t>(r) * D + c * 8) =
          *reinterpret_cast<const uint4*>(so + swz<D>(r, c));
    }
  }
}

template <typename T, int D>
void launch_fwd(const FwdParams& p, dim3 grid, cudaStream_t stream) {
  constexpr size_t smem = fwd_smem_bytes<D>();
  allow_dynamic_smem(attention_fwd_kernel<T, D>, smem);
  attention_fwd_kernel<T, D><<<grid, kThreads, smem, stream>>>(p);
  check_cuda(cudaGetLastError(), "attention_fwd_kernel launch");
}

std::tuple<Tensor, Tensor> attention_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const std::optional<Tensor>& mask, const std::optional<Tensor>& cu_q,
                                              const std::optional<Tensor>& cu_k, int64_t /*max_q*/, int64_t /*max_k*/,
                                              double scale, bool causal, double dropout_p, const Tensor& /*rng*/,
                                              int64_t window_left, int64_t window_right, double softcap,
                                              const std::optional<Tensor>& sinks,
                                              const std::optional<Tensor>& alibi) {
  check_no_modifiers(window_left, window_right, softcap, sinks, alibi);
  const Dims d = check_inputs(q, k, v, mask, cu_q, cu_k, dropout_p);
  const int32_t dev = q.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(dev);
  const FwdOut out = fwd_outputs(q, d);
  if (out.done) return {out.o, out.lse};

  FwdParams p{};
  set_qkv_params(p, q, k, v, d, scale, causal);
  p.o = out.o.data_ptr();
  p.lse = static_cast<float*>(out.lse.data_ptr());

  const dim3 grid(static_cast<unsigned>((d.Sq + kFwdBM - 1) / kFwdBM), static_cast<unsigned>(d.H),
                  static_cast<unsigned>(d.B));
  STD_TORCH_CHECK(grid.x <= 0x7fffffffu, "fastlm: sequence too long");
  const cudaStream_t stream = current_stream(dev);
  dispatch_kernels(q.scalar_type(), d.D, [&](auto t, auto dd) {
    launch_fwd<decltype(t), decltype(dd)::value>(p, grid, stream);
  });
  return {out.o, out.lse};
}

}  // namespace
}  // namespace attn
}  // namespace fastlm

STABLE_TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("attention_fwd_cuda", TORCH_BOX(&fastlm::attn::attention_fwd_cuda));
}
