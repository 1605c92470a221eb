// Softmax / log-softmax, the scaled-masked-causal softmax of attention scores, and their backward: CPU kernels
// registered as the CPU implementations of fastlm::softmax_fwd_cpu, fastlm::masked_softmax_fwd_cpu and
// fastlm::softmax_bwd_cpu (schemas in csrc/ops.cpp). Same op contract as csrc/cuda/softmax.cu.
//
// Two work layouts, both parallel over independent work items (every output element is computed by one thread
// in a fixed order: results do not depend on the thread count):
//  * rows (softmax along a dim with unit stride): one row at a time, three vectorised sweeps over a row that
//    stays in L1/L2 (max; exp(x - max) written to y, with the sum; the scale by 1 / sum). The exp is computed
//    once per element; x is read once from memory. A 16-bit row is widened by the first sweep into an fp32 scratch
//    row (in the pair order of csrc/cpu/common.h), the middle sweeps run on fp32 only, and the last packs pairs
//    back; the backward walks its 16-bit rows as pairs too.
//  * strided (softmax along a dim of a contiguous tensor with inner size > 1, no transpose copy): element j of
//    row (o, i) is at o * R * inner + j * inner + i. A work item is a block of `nb` consecutive i of one o; the
//    sweeps run over j with the nb lanes as the vector dimension (unit stride), so nothing is gathered. nb is
//    chosen so that the (R, nb) block stays in L2 between sweeps.
// The masked softmax is the rows layout with the score s = x * scale (+ mask / causal) formed in the first sweep
// (one read of x and of the mask row) into the fp32 scratch row; causal rows only touch keys <= query and write
// zeros past them; a row with max -inf (fully masked) gives zeros.
//
// Numerics: fp32 math, exp via exp_nonpos (~2 ulp); vectorised sums are reassociated across SIMD lanes
// (and, for 16-bit rows, taken in pair order): fixed for a given build / ISA clone, so bitwise reproducible run to run.
#include "checks.h"
#include "cpu/common.h"

#include <algorithm>
#include <memory>
#include <optional>

namespace fastlm::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Lanes of a strided block: stack arrays of per-lane statistics.
constexpr int64_t kMaxLanes = 256;

// Scratch row of n floats for one parallel chunk (fp16/bf16 rows, masked scores). Heap: rows can be wide.
struct Scratch {
  std::unique_ptr<float[]> p;
  int64_t n = 0;
  float* get(int64_t want) {
    if (want > n) {
      p.reset(new float[want]);
      n = want;
    }
    return p.get();
  }
};

template <typename T>
FASTLM_INLINE float row_max(const T* __restrict__ x, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < n; ++k) {
    const float v = to_float(x[k]);
    m = v > m ? v : m;  // a NaN element is skipped here but still poisons the sum below (torch: NaN row)
  }
  return m;
}

// In place: s[k] = exp(s[k] - m); returns the sum.
FASTLM_INLINE float exp_sum_inplace(float* __restrict__ s, int64_t n, float m) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) {
    const float v = exp_nonpos(s[k] - m);
    s[k] = v;
    sum += v;
  }
  return sum;
}

template <typename T>
FASTLM_INLINE void scale_store(const float* __restrict__ e, T* __restrict__ y, int64_t n, float inv) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] = from_float<T>(e[k] * inv);
}

template <typename T>
FASTLM_INLINE void fill_zero(T* __restrict__ y, int64_t n) {
  const T z = from_float<T>(0.f);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] = z;
}

// ------------------------------------------------------------------------------------------------------------
// 16-bit rows in pair order: an fp32 row buf of n elements holds the low elements of the row's 32-bit words, then
// their high elements, then the last element of an odd row (csrc/cpu/common.h: loops over words vectorise with
// 32-bit lanes only).

