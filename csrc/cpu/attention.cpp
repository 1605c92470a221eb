// Flash-attention forward on the CPU, registered as the CPU implementation of fastlm::attention_fwd_cpu (schema
// and contract in csrc/ops.cpp): dense (B, H, S, D) views with any strides but a unit last one, GQA without
// copying K/V, top-left causal, bool / additive float masks given as expanded (B, H, Sq, Sk) views, fp32 / fp16 /
// bf16 with fp32 accumulation, any head dim, dropout. No varlen (the Python side raises UnsupportedCaseError first;
// the op itself raises too). The backward is csrc/cpu/attention_bwd.cpp (the same tiles, csrc/cpu/attention.h).
//
// Layout: everything is vectorised over QUERIES. A block of BM = 32 queries of one (batch, head) keeps its
// scaled queries transposed, qt[d][i] (fp32), and its output accumulator transposed too, ot[d][i]. Per tile of
// kBN keys:
//   st[j][i] = sum_d k[j][d] * qt[d][i]      register tile of 8 keys x 32 queries (AVX-512), k[j][d] broadcast
//   + mask bias, causal -inf                  (outer products over d: 16 FMA per 10 loads, no reductions)
//   online softmax per query: the row max / sum over keys are lane-wise max / add across the rows st[j][.]
//   ot[d][i] = ot[d][i] * alpha[i] + sum_j v[j][d] * p[j][i]      register tile of 8 dims x 32 queries
// so K and V are only ever read as broadcast scalars from their rows: fp32 K/V are used in place whatever their
// strides, fp16/bf16 ones are widened once per (batch, kv head) into a per-thread fp32 copy (per tile when that
// copy would be too big). The vectors are GCC vector types of the ISA's native width, picked at run time together
// with the tile shape (AVX-512: 16 lanes, 32 queries x 8; AVX2: 8 lanes, 16 x 6; SSE: 4 lanes, 8 x 6), in the ISA
// entry point compiled for that level only (FASTLM_ISA_V4, common.h): a 16-lane vector lowered to ymm pairs spills badly with GCC.
// Key tiles entirely above the causal diagonal or outside the sliding window's band are never visited (each query
// block loops over the keys its band reaches, so the cost falls with the window); tiles whose mask hides every key
// are skipped before any arithmetic. Blocks of fewer than kRowPath valid queries (decoding, Sq = 1, or a ragged
// last block) take a row-at-a-time path instead (dot products over D), since a 32-query block would waste most of
// its lanes there.
//
// Score modifiers (semantics in csrc/ops.cpp), with off = Sk - Sq: softcap (queries pre-scaled by scale / c, then
// s = c * tanh(s), vectorised tanh_fast) and ALiBi (s -= slope * |i + off - j|) are one template flag, MODS, so
// the default path is unchanged; the window only moves loop bounds and masks the tiles on the band's edges; sinks
// start each row's online softmax at m = sink, l = 1 (exp(sink - m)), which a finished row divides by. Dropout
// (attention.h: a Philox number per (b, h, i, j) from the op's seed) multiplies the probabilities by 0 or
// 1 / (1 - p) after they joined the row's sum and before P V, so lse is that of the undropped scores (as torch's).
#include "cpu/attention.h"

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastlm::cpu::flash {
namespace {

// Most queries per block (AVX-512; scratch is sized for it). On AVX-512, blocks of 16 and 48 queries measured no
// better (the tiles are FMA-bound either way) and 12 keys per register tile spill.
constexpr int kBM = 32;
constexpr int kRowPath = 4;    // blocks with fewer valid queries than this go row by row

// softcap and ALiBi on n scores s[0..n) of query i against keys j0.. (MODS only): s = c * tanh(s) (the queries
// carry 1 / c), then s -= slope * |i + off - j|.
FASTLM_INLINE void row_mods(const Params& p, float slope, int64_t i, int64_t j0, int64_t n, float* s) {
  if (p.softcap > 0.f) {
    const float c = p.softcap;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] = c * tanh_fast(s[j]);
  }
  if (p.alibi != nullptr) {
    const float base = static_cast<float>(i + p.off - j0);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] -= slope * std::fabs(base - static_cast<float>(j));
  }
}

