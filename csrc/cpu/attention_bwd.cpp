// Flash-attention backward on the CPU, registered as the CPU implementation of fastlm::attention_bwd_cpu (schema
// and contract in csrc/ops.cpp; the forward and the shared tiles: csrc/cpu/attention.cpp, attention.h). Every
// case the forward takes, each with its gradient: bool / additive masks as expanded views (dmask, summed over the
// mask's stride-0 dims), causal, window, softcap, sinks (dsinks), ALiBi, GQA without copies, dropout (the
// forward's mask regenerated from the seed), fp32 / fp16 / bf16 with fp32 accumulation, any head dim and strides.
//
// The math (per (b, h), from the saved lse; nothing (Sq, Sk)-sized is stored, a tile of kBN keys at a time):
//   P = exp(S - lse) (0 where hidden, on rows with no visible key, lse = -inf, and on padded lanes)
//   Z = dropout's factors (0 or 1 / (1 - p); 1 without dropout), Di = rowsum(dO * O) in fp32
//   dV += (P Z)^T dO;  dP = dO V^T;  dS = P (Z dP - Di) (= dL/dmask);  dS' = dS (1 - tanh^2) with softcap
//   dK += scale dS'^T Q;  dQ += scale dS' K;  dsink[h] = -sum_{b,i} exp(sink[h] - lse) Di
// in the forward's layout: a block of BM queries keeps Q and dO transposed (qt[d][i], dot[d][i]) and its dQ
// accumulator transposed (dqt[d][i]), so that S, dP (outer products over d, K / V rows broadcast) and dQ (K rows
// broadcast) are the forward's register tiles, vectorised over queries; dK and dV need sums over the queries, so
// they are vectorised over the head dim instead: acc[j][d] += p[j][i] x[i][d] with x the block's Q / dO copied in
// their natural layout (rows padded to Dp, a multiple of the vector width), p[j][i] broadcast (AVX-512: 6 keys x
// 64 dims, 24 accumulators, 24 FMA per 4 loads + 6 broadcasts). Five tile products per (query block, key tile), no
// transposition in the loop, no reduction across lanes.
//
// One pass, no atomics: a work item is a (batch, kv head) and loops over the query blocks of every query head of its
// GQA group (query block outer, key tiles inner, as the forward), with dK / dV accumulated in fp32 per-thread
// scratch (Sk x Dp each) and written once at its end, and dQ complete after each query block's key loop: each
// output element is written by one thread in a fixed order. Why not FlashAttention-2's split (a dK/dV pass over
// (batch, kv head, key block) and a dQ pass over (batch, head, query block)): both passes recompute S and dP, 7 tile
// products instead of 5, +40% FMAs, and the CPU loses the split's only gain (thousands of independent blocks for a
// GPU) as soon as B * Hkv covers the threads, which training shapes do. The tile products are the cost: measured
// on the 2-core AMD EPYC (Zen 4, AVX-512) development machine, B2 H12 S512 D64 fp32, one thread, the backward ran
// at 88 GFLOP/s (2.5x the forward's FLOPs; the forward 81 GFLOP/s, same run, load ~5.5), with 64% of the kernel's
// perf samples in the three register-tile loops (S and dP 29%, dK / dV 20%, dQ 15%), which are spill-free
// (objdump: 24 FMA per 4 loads + 6 broadcasts in the dK / dV tile, 16 per 2 + 8 in S / dP). When the (batch, kv
// head) items alone would leave threads idle (B * Hkv not a multiple of the thread count and < 8x it), each item's
// query blocks are dealt round-robin to `chunks` work items (round-robin keeps causal chunks balanced) whose partial
// dK / dV (at most 256 MiB of them) are summed in chunk order afterwards: deterministic for a given thread count
// (the chunk count derives from it); thread counts that give the same chunks give bitwise the same gradients.
// Causal / window tiles outside the band are never visited (the same key_range as the forward); tiles whose mask
// hides every key, or whose P is all zero, are skipped.
//
// dmask: dS summed into an fp32 buffer in the mask's (B, H, Sq, Sk) view with the stride-0 dims reduced, each
// element owned by one work item; where two items would share an element (a mask broadcast over the batch, or over
// heads with several kv heads, or over queries with chunks), that dim is kept in the buffer and summed afterwards
// in index order. dsinks: a term per (b, h, query block), summed in index order.
#include "cpu/attention.h"

