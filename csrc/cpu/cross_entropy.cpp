// Fused cross-entropy forward (loss and gradient in one pass over the logits; the softmax is never stored): the CPU
// kernel registered as the CPU implementation of fastlm::cross_entropy_fwd_cpu (schema in csrc/ops.cpp). Same op
// contract as csrc/cuda/cross_entropy.cu, except that a target outside [0, C) that is not ignore_index raises
// (checking costs no device sync here).
//
// For a row of logits x (C classes), target t, class weights w (1 without), smoothing eps:
//   lse  = log(sum(exp(x)))
//   loss = (1 - eps) * w_t * (lse - x_t) + eps / C * (W * lse - sum_c w_c x_c),   W = sum_c w_c (C without weights)
//   grad = (1 - eps) * w_t * (p_c - [c == t]) + eps / C * (W * p_c - w_c),  p = softmax(x), times 1 / denom (mean)
// Rows with t == ignore_index: loss 0, grad 0.
//
// Soft (class-probability) targets, fastlm::soft_cross_entropy_fwd_cpu: the same kernels with kSoft; the target is a
// tensor of the input's shape and dtype, t' = (1 - eps) * t + eps / C, and per row (as torch's probability path):
//   S    = sum_c w_c t'_c,   loss = S * lse - sum_c w_c t'_c x_c
//   grad = (p_c * S - w_c t'_c) * scale,   target_grad = -(1 - eps) * w_c * (x_c - lse) * scale
// with scale = 1 / rows for the mean (torch divides by the number of rows, not by a sum of weights), else 1; no
// ignore_index. The target gradient (when asked for) is written in the gradient sweep, from x and lse.
//
// Steps:
//  1. serial, O(rows): the target range check and (mean) denom = sum over non-ignored rows of w_t (count without
//     weights), in row order.
//  2. parallel over rows: the statistics in one read of the row (online: per chunk of kChunk logits a vectorised
//     max, then the rescaled running sum of exp over the same chunk while it is in L1), the loss, and, if asked,
//     the gradient: the exps of the statistics sweep are kept (in the fp32 gradient row, or an fp32 scratch row
//     for fp16/bf16) and rescaled in one more cache-resident sweep, so each logit is read once from memory and
//     exponentiated once (no logits copy). Rows (N, C) with unit class stride are
//     walked row by row; contiguous (N, C, D) with D > 1 by blocks of consecutive d, the d lanes as the vector
//     dimension (unit stride), classes D apart.
//  3. (mean / sum) serial: the sum of the per-row losses in row order, in double.
// Every exp here has a non-positive argument (a logit minus a running max, or minus lse): exp_nonpos.
// Every reduction has a fixed order (SIMD lane sums are fixed per build / ISA clone): bitwise reproducible, and
// independent of the thread count.
#include "checks.h"
#include "cpu/common.h"

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace fastlm::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kChunk = 2048;    // logits per online step: 8 KiB of fp32, L1-resident for the second sweep
constexpr int64_t kMaxLanes = 256;  // d lanes of a strided block

template <typename T>
struct CeArgs {
  const T* x;
  const int64_t* target;  // (rows,) class indices (not soft)
  const T* prob;          // soft: the target, laid out as x (row r at r * tsn; strided: as x)
  T* tgrad;               // soft: d loss / d target (contiguous, x's shape), or nullptr
  int64_t tsn;            // soft, (N, C): target row stride
  const float* w;         // (C,) or nullptr
  float* losses;          // (rows,)
  T* grad;                // input's shape, contiguous; nullptr: no gradient
  int64_t C, D;           // classes; trailing size (row r = (n, d) = (r / D, r % D), classes D apart)
  int64_t sn;             // x stride of n (elements)
  int64_t nb, nblocks;    // strided: lanes per block, blocks per n
  int64_t ignore_index;
  float eps;    // label smoothing
  float eps_c;  // eps / C
  float W;      // sum of the class weights (C without weights)
  float scale;  // 1 / denom for the mean, else 1 (cross_entropy_rows_cpu: its grad_scale of shape (1,))
  int64_t gsn;  // rows layout: grad row stride (C for a new contiguous gradient; x's own when written over x)
  const float* rscale;  // (rows,) per-row gradient scale (cross_entropy_rows_cpu), or nullptr
};

