// The parts of the CPU flash attention shared by its forward (csrc/cpu/attention.cpp) and its backward
// (csrc/cpu/attention_bwd.cpp): the op arguments as one Params (checked once, the same way for both), the fp32
// register tiles vectorised over queries, the score modifiers' row helpers, and dropout's counter-based RNG.
//
// Vectors are GCC vector types of the ISA's native width L (16 / 8 / 4 fp32 lanes), picked at run time by isa()
// together with the tile shapes, in an entry point compiled for that level's ISA only (FASTLM_ISA_V4 / V3,
// common.h). Every helper here is FASTLM_INLINE, so that it is compiled into each level's entry point at its ISA.
//
// Dropout (keep probability 1 - p, kept probabilities scaled by 1 / (1 - p), as torch): the keep bit of score
// (b, h, i, j) is a pure function of (seed, b * H + h, i, j), so the backward regenerates exactly the forward's mask
// whatever its tiling. Philox4x32-10 (Salmon et al., SC'11; the generator of torch's and Triton's GPU dropout) with
// key = the 64-bit seed of the op's `rng` tensor and counter = (j / 4, i, (b * H + h) low, high 32 bits): one call
// gives the 32-bit numbers of keys 4 (j / 4) .. + 3, and key j is kept iff its number is >= p * 2^32. The block
// paths run it on vectors of L queries (lane = i), the row paths on scalars: the same numbers.
#pragma once

#include "checks.h"
#include "cpu/common.h"

#include <algorithm>
#include <optional>
#include <string>
#include <type_traits>

namespace fastlm::cpu::flash {

constexpr int kBN = 64;  // keys per tile
constexpr int64_t kMaxHeadCopy = int64_t{4} << 20;  // fp32 elements of one K (or V) head copy per thread
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// L fp32 lanes as a GCC vector: each ISA gets its native width (16 / 8 / 4), since wider ones are lowered badly.
template <int L>
struct Vec {
  typedef float type __attribute__((vector_size(L * sizeof(float))));
  typedef uint32_t u32 __attribute__((vector_size(L * sizeof(uint32_t))));
  typedef uint64_t u64 __attribute__((vector_size(L * sizeof(uint64_t))));
};

enum MaskKind : int { kNoMask, kBoolMask, kF32Mask, kF16Mask, kBF16Mask };

struct Params {
  const void* q;
  const void* k;
  const void* v;
  const void* mask;
  void* o;     // forward: (B, H, Sq, D) contiguous output; backward: the saved o (strides o_s*)
  float* lse;  // forward: (B, H, Sq) contiguous output
  int64_t q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss;  // strides in elements
  int64_t m_sb, m_sh, m_sq, m_sk;
  int64_t B, H, Hkv, group, Sq, Sk, D, n_qblocks;
  int64_t grouped;  // > 0: decoding with GQA, one work item per (b, kv head) of `grouped` = group * Sq rows
  int64_t off;      // Sk - Sq: the bottom-right alignment of the window and of ALiBi's distances
  int64_t wl, wr;   // window left / right, -1 = unbounded (a bound that hides no key is stored as -1)
  const float* sinks;  // (H,) or null
  const float* alibi;  // (B, H) slopes or null
  int mask_kind;
  float scale;     // the softmax scale
  float qscale;    // the queries' factor: scale, divided by softcap when there is one
  float softcap;   // 0 = none
  bool causal;
  // dropout: keep iff the Philox number >= drop_thr; kept probabilities times drop_scale = 1 / (1 - p)
  bool dropout;
  uint32_t seed_lo, seed_hi, drop_thr;
  float drop_scale;
  // backward only
  const void* dout;      // dO, strides do_s*
  const float* lse_in;   // the saved lse, strides l_s*
  int64_t o_sb, o_sh, o_ss, do_sb, do_sh, do_ss, l_sb, l_sh, l_ss;
  void* dq;              // (B, H, Sq, D) contiguous
  void* dk;              // (B, Hkv, Sk, D) contiguous
  void* dv;
  int64_t Dp;            // D rounded up to the vector width: the row stride of the natural-layout copies
  int64_t chunks;        // work items per (b, kv head): > 1 splits its query blocks, dK / dV reduced afterwards
  float* dkv_part;       // chunks > 1: (B * Hkv * chunks, 2, Sk, Dp) partial dK / dV
  float* dmask;          // mask_grad: the fp32 dS sums, strides g_s* (0 along the summed dims), or null
  int64_t g_sb, g_sh, g_sq, g_sk;
  float* dsink_part;     // sinks: (B, H, n_qblocks) per-block terms of dsinks, or null
};

// The ISA level of this CPU (x86-64-v4 AVX-512: 2, v3 AVX2: 1, anything else: 0): it picks the tile shapes and
// the entry point compiled for that ISA (FASTLM_ISA_V4 / V3), the same test target_clones' resolver makes.
inline int isa() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__) && !defined(FASTLM_NO_CLONES)
  return __builtin_cpu_supports("x86-64-v4") ? 2 : __builtin_cpu_supports("x86-64-v3") ? 1 : 0;