#include <tuple>
#include <vector>

namespace fastlm::cpu::flash {
namespace {

constexpr int kBM = 32;  // most queries per block (AVX-512); scratch is sized for it

// acc[r][.] += sum_{i < rows} pt[r][i] x[i][.] for KR keys (rows of pt BM apart, of acc Dp apart) and NV vectors
// of the head dim (x: the block's natural-layout rows, Dp apart).
template <int L, int BM, int KR, int NV>
FASTLM_INLINE void kd_tile(const float* pt, int64_t rows, const float* x, int64_t Dp, float* acc) {
  using vec = typename Vec<L>::type;
  vec a[KR][NV];
  for (int r = 0; r < KR; ++r)
    for (int n = 0; n < NV; ++n) a[r][n] = at<L>(acc + r * Dp + n * L);
  for (int64_t i = 0; i < rows; ++i) {
    vec xv[NV];
    for (int n = 0; n < NV; ++n) xv[n] = at<L>(x + i * Dp + n * L);
    for (int r = 0; r < KR; ++r) {
      const float s = pt[r * BM + i];
      for (int n = 0; n < NV; ++n) a[r][n] += s * xv[n];
    }
  }
  for (int r = 0; r < KR; ++r)
    for (int n = 0; n < NV; ++n) at<L>(acc + r * Dp + n * L) = a[r][n];
}

// acc[j][.] += sum_{i < rows} pt[j][i] x[i][.] for the nj keys of a tile and NV vectors of columns.
template <int L, int BM, int KR, int NV>
FASTLM_INLINE void kd_cols(const float* pt, int64_t nj, int64_t rows, const float* x, int64_t Dp, float* acc) {
  int64_t j = 0;
  for (; j + KR <= nj; j += KR) kd_tile<L, BM, KR, NV>(pt + j * BM, rows, x, Dp, acc + j * Dp);
  tail<KR>(nj - j, [&](auto r) FASTLM_INLINE_LAMBDA {
    kd_tile<L, BM, decltype(r)::value, NV>(pt + j * BM, rows, x, Dp, acc + j * Dp);
  });
}

// acc[j][.] += sum_{i < rows} pt[j][i] x[i][.] for the nj keys of a tile and all Dp columns.
template <int L, int BM, int KR, int NV>
FASTLM_INLINE void kd_tiles(const float* pt, int64_t nj, int64_t rows, const float* x, int64_t Dp, float* acc) {
  int64_t d = 0;
  for (; d + NV * L <= Dp; d += NV * L) kd_cols<L, BM, KR, NV>(pt, nj, rows, x + d, Dp, acc + d);
  tail<NV>((Dp - d) / L, [&](auto nv) FASTLM_INLINE_LAMBDA {
    kd_cols<L, BM, KR, decltype(nv)::value>(pt, nj, rows, x + d, Dp, acc + d);
  });
}

// Per-thread scratch, allocated once per parallel chunk; every array 64-byte aligned.
struct Workspace {
  static constexpr int kSlots = 14;
  float *qt, *dot, *dqt, *qn, *don, *st, *dpt, *ft, *zt, *bt, *kbias, *kc, *vc, *dkv;
  bool whole_head;
  int64_t size[kSlots];  // floats per array, rounded up to 16
  Scratch buf;