template <bool kW>
FASTLM_INLINE float weight_of(const float* w, int64_t c) {
  if constexpr (kW) {
    return w[c];
  } else {
    return 1.f;
  }
}

// ------------------------------------------------------------------------------------------------------------
// Rows layout: input (N, C), unit class stride, row r at r * sn; grad row at r * C.

// Soft targets, the gradient sweep of one row: p = e * exp(m_chunk - lse) from the kept exps e (kept when gr is
// asked for; fp32: e is gr itself, each element read before it is overwritten), grad = scale * (p * S - w t'), and
// d loss / d target =
// -scale * (1 - eps) * w * (x - lse) from the logits, chunk by chunk (the chunk's x and t are still in L1).
template <typename T, bool kW>
FASTLM_INLINE void soft_grad_row(const CeArgs<T>& a, const T* xr, const T* tr, T* gr, T* dtr, const float* e,
                                 const float* cmax, float lse, float S) {
  const int64_t C = a.C;
  const float one_m_eps = 1.f - a.eps, eps_c = a.eps_c, scale = a.scale;
  const float scale_s = scale * S, tscale = -scale * one_m_eps;
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    const float* ec = e + c0;
    const T* xc = xr + c0;
    const T* tc = tr + c0;
    if (gr) {
      const float f = exp_nonpos(cmax[c0 / kChunk] - lse);
      T* gc = gr + c0;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        const float wt = weight_of<kW>(a.w, c0 + k) * (one_m_eps * to_float(tc[k]) + eps_c);
        gc[k] = from_float<T>(scale_s * (ec[k] * f) - scale * wt);
      }
    }
    if (dtr) {
      T* dc = dtr + c0;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) dc[k] = from_float<T>(tscale * weight_of<kW>(a.w, c0 + k) * (to_float(xc[k]) - lse));
    }
  }
}