// buf <- row x of n elements in pair order; returns the row's max (as row_max: NaN elements skipped).
template <typename T>
FASTLM_INLINE float widen_max(const T* __restrict__ x, float* __restrict__ buf, int64_t n) {
  const int64_t P = n / 2;
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < P; ++k) {
    const uint32_t u = load_pair(x, k);
    const float lo = pair_lo<T>(u), hi = pair_hi<T>(u);
    buf[k] = lo;
    buf[P + k] = hi;
    m = lo > m ? lo : m;
    m = hi > m ? hi : m;
  }
  if (n & 1) {
    const float v = to_float(x[n - 1]);
    buf[n - 1] = v;
    m = v > m ? v : m;
  }
  return m;
}

// Every value the 16-bit rows store is fp32 arithmetic on widened 16-bit inputs (and on a scale passed as the default
// NaN when it is one): pack_pair without its NaN selects (csrc/cpu/common.h).
template <typename T>
FASTLM_INLINE uint32_t pack(float lo, float hi) {
  return pack_pair<T, false>(lo, hi);
}

// y <- f(buf) for a row of n elements, buf in pair order.
template <typename T, typename F>
FASTLM_INLINE void narrow_row(const float* __restrict__ buf, T* __restrict__ y, int64_t n, const F& f) {
  const int64_t P = n / 2;
#pragma omp simd
  for (int64_t k = 0; k < P; ++k) store_pair(y, k, pack<T>(f(buf[k]), f(buf[P + k])));
  if (n & 1) y[n - 1] = from_float<T>(f(buf[n - 1]));
}

// The sum over k < n of f(a[k], b[k]) (16-bit rows: in pair order).
template <typename T, typename F>
FASTLM_INLINE float sum2(const T* __restrict__ a, const T* __restrict__ b, int64_t n, const F& f) {
  float s = 0.f;
  if constexpr (std::is_same_v<T, float>) {
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n; ++k) s += f(a[k], b[k]);
  } else {
    const int64_t P = n / 2;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < P; ++k) {
      const uint32_t u = load_pair(a, k), v = load_pair(b, k);
      s += f(pair_lo<T>(u), pair_lo<T>(v)) + f(pair_hi<T>(u), pair_hi<T>(v));
    }
    if (n & 1) s += f(to_float(a[n - 1]), to_float(b[n - 1]));
  }
  return s;
}

// out[k] = f(a[k], b[k]) for k < n.
template <typename T, typename F>
FASTLM_INLINE void map2(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t n, const F& f) {
  if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) out[k] = f(a[k], b[k]);
  } else {
    const int64_t P = n / 2;
#pragma omp simd
    for (int64_t k = 0; k < P; ++k) {
      const uint32_t u = load_pair(a, k), v = load_pair(b, k);
      store_pair(out, k, pack<T>(f(pair_lo<T>(u), pair_lo<T>(v)), f(pair_hi<T>(u), pair_hi<T>(v))));
    }
    if (n & 1) out[n - 1] = from_float<T>(f(to_float(a[n - 1]), to_float(b[n - 1])));
  }
}

// exp(y) of a saved log-softmax output y = x - max - log(sum) <= 0 (the op's contract): exp_nonpos. Clamping y to
// exp_nonpos's range (y <= 88.7) first doubled the loop's mask work (GCC 12 merged both clamps into masked blends):
// a y > 88.7, which no log-softmax gives, has no defined gradient here.
FASTLM_INLINE float exp_logp(float y) { return exp_nonpos(y); }