  static bool whole(const Params& p, bool widen) { return widen && p.Sk * p.D <= kMaxHeadCopy; }
  static int64_t sizes(const Params& p, bool widen, int64_t* out) {
    const int64_t D = p.D, Dp = p.Dp, tile = kBN * kBM;
    const int64_t kv_rows = !widen ? 0 : (whole(p, widen) ? p.Sk : kBN);
    const int64_t n[kSlots] = {D * kBM,
                               D * kBM,
                               D * kBM,
                               kBM * Dp,
                               kBM * Dp,
                               tile,
                               tile,
                               p.softcap > 0.f ? tile : 0,
                               p.dropout ? tile : 0,
                               tile,
                               kBN,
                               kv_rows * D,
                               kv_rows * D,
                               p.chunks == 1 ? 2 * p.Sk * Dp : 0};
    int64_t total = 0;
    for (int i = 0; i < kSlots; ++i) total += out[i] = (n[i] + 15) / 16 * 16;
    return total;
  }
  Workspace(const Params& p, bool widen) : whole_head(whole(p, widen)), buf(sizes(p, widen, size)) {
    float** slots[kSlots] = {&qt, &dot, &dqt, &qn, &don, &st, &dpt, &ft, &zt, &bt, &kbias, &kc, &vc, &dkv};
    float* a = buf.get();
    for (int i = 0; i < kSlots; ++i) {
      *slots[i] = a;
      a += size[i];
    }
  }
};

// The fp32 K and V rows of one (b, kv head): in place (fp32), whole-head copies, or (null) widened per tile.
struct KV {
  const void* k;  // the input rows (T), k_ss / v_ss apart
  const void* v;
  const float* kf;  // fp32 rows ks / vs apart, or null
  const float* vf;
  int64_t ks, vs;
};

// The gradients of queries [i0, i0 + rows) of (b, h) (query block qb) against every key tile their band reaches:
// dq written, dk / dv (fp32, Sk x Dp each) accumulated, the block's dsinks term stored.
template <typename T, int L, int BM, int R, int KR, int NV, bool MODS>
FASTLM_INLINE void bwd_block(const Params& p, int64_t b, int64_t h, int64_t qb, const KV& kv, float* dk, float* dv,
                             Workspace& w) {
  const int64_t D = p.D, Dp = p.Dp, bh = b * p.H + h;
  const int64_t i0 = qb * BM, rows = std::min<int64_t>(BM, p.Sq - i0);
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + i0 * p.q_ss;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + i0 * p.do_ss;
  const T* o = static_cast<const T*>(p.o) + b * p.o_sb + h * p.o_sh + i0 * p.o_ss;
  const float* lse = p.lse_in + b * p.l_sb + h * p.l_sh + i0 * p.l_ss;
  const float slope = p.alibi != nullptr ? p.alibi[bh] : 0.f;
  const float sink = p.sinks != nullptr ? p.sinks[h] : kNegInf;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float *qt = w.qt, *dot = w.dot, *dqt = w.dqt, *qn = w.qn, *don = w.don, *st = w.st, *dpt = w.dpt, *bt = w.bt;

  // The block's inputs: Q (scaled) and dO transposed, Q and dO in rows of Dp (zero-padded), Di, and -lse as the
  // exponent's offset (+inf where P must be 0: rows with no visible key, padded lanes).
  float nlse[BM], di[BM];
  for (int64_t x = 0; x < D * BM; ++x) qt[x] = 0.f, dot[x] = 0.f, dqt[x] = 0.f;
  for (int i = 0; i < BM; ++i) nlse[i] = kInf, di[i] = 0.f;
  float dsink = 0.f;
  for (int64_t r = 0; r < rows; ++r) {
    const T *qr = q + r * p.q_ss, *dr = dout + r * p.do_ss, *orow = o + r * p.o_ss;
    float *qnr = qn + r * Dp, *dnr = don + r * Dp;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) {
      const float x = to_float(qr[d]), y = to_float(dr[d]);
      qnr[d] = x;
      dnr[d] = y;
      acc += y * to_float(orow[d]);
    }
    for (int64_t d = D; d < Dp; ++d) qnr[d] = 0.f, dnr[d] = 0.f;
    for (int64_t d = 0; d < D; ++d) qt[d * BM + r] = p.qscale * qnr[d], dot[d * BM + r] = dnr[d];
    di[r] = acc;
    const float l = lse[r * p.l_ss];
    nlse[r] = l == kNegInf ? kInf : l;
    if (sink != kNegInf && l != kNegInf) dsink -= exp_fast(sink - l) * acc;
  }
  if (p.dsink_part != nullptr) p.dsink_part[bh * p.n_qblocks + qb] = dsink;