template <typename T, bool kSmooth, bool kW, bool kSoft>
FASTLM_CPU_CLONES void ce_rows(const CeArgs<T>& a, int64_t r0, int64_t r1) {
  const int64_t C = a.C;
  const int64_t nchunks = (C + kChunk - 1) / kChunk;
  // With the gradient, the statistics sweep keeps e = exp(x - m_chunk) (m_chunk: the running max when the chunk
  // was summed, <= the row max, so e <= 1) in the fp32 gradient row itself, or in an fp32 scratch row for
  // fp16/bf16; the gradient sweep rescales it by exp(m_chunk - lse): one exp per logit instead of two (the exp
  // is what bounds this kernel, not memory).
  std::vector<float> scratch(a.grad && !std::is_same_v<T, float> ? C : 0);
  std::vector<float> cmax(nchunks);
  const float one_m_eps = 1.f - a.eps;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = a.x + r * a.sn;
    const T* tr = kSoft ? a.prob + r * a.tsn : nullptr;
    T* gr = a.grad ? a.grad + r * a.gsn : nullptr;
    T* dtr = kSoft && a.tgrad ? a.tgrad + r * C : nullptr;
    const int64_t t = kSoft ? 0 : a.target[r];
    if (!kSoft && t == a.ignore_index) {
      a.losses[r] = 0.f;
      if (gr) {
        const T z = from_float<T>(0.f);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) gr[c] = z;
      }
      continue;
    }
    // The target's logit, read before the sweeps: the gradient may be written over the logits (gr == xr).
    const float x_t = kSoft ? 0.f : to_float(xr[t]);
    float* e = !gr ? nullptr : std::is_same_v<T, float> ? reinterpret_cast<float*>(gr) : scratch.data();
    // Statistics, online over chunks: m the running max, s the sum of exp(x - m), sx = sum_c w_c x_c (soft:
    // sum_c w_c t'_c x_c, and sw = sum_c w_c t'_c).
    float m = kNegInf, s = 0.f, sx = 0.f, sw = 0.f;
    for (int64_t ci = 0; ci < nchunks; ++ci) {
      const int64_t c0 = ci * kChunk;
      const T* p = xr + c0;
      const int64_t n = std::min(kChunk, C - c0);
      float cm = kNegInf;
#pragma omp simd reduction(max : cm)
      for (int64_t k = 0; k < n; ++k) {
        const float v = to_float(p[k]);
        cm = v > cm ? v : cm;
      }
      if (cm > m) {
        s *= exp_nonpos(m - cm);  // m = -inf (first chunk): s = 0 * 0
        if constexpr (kSoft) {
          if (m != kNegInf) sx -= sw * (cm - m);  // soft: sx is kept relative to the running max
        }
        m = cm;
      }
      // While every logit so far is -inf, exp(v - m) would be exp(-inf + inf) = NaN: take the exps against 0 (they
      // are all exp(-inf) = 0 then, and the rescaling above keeps s = 0 once a finite max appears).
      const float mref = m == kNegInf ? 0.f : m;
      cmax[ci] = mref;
      float cs = 0.f, cx = 0.f, cw = 0.f;
      if (e) {
        float* ec = e + c0;
#pragma omp simd reduction(+ : cs, cx, cw)
        for (int64_t k = 0; k < n; ++k) {
          const float v = to_float(p[k]);
          const float ev = exp_nonpos(v - mref);
          ec[k] = ev;
          cs += ev;
          if constexpr (kSoft) {
            const float wt = weight_of<kW>(a.w, c0 + k) * (one_m_eps * to_float(tr[c0 + k]) + a.eps_c);
            cw += wt;
            cx += wt * (v - mref);
          } else if constexpr (kSmooth) {
            cx += weight_of<kW>(a.w, c0 + k) * v;
          }
        }
      } else {
#pragma omp simd reduction(+ : cs, cx, cw)
        for (int64_t k = 0; k < n; ++k) {
          const float v = to_float(p[k]);
          cs += exp_nonpos(v - mref);
          if constexpr (kSoft) {
            const float wt = weight_of<kW>(a.w, c0 + k) * (one_m_eps * to_float(tr[c0 + k]) + a.eps_c);
            cw += wt;
            cx += wt * (v - mref);
          } else if constexpr (kSmooth) {
            cx += weight_of<kW>(a.w, c0 + k) * v;
          }
        }
      }
      s += cs;
      sx += cx;
      sw += cw;
    }
    const float lse = m + std::log(s);
    if constexpr (kSoft) {
      // sw * lse - sum w t' x, with sx = sum w t' (x - m): no cancellation of large logits against lse
      a.losses[r] = sw * std::log(s) - sx;
      if (gr || dtr) soft_grad_row<T, kW>(a, xr, tr, gr, dtr, e, cmax.data(), lse, sw);
      continue;
    }
    const float w_t = a.w ? a.w[t] : 1.f;
    float loss = (1.f - a.eps) * w_t * (lse - x_t);
    if constexpr (kSmooth) loss += a.eps_c * (a.W * lse - sx);
    a.losses[r] = loss;
    if (!gr) continue;

    // Gradient: p = e * exp(m_chunk - lse).
    const float scale = a.rscale ? a.scale * a.rscale[r] : a.scale;
    const float coef = (1.f - a.eps) * w_t * scale;
    const float smc = a.eps_c * scale;
    const float W = a.W;
    const float p_t = e[t] * exp_nonpos(cmax[t / kChunk] - lse);
    for (int64_t ci = 0; ci < nchunks; ++ci) {
      const int64_t c0 = ci * kChunk;
      const int64_t n = std::min(kChunk, C - c0);
      const float f = exp_nonpos(cmax[ci] - lse);
      const float* ec = e + c0;
      T* gc = gr + c0;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        const float p = ec[k] * f;
        float g = coef * p;
        if constexpr (kSmooth) g += smc * (W * p - weight_of<kW>(a.w, c0 + k));
        gc[k] = from_float<T>(g);  // for fp32, gc aliases ec element by element (same index): read before write
      }
    }
    // The one-hot term, written over element t (kept out of the vector loop).
    float g_t = coef * (p_t - 1.f);
    if constexpr (kSmooth) g_t += smc * (W * p_t - weight_of<kW>(a.w, t));
    gr[t] = from_float<T>(g_t);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Strided layout: input contiguous (N, C, D), element (n, c, d) at n * sn + c * D + d (sn = C * D); grad likewise.
