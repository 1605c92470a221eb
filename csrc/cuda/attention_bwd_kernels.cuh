// Flash-attention backward CUDA kernels: delta = rowsum(dO * O), dK / dV, and dQ, with their parameters. Included
// by csrc/cuda/attention_bwd.cu only (the scheme and the host side are there).
#pragma once

#include "attention.cuh"

#include <cmath>
#include <cstdint>

namespace fastlm {
namespace attn {
namespace {

constexpr int kBN = 64;  // keys per dK/dV block
constexpr int kBM = 64;  // queries per dQ block
// Query tile of the dK/dV kernel and key tile of the dQ kernel: smaller for D = 128 (register budget).
template <int D>
constexpr int kBMQ = D == 64 ? 64 : 32;
template <int D>
constexpr int kBNK = D == 64 ? 64 : 32;

struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* o;
  const void* dout;
  const float* lse;
  float* delta;  // (B, H, Sq) contiguous
  void* dq;      // (B, H, Sq, D) contiguous
  void* dk;      // (B, Hkv, Sk, D) contiguous
  void* dv;      // (B, Hkv, Sk, D) contiguous
  int64_t q_sb, q_sh, q_ss;  // strides in elements
  int64_t k_sb, k_sh, k_ss;
  int64_t v_sb, v_sh, v_ss;
  int64_t o_sb, o_sh, o_ss;
  int64_t do_sb, do_sh, do_ss;
  int64_t l_sb, l_sh, l_ss;  // lse strides
  int H;
  int Hkv;
  int group;  // H / Hkv
  int Sq;
  int Sk;
  float scale;
  float scale_log2;
  bool causal;
};

// ------------------------------------------------------------------------------------------------------------
// 1. delta = rowsum(dO * O): D / 8 threads per row (one 16-byte chunk each), 128 / (D / 8) rows per block.
// ------------------------------------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_delta_kernel(const BwdParams p) {
  constexpr int TPR = D / 8;
  constexpr int RPB = kThreads / TPR;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int row = blockIdx.x * RPB + threadIdx.x / TPR;
  const int c = threadIdx.x % TPR;
  float acc = 0.f;
  if (row < p.Sq) {
    const T* op = static_cast<const T*>(p.o) + b * p.o_sb + h * p.o_sh + row * p.o_ss + c * 8;
    const T* dp = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + row * p.do_ss + c * 8;
    float ov[8];
    float dv[8];
    load_chunk<8>(op, 0, 8, true, ov);
    load_chunk<8>(dp, 0, 8, true, dv);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc += ov[i] * dv[i];
  }
#pragma unroll
  for (int o = TPR / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);  // within the row's lanes
  if (row < p.Sq && c == 0) p.delta[(static_cast<int64_t>(b) * p.H + h) * p.Sq + row] = acc;
}

// Writes a warp's 16 x D fp32 accumulator rows (rounded to T, times mul) to out rows [row0, row0 + 16) of a
// contiguous (rows, D) matrix, rows >= nrows skipped, staged through the warp's own 16 rows of a swizzled tile
// `stage` (rows wrow..wrow + 15; the caller guarantees no other thread touches them any more).
template <typename T, int D>
__device__ __forceinline__ void store_rows(const float (&acc)[D / 8][4], float mul, T* stage, int wrow, T* out,
                                           int row0, int nrows) {
  constexpr int ND = D / 8;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int j = 0; j < ND; ++j) {
      const uint32_t v2 = pack2<T>(acc[j][2 * r] * mul, acc[j][2 * r + 1] * mul);
      *reinterpret_cast<uint32_t*>(stage + swz<D>(wrow + g + r * 8, j) + 2 * t) = v2;  // 4-byte aligned
    }
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 16 * ND / 32; ++i) {
    const int idx = i * 32 + lane;
    const int r = idx / ND;
    const int c = idx % ND;
    if (row0 + r < nrows) {
      // 16-byte aligned on both sides: swizzled chunk; contiguous output rows of D elements
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(row0 + r) * D + c * 8) =
          *reinterpret_cast<const uint4*>(stage + swz<D>(wrow + r, c));
    }
  }
}

template <int D>
constexpr size_t dkdv_smem_bytes() {
  return static_cast<size_t>(2 * kBN + 4 * kBMQ<D>) * D * 2 + 4 * kBMQ<D> * sizeof(float);
}