  const T* k = static_cast<const T*>(kv.k);
  const T* v = static_cast<const T*>(kv.v);
  const int64_t mb = b * p.m_sb + h * p.m_sh;
  const bool key_mask = p.mask_kind != kNoMask && p.m_sq == 0;  // padding-style: one bias per key
  const bool full_mask = p.mask_kind != kNoMask && !key_mask;
  int64_t jbeg, jend;
  key_range(p, i0, i0 + rows, jbeg, jend);
  for (int64_t j0 = jbeg; j0 < jend; j0 += kBN) {
    const int64_t nj = std::min<int64_t>(kBN, jend - j0);
    // Masks first: a tile that hides every key has P = 0.
    if (key_mask) {
      bool any = false;
      for (int64_t j = 0; j < nj; ++j) {
        w.kbias[j] = mask_bias(p.mask_kind, p.mask, mb + (j0 + j) * p.m_sk);
        any = any || w.kbias[j] != kNegInf;
      }
      if (!any) continue;
    } else if (full_mask) {
      bool any = false;
      for (int64_t i = 0; i < BM; ++i) {
        for (int64_t j = 0; j < nj; ++j) {
          const float x = i < rows ? mask_bias(p.mask_kind, p.mask, mb + (i0 + i) * p.m_sq + (j0 + j) * p.m_sk)
                                   : kNegInf;
          bt[j * BM + i] = x;
          any = any || x != kNegInf;
        }
      }
      if (!any) continue;
    }
    const float *kf, *vf;
    int64_t ks = kv.ks, vs = kv.vs;
    if (kv.kf != nullptr) {
      kf = kv.kf + j0 * ks;
      vf = kv.vf + j0 * vs;
    } else {
      widen_rows(k + j0 * p.k_ss, p.k_ss, nj, D, w.kc);
      widen_rows(v + j0 * p.v_ss, p.v_ss, nj, D, w.vc);
      kf = w.kc, vf = w.vc, ks = D, vs = D;
    }

    // S, as the forward computes it
    qk_tiles<L, BM, R>(qt, kf, ks, D, nj, st);
    if constexpr (MODS) {
      if (p.softcap > 0.f) {  // keep 1 - tanh^2 for the chain rule
        const float c = p.softcap;
#pragma omp simd
        for (int64_t x = 0; x < nj * BM; ++x) {
          const float th = tanh_fast(st[x]);
          st[x] = c * th;
          w.ft[x] = 1.f - th * th;
        }
      }
      if (p.alibi != nullptr) {
        for (int64_t jj = 0; jj < nj; ++jj) {
          const float base = static_cast<float>(i0 + p.off - j0 - jj);
#pragma omp simd
          for (int i = 0; i < BM; ++i) st[jj * BM + i] -= slope * std::fabs(base + static_cast<float>(i));
        }
      }
    }
    if (key_mask) {
      for (int64_t jj = 0; jj < nj; ++jj) {
        const float bias = w.kbias[jj];
#pragma omp simd
        for (int i = 0; i < BM; ++i) st[jj * BM + i] += bias;
      }
    } else if (full_mask) {
#pragma omp simd
      for (int64_t x = 0; x < nj * BM; ++x) st[x] += bt[x];
    }
    const int64_t jlast = j0 + nj - 1;
    const bool edge = (p.causal && jlast > i0) || (p.wr >= 0 && jlast > i0 + p.off + p.wr) ||
                      (p.wl >= 0 && j0 < i0 + rows - 1 + p.off - p.wl);
    if (edge) {  // key j0 + jj is visible to the queries i0 + i with first <= i <= last
      for (int64_t jj = 0; jj < nj; ++jj) {
        const int64_t j = j0 + jj - i0;
        int64_t first = p.causal ? j : 0, last = BM;
        if (p.wr >= 0) first = std::max(first, j - p.off - p.wr);
        if (p.wl >= 0) last = std::min(last, j - p.off + p.wl);
        const int f = static_cast<int>(std::clamp<int64_t>(first, -1, BM + 1));
        const int t = static_cast<int>(std::clamp<int64_t>(last, -1, BM + 1));
#pragma omp simd
        for (int i = 0; i < BM; ++i) st[jj * BM + i] = (i < f || i > t) ? kNegInf : st[jj * BM + i];
      }
    }
    // P
    float pmax = 0.f;
    for (int64_t jj = 0; jj < nj; ++jj) {
#pragma omp simd reduction(max : pmax)
      for (int i = 0; i < BM; ++i) {
        const float e = exp_fast(st[jj * BM + i] - nlse[i]);
        st[jj * BM + i] = e;
        pmax = std::max(pmax, e);
      }
    }
    if (!(pmax > 0.f)) continue;  // no visible (query, key) pair in this tile

    // dP, then dS = P (Z dP - Di) into dpt, P Z into st
    qk_tiles<L, BM, R>(dot, vf, vs, D, nj, dpt);
    if (p.dropout) {
      drop_tile<L, BM>(p, bh, i0, j0, nj, w.zt);
      for (int64_t jj = 0; jj < nj; ++jj) {
#pragma omp simd
        for (int i = 0; i < BM; ++i) {
          const int64_t x = jj * BM + i;
          const float z = w.zt[x];
          dpt[x] = st[x] * (z * dpt[x] - di[i]);
          st[x] *= z;
        }
      }
    } else {
      for (int64_t jj = 0; jj < nj; ++jj) {
#pragma omp simd
        for (int i = 0; i < BM; ++i) dpt[jj * BM + i] = st[jj * BM + i] * (dpt[jj * BM + i] - di[i]);
      }
    }
    if (p.dmask != nullptr) {  // dL/dmask = dS, summed over the reduced dims (owned by this work item)
      float* g = p.dmask + b * p.g_sb + h * p.g_sh + i0 * p.g_sq + j0 * p.g_sk;
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t jj = 0; jj < nj; ++jj) g[i * p.g_sq + jj * p.g_sk] += dpt[jj * BM + i];
    }
    if constexpr (MODS) {
      if (p.softcap > 0.f) {
#pragma omp simd
        for (int64_t x = 0; x < nj * BM; ++x) dpt[x] *= w.ft[x];
      }
    }
    kd_tiles<L, BM, KR, NV>(st, nj, rows, don, Dp, dv + j0 * Dp);   // dV += (P Z)^T dO
    kd_tiles<L, BM, KR, NV>(dpt, nj, rows, qn, Dp, dk + j0 * Dp);   // dK += dS'^T Q (scaled at the end)
    pv_tiles<L, BM, R>(dpt, nj, kf, ks, D, dqt);                    // dQ += dS' K (scaled below)
  }
  T* dq = static_cast<T*>(p.dq) + (bh * p.Sq + i0) * D;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) dq[r * D + d] = from_float<T>(p.scale * dqt[d * BM + r]);
}