// Work item w = (n, block ib) covers d in [ib * nb, min(D, (ib + 1) * nb)).

// Soft targets, one block of nl lanes after the statistics (m, s, sx = sum w t' x, sw = sum w t'): the losses, then
// the gradient and the target's gradient in one more sweep over the classes.
template <typename T, bool kW>
FASTLM_INLINE void soft_strided_block(const CeArgs<T>& a, int64_t n, int64_t d0, int64_t nl, const T* xb, const T* pb,
                                      const float* m, const float* s, const float* sx, const float* sw) {
  const int64_t C = a.C, D = a.D;
  const float one_m_eps = 1.f - a.eps, eps_c = a.eps_c, scale = a.scale, tscale = -a.scale * (1.f - a.eps);
  float lse[kMaxLanes], ss[kMaxLanes];
  for (int64_t i = 0; i < nl; ++i) {
    lse[i] = m[i] + std::log(s[i]);
    a.losses[n * D + d0 + i] = sw[i] * std::log(s[i]) - sx[i];  // sx = sum w t' (x - m): no cancellation
    ss[i] = scale * sw[i];
  }
  if (!a.grad && !a.tgrad) return;
  T* gb = a.grad ? a.grad + n * a.sn + d0 : nullptr;
  T* db = a.tgrad ? a.tgrad + n * a.sn + d0 : nullptr;
  for (int64_t c = 0; c < C; ++c) {
    const T* p = xb + c * D;
    const T* q = pb + c * D;
    const float wc = weight_of<kW>(a.w, c);
    if (gb) {
      T* g = gb + c * D;
#pragma omp simd
      for (int64_t i = 0; i < nl; ++i) {
        const float pr = exp_nonpos(to_float(p[i]) - lse[i]);
        g[i] = from_float<T>(ss[i] * pr - scale * wc * (one_m_eps * to_float(q[i]) + eps_c));
      }
    }
    if (db) {
      T* dt = db + c * D;
#pragma omp simd
      for (int64_t i = 0; i < nl; ++i) dt[i] = from_float<T>(tscale * wc * (to_float(p[i]) - lse[i]));
    }
  }
}