#else
  return 0;
#endif
}

// The keys [lo, hi) that queries [i0, i1) may see under the causal mask and the window (hi <= lo: none).
FASTLM_INLINE void key_range(const Params& p, int64_t i0, int64_t i1, int64_t& lo, int64_t& hi) {
  lo = p.wl >= 0 ? std::max<int64_t>(0, i0 + p.off - p.wl) : 0;
  hi = p.causal ? std::min(p.Sk, i1) : p.Sk;
  if (p.wr >= 0) hi = std::min(hi, i1 + p.off + p.wr);
}

// The additive bias of mask element off: bool False -> -inf, True -> 0; float masks as they are.
FASTLM_INLINE float mask_bias(int kind, const void* m, int64_t off) {
  switch (kind) {
    case kBoolMask: return static_cast<const uint8_t*>(m)[off] ? 0.f : kNegInf;
    case kF32Mask: return static_cast<const float*>(m)[off];
    case kF16Mask: return to_float(static_cast<const half*>(m)[off]);
    default: return to_float(static_cast<const bf16*>(m)[off]);
  }
}

// The L floats at p (64-byte aligned scratch), by reference: a vector passed by value would change the ABI by ISA.
template <int L>
FASTLM_INLINE typename Vec<L>::type& at(float* p) {
  return *reinterpret_cast<typename Vec<L>::type*>(p);
}
template <int L>
FASTLM_INLINE const typename Vec<L>::type& at(const float* p) {
  return *reinterpret_cast<const typename Vec<L>::type*>(p);
}

// st[j][.] = sum_d k[j][d] qt[d][.] for R keys (rows of k ks elements apart).
template <int L, int BM, int R>
FASTLM_INLINE void qk_tile(const float* qt, const float* k, int64_t ks, int64_t D, float* st) {
  using vec = typename Vec<L>::type;
  constexpr int kNV = BM / L;
  vec acc[R][kNV];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < kNV; ++n) acc[r][n] = vec{};
  for (int64_t d = 0; d < D; ++d) {
    vec qv[kNV];
    for (int n = 0; n < kNV; ++n) qv[n] = at<L>(qt + d * BM + n * L);
    for (int r = 0; r < R; ++r) {
      const float kv = k[r * ks + d];
      for (int n = 0; n < kNV; ++n) acc[r][n] += kv * qv[n];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < kNV; ++n) at<L>(st + r * BM + n * L) = acc[r][n];
}

// ot[d][.] += sum_j v[j][d] p[j][.] for R head dims starting at v's column 0 (rows vs elements apart).
template <int L, int BM, int R>
FASTLM_INLINE void pv_tile(const float* pt, int64_t nj, const float* v, int64_t vs, float* ot) {
  using vec = typename Vec<L>::type;
  constexpr int kNV = BM / L;
  vec acc[R][kNV];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < kNV; ++n) acc[r][n] = at<L>(ot + r * BM + n * L);
  for (int64_t j = 0; j < nj; ++j) {
    vec pv[kNV];
    for (int n = 0; n < kNV; ++n) pv[n] = at<L>(pt + j * BM + n * L);
    for (int r = 0; r < R; ++r) {
      const float vv = v[j * vs + r];
      for (int n = 0; n < kNV; ++n) acc[r][n] += vv * pv[n];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < kNV; ++n) at<L>(ot + r * BM + n * L) = acc[r][n];
}