// n rows of dk / dv (out row = row r of (b, kv head) bhk) from fp32 accumulators (rows Dp apart): dK = scale * acc.
template <typename T>
FASTLM_INLINE void store_dkdv(const Params& p, int64_t row, int64_t n, const float* dk, const float* dv) {
  const int64_t D = p.D, Dp = p.Dp;
  T* ok = static_cast<T*>(p.dk) + row * D;
  T* ov = static_cast<T*>(p.dv) + row * D;
  for (int64_t j = 0; j < n; ++j) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      ok[j * D + d] = from_float<T>(p.scale * dk[j * Dp + d]);
      ov[j * D + d] = from_float<T>(dv[j * Dp + d]);
    }
  }
}

// Work items [begin, end) of (b, kv head, chunk): chunk c takes the units u = c, c + chunks, ... of the
// (query block, head of the group) pairs, u = qb * group + g (the group's heads in turn share the K/V tiles).
template <typename T, int L, int BM, int R, int KR, int NV, bool MODS>
FASTLM_INLINE void bwd_items(const Params& p, int64_t begin, int64_t end) {
  constexpr bool widen = !std::is_same_v<T, float>;
  Workspace w(p, widen);
  const int64_t Sk = p.Sk, D = p.D, Dp = p.Dp, units = p.group * p.n_qblocks;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t c = item % p.chunks, bhk = item / p.chunks, b = bhk / p.Hkv, hk = bhk % p.Hkv;
    float* dk = p.chunks == 1 ? w.dkv : p.dkv_part + item * 2 * Sk * Dp;
    float* dv = dk + Sk * Dp;
    for (int64_t x = 0; x < 2 * Sk * Dp; ++x) dk[x] = 0.f;
    const T* k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
    const T* v = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
    KV kv{k, v, nullptr, nullptr, D, D};
    if constexpr (!widen) {
      kv.kf = k, kv.vf = v, kv.ks = p.k_ss, kv.vs = p.v_ss;
    } else if (w.whole_head) {
      widen_rows(k, p.k_ss, Sk, D, w.kc);
      widen_rows(v, p.v_ss, Sk, D, w.vc);
      kv.kf = w.kc, kv.vf = w.vc;
    }
    for (int64_t u = c; u < units; u += p.chunks)
      bwd_block<T, L, BM, R, KR, NV, MODS>(p, b, hk * p.group + u % p.group, u / p.group, kv, dk, dv, w);
    if (p.chunks == 1) store_dkdv<T>(p, bhk * Sk, Sk, dk, dv);
  }
}

