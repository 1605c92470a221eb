// The row kernel of linear_logprobs(..., return_entropy=True) on the cpu backend: fastlm::logprob_entropy_rows_cpu
// (schema in csrc/ops.cpp; contract in fastlm/ops/linear_logprobs.py; the Triton twin is kernels/linear_logprobs.py,
// same math). Per row of a chunk's logits z (V classes) with target t:
//   lse = log sum_k exp(z_k),   lp = z_t - lse,   p = exp(z - lse),   H = lse - sum_k p_k z_k
// and, with grad, the gradient of a * lp + c * H (a = grad_lp[r], c = grad_ent[r]) written into grad (which may be
// the logits themselves: each element is read before it is overwritten):
//   d/dz_k = a ([k == t] - p_k) - c p_k (z_k - E_p[z]),   E_p[z] = lse - H
// Rows whose target is ignore_index: lp = H = 0, gradient 0; a target outside [0, V) raises. Logits of -inf (banned
// tokens) count 0 in H and get a zero gradient.
//
// Per row: a vectorised max; one sweep for s = sum exp(z - m) and A = sum exp(z - m) (z - m) (H = log s - A / s,
// no cancellation of large logits); with grad, one more sweep (the row, <= 256 KiB for V = 64K fp32, is an L2 hit).
// Reductions in a fixed order: bitwise reproducible, independent of the thread count.
#include "checks.h"
#include "cpu/common.h"

#include <algorithm>
#include <optional>
#include <tuple>

namespace fastlm::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// v where p != 0, else +0: p * (z - x) and exp(z - m) * (z - m) are 0 * -inf = NaN for a logit z = -inf (a banned
// token), where the term's limit is 0. An integer mask rather than a select: the AVX2 clone stays vectorised.
FASTLM_INLINE float zero_where_zero(float v, float p) {
  return bits_to_float(float_to_bits(v) & (0u - static_cast<uint32_t>(float_to_bits(p) != 0u)));
}

template <typename T>
struct LpArgs {
  const T* x;
  int64_t sx;  // logits row stride
  const int64_t* target;
  int64_t V, ignore_index;
  float* lp;
  float* ent;
  T* grad;  // nullptr: no gradient
  int64_t sg;
  const float* ga;  // (rows,) d loss / d lp
  const float* gc;  // (rows,) d loss / d entropy
};

template <typename T>
FASTLM_CPU_CLONES void lp_rows(const LpArgs<T>& a, int64_t r0, int64_t r1) {
  const int64_t V = a.V;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = a.x + r * a.sx;
    T* gr = a.grad ? a.grad + r * a.sg : nullptr;
    const int64_t t = a.target[r];
    if (t == a.ignore_index) {
      a.lp[r] = 0.f;
      a.ent[r] = 0.f;
      if (gr) {
        const T z = from_float<T>(0.f);
#pragma omp simd
        for (int64_t k = 0; k < V; ++k) gr[k] = z;
      }
      continue;
    }
    float m = kNegInf;
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < V; ++k) {
      const float v = to_float(xr[k]);
      m = v > m ? v : m;
    }
    const float mref = m == kNegInf ? 0.f : m;  // every logit -inf: exps against 0 (all 0, lse = -inf)
    float s = 0.f, A = 0.f;
#pragma omp simd reduction(+ : s, A)
    for (int64_t k = 0; k < V; ++k) {
      const float d = to_float(xr[k]) - mref;
      const float e = exp_nonpos(d);
      s += e;
      A += zero_where_zero(e * d, e);
    }
    const float log_s = std::log(s);
    const float lse = mref + log_s;
    const float H = log_s - A / s;
    const float x_t = to_float(xr[t]);  // before the gradient sweep may overwrite it
    a.lp[r] = x_t - lse;
    a.ent[r] = H;
    if (!gr) continue;
    const float ga = a.ga[r], gc = a.gc[r], mean_z = lse - H;