// The remainder (0 < rest < N) of a loop of register tiles: f is called with rest as a template argument.
template <int N, typename F>
FASTLM_INLINE void tail(int64_t rest, F&& f) {
  if constexpr (N > 1) {
    if (rest == N - 1) {
      f(std::integral_constant<int, N - 1>{});
    } else {
      tail<N - 1>(rest, f);
    }
  }
}

// st[j][.] = sum_d k[j][d] qt[d][.] for the nj keys of a tile, R at a time.
template <int L, int BM, int R>
FASTLM_INLINE void qk_tiles(const float* qt, const float* k, int64_t ks, int64_t D, int64_t nj, float* st) {
  int64_t j = 0;
  for (; j + R <= nj; j += R) qk_tile<L, BM, R>(qt, k + j * ks, ks, D, st + j * BM);
  tail<R>(nj - j, [&](auto r) FASTLM_INLINE_LAMBDA {
    qk_tile<L, BM, decltype(r)::value>(qt, k + j * ks, ks, D, st + j * BM);
  });
}

// ot[d][.] += sum_j v[j][d] p[j][.] for all D head dims, R at a time.
template <int L, int BM, int R>
FASTLM_INLINE void pv_tiles(const float* pt, int64_t nj, const float* v, int64_t vs, int64_t D, float* ot) {
  int64_t d = 0;
  for (; d + R <= D; d += R) pv_tile<L, BM, R>(pt, nj, v + d, vs, ot + d * BM);
  tail<R>(D - d, [&](auto r) FASTLM_INLINE_LAMBDA {
    pv_tile<L, BM, decltype(r)::value>(pt, nj, v + d, vs, ot + d * BM);
  });
}