// The items at each ISA level's tiles, compiled for that level only (FASTLM_ISA_V4, common.h).
template <typename T, bool MODS>
FASTLM_ISA_V4 void items_v4(const Params& p, int64_t begin, int64_t end) {
  bwd_items<T, 16, 32, 8, 6, 4, MODS>(p, begin, end);
}
template <typename T, bool MODS>
FASTLM_ISA_V3 void items_v3(const Params& p, int64_t begin, int64_t end) {
  bwd_items<T, 8, 16, 6, 4, 2, MODS>(p, begin, end);
}
template <typename T, bool MODS>
void items_v0(const Params& p, int64_t begin, int64_t end) {
  bwd_items<T, 4, 8, 6, 4, 2, MODS>(p, begin, end);
}

// chunks > 1: dk / dv rows [begin, end) of the (B * Hkv * Sk) rows, the chunks' partial sums added in chunk order.
template <typename T>
FASTLM_CPU_CLONES void reduce_dkdv(const Params& p, int64_t begin, int64_t end) {
  const int64_t Sk = p.Sk, Dp = p.Dp;
  std::vector<float> acc(static_cast<size_t>(2 * Dp));
  for (int64_t row = begin; row < end; ++row) {
    const int64_t bhk = row / Sk, j = row % Sk;
    float *ak = acc.data(), *av = acc.data() + Dp;
    for (int64_t d = 0; d < 2 * Dp; ++d) acc[d] = 0.f;
    for (int64_t c = 0; c < p.chunks; ++c) {
      const float* pk = p.dkv_part + (bhk * p.chunks + c) * 2 * Sk * Dp + j * Dp;
      const float* pv = pk + Sk * Dp;
#pragma omp simd
      for (int64_t d = 0; d < Dp; ++d) ak[d] += pk[d], av[d] += pv[d];
    }
    store_dkdv<T>(p, row, 1, ak, av);
  }
}

// dmask: the op's output (sizes 1 on the mask's stride-0 dims), or, where work items would share its elements, a
// buffer keeping those dims (see the top), summed into it afterwards in index order.
struct MaskGrad {
  int64_t out[4];   // the output's sizes
  int64_t keep[4];  // the buffer's sizes (out[d], or the full size where items would share elements)
  bool direct;      // the buffer is the output
};