// ------------------------------------------------------------------------------------------------------------
// 2. dK, dV.
// ------------------------------------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(const BwdParams p) {
  constexpr int BN = kBN;
  constexpr int BM = kBMQ<D>;
  constexpr int KD = D / 16;
  constexpr int NQ = BM / 8;  // 8-query column blocks of s^T
  constexpr int ND = D / 8;
  static_assert(2 * BM <= kThreads, "lse / delta loads use one thread per value");
  T* sK = reinterpret_cast<T*>(dynamic_smem());
  T* sV = sK + BN * D;
  T* sQ = sV + BN * D;         // two buffers of BM x D
  T* sdO = sQ + 2 * BM * D;    // two buffers of BM x D
  float* sL = reinterpret_cast<float*>(sdO + 2 * BM * D);  // two buffers of BM raw lse values
  float* sDl = sL + 2 * BM;                                 // two buffers of BM delta values

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int hk = blockIdx.y;
  const int b = blockIdx.z;
  const int n0 = blockIdx.x * BN;
  const int Sq = p.Sq;
  const int Sk = p.Sk;
  const int wrow = warp * 16;

  const T* kp = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh + static_cast<int64_t>(n0) * p.k_ss;
  const T* vp = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh + static_cast<int64_t>(n0) * p.v_ss;
  load_tile<BN, D>(sK, kp, p.k_ss, Sk - n0);
  load_tile<BN, D>(sV, vp, p.v_ss, Sk - n0);

  const int m_start = p.causal ? n0 / BM : 0;  // earlier query tiles see none of these keys
  const int m_blocks = (Sq + BM - 1) / BM;
  const int per_head = max(0, m_blocks - m_start);
  const int total = p.group * per_head;

  auto load_step = [&](int it, int buf) {
    const int hq = hk * p.group + it / per_head;
    const int m0 = (m_start + it % per_head) * BM;
    const T* qp = static_cast<const T*>(p.q) + b * p.q_sb + hq * p.q_sh + static_cast<int64_t>(m0) * p.q_ss;
    const T* dp =
        static_cast<const T*>(p.dout) + b * p.do_sb + hq * p.do_sh + static_cast<int64_t>(m0) * p.do_ss;
    load_tile<BM, D>(sQ + buf * BM * D, qp, p.q_ss, Sq - m0);
    load_tile<BM, D>(sdO + buf * BM * D, dp, p.do_ss, Sq - m0);
    if (tid < 2 * BM) {
      const int i = tid % BM;
      const bool ok = m0 + i < Sq;
      const float* src;
      if (tid < BM) {
        src = p.lse + b * p.l_sb + hq * p.l_sh + (ok ? static_cast<int64_t>(m0 + i) * p.l_ss : 0);
      } else {
        src = p.delta + (static_cast<int64_t>(b) * p.H + hq) * Sq + (ok ? m0 + i : 0);
      }
      float* dst = (tid < BM ? sL : sDl) + buf * BM + i;
      cp_async4(smem_u32(dst), src, ok);  // zero-filled past Sq (p is forced to 0 there anyway)
    }
  };

  if (total > 0) load_step(0, 0);
  cp_async_commit();  // group 0: K, V and the first query tile

  float dk[ND][4];
  float dv[ND][4];
#pragma unroll
  for (int j = 0; j < ND; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      dk[j][e] = 0.f;
      dv[j][e] = 0.f;
    }
  }
  const uint32_t kb = smem_u32(sK);
  const uint32_t vb = smem_u32(sV);
  const float sl2 = p.scale_log2;
  const int key0 = n0 + wrow + g;  // key of accumulator rows r = 0; r = 1 adds 8

  for (int it = 0; it < total; ++it) {
    if (it + 1 < total) load_step(it + 1, (it + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const int buf = it & 1;
    const int m0 = (m_start + it % per_head) * BM;
    const uint32_t qb = smem_u32(sQ + buf * BM * D);
    const uint32_t dob = smem_u32(sdO + buf * BM * D);
    const float* lsb = sL + buf * BM;
    const float* dlb = sDl + buf * BM;

    // s^T = K Q^T (this warp's 16 keys x BM queries)
    float st[NQ][4];
#pragma unroll
    for (int j = 0; j < NQ; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st[j][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t a[4];
      ldsm_x4(a_addr<D, T>(kb, wrow, kk * 16, lane), a[0], a[1], a[2], a[3]);
#pragma unroll
      for (int j2 = 0; j2 < NQ / 2; ++j2) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4(bt_addr<D, T>(qb, j2 * 16, kk * 16, lane), b0, b1, b2, b3);
        mma16816<T>(st[2 * j2], a, b0, b1);
        mma16816<T>(st[2 * j2 + 1], a, b2, b3);
      }
    }

    // p^T. Column (query) m0 + j*8 + 2t + (e & 1); row (key) key0 + 8 * (e >> 1).
    const bool need_mask = n0 + BN > Sk || (p.causal && n0 + wrow + 15 > m0);
#pragma unroll
    for (int j = 0; j < NQ; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int qi = j * 8 + 2 * t + c;
        const float lv = lsb[qi];
        // rows past Sq and empty rows (lse = -inf): +inf, so p = exp2(-inf) = 0
        const float l2 = (m0 + qi < Sq && lv != -INFINITY) ? lv * kLog2e : INFINITY;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float pv = exp2f(st[j][2 * r + c] * sl2 - l2);
          if (need_mask) {
            const int key = key0 + r * 8;
            if (key >= Sk || (p.causal && key > m0 + qi)) pv = 0.f;
          }
          st[j][2 * r + c] = pv;
        }
      }
    }

    // dV += p^T dO
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(st[2 * kk][0], st[2 * kk][1]);
      a[1] = pack2<T>(st[2 * kk][2], st[2 * kk][3]);
      a[2] = pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      a[3] = pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
#pragma unroll
      for (int d2 = 0; d2 < ND / 2; ++d2) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4_t(b_addr<D, T>(dob, kk * 16, d2 * 16, lane), b0, b1, b2, b3);
        mma16816<T>(dv[2 * d2], a, b0, b1);
        mma16816<T>(dv[2 * d2 + 1], a, b2, b3);
      }
    }

    // dP^T = V dO^T
    float dpt[NQ][4];