template <typename T, bool kSmooth, bool kW, bool kSoft>
FASTLM_CPU_CLONES void ce_strided(const CeArgs<T>& a, int64_t w0, int64_t w1) {
  float m[kMaxLanes], s[kMaxLanes], sx[kMaxLanes], sw[kMaxLanes], lse[kMaxLanes], coef[kMaxLanes], smc[kMaxLanes];
  const float one_m_eps = 1.f - a.eps;
  const int64_t C = a.C, D = a.D;
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t n = w / a.nblocks;
    const int64_t d0 = (w % a.nblocks) * a.nb;
    const int64_t nl = std::min(a.nb, D - d0);
    const T* xb = a.x + n * a.sn + d0;
    const int64_t* tb = kSoft ? nullptr : a.target + n * D + d0;
    const T* pb = kSoft ? a.prob + n * a.sn + d0 : nullptr;  // soft: the target, contiguous like x
    for (int64_t i = 0; i < nl; ++i) m[i] = kNegInf, s[i] = 0.f, sx[i] = 0.f, sw[i] = 0.f;
    for (int64_t c = 0; c < C; ++c) {
      const T* p = xb + c * D;
#pragma omp simd
      for (int64_t i = 0; i < nl; ++i) {
        const float v = to_float(p[i]);
        m[i] = v > m[i] ? v : m[i];
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const T* p = xb + c * D;
      const float wc = weight_of<kW>(a.w, c);
      if constexpr (kSoft) {
        const T* q = pb + c * D;
#pragma omp simd
        for (int64_t i = 0; i < nl; ++i) {
          const float v = to_float(p[i]);
          const float wt = wc * (one_m_eps * to_float(q[i]) + a.eps_c);
          s[i] += exp_nonpos(v - m[i]);
          sw[i] += wt;
          sx[i] += wt * (v - m[i]);  // relative to the row's max: see soft_strided_block
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < nl; ++i) {
          const float v = to_float(p[i]);
          s[i] += exp_nonpos(v - m[i]);
          if constexpr (kSmooth) sx[i] += wc * v;
        }
      }
    }
    if constexpr (kSoft) {
      soft_strided_block<T, kW>(a, n, d0, nl, xb, pb, m, s, sx, sw);
      continue;
    }
    for (int64_t i = 0; i < nl; ++i) {
      const int64_t t = tb[i];
      float* loss = a.losses + n * D + d0 + i;
      lse[i] = m[i] + std::log(s[i]);
      if (t == a.ignore_index) {
        *loss = 0.f;
        coef[i] = 0.f;
        smc[i] = 0.f;
        continue;
      }
      const float w_t = a.w ? a.w[t] : 1.f;
      float l = (1.f - a.eps) * w_t * (lse[i] - to_float(xb[t * D + i]));
      if constexpr (kSmooth) l += a.eps_c * (a.W * lse[i] - sx[i]);
      *loss = l;
      coef[i] = (1.f - a.eps) * w_t * a.scale;
      smc[i] = a.eps_c * a.scale;
    }
    if (!a.grad) continue;
    T* gb = a.grad + n * a.sn + d0;
    for (int64_t c = 0; c < C; ++c) {
      const T* p = xb + c * D;
      T* q = gb + c * D;
      const float wc = weight_of<kW>(a.w, c);
#pragma omp simd
      for (int64_t i = 0; i < nl; ++i) {
        const float pr = exp_nonpos(to_float(p[i]) - lse[i]);
        float g = coef[i] * pr;
        if constexpr (kSmooth) g += smc[i] * (a.W * pr - wc);
        q[i] = from_float<T>(coef[i] == 0.f && smc[i] == 0.f ? 0.f : g);  // ignored lanes: exact zeros
      }
    }
    for (int64_t i = 0; i < nl; ++i) {
      const int64_t t = tb[i];
      if (t == a.ignore_index) continue;
      const float pr = exp_nonpos(to_float(xb[t * D + i]) - lse[i]);
      float g = coef[i] * (pr - 1.f);
      if constexpr (kSmooth) g += smc[i] * (a.W * pr - weight_of<kW>(a.w, t));
      gb[t * D + i] = from_float<T>(g);
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Host side.

template <typename T, bool kSmooth, bool kW, bool kSoft = false>
void run_rows(const CeArgs<T>& a, int64_t rows, bool strided) {
  const int64_t passes = (a.grad ? 3 : 1) + (kSoft ? 1 + (a.tgrad ? 2 : 0) : 0);
  if (!strided) {
    parallel_rows(rows, grain_for(a.C * passes * static_cast<int64_t>(sizeof(T))),
                  [&](int64_t r0, int64_t r1) { ce_rows<T, kSmooth, kW, kSoft>(a, r0, r1); });
  } else {
    const int64_t items = rows / a.D * a.nblocks;
    parallel_rows(items, grain_for(a.C * a.nb * passes * static_cast<int64_t>(sizeof(T))),
                  [&](int64_t w0, int64_t w1) { ce_strided<T, kSmooth, kW, kSoft>(a, w0, w1); });
  }
}

// Strided lanes: an (C, nb) block of logits stays within ~256 KiB of L2 between sweeps.
template <typename T>
void set_lanes(CeArgs<T>& a) {
  a.nb = std::min(a.D, std::clamp<int64_t>((256 * 1024 / 4) / a.C / 16 * 16, 16, kMaxLanes));
  a.nblocks = (a.D + a.nb - 1) / a.nb;
}

// (mean / sum): the fixed-order sum of the per-row losses, in double, divided by denom for the mean.
Tensor reduce_losses(const Tensor& input, const float* lp, int64_t rows, int64_t reduction, float denom) {
  double total = 0.0;
  for (int64_t r = 0; r < rows; ++r) total += lp[r];
  Tensor loss = empty_on(input, std::vector<int64_t>{}, ScalarType::Float);
  *static_cast<float*>(loss.data_ptr()) = reduction == 1 ? static_cast<float>(total) / denom
                                                         : static_cast<float>(total);
  return loss;
}

// Class-index targets, step 1: the target range check and the sum of w[target] over the rows not ignored (the
// mean's denominator), in row order.
double check_targets(const int64_t* tp, int64_t rows, int64_t C, const float* w, int64_t ignore_index) {
  double denom = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = tp[r];
    if (t == ignore_index) continue;
    STD_TORCH_CHECK(t >= 0 && t < C, "fastlm: target[", r, "] = ", t, " is out of range: class indices must be in [0, ",
                    C, ") or equal ignore_index = ", ignore_index);
    denom += w ? w[t] : 1.0;
  }
  return denom;
}

// Class-index targets, step 2 over every row: losses into lp and, with grad, the gradient times scale (times
// rscale[r] where given) into grad, row r at r * gsn (gsn = C: a new contiguous gradient; it may also be the logits
// themselves, rows layout only).
void run_hard(const Tensor& input, const ce::Shape& s, const int64_t* tp, const float* w, float* lp, void* grad,
              int64_t gsn, int64_t ignore_index, double label_smoothing, float scale, const float* rscale) {
  if (s.rows == 0) return;
  double W = static_cast<double>(s.C);
  if (w) {
    W = 0.0;
    for (int64_t c = 0; c < s.C; ++c) W += w[c];
  }
  const bool smooth = label_smoothing > 0.0;
  dispatch_float<half, bf16>(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    CeArgs<T> a{};
    ce::set_args<T>(a, input, tp, w, lp, static_cast<T*>(grad), s, ignore_index, label_smoothing);
    a.W = static_cast<float>(W);
    a.scale = scale;
    a.gsn = gsn;
    a.rscale = rscale;
    set_lanes(a);
    const bool strided = s.D > 1;
    if (!smooth) {
      run_rows<T, false, false>(a, s.rows, strided);
    } else if (w) {
      run_rows<T, true, true>(a, s.rows, strided);
    } else {
      run_rows<T, true, false>(a, s.rows, strided);
    }
  });
}

std::tuple<Tensor, Tensor> cross_entropy_fwd_cpu(const Tensor& input, const Tensor& target,
                                                 const std::optional<Tensor>& weight, int64_t ignore_index,
                                                 double label_smoothing, int64_t reduction, bool compute_grad) {
  check_cpu_float(input, "input");
  const ce::Shape s = ce::input_shape(input);
  const int64_t C = s.C, rows = s.rows;
  STD_TORCH_CHECK(C >= 1, "fastlm: the number of classes C = ", C, " must be at least 1");
  ce::check_input_layout(input, s, s.N > 0);
  ce::check_target_weight(target, weight, reduction, s, check_cpu);
  const float* w = weight ? static_cast<const float*>(weight->data_ptr()) : nullptr;
  STD_TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "fastlm: label_smoothing must be in [0, 1], got ",
                  label_smoothing);
  const int64_t* tp = static_cast<const int64_t*>(target.data_ptr());
  const float denom_f = static_cast<float>(check_targets(tp, rows, C, w, ignore_index));

  Tensor losses = empty_on(input, {rows}, ScalarType::Float);
  Tensor grad = compute_grad ? empty_on(input, input.sizes()) : empty_on(input, {0});
  float* lp = static_cast<float*>(losses.data_ptr());
  run_hard(input, s, tp, w, lp, compute_grad ? grad.data_ptr() : nullptr, C, ignore_index, label_smoothing,
           reduction == 1 ? 1.f / denom_f : 1.f, nullptr);
  if (reduction == 0) return {losses, grad};
  // Step 3: fixed-order sum.
  return {reduce_losses(input, lp, rows, reduction, denom_f), grad};
}