MaskGrad mask_grad_shape(const Tensor& m, const Params& p) {
  MaskGrad g{};
  g.direct = true;
  for (int d = 0; d < 4; ++d) {
    const bool bc = m.stride(d) == 0 && m.size(d) > 1;
    const bool shared = d == 0 || (d == 1 && (p.Hkv > 1 || p.chunks > 1)) || (d == 2 && p.chunks > 1);
    g.out[d] = bc ? 1 : m.size(d);
    g.keep[d] = bc && shared ? m.size(d) : g.out[d];
    g.direct = g.direct && g.keep[d] == g.out[d];
  }
  return g;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_bwd_cpu(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
    const std::optional<Tensor>& mask, const std::optional<Tensor>& cu_q, const std::optional<Tensor>& cu_k,
    int64_t /*max_q*/, int64_t /*max_k*/, double scale, bool causal, double dropout_p, const Tensor& rng,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<Tensor>& sinks,
    const std::optional<Tensor>& alibi, bool mask_grad) {
  Params p{};
  const attn::Dims d = set_params(p, q, k, v, mask, cu_q, cu_k, scale, causal, dropout_p, rng, window_left,
                                  window_right, softcap, sinks, alibi);
  const int64_t B = d.B, H = d.H, Hkv = d.Hkv, Sq = d.Sq, Sk = d.Sk, D = d.D;
  const ScalarType dt = q.scalar_type();
  check_bhsd(o, "o", dt);
  check_bhsd(dout, "do", dt);
  for (int i = 0; i < 4; ++i) {
    STD_TORCH_CHECK(o.size(i) == q.size(i) && dout.size(i) == q.size(i), "fastlm: o and do must have q's shape");
  }
  check_cpu(lse, "lse");
  STD_TORCH_CHECK(lse.scalar_type() == ScalarType::Float, "fastlm: lse must be float32, got ",
                  dtype_name(lse.scalar_type()));
  STD_TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == Sq,
                  "fastlm: lse must have shape (B, H, Sq) = (", B, ", ", H, ", ", Sq, ")");
  STD_TORCH_CHECK(!mask_grad || (mask.has_value() && p.mask_kind != kBoolMask),
                  "fastlm: mask_grad needs an additive float mask");

  // Tiles per ISA (the forward's, plus dK / dV tiles of KR keys x NV vectors: 24 accumulators on AVX-512's 32
  // registers, 8 on AVX2's / SSE's 16).
  const int level = isa();
  const int64_t L = level == 2 ? 16 : level == 1 ? 8 : 4, bm = 2 * L;
  p.Dp = (D + L - 1) / L * L;
  p.n_qblocks = (Sq + bm - 1) / bm;
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  const int64_t items0 = B * Hkv, units = p.group * p.n_qblocks;
  p.chunks = 1;
  if (items0 > 0 && items0 % threads != 0 && items0 < 8 * threads) {
    // Partial dK / dV: at most 256 MiB of them.
    const int64_t per_chunk = std::max<int64_t>(items0 * 2 * Sk * p.Dp * 4, 1);
    const int64_t cap = std::max<int64_t>((int64_t{256} << 20) / per_chunk, 1);
    p.chunks = std::max<int64_t>(1, std::min({(2 * threads + items0 - 1) / items0, units, cap}));
  }

  Tensor dq = torch::stable::new_empty(q, {B, H, Sq, D});
  Tensor dk = torch::stable::new_empty(k, {B, Hkv, Sk, D});
  Tensor dv = torch::stable::new_empty(v, {B, Hkv, Sk, D});
  MaskGrad mg{};
  Tensor dmask = torch::stable::new_empty(q, {0}, ScalarType::Float);
  if (mask_grad) {
    mg = mask_grad_shape(*mask, p);
    dmask = torch::stable::new_empty(q, {mg.out[0], mg.out[1], mg.out[2], mg.out[3]}, ScalarType::Float);
  }
  Tensor dsinks = torch::stable::new_empty(q, {p.sinks != nullptr ? H : 0}, ScalarType::Float);
  for (const Tensor* t : {&dq, &dk, &dv, &dmask, &dsinks}) poison(*t);
  if (B * H == 0) {
    torch::stable::zero_(dk);
    torch::stable::zero_(dv);
    torch::stable::zero_(dmask);
    torch::stable::zero_(dsinks);
    return {dq, dk, dv, dmask, dsinks};
  }

  p.dout = dout.data_ptr(), p.o = o.data_ptr(), p.lse_in = static_cast<const float*>(lse.data_ptr());
  p.o_sb = o.stride(0), p.o_sh = o.stride(1), p.o_ss = o.stride(2);
  p.do_sb = dout.stride(0), p.do_sh = dout.stride(1), p.do_ss = dout.stride(2);
  p.l_sb = lse.stride(0), p.l_sh = lse.stride(1), p.l_ss = lse.stride(2);
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  std::optional<Scratch> dkv_part, dsink_part, dmask_buf;
  if (p.chunks > 1) {
    dkv_part.emplace(items0 * p.chunks * 2 * Sk * p.Dp);
    p.dkv_part = dkv_part->get();
  }
  if (p.sinks != nullptr) {
    dsink_part.emplace(B * H * p.n_qblocks);
    p.dsink_part = dsink_part->get();
  }
  if (mask_grad) {
    const int64_t* g = mg.keep;
    if (mg.direct) {
      p.dmask = static_cast<float*>(dmask.data_ptr());
    } else {
      dmask_buf.emplace(g[0] * g[1] * g[2] * g[3]);
      p.dmask = dmask_buf->get();
    }
    for (int64_t x = 0; x < g[0] * g[1] * g[2] * g[3]; ++x) p.dmask[x] = 0.f;
    p.g_sk = g[3] > 1 ? 1 : 0;
    p.g_sq = g[2] > 1 ? g[3] : 0;
    p.g_sh = g[1] > 1 ? g[2] * g[3] : 0;
    p.g_sb = g[0] > 1 ? g[1] * g[2] * g[3] : 0;
  }

  const bool mods = p.softcap > 0.f || p.alibi != nullptr;
  dispatch_float<half, bf16>(dt, [&](auto tag) {
    using T = decltype(tag);
    // One item is a whole (b, kv head) (or a chunk of one): worth a task of its own.
    parallel_rows(items0 * p.chunks, 1, [&](int64_t begin, int64_t end) {
      const auto run = [&](auto with_mods) {
        constexpr bool M = decltype(with_mods)::value;
        if (level == 2) {
          items_v4<T, M>(p, begin, end);
        } else if (level == 1) {
          items_v3<T, M>(p, begin, end);
        } else {
          items_v0<T, M>(p, begin, end);
        }
      };
      if (mods) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
    });
    if (p.chunks > 1) {
      parallel_rows(items0 * Sk, grain_for(p.chunks * 2 * p.Dp * 4),
                    [&](int64_t begin, int64_t end) { reduce_dkdv<T>(p, begin, end); });
    }
  });

  if (p.sinks != nullptr) {  // dsinks[h]: the blocks' terms in (b, query block) order
    float* ds = static_cast<float*>(dsinks.data_ptr());
    for (int64_t h = 0; h < H; ++h) {
      float acc = 0.f;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t qb = 0; qb < p.n_qblocks; ++qb) acc += p.dsink_part[(b * H + h) * p.n_qblocks + qb];
      ds[h] = acc;
    }
  }
  if (mask_grad && !mg.direct) {  // sum the kept dims in index order
    const int64_t *g = mg.keep, *n = mg.out;
    float* out = static_cast<float*>(dmask.data_ptr());
    const float* buf = p.dmask;
    parallel_rows(n[0] * n[1] * n[2], grain_for(g[3] * 4), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t ob = r / (n[1] * n[2]), oh = (r / n[2]) % n[1], oq = r % n[2];
        float* dst = out + r * n[3];
        for (int64_t x = 0; x < n[3]; ++x) dst[x] = 0.f;
        for (int64_t b = n[0] == g[0] ? ob : 0; b < (n[0] == g[0] ? ob + 1 : g[0]); ++b)
          for (int64_t h = n[1] == g[1] ? oh : 0; h < (n[1] == g[1] ? oh + 1 : g[1]); ++h)
            for (int64_t i = n[2] == g[2] ? oq : 0; i < (n[2] == g[2] ? oq + 1 : g[2]); ++i) {
              const float* src = buf + ((b * g[1] + h) * g[2] + i) * g[3];
              for (int64_t x = 0; x < n[3]; ++x) dst[x] += src[x];
            }
      }
    });
  }
  return {dq, dk, dv, dmask, dsinks};
}

}  // namespace
}  // namespace fastlm::cpu::flash

STABLE_TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("attention_bwd_cpu", TORCH_BOX(&fastlm::cpu::flash::attention_bwd_cpu));
}