// Per-thread scratch (common.h's aligned Scratch), allocated once per parallel chunk; every array 64-byte aligned.
struct Workspace {
  static constexpr int kSlots = 12;
  float *qt, *ot, *st, *bt, *kbias, *kc, *vc, *srow, *qrow, *orow, *kvrow, *zt;
  int64_t cached = -1;  // b * Hkv + hk whose K/V the whole-head copies kc/vc hold
  bool whole_head;
  int64_t size[kSlots];  // floats per array, rounded up to 16
  Scratch buf;

  static bool whole(const Params& p, bool widen) { return widen && p.Sk * p.D <= kMaxHeadCopy; }
  static int64_t sizes(const Params& p, bool widen, int64_t* out) {
    const int64_t D = p.D;
    const int64_t kv_rows = !widen ? 0 : (whole(p, widen) ? p.Sk : kBN);
    const int64_t R = std::max<int64_t>(p.grouped, 1);  // rows of the row path at once
    const int64_t n[kSlots] = {D * kBM,     D * kBM,  kBN * kBM, kBN * kBM, kBN, kv_rows * D,
                               kv_rows * D, R * p.Sk, R * D,     R * D,     D,   p.dropout ? kBN * kBM : 0};
    int64_t total = 0;
    for (int i = 0; i < kSlots; ++i) total += out[i] = (n[i] + 15) / 16 * 16;
    return total;
  }
  Workspace(const Params& p, bool widen) : whole_head(whole(p, widen)), buf(sizes(p, widen, size)) {
    float** slots[kSlots] = {&qt, &ot, &st, &bt, &kbias, &kc, &vc, &srow, &qrow, &orow, &kvrow, &zt};
    float* at = buf.get();
    for (int i = 0; i < kSlots; ++i) {
      *slots[i] = at;
      at += size[i];
    }
  }
};

// out[c] = q . k[c * ks ..] for C consecutive key rows (C independent accumulators: a single dot product's
// reduction is a dependency chain, and the row paths are otherwise bound by its latency, not by memory).
template <int C, typename T>
FASTLM_INLINE void dots(const float* q, const T* k, int64_t ks, int64_t D, float* out) {
  float a[C] = {};
  if constexpr (C == 4) {
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t d = 0; d < D; ++d) {
      const float x = q[d];
      a0 += x * to_float(k[d]);
      a1 += x * to_float(k[ks + d]);
      a2 += x * to_float(k[2 * ks + d]);
      a3 += x * to_float(k[3 * ks + d]);
    }
    a[0] = a0, a[1] = a1, a[2] = a2, a[3] = a3;
  } else {
    float a0 = 0.f;
#pragma omp simd reduction(+ : a0)
    for (int64_t d = 0; d < D; ++d) a0 += q[d] * to_float(k[d]);
    a[0] = a0;
  }
  for (int c = 0; c < C; ++c) out[c] = a[c];
}

// One query row at a time (decoding and ragged blocks): scores by dot products over D, then a plain softmax.
template <typename T, bool MODS>
FASTLM_INLINE void attend_row(const Params& p, const T* q, const T* k, const T* v, int64_t bh, int64_t mb, int64_t i,
                              float slope, float sink, T* o, float* lse, Workspace& w) {
  const int64_t D = p.D;
  int64_t lo, hi;
  key_range(p, i, i + 1, lo, hi);
  const int64_t n = std::max<int64_t>(hi - lo, 0);
  float* qf = w.qrow;
  float* s = w.srow;  // s[j - lo]
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) qf[d] = p.qscale * to_float(q[d]);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) dots<4>(qf, k + (lo + j) * p.k_ss, p.k_ss, D, s + j);
  for (; j < n; ++j) dots<1>(qf, k + (lo + j) * p.k_ss, p.k_ss, D, s + j);
  if constexpr (MODS) row_mods(p, slope, i, lo, n, s);
  if (p.mask_kind != kNoMask) {
    const int64_t mrow = mb + i * p.m_sq + lo * p.m_sk;
    for (int64_t j = 0; j < n; ++j) s[j] += mask_bias(p.mask_kind, p.mask, mrow + j * p.m_sk);
  }
  float mx = sink;  // -inf without sinks
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  float* acc = w.orow;
  for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
  if (mx == kNegInf) {  // no visible key (or none at all) and no sink
    for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(0.f);
    *lse = kNegInf;
    return;
  }
  float l = 0.f;