#pragma unroll
    for (int j = 0; j < NQ; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dpt[j][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t a[4];
      ldsm_x4(a_addr<D, T>(vb, wrow, kk * 16, lane), a[0], a[1], a[2], a[3]);
#pragma unroll
      for (int j2 = 0; j2 < NQ / 2; ++j2) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4(bt_addr<D, T>(dob, j2 * 16, kk * 16, lane), b0, b1, b2, b3);
        mma16816<T>(dpt[2 * j2], a, b0, b1);
        mma16816<T>(dpt[2 * j2 + 1], a, b2, b3);
      }
    }

    // dS^T = p^T (dP^T - delta[query])   (stored over dpt)
#pragma unroll
    for (int j = 0; j < NQ; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float dl = dlb[j * 8 + 2 * t + c];
#pragma unroll
        for (int r = 0; r < 2; ++r) dpt[j][2 * r + c] = st[j][2 * r + c] * (dpt[j][2 * r + c] - dl);
      }
    }

    // dK += dS^T Q
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]);
      a[1] = pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]);
      a[2] = pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
      a[3] = pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
#pragma unroll
      for (int d2 = 0; d2 < ND / 2; ++d2) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4_t(b_addr<D, T>(qb, kk * 16, d2 * 16, lane), b0, b1, b2, b3);
        mma16816<T>(dk[2 * d2], a, b0, b1);
        mma16816<T>(dk[2 * d2 + 1], a, b2, b3);
      }
    }
    __syncthreads();  // buffer `buf` is refilled by the next iteration's prefetch
  }
  cp_async_wait<0>();  // when total == 0, K/V copies may still be landing in the staging rows
  __syncthreads();

  const int64_t bh = static_cast<int64_t>(b) * p.Hkv + hk;
  T* dkp = static_cast<T*>(p.dk) + bh * Sk * D;
  T* dvp = static_cast<T*>(p.dv) + bh * Sk * D;
  store_rows<T, D>(dk, p.scale, sK, wrow, dkp, n0 + wrow, Sk);
  store_rows<T, D>(dv, 1.f, sV, wrow, dvp, n0 + wrow, Sk);
}

template <int D>
constexpr size_t dq_smem_bytes() {
  return static_cast<size_t>(2 * kBM + 4 * kBNK<D>) * D * 2;
}