// ------------------------------------------------------------------------------------------------------------
// Forward, rows layout: rows [r0, r1) of R elements, x row r at r * sx, y contiguous.
template <typename T>
FASTLM_CPU_CLONES void softmax_rows(const T* __restrict__ x, int64_t sx, T* __restrict__ y, int64_t R, bool log,
                                    int64_t r0, int64_t r1) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  Scratch scratch;
  float* const buf = kF32 ? nullptr : scratch.get(R);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * sx;
    T* yr = y + r * R;
    // v: the row in fp32 (x itself, or the widened copy in buf)
    const float* v;
    float m;
    if constexpr (kF32) {
      v = xr;
      m = row_max(xr, R);
    } else {
      v = buf;
      m = widen_max(xr, buf, R);
    }
    if (log) {
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < R; ++k) sum += exp_nonpos(v[k] - m);
      const float lg = std::log(sum);
      auto f = [=](float t) FASTLM_INLINE_LAMBDA { return t - m - lg; };
      if constexpr (kF32) {
#pragma omp simd
        for (int64_t k = 0; k < R; ++k) yr[k] = f(v[k]);
      } else {
        narrow_row(buf, yr, R, f);
      }
    } else {
      // The exps go to y (fp32: y and x never alias, y is a fresh tensor) or back into buf.
      float* e = kF32 ? reinterpret_cast<float*>(yr) : buf;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < R; ++k) {
        const float t = exp_nonpos(v[k] - m);
        e[k] = t;
        sum += t;
      }
      const float inv = 1.f / sum;
      if constexpr (kF32) {
#pragma omp simd
        for (int64_t k = 0; k < R; ++k) e[k] *= inv;
      } else {
        narrow_row(buf, yr, R, [=](float t) FASTLM_INLINE_LAMBDA { return t * inv; });
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Forward, masked rows: row r = (b, h, q) of (B, H, Sq, Sk) scores.
struct NoMask {};

template <typename T>
struct MaskedArgs {
  const T* x;
  T* y;
  const void* mask;  // element type M of masked_rows; unused for NoMask
  int64_t H, Sq, Sk;
  int64_t s0, s1, s2;      // x strides (elements) of b, h, q
  int64_t m0, m1, m2, m3;  // mask strides (elements) of b, h, q, k (0 for broadcast dims)
  float scale;
  bool causal;
};

// The score of key k with its mask element mk: bool keeps or sets -inf, a float mask adds.
FASTLM_INLINE float apply_mask(float s, bool mk) { return mk ? s : kNegInf; }
FASTLM_INLINE float apply_mask(float s, float mk) { return s + mk; }
FASTLM_INLINE float apply_mask(float s, half mk) { return s + to_float(mk); }
FASTLM_INLINE float apply_mask(float s, bf16 mk) { return s + to_float(mk); }
FASTLM_INLINE float apply_mask(float s, double mk) { return s + static_cast<float>(mk); }

// buf[k] = x[k] * scale (+ mask) for k < n; returns the max. kUnit: the mask row has unit stride (vectorises);
// otherwise its elements are m3 apart (0: one value broadcast over the keys).
template <typename T, typename M, bool kUnit>
FASTLM_INLINE float masked_scores(const T* __restrict__ xr, const M* __restrict__ mr, int64_t m3, float scale,
                                  float* __restrict__ buf, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < n; ++k) {
    float s = to_float(xr[k]) * scale;
    if constexpr (!std::is_same_v<M, NoMask>) s = apply_mask(s, mr[kUnit ? k : k * m3]);
    buf[k] = s;
    m = s > m ? s : m;
  }
  return m;
}