// The chunk kernel of the linear cross-entropy (fastlm/ops/linear_cross_entropy.py): input (N, C) with unit class
// stride, any row stride; returns the per-row float32 losses. With grad ((N, C), input's dtype, unit class stride;
// input itself allowed: each row's logits are read before they are overwritten, so the chunk's logits buffer
// becomes its gradient and no second (N, C) buffer is needed), writes d loss_r / d input_r times grad_scale (None:
// 1; (1,) or (N,) float32: one scale, or one per row) there. No reduction, hence no denominator of its own: the
// caller passes 1 / (the whole batch's denominator) as grad_scale.
Tensor cross_entropy_rows_cpu(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                              const std::optional<Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
                              const std::optional<Tensor>& grad) {
  check_cpu_float(input, "input");
  STD_TORCH_CHECK(input.dim() == 2, "fastlm: input must be (N, C), got ", input.dim(), " dimensions");
  const ce::Shape s = ce::input_shape(input);
  STD_TORCH_CHECK(s.C >= 1, "fastlm: the number of classes C = ", s.C, " must be at least 1");
  ce::check_input_layout(input, s, s.N > 0);
  ce::check_target_weight(target, weight, 0, s, check_cpu);
  STD_TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "fastlm: label_smoothing must be in [0, 1], got ",
                  label_smoothing);
  const float* w = weight ? static_cast<const float*>(weight->data_ptr()) : nullptr;
  const RowGrad g = check_row_grad(input, "input", grad_scale, grad);
  const int64_t* tp = static_cast<const int64_t*>(target.data_ptr());
  check_targets(tp, s.rows, s.C, w, ignore_index);
  Tensor losses = torch::stable::new_empty(input, {s.rows}, ScalarType::Float);
  run_hard(input, s, tp, w, static_cast<float*>(losses.data_ptr()), g.ptr, g.row_stride, ignore_index,
           label_smoothing, g.scale, g.rscale);
  return losses;
}