template <typename T>
FASTLM_INLINE void widen_rows(const T* src, int64_t stride, int64_t rows, int64_t D, float* dst) {
  for (int64_t j = 0; j < rows; ++j) {
    const T* s = src + j * stride;
    float* o = dst + j * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = to_float(s[d]);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Dropout's Philox4x32-10, on scalars (U = uint32_t) or vectors of lanes (U = Vec<L>::u32).

FASTLM_INLINE void mulhilo(uint32_t a, uint32_t m, uint32_t& hi, uint32_t& lo) {
  const uint64_t x = static_cast<uint64_t>(a) * m;
  hi = static_cast<uint32_t>(x >> 32);
  lo = static_cast<uint32_t>(x);
}
// On vectors: the even and odd lanes as 64-bit lanes (a 32 x 32 -> 64-bit product each), so that a vector of L
// lanes takes two L / 2-lane 64-bit multiplies (zero-extending the L lanes to 64 bits instead needed twice the
// registers, and shuffles back).
template <typename U>
FASTLM_INLINE void mulhilo(const U& a, uint32_t m, U& hi, U& lo) {
  constexpr int L = sizeof(U) / sizeof(uint32_t);
  using u64 = typename Vec<L / 2>::u64;
  const u64 x = (u64)a;  // GCC vector casts reinterpret the bits
  const u64 even = (x & 0xffffffffu) * static_cast<uint64_t>(m), odd = (x >> 32) * static_cast<uint64_t>(m);
  const u64 l = (even & 0xffffffffu) | (odd << 32), h = (even >> 32) | (odd & ~uint64_t{0xffffffffu});
  lo = (U)l;
  hi = (U)h;
}

// (c0, c1, c2, c3): the counter in, the four random numbers out.
template <typename U>
FASTLM_INLINE void philox(U& c0, U& c1, U& c2, U& c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    U hi0, lo0, hi1, lo1;
    mulhilo(c0, 0xD2511F53u, hi0, lo0);
    mulhilo(c2, 0xCD9E8D57u, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0, c1 = lo1, c2 = hi0 ^ c3 ^ k1, c3 = lo0;
    k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
  }
}

// Dropout of the probabilities of one query row i of (b, h) = bh: s[j - j0] *= z(i, j) for keys [j0, j0 + n).
FASTLM_INLINE void drop_row(const Params& p, int64_t bh, int64_t i, int64_t j0, int64_t n, float* s) {
  for (int64_t t = j0 >> 2; t <= (j0 + n - 1) >> 2 && n > 0; ++t) {
    uint32_t c[4] = {static_cast<uint32_t>(t), static_cast<uint32_t>(i), static_cast<uint32_t>(bh),
                     static_cast<uint32_t>(static_cast<uint64_t>(bh) >> 32)};
    philox(c[0], c[1], c[2], c[3], p.seed_lo, p.seed_hi);
    for (int r = 0; r < 4; ++r) {
      const int64_t j = 4 * t + r - j0;
      if (j >= 0 && j < n) s[j] = c[r] >= p.drop_thr ? s[j] * p.drop_scale : 0.f;
    }
  }
}

// The dropout factors z[j][.] (0 or 1 / (1 - p)) of queries i0 .. i0 + BM of bh against keys [j0, j0 + nj),
// as a (nj, BM) tile like the scores'.
template <int L, int BM>
FASTLM_INLINE void drop_tile(const Params& p, int64_t bh, int64_t i0, int64_t j0, int64_t nj, float* zt) {
  using u32 = typename Vec<L>::u32;
  using vec = typename Vec<L>::type;
  u32 lane = u32{};
  for (int x = 0; x < L; ++x) lane[x] = static_cast<uint32_t>(x);
  const vec keep = vec{} + p.drop_scale;
  const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(bh) >> 32);
  for (int64_t t = j0 >> 2; t <= (j0 + nj - 1) >> 2; ++t) {
    for (int n = 0; n < BM / L; ++n) {
      u32 c0 = u32{} + static_cast<uint32_t>(t), c1 = lane + static_cast<uint32_t>(i0 + n * L);
      u32 c2 = u32{} + static_cast<uint32_t>(bh), c3 = u32{} + hi;
      philox(c0, c1, c2, c3, p.seed_lo, p.seed_hi);
      const u32* c[4] = {&c0, &c1, &c2, &c3};
      for (int r = 0; r < 4; ++r) {
        const int64_t j = 4 * t + r - j0;
        if (j < 0 || j >= nj) continue;
        const auto kept = *c[r] >= p.drop_thr;  // all ones where kept
        at<L>(zt + j * BM + n * L) = kept ? keep : vec{};
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Arguments

inline void check_bhsd(const Tensor& t, const char* name, ScalarType dt) {
  check_cpu_float(t, name);
  STD_TORCH_CHECK(t.dim() == 4, "fastlm: ", name, " must be 4-D (B, H, S, D), got ", t.dim(), " dimensions");
  STD_TORCH_CHECK(t.scalar_type() == dt, "fastlm: ", name, " must have q's dtype ", dtype_name(dt), ", got ",
                  dtype_name(t.scalar_type()));
  STD_TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, "fastlm: ", name,
                  " must have unit stride along the head dim, got stride ", t.stride(3));
}

// q, k, v and the modifiers of one forward or backward call, checked, into p (the caller sets its outputs).
inline attn::Dims set_params(Params& p, const Tensor& q, const Tensor& k, const Tensor& v,
                             const std::optional<Tensor>& mask, const std::optional<Tensor>& cu_q,
                             const std::optional<Tensor>& cu_k, double scale, bool causal, double dropout_p,
                             const Tensor& rng, int64_t window_left, int64_t window_right, double softcap,
                             const std::optional<Tensor>& sinks, const std::optional<Tensor>& alibi) {
  STD_TORCH_CHECK(!cu_q.has_value() && !cu_k.has_value(),
                  "fastlm: unsupported case: varlen (cu_q / cu_k) attention in the CPU backend");
  check_cpu_float(q, "q");
  const ScalarType dt = q.scalar_type();
  check_bhsd(q, "q", dt);
  check_bhsd(k, "k", dt);
  check_bhsd(v, "v", dt);
  const attn::Dims d = attn::qkv_dims(q, k, v);
  const int64_t B = d.B, H = d.H, Sq = d.Sq, D = d.D, Sk = d.Sk;
  STD_TORCH_CHECK(D >= 1, "fastlm: the head dim must be at least 1");
  // Expanded (stride-0) k/v can claim any length without memory behind it; the scratch sizes derive from Sk and D.
  STD_TORCH_CHECK(Sk <= (int64_t{1} << 32) && Sq <= (int64_t{1} << 32) && D <= (int64_t{1} << 20),
                  "fastlm: sequence lengths up to 2^32 and head dims up to 2^20 (got Sq ", Sq, ", Sk ", Sk, ", D ", D,
                  ")");
  attn::check_heads(d);
  if (mask.has_value()) {
    const Tensor& m = *mask;
    check_cpu(m, "mask");
    const ScalarType mt = m.scalar_type();
    p.mask_kind = mt == ScalarType::Bool       ? kBoolMask
                  : mt == ScalarType::Float    ? kF32Mask
                  : mt == ScalarType::Half     ? kF16Mask
                  : mt == ScalarType::BFloat16 ? kBF16Mask
                                               : kNoMask;
    STD_TORCH_CHECK(p.mask_kind != kNoMask, "fastlm: mask must be bool or float32/float16/bfloat16, got ",
                    dtype_name(mt));
    STD_TORCH_CHECK(m.dim() == 4 && m.size(0) == B && m.size(1) == H && m.size(2) == Sq && m.size(3) == Sk,
                    "fastlm: mask must be a (B, H, Sq, Sk) = (", B, ", ", H, ", ", Sq, ", ", Sk,
                    ") view (expand a broadcastable mask)");
    p.mask = m.data_ptr();
    p.m_sb = m.stride(0), p.m_sh = m.stride(1), p.m_sq = m.stride(2), p.m_sk = m.stride(3);
  }
  STD_TORCH_CHECK(window_left >= -1 && window_right >= -1,
                  "fastlm: window sizes must be >= 0 (or -1: unbounded), got (", window_left, ", ", window_right, ")");
  STD_TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), "fastlm: softcap must be finite and >= 0 (0: none), got ",
                  softcap);
  STD_TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fastlm: dropout_p must be in [0, 1), got ", dropout_p);
  const auto check_f32 = [](const std::optional<Tensor>& t, const char* name, int64_t n0, int64_t n1, int dims) {
    if (!t.has_value()) return static_cast<const float*>(nullptr);
    check_cpu(*t, name);
    const bool shape_ok = t->dim() == dims && t->size(0) == n0 && (dims == 1 || t->size(1) == n1);
    STD_TORCH_CHECK(shape_ok, "fastlm: ", name, " must have shape ", dims == 1 ? "(H,) = (" : "(B, H) = (", n0,
                    dims == 1 ? "" : ", ", dims == 1 ? "" : std::to_string(n1), ")");
    STD_TORCH_CHECK(t->scalar_type() == ScalarType::Float, "fastlm: ", name, " must be float32, got ",
                    dtype_name(t->scalar_type()));
    STD_TORCH_CHECK(t->is_contiguous(), "fastlm: ", name, " must be contiguous");
    return static_cast<const float*>(t->data_ptr());
  };
  p.sinks = check_f32(sinks, "sinks", H, 0, 1);
  p.alibi = check_f32(alibi, "alibi", B, H, 2);
  if (dropout_p > 0.0) {
    check_cpu(rng, "rng");
    STD_TORCH_CHECK(rng.scalar_type() == ScalarType::Long && rng.numel() == 1,
                    "fastlm: rng must be a (1,) int64 tensor holding dropout's seed");
    const uint64_t seed = static_cast<uint64_t>(*static_cast<const int64_t*>(rng.data_ptr()));
    p.dropout = true;
    p.seed_lo = static_cast<uint32_t>(seed), p.seed_hi = static_cast<uint32_t>(seed >> 32);
    // P(number >= thr) = 1 - thr / 2^32: p within 2^-32.
    p.drop_thr = static_cast<uint32_t>(std::min(std::ceil(dropout_p * 4294967296.0), 4294967295.0));
    p.drop_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  }
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_ss = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_ss = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_ss = v.stride(2);
  p.B = B, p.H = H, p.Hkv = d.Hkv, p.group = d.Hkv > 0 ? H / d.Hkv : 1, p.Sq = Sq, p.Sk = Sk, p.D = D;
  p.softcap = static_cast<float>(softcap);
  p.scale = static_cast<float>(scale);
  p.qscale = static_cast<float>(softcap > 0.0 ? scale / softcap : scale);
  p.causal = causal;
  p.off = Sk - Sq;
  // Bounds that hide no key become -1 (unbounded): i + off - j lies in [1 - Sq, Sk - 1]. Huge sizes cannot overflow.
  p.wl = window_left >= Sk ? -1 : window_left;
  p.wr = window_right >= Sq ? -1 : window_right;
  return d;
}

}  // namespace fastlm::cpu::flash