template <typename T, typename M>
FASTLM_CPU_CLONES void masked_rows(const MaskedArgs<T>& a, int64_t r0, int64_t r1) {
  Scratch scratch;
  float* buf = scratch.get(a.Sk);
  const M* mask = static_cast<const M*>(a.mask);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t q = r % a.Sq;
    const int64_t h = (r / a.Sq) % a.H;
    const int64_t b = r / (a.Sq * a.H);
    const T* xr = a.x + b * a.s0 + h * a.s1 + q * a.s2;
    const M* mr = std::is_same_v<M, NoMask> ? nullptr : mask + b * a.m0 + h * a.m1 + q * a.m2;
    T* yr = a.y + r * a.Sk;
    // Causal (top-left): keys k > q are masked; they are never read, only zeroed.
    const int64_t n = a.causal ? std::min(q + 1, a.Sk) : a.Sk;
    const float m = a.m3 == 1 ? masked_scores<T, M, true>(xr, mr, 1, a.scale, buf, n)
                              : masked_scores<T, M, false>(xr, mr, a.m3, a.scale, buf, n);
    if (m == kNegInf) {
      fill_zero(yr, a.Sk);  // fully masked: zeros (the unfused composition would give NaN)
      continue;
    }
    const float inv = 1.f / exp_sum_inplace(buf, n, m);
    scale_store(buf, yr, n, inv);
    fill_zero(yr + n, a.Sk - n);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Strided layout: work item w = (o, block ib) covers lanes i in [ib * nb, min(inner, (ib + 1) * nb)).
struct StridedShape {
  int64_t outer, R, inner, nb, nblocks;
};

// Work item w of the strided layout: its first element (o * R * inner + i0) and its number of lanes.
struct StridedItem {
  int64_t base, nl;
};

FASTLM_INLINE StridedItem strided_item(const StridedShape& sh, int64_t w) {
  const int64_t o = w / sh.nblocks;
  const int64_t i0 = (w % sh.nblocks) * sh.nb;
  return {o * sh.R * sh.inner + i0, std::min(sh.nb, sh.inner - i0)};
}

template <typename T>
FASTLM_CPU_CLONES void softmax_strided(const T* __restrict__ x, T* __restrict__ y, StridedShape sh, bool log,
                                       int64_t w0, int64_t w1) {
  float m[kMaxLanes], sum[kMaxLanes];
  const int64_t R = sh.R, inner = sh.inner;
  for (int64_t w = w0; w < w1; ++w) {
    const StridedItem it = strided_item(sh, w);
    const int64_t base = it.base, nl = it.nl;
    for (int64_t i = 0; i < nl; ++i) m[i] = kNegInf, sum[i] = 0.f;
    for (int64_t j = 0; j < R; ++j) {
      const T* p = x + base + j * inner;
#pragma omp simd
      for (int64_t i = 0; i < nl; ++i) {
        const float v = to_float(p[i]);
        m[i] = v > m[i] ? v : m[i];
      }
    }
    for (int64_t j = 0; j < R; ++j) {
      const T* p = x + base + j * inner;
#pragma omp simd
      for (int64_t i = 0; i < nl; ++i) sum[i] += exp_nonpos(to_float(p[i]) - m[i]);
    }
    // sum[i] becomes the additive term (log) or the factor (softmax) of lane i.
    for (int64_t i = 0; i < nl; ++i) sum[i] = log ? m[i] + std::log(sum[i]) : 1.f / sum[i];
    for (int64_t j = 0; j < R; ++j) {
      const T* p = x + base + j * inner;
      T* q = y + base + j * inner;
      if (log) {
#pragma omp simd
        for (int64_t i = 0; i < nl; ++i) q[i] = from_float<T>(to_float(p[i]) - sum[i]);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < nl; ++i) q[i] = from_float<T>(exp_nonpos(to_float(p[i]) - m[i]) * sum[i]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Backward.  softmax: dx = scale * y * (dy - sum(y * dy));  log: dx = scale * (dy - exp(y) * sum(dy)).
template <typename T>
FASTLM_CPU_CLONES void softmax_bwd_rows(const T* __restrict__ y, int64_t sy, const T* __restrict__ dy, int64_t sdy,
                                        T* __restrict__ dx, int64_t R, bool log, float scale, int64_t r0, int64_t r1) {
  // scale == 1 (every plain softmax): one multiply per element less (x * 1 is exact, so the results are the same).
  auto rows = [&](auto unit) FASTLM_INLINE_LAMBDA {
    constexpr bool kUnit = decltype(unit)::value;
    for (int64_t r = r0; r < r1; ++r) {
      const T* yr = y + r * sy;
      const T* dyr = dy + r * sdy;
      T* dxr = dx + r * R;
      if (log) {
        const float s = sum2(yr, dyr, R, [](float, float d) FASTLM_INLINE_LAMBDA { return d; });
        map2(yr, dyr, dxr, R, [=](float p, float d) FASTLM_INLINE_LAMBDA {
          const float g = d - exp_logp(p) * s;
          return kUnit ? g : scale * g;
        });
      } else {
        const float dot = sum2(yr, dyr, R, [](float p, float d) FASTLM_INLINE_LAMBDA { return p * d; });
        map2(yr, dyr, dxr, R, [=](float p, float d) FASTLM_INLINE_LAMBDA {
          return kUnit ? p * (d - dot) : scale * p * (d - dot);
        });
      }
    }
  };
  if (scale == 1.f) {
    rows(std::true_type{});
  } else {
    rows(std::false_type{});
  }
}

template <typename T>
FASTLM_CPU_CLONES void softmax_bwd_strided(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx,
                                           StridedShape sh, bool log, float scale, int64_t w0, int64_t w1) {
  float dot[kMaxLanes];
  const int64_t R = sh.R, inner = sh.inner;
  for (int64_t w = w0; w < w1; ++w) {
    const StridedItem it = strided_item(sh, w);
    const int64_t base = it.base, nl = it.nl;
    for (int64_t i = 0; i < nl; ++i) dot[i] = 0.f;
    for (int64_t j = 0; j < R; ++j) {
      const T* py = y + base + j * inner;
      const T* pd = dy + base + j * inner;
#pragma omp simd
      for (int64_t i = 0; i < nl; ++i) dot[i] += log ? to_float(pd[i]) : to_float(py[i]) * to_float(pd[i]);
    }
    for (int64_t j = 0; j < R; ++j) {
      const int64_t off = base + j * inner;
      const T* py = y + off;
      const T* pd = dy + off;
      T* q = dx + off;
      if (log) {
#pragma omp simd
        for (int64_t i = 0; i < nl; ++i) {
          q[i] = from_float<T>(scale * (to_float(pd[i]) - exp_logp(to_float(py[i])) * dot[i]));
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < nl; ++i) q[i] = from_float<T>(scale * to_float(py[i]) * (to_float(pd[i]) - dot[i]));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Host side.

// (outer, R, inner) of a tensor along dim, and the lane blocking of the strided layout: an (R, nb) block of fp32
// statistics inputs stays within ~256 KiB of L2 between sweeps, nb a multiple of 16 (one AVX-512 vector).
StridedShape split_dims(const Tensor& t, int64_t dim) {
  const softmax::Split sp = softmax::split_dims(t, dim);
  StridedShape s{sp.outer, sp.R, sp.inner, 1, 1};
  int64_t nb = (256 * 1024 / 4) / std::max<int64_t>(s.R, 1);
  nb = std::clamp<int64_t>(nb / 16 * 16, 16, kMaxLanes);
  s.nb = std::min(nb, s.inner);
  s.nblocks = (s.inner + s.nb - 1) / s.nb;
  return s;
}

Tensor softmax_fwd_cpu(const Tensor& x, int64_t dim_in, bool log) {
  check_cpu_float(x, "x");
  const int64_t dim = softmax::normalize_dim(x, dim_in, "x");
  const bool rows2d = x.dim() == 2 && dim == 1;
  if (x.numel() == 0) return empty_on(x, x.sizes());
  softmax::check_layout(x, rows2d);
  const StridedShape sh = split_dims(x, dim);
  Tensor y = empty_on(x, x.sizes());
  if (x.numel() == 0) return y;
  dispatch_float<half, bf16>(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.data_ptr());
    T* yp = static_cast<T*>(y.data_ptr());
    if (sh.inner == 1) {
      const int64_t sx = rows2d ? x.stride(0) : sh.R;
      parallel_rows(sh.outer, grain_for(sh.R * 2 * static_cast<int64_t>(sizeof(T))),
                    [&](int64_t r0, int64_t r1) { softmax_rows<T>(xp, sx, yp, sh.R, log, r0, r1); });
    } else {
      parallel_rows(sh.outer * sh.nblocks, grain_for(sh.R * sh.nb * 2 * static_cast<int64_t>(sizeof(T))),
                    [&](int64_t w0, int64_t w1) { softmax_strided<T>(xp, yp, sh, log, w0, w1); });
    }
  });
  return y;
}

template <typename T, typename M>
void run_masked(const MaskedArgs<T>& a, int64_t rows) {
  parallel_rows(rows, grain_for(a.Sk * 2 * static_cast<int64_t>(sizeof(T))),
                [&](int64_t r0, int64_t r1) { masked_rows<T, M>(a, r0, r1); });
}

Tensor masked_softmax_fwd_cpu(const Tensor& x, const std::optional<Tensor>& mask, double scale, bool causal) {
  check_cpu_float(x, "x");
  const softmax::Scores sc = softmax::check_scores(x);
  const int64_t B = sc.B, H = sc.H, Sq = sc.Sq, Sk = sc.Sk;
  if (mask) softmax::check_mask(*mask, sc, check_cpu);
  Tensor y = empty_on(x, {B, H, Sq, Sk});
  if (x.numel() == 0) return y;
  dispatch_float<half, bf16>(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    MaskedArgs<T> a{};
    a.x = static_cast<const T*>(x.data_ptr());
    a.y = static_cast<T*>(y.data_ptr());
    a.H = H;
    a.Sq = Sq;
    a.Sk = Sk;
    a.s0 = x.stride(0);
    a.s1 = x.stride(1);
    a.s2 = x.stride(2);
    a.m3 = 1;
    a.scale = static_cast<float>(scale);
    a.causal = causal;
    const int64_t rows = B * H * Sq;
    if (!mask) {
      run_masked<T, NoMask>(a, rows);
      return;
    }
    a.mask = mask->data_ptr();
    a.m0 = mask->stride(0);
    a.m1 = mask->stride(1);
    a.m2 = mask->stride(2);
    a.m3 = Sk <= 1 ? 1 : mask->stride(3);
    switch (mask->scalar_type()) {
      case ScalarType::Bool: run_masked<T, bool>(a, rows); break;
      case ScalarType::Half: run_masked<T, half>(a, rows); break;
      case ScalarType::BFloat16: run_masked<T, bf16>(a, rows); break;
      case ScalarType::Float: run_masked<T, float>(a, rows); break;
      default: run_masked<T, double>(a, rows); break;
    }
  });
  return y;
}

Tensor softmax_bwd_cpu(const Tensor& dy, const Tensor& y, int64_t dim_in, bool log, double scale) {
  check_cpu_float(y, "y");
  check_cpu_float(dy, "dy");
  const int64_t dim = softmax::normalize_dim(y, dim_in, "y");
  softmax::check_dy(dy, y);
  const bool rows2d = y.dim() == 2 && dim == 1;
  if (y.numel() == 0) return empty_on(y, y.sizes());  // any strides (an expanded empty dy)
  softmax::check_bwd_layout(y, dy, rows2d);
  const StridedShape sh = split_dims(y, dim);
  Tensor dx = empty_on(y, y.sizes());
  if (y.numel() == 0) return dx;
  // A NaN scale as the default quiet NaN: the bf16 rows' packing relies on NaN payloads with zero low bits (pack).
  const float sc = scale != scale ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(scale);
  dispatch_float<half, bf16>(y.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* yp = static_cast<const T*>(y.data_ptr());
    const T* dyp = static_cast<const T*>(dy.data_ptr());
    T* dxp = static_cast<T*>(dx.data_ptr());
    if (sh.inner == 1) {
      const int64_t sy = rows2d ? y.stride(0) : sh.R;
      const int64_t sdy = rows2d ? dy.stride(0) : sh.R;
      parallel_rows(sh.outer, grain_for(sh.R * 3 * static_cast<int64_t>(sizeof(T))), [&](int64_t r0, int64_t r1) {
        softmax_bwd_rows<T>(yp, sy, dyp, sdy, dxp, sh.R, log, sc, r0, r1);
      });
    } else {
      parallel_rows(sh.outer * sh.nblocks, grain_for(sh.R * sh.nb * 3 * static_cast<int64_t>(sizeof(T))),
                    [&](int64_t w0, int64_t w1) { softmax_bwd_strided<T>(yp, dyp, dxp, sh, log, sc, w0, w1); });
    }
  });
  return dx;
}

}  // namespace
}  // namespace fastlm::cpu

STABLE_TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("softmax_fwd_cpu", TORCH_BOX(&fastlm::cpu::softmax_fwd_cpu));
  m.impl("masked_softmax_fwd_cpu", TORCH_BOX(&fastlm::cpu::masked_softmax_fwd_cpu));
  m.impl("softmax_bwd_cpu", TORCH_BOX(&fastlm::cpu::softmax_bwd_cpu));
}