// Soft targets: target of input's shape and dtype ((N, C): unit class stride; (N, C, D): contiguous). The mean
// divides by the number of rows N * D (torch's probability path); no ignore_index, no range check.
std::tuple<Tensor, Tensor, Tensor> soft_cross_entropy_fwd_cpu(const Tensor& input, const Tensor& target,
                                                              const std::optional<Tensor>& weight,
                                                              double label_smoothing, int64_t reduction,
                                                              bool compute_grad, bool compute_target_grad) {
  check_cpu_float(input, "input");
  const ce::Shape s = ce::input_shape(input);
  const int64_t C = s.C, rows = s.rows;
  STD_TORCH_CHECK(C >= 1, "fastlm: the number of classes C = ", C, " must be at least 1");
  ce::check_input_layout(input, s, s.N > 0);
  ce::check_soft_target(target, input, s, check_cpu);
  ce::check_weight_reduction(weight, reduction, s, check_cpu);
  STD_TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "fastlm: label_smoothing must be in [0, 1], got ",
                  label_smoothing);
  const float* w = weight ? static_cast<const float*>(weight->data_ptr()) : nullptr;
  Tensor losses = empty_on(input, {rows}, ScalarType::Float);
  Tensor grad = compute_grad ? empty_on(input, input.sizes()) : empty_on(input, {0});
  Tensor tgrad =
      compute_target_grad ? empty_on(input, input.sizes()) : empty_on(input, {0});
  float* lp = static_cast<float*>(losses.data_ptr());
  const float denom_f = static_cast<float>(rows);
  if (rows > 0) {
    dispatch_float<half, bf16>(input.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      CeArgs<T> a{};
      ce::set_args<T>(a, input, nullptr, w, lp, compute_grad ? static_cast<T*>(grad.data_ptr()) : nullptr, s, -1,
                      label_smoothing);
      a.prob = static_cast<const T*>(target.data_ptr());
      a.tsn = input.dim() == 2 ? target.stride(0) : C * s.D;
      a.tgrad = compute_target_grad ? static_cast<T*>(tgrad.data_ptr()) : nullptr;
      a.scale = reduction == 1 ? 1.f / denom_f : 1.f;
      a.gsn = C;
      set_lanes(a);
      if (w) {
        run_rows<T, false, true, true>(a, rows, s.D > 1);
      } else {
        run_rows<T, false, false, true>(a, rows, s.D > 1);
      }
    });
  }
  if (reduction == 0) return {losses, grad, tgrad};
  return {reduce_losses(input, lp, rows, reduction, denom_f), grad, tgrad};
}

}  // namespace
}  // namespace fastlm::cpu

STABLE_TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("cross_entropy_fwd_cpu", TORCH_BOX(&fastlm::cpu::cross_entropy_fwd_cpu));
  m.impl("soft_cross_entropy_fwd_cpu", TORCH_BOX(&fastlm::cpu::soft_cross_entropy_fwd_cpu));
  m.impl("cross_entropy_rows_cpu", TORCH_BOX(&fastlm::cpu::cross_entropy_rows_cpu));
}