// ------------------------------------------------------------------------------------------------------------
// 3. dQ.
// ------------------------------------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const BwdParams p) {
  constexpr int BM = kBM;
  constexpr int BN = kBNK<D>;
  constexpr int KD = D / 16;
  constexpr int NB = BN / 8;
  constexpr int ND = D / 8;
  T* sQ = reinterpret_cast<T*>(dynamic_smem());
  T* sdO = sQ + BM * D;
  T* sK = sdO + BM * D;     // two buffers of BN x D
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
  const int wrow = warp * 16;

  const T* qp = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + static_cast<int64_t>(m0) * p.q_ss;
  const T* dp = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + static_cast<int64_t>(m0) * p.do_ss;
  const T* kp = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vp = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;

  int n_blocks = (Sk + BN - 1) / BN;
  if (p.causal) n_blocks = min(n_blocks, (min(m0 + BM, Sq) + BN - 1) / BN);  // >= 1

  load_tile<BM, D>(sQ, qp, p.q_ss, Sq - m0);
  load_tile<BM, D>(sdO, dp, p.do_ss, Sq - m0);
  load_tile<BN, D>(sK, kp, p.k_ss, Sk);
  load_tile<BN, D>(sV, vp, p.v_ss, Sk);
  cp_async_commit();

  // Per-row lse (log2 units; +inf for rows past Sq and empty rows: p = 0) and delta, rows g and g + 8.
  float l2r[2];
  float dlr[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + wrow + g + r * 8;
    l2r[r] = INFINITY;
    dlr[r] = 0.f;
    if (row < Sq) {
      const float lv = p.lse[b * p.l_sb + h * p.l_sh + static_cast<int64_t>(row) * p.l_ss];
      l2r[r] = lv != -INFINITY ? lv * kLog2e : INFINITY;
      dlr[r] = p.delta[(static_cast<int64_t>(b) * p.H + h) * Sq + row];
    }
  }

  float dq[ND][4];
#pragma unroll
  for (int j = 0; j < ND; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[j][e] = 0.f;
  }
  const uint32_t qb = smem_u32(sQ);
  const uint32_t dob = smem_u32(sdO);
  const float sl2 = p.scale_log2;

  for (int n = 0; n < n_blocks; ++n) {
    if (n + 1 < n_blocks) {
      const int buf = (n + 1) & 1;
      const int64_t n1 = static_cast<int64_t>(n + 1) * BN;
      load_tile<BN, D>(sK + buf * BN * D, kp + n1 * p.k_ss, p.k_ss, Sk - (n + 1) * BN);
      load_tile<BN, D>(sV + buf * BN * D, vp + n1 * p.v_ss, p.v_ss, Sk - (n + 1) * BN);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const uint32_t kb = smem_u32(sK + (n & 1) * BN * D);
    const uint32_t vb = smem_u32(sV + (n & 1) * BN * D);
    const int n0 = n * BN;

    // s = Q K^T and dP = dO V^T
    float s[NB][4];
    float dpv[NB][4];
#pragma unroll
    for (int j = 0; j < NB; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = 0.f;
        dpv[j][e] = 0.f;
      }
    }
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t a[4];
      ldsm_x4(a_addr<D, T>(qb, wrow, kk * 16, lane), a[0], a[1], a[2], a[3]);
#pragma unroll
      for (int j2 = 0; j2 < NB / 2; ++j2) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4(bt_addr<D, T>(kb, j2 * 16, kk * 16, lane), b0, b1, b2, b3);
        mma16816<T>(s[2 * j2], a, b0, b1);
        mma16816<T>(s[2 * j2 + 1], a, b2, b3);
      }
    }
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t a[4];
      ldsm_x4(a_addr<D, T>(dob, wrow, kk * 16, lane), a[0], a[1], a[2], a[3]);
#pragma unroll
      for (int j2 = 0; j2 < NB / 2; ++j2) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4(bt_addr<D, T>(vb, j2 * 16, kk * 16, lane), b0, b1, b2, b3);
        mma16816<T>(dpv[2 * j2], a, b0, b1);
        mma16816<T>(dpv[2 * j2 + 1], a, b2, b3);
      }
    }

    // p, then dS = p (dP - delta) (stored over s). Keys past Sk must be masked here: their K/V rows are zero
    // but p there need not be finite.
    const bool need_mask = n0 + BN > Sk || (p.causal && n0 + BN - 1 > m0 + wrow);
#pragma unroll
    for (int j = 0; j < NB; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        float pv = exp2f(s[j][e] * sl2 - l2r[r]);
        if (need_mask) {
          const int col = n0 + j * 8 + 2 * t + (e & 1);
          const int row = m0 + wrow + g + r * 8;
          if (col >= Sk || (p.causal && col > row)) pv = 0.f;
        }
        s[j][e] = pv * (dpv[j][e] - dlr[r]);
      }
    }

    // dQ += dS K
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
        ldsm_x4_t(b_addr<D, T>(kb, kk * 16, d2 * 16, lane), b0, b1, b2, b3);
        mma16816<T>(dq[2 * d2], a, b0, b1);
        mma16816<T>(dq[2 * d2 + 1], a, b2, b3);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();  // sQ rows become staging: nobody may still read them (they are each warp's own, but cheap)

  T* dqp = static_cast<T*>(p.dq) + (static_cast<int64_t>(b) * p.H + h) * Sq * D;
  store_rows<T, D>(dq, p.scale, sQ, wrow, dqp, m0 + wrow, Sq);
}

}  // namespace
}  // namespace attn
}  // namespace fastlm