#pragma omp simd reduction(+ : l)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_fast(s[j] - mx);
    l += s[j];
  }
  if (sink != kNegInf) l += exp_fast(sink - mx);
  if (p.dropout) drop_row(p, bh, i, lo, n, s);  // after the sum: dropout scales the normalised probabilities
  for (int64_t j = 0; j < n; ++j) {
    const float pj = s[j];
    if (pj == 0.f) continue;
    const T* vr = v + (lo + j) * p.v_ss;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += pj * to_float(vr[d]);
  }
  const float inv = 1.f / l;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(acc[d] * inv);
  *lse = mx + std::log(l);
}

// Decoding with GQA: the R = group * Sq query rows of one (b, kv head) at once, so that each K and V row is read
// from memory once for all of them (the per-row path would stream the kv head once per query head). Row r is query
// i = r % Sq of head h = hk * group + r / Sq; the rows share the key range [lo, hi) of all Sq queries, each row
// hiding the keys outside its own range. Scores s[r][j - lo], then per row the row path's softmax, then o.
template <typename T, bool MODS>
FASTLM_INLINE void attend_group(const Params& p, int64_t b, int64_t hk, Workspace& w) {
  const int64_t D = p.D, R = p.grouped, h0 = hk * p.group;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  int64_t lo, hi;
  key_range(p, 0, p.Sq, lo, hi);
  const int64_t n = std::max<int64_t>(hi - lo, 0);
  float *qf = w.qrow, *s = w.srow, *acc = w.orow, *kv = w.kvrow;
  for (int64_t r = 0; r < R; ++r) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_sb + (h0 + r / p.Sq) * p.q_sh + (r % p.Sq) * p.q_ss;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) qf[r * D + d] = p.qscale * to_float(q[d]);
  }
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {  // 4 key rows, read from memory once, in cache for the R query rows
    for (int64_t r = 0; r < R; ++r) dots<4>(qf + r * D, k + (lo + j) * p.k_ss, p.k_ss, D, s + r * n + j);
  }
  for (; j < n; ++j) {
    for (int64_t r = 0; r < R; ++r) dots<1>(qf + r * D, k + (lo + j) * p.k_ss, p.k_ss, D, s + r * n + j);
  }
  float* lsum = w.kbias;  // the rows' sums (R <= kBN: attention_fwd_cpu's condition)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t h = h0 + r / p.Sq, i = r % p.Sq;
    float* sr = s + r * n;
    if constexpr (MODS) row_mods(p, p.alibi != nullptr ? p.alibi[b * p.H + h] : 0.f, i, lo, n, sr);
    if (p.mask_kind != kNoMask) {
      const int64_t mrow = b * p.m_sb + h * p.m_sh + i * p.m_sq + lo * p.m_sk;
      for (int64_t j = 0; j < n; ++j) sr[j] += mask_bias(p.mask_kind, p.mask, mrow + j * p.m_sk);
    }
    int64_t rlo, rhi;  // this row's own keys
    key_range(p, i, i + 1, rlo, rhi);
    rlo = std::clamp<int64_t>(rlo - lo, 0, n);
    rhi = std::clamp<int64_t>(rhi - lo, rlo, n);
    for (int64_t j = 0; j < rlo; ++j) sr[j] = kNegInf;
    for (int64_t j = rhi; j < n; ++j) sr[j] = kNegInf;
    const float sink = p.sinks != nullptr ? p.sinks[h] : kNegInf;
    float mx = sink;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sr[j]);
    const float mu = mx == kNegInf ? 0.f : mx;  // nothing visible: every p = 0, the row's o = 0, lse = -inf
    float l = 0.f;