#pragma omp simd
    for (int64_t k = 0; k < V; ++k) {
      const float v = to_float(xr[k]);
      const float p = exp_nonpos(v - lse);
      gr[k] = from_float<T>(-(ga * p + gc * zero_where_zero(p * (v - mean_z), p)));
    }
    const float p_t = exp_nonpos(x_t - lse);
    gr[t] = from_float<T>(ga * (1.f - p_t) - gc * zero_where_zero(p_t * (x_t - mean_z), p_t));
  }
}

std::tuple<Tensor, Tensor> logprob_entropy_rows_cpu(const Tensor& input, const Tensor& target, int64_t ignore_index,
                                                    const std::optional<Tensor>& grad_lp,
                                                    const std::optional<Tensor>& grad_ent,
                                                    const std::optional<Tensor>& grad) {
  check_cpu_float(input, "input");
  STD_TORCH_CHECK(input.dim() == 2, "fastlm: input must be (N, V), got ", input.dim(), " dimensions");
  const int64_t N = input.size(0), V = input.size(1);
  STD_TORCH_CHECK(V >= 1, "fastlm: the vocabulary V = ", V, " must be at least 1");
  STD_TORCH_CHECK(V == 1 || input.stride(1) == 1, "fastlm: input must have unit stride along the vocabulary");
  check_cpu(target, "target");
  STD_TORCH_CHECK(target.scalar_type() == ScalarType::Long && target.dim() == 1 && target.size(0) == N &&
                      (N <= 1 || target.stride(0) == 1),
                  "fastlm: target must be a contiguous (N,) = (", N, ",) int64 tensor");
  const int64_t* tp = static_cast<const int64_t*>(target.data_ptr());
  for (int64_t r = 0; r < N; ++r) {
    const int64_t t = tp[r];
    STD_TORCH_CHECK(t == ignore_index || (t >= 0 && t < V), "fastlm: target[", r, "] = ", t,
                    " is out of range: token ids must be in [0, ", V, ") or equal ignore_index = ", ignore_index);
  }
  STD_TORCH_CHECK(grad.has_value() == grad_lp.has_value() && grad_lp.has_value() == grad_ent.has_value(),
                  "fastlm: grad, grad_lp and grad_ent are given together or not at all");
  const float* ga = nullptr;
  const float* gc = nullptr;
  if (grad_lp) {
    for (const auto* g : {&*grad_lp, &*grad_ent}) {
      check_cpu(*g, "grad_lp / grad_ent");
      STD_TORCH_CHECK(g->scalar_type() == ScalarType::Float && g->dim() == 1 && g->size(0) == N &&
                          (N <= 1 || g->stride(0) == 1),
                      "fastlm: grad_lp and grad_ent must be contiguous (N,) = (", N, ",) float32 tensors");
    }
    ga = static_cast<const float*>(grad_lp->data_ptr());
    gc = static_cast<const float*>(grad_ent->data_ptr());
  }
  const RowGrad g = check_row_grad(input, "input", std::nullopt, grad);
  Tensor lp = torch::stable::new_empty(input, {N}, ScalarType::Float);
  Tensor ent = torch::stable::new_empty(input, {N}, ScalarType::Float);
  dispatch_float<half, bf16>(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const LpArgs<T> a{static_cast<const T*>(input.data_ptr()), N > 1 ? input.stride(0) : V, tp, V, ignore_index,
                      static_cast<float*>(lp.data_ptr()), static_cast<float*>(ent.data_ptr()), static_cast<T*>(g.ptr),
                      g.row_stride, ga, gc};
    parallel_rows(N, grain_for(V * (g.ptr ? 3 : 2) * static_cast<int64_t>(sizeof(T))),
                  [&](int64_t r0, int64_t r1) { lp_rows<T>(a, r0, r1); });
  });
  return {lp, ent};
}

}  // namespace
}  // namespace fastlm::cpu

STABLE_TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("logprob_entropy_rows_cpu", TORCH_BOX(&fastlm::cpu::logprob_entropy_rows_cpu));
}