#pragma omp simd reduction(+ : l)
    for (int64_t j = 0; j < n; ++j) {
      sr[j] = exp_fast(sr[j] - mu);
      l += sr[j];
    }
    if (sink != kNegInf) l += exp_fast(sink - mu);
    lsum[r] = l;
    p.lse[(b * p.H + h) * p.Sq + i] = l > 0.f ? mu + std::log(l) : kNegInf;
  }
  for (int64_t x = 0; x < R * D; ++x) acc[x] = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const T* vr = v + (lo + j) * p.v_ss;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) kv[d] = to_float(vr[d]);
    for (int64_t r = 0; r < R; ++r) {
      const float pj = s[r * n + j];
      if (pj == 0.f) continue;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[r * D + d] += pj * kv[d];
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t h = h0 + r / p.Sq, i = r % p.Sq;
    const float inv = lsum[r] > 0.f ? 1.f / lsum[r] : 0.f;
    T* o = static_cast<T*>(p.o) + ((b * p.H + h) * p.Sq + i) * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(acc[r * D + d] * inv);
  }
}

// Queries [i0, i0 + rows) of one (b, h), rows <= BM: the flash loop over key tiles described at the top.
template <typename T, int L, int BM, int kR, bool MODS>
FASTLM_INLINE void attend_block(const Params& p, int64_t b, int64_t h, int64_t i0, int64_t rows, Workspace& w) {
  const int64_t D = p.D;
  const int64_t hk = h / p.group;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + i0 * p.q_ss;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  T* o = static_cast<T*>(p.o) + ((b * p.H + h) * p.Sq + i0) * D;
  float* lse = p.lse + (b * p.H + h) * p.Sq + i0;
  const int64_t mb = b * p.m_sb + h * p.m_sh;
  const float slope = p.alibi != nullptr ? p.alibi[b * p.H + h] : 0.f;
  const float sink = p.sinks != nullptr ? p.sinks[h] : kNegInf;
  if (rows < kRowPath) {
    for (int64_t r = 0; r < rows; ++r)
      attend_row<T, MODS>(p, q + r * p.q_ss, k, v, b * p.H + h, mb, i0 + r, slope, sink, o + r * D, lse + r, w);
    return;
  }
  float *qt = w.qt, *ot = w.ot, *st = w.st, *bt = w.bt;
  for (int64_t x = 0; x < D * BM; ++x) qt[x] = 0.f, ot[x] = 0.f;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) qt[d * BM + r] = p.qscale * to_float(q[r * p.q_ss + d]);
  float m[BM], l[BM], mt[BM], mu[BM], alpha[BM];
  // A sink is a key of score `sink` and no value: the running max starts at it, with a sum of exp(sink - sink).
  for (int i = 0; i < BM; ++i) m[i] = sink, l[i] = sink == kNegInf ? 0.f : 1.f;

  constexpr bool widen = !std::is_same_v<T, float>;
  if (widen && w.whole_head && w.cached != b * (p.H / p.group) + hk) {
    widen_rows(k, p.k_ss, p.Sk, D, w.kc);
    widen_rows(v, p.v_ss, p.Sk, D, w.vc);
    w.cached = b * (p.H / p.group) + hk;
  }
  const bool key_mask = p.mask_kind != kNoMask && p.m_sq == 0;  // padding-style: one bias per key
  const bool full_mask = p.mask_kind != kNoMask && !key_mask;
  int64_t jbeg, jend;
  key_range(p, i0, i0 + rows, jbeg, jend);
  for (int64_t j0 = jbeg; j0 < jend; j0 += kBN) {
    const int64_t nj = std::min<int64_t>(kBN, jend - j0);
    // Masks first: a tile that hides every key costs no arithmetic.
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
    // K and V rows of this tile in fp32: in place for fp32 inputs, else the widened copies.
    const float *kf, *vf;
    int64_t ks = D, vs = D;
    if constexpr (widen) {
      if (w.whole_head) {
        kf = w.kc + j0 * D;
        vf = w.vc + j0 * D;
      } else {
        widen_rows(k + j0 * p.k_ss, p.k_ss, nj, D, w.kc);
        widen_rows(v + j0 * p.v_ss, p.v_ss, nj, D, w.vc);
        kf = w.kc;
        vf = w.vc;
      }
    } else {
      kf = k + j0 * p.k_ss;
      vf = v + j0 * p.v_ss;
      ks = p.k_ss;
      vs = p.v_ss;
    }
    qk_tiles<L, BM, kR>(qt, kf, ks, D, nj, st);

    if constexpr (MODS) {
      if (p.softcap > 0.f) {
        const float c = p.softcap;
#pragma omp simd
        for (int64_t x = 0; x < nj * BM; ++x) st[x] = c * tanh_fast(st[x]);
      }
      if (p.alibi != nullptr) {
        for (int64_t jj = 0; jj < nj; ++jj) {
          const float base = static_cast<float>(i0 + p.off - j0 - jj);  // query i0 + i is |base + i| from key j0 + jj
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
    // Tiles crossing the causal diagonal or an edge of the window's band: key j = j0 + jj is visible to the
    // queries i0 + i with first <= i <= last.
    const int64_t jlast = j0 + nj - 1;
    const bool edge = (p.causal && jlast > i0) || (p.wr >= 0 && jlast > i0 + p.off + p.wr) ||
                      (p.wl >= 0 && j0 < i0 + rows - 1 + p.off - p.wl);
    if (edge) {
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

    // Online softmax: lane-wise across the key rows of st.
    for (int i = 0; i < BM; ++i) mt[i] = kNegInf;
    for (int64_t jj = 0; jj < nj; ++jj) {
#pragma omp simd
      for (int i = 0; i < BM; ++i) mt[i] = std::max(mt[i], st[jj * BM + i]);
    }
    bool any = false;
    for (int i = 0; i < BM; ++i) any = any || mt[i] != kNegInf;
    if (!any) continue;  // e.g. a float mask of -inf over the whole tile
#pragma omp simd
    for (int i = 0; i < BM; ++i) {
      const float mn = std::max(m[i], mt[i]);
      mu[i] = mn == kNegInf ? 0.f : mn;  // nothing visible yet: keep exp finite (p = 0)
      alpha[i] = exp_fast(m[i] - mu[i]);
      m[i] = mn;
    }
    float rs[BM] = {};
    for (int64_t jj = 0; jj < nj; ++jj) {
#pragma omp simd
      for (int i = 0; i < BM; ++i) {
        const float e = exp_fast(st[jj * BM + i] - mu[i]);
        st[jj * BM + i] = e;
        rs[i] += e;
      }
    }
#pragma omp simd
    for (int i = 0; i < BM; ++i) l[i] = l[i] * alpha[i] + rs[i];
    for (int64_t d = 0; d < D; ++d) {
#pragma omp simd
      for (int i = 0; i < BM; ++i) ot[d * BM + i] *= alpha[i];
    }

    if (p.dropout) {  // after the sums: dropout scales the normalised probabilities
      drop_tile<L, BM>(p, b * p.H + h, i0, j0, nj, w.zt);
#pragma omp simd
      for (int64_t x = 0; x < nj * BM; ++x) st[x] *= w.zt[x];
    }
    pv_tiles<L, BM, kR>(st, nj, vf, vs, D, ot);
  }

  // Epilogue: normalise and transpose back; rows with no visible key get o = 0, lse = -inf.
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    lse[r] = l[r] > 0.f ? m[r] + std::log(l[r]) : kNegInf;
    for (int64_t d = 0; d < D; ++d) o[r * D + d] = from_float<T>(ot[d * BM + r] * inv);
  }
}

// Work items [begin, end) of (b, h, query block), in that order: consecutive items share K/V (same head, or
// the heads of one GQA group), so the widened copy is made once per kv head per thread.
template <typename T, int L, int BM, int R, bool MODS>
FASTLM_INLINE void attention_items(const Params& p, int64_t begin, int64_t end) {
  Workspace w(p, !std::is_same_v<T, float> && p.grouped == 0);
  if (p.grouped > 0) {
    const int64_t Hkv = p.H / p.group;
    for (int64_t item = begin; item < end; ++item) attend_group<T, MODS>(p, item / Hkv, item % Hkv, w);
    return;
  }
  for (int64_t item = begin; item < end; ++item) {
    const int64_t qb = item % p.n_qblocks;
    const int64_t bh = item / p.n_qblocks;
    const int64_t i0 = qb * BM;
    attend_block<T, L, BM, R, MODS>(p, bh / p.H, bh % p.H, i0, std::min<int64_t>(BM, p.Sq - i0), w);
  }
}

// The items at each ISA level's tiles, compiled for that level only (FASTLM_ISA_V4, common.h).
template <typename T, bool MODS>
FASTLM_ISA_V4 void items_v4(const Params& p, int64_t begin, int64_t end) {
  attention_items<T, 16, 32, 8, MODS>(p, begin, end);
}
template <typename T, bool MODS>
FASTLM_ISA_V3 void items_v3(const Params& p, int64_t begin, int64_t end) {
  attention_items<T, 8, 16, 6, MODS>(p, begin, end);
}
template <typename T, bool MODS>
void items_v0(const Params& p, int64_t begin, int64_t end) {
  attention_items<T, 4, 8, 6, MODS>(p, begin, end);
}

std::tuple<Tensor, Tensor> attention_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const std::optional<Tensor>& mask, const std::optional<Tensor>& cu_q,
                                             const std::optional<Tensor>& cu_k, int64_t /*max_q*/, int64_t /*max_k*/,
                                             double scale, bool causal, double dropout_p, const Tensor& rng,
                                             int64_t window_left, int64_t window_right, double softcap,
                                             const std::optional<Tensor>& sinks, const std::optional<Tensor>& alibi) {
  Params p{};
  const attn::Dims d = set_params(p, q, k, v, mask, cu_q, cu_k, scale, causal, dropout_p, rng, window_left,
                                  window_right, softcap, sinks, alibi);
  const int64_t B = d.B, H = d.H, Sq = d.Sq, Hkv = d.Hkv, Sk = d.Sk;
  const attn::FwdOut out = attn::fwd_outputs(q, d);
  if (out.done) {
    if (p.sinks != nullptr && Sk == 0) {  // no key: every row's sum-exp is the sink's
      float* lse = static_cast<float*>(out.lse.data_ptr());
      for (int64_t x = 0; x < B * H * Sq; ++x) lse[x] = p.sinks[(x / Sq) % H];
    }
    return {out.o, out.lse};
  }
  poison(out.o);
  poison(out.lse);
  p.o = out.o.data_ptr();
  p.lse = static_cast<float*>(out.lse.data_ptr());
  // Register tiles per ISA: AVX-512 (32 registers of 16 lanes): 32 queries x 8 keys = 16 accumulators; AVX2 (16
  // registers of 8 lanes): 16 x 6 = 12; SSE (and any other CPU, e.g. NEON's 4 lanes): 8 x 6 = 12.
  const int level = isa();
  const int64_t bm = level == 2 ? 32 : level == 1 ? 16 : 8;
  p.n_qblocks = (Sq + bm - 1) / bm;
  const bool mods = p.softcap > 0.f || p.alibi != nullptr;
  // Decoding with GQA: one item per (b, kv head), so each K/V row is read once for its query heads (attend_group),
  // while that leaves every thread an item and the group's scores fit the scratch (group * Sq * Sk floats).
  // Dropout takes the per-head paths (attend_group has none).
  const int64_t rows = p.group * Sq;
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  p.grouped = Sq < kRowPath && p.group > 1 && B * Hkv >= threads && rows <= kBN && rows * Sk <= kMaxHeadCopy &&
                      !p.dropout
                  ? rows
                  : 0;
  const int64_t items = p.grouped > 0 ? B * Hkv : B * H * p.n_qblocks;
  dispatch_float<half, bf16>(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    // One item is >= kBM x Sk x D multiply-adds (or a decoding row): worth a task of its own.
    parallel_rows(items, 1, [&](int64_t begin, int64_t end) {
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
  });
  return {out.o, out.lse};
}

}  // namespace
}  // namespace fastlm::cpu::flash

STABLE_TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("attention_fwd_cpu", TORCH_BOX(&fastlm::cpu::flash::attention_fwd_cpu));
}
