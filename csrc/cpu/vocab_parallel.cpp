// Vocab-parallel cross-entropy, the per-rank work on one rank's shard of the classes: the CPU kernels of
// fastlm::vocab_parallel_ce_stats_cpu and fastlm::vocab_parallel_ce_grad_cpu (schemas in csrc/ops.cpp; the
// collectives and the combination of the statistics are in fastlm/ops/vocab_parallel.py; the Triton twin is the
// STATS / EXT_GRAD mode of kernels/cross_entropy.py). Megatron's scheme: each rank reduces its own classes, the
// ranks all-reduce three numbers per row, and each rank forms its gradient from the global log-sum-exp.
//
// input (N, Cl) with unit class stride (any row stride >= 0): this rank's logits; target (N,) int64 local class ids,
// an id outside [0, Cl) meaning that another rank owns the row's target; weight (Cl,) float32 or None: this rank's
// slice of the class weights.
//   stats -> (3, N) float32: lse_local = log sum_c exp(x_c) (-inf when Cl == 0), x_t (0 when not owned),
//            sum_c w_c x_c (0 unless smooth).
//   grad: row_stats (3, N) float32 = (lse, a, b) from the global statistics, W the global weight sum:
//            grad_c = a * (p_c - [c == t]) + b * (W * p_c - w_c),   p_c = exp(x_c - lse)
//         written into grad ((N, Cl) contiguous, input's dtype; may be input itself: each element is read before it
//         is written). Rows with a = b = 0 (ignored targets) get exact zeros without touching the logits.
// Bytes: stats reads x once (the online max / sum of kernels/cross_entropy.cpp's statistics sweep); grad reads x and
// writes the gradient once.
#include "checks.h"
#include "cpu/common.h"

#include <algorithm>
#include <optional>

namespace fastlm::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kChunk = 2048;  // logits per online step (L1-resident for the exp after the max)

template <typename T, bool kSmooth, bool kW>
FASTLM_CPU_CLONES void stats_rows(const T* x, int64_t sn, int64_t C, const int64_t* target, const float* w, float* out,
                                  int64_t N, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * sn;
    float m = kNegInf, s = 0.f, sx = 0.f;
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, C - c0);
      const T* p = xr + c0;
      float cm = kNegInf;
#pragma omp simd reduction(max : cm)
      for (int64_t k = 0; k < n; ++k) {
        const float v = to_float(p[k]);
        cm = v > cm ? v : cm;
      }
      if (cm > m) {
        s *= exp_fast(m - cm);  // m = -inf (first chunk): s = 0 * 0
        m = cm;
      }
      const float mref = m == kNegInf ? 0.f : m;  // all -inf so far: exps against 0 (all 0), never -inf - -inf
      float cs = 0.f, cx = 0.f;
#pragma omp simd reduction(+ : cs, cx)
      for (int64_t k = 0; k < n; ++k) {
        const float v = to_float(p[k]);
        cs += exp_fast(v - mref);
        if constexpr (kSmooth) cx += (kW ? w[c0 + k] : 1.f) * v;
      }
      s += cs;
      sx += cx;
    }
    const int64_t t = target[r];
    out[r] = (m == kNegInf ? 0.f : m) + std::log(s);
    out[N + r] = t >= 0 && t < C ? to_float(xr[t]) : 0.f;
    out[2 * N + r] = sx;
  }
}

template <typename T, bool kSmooth, bool kW>
FASTLM_CPU_CLONES void grad_rows(const T* x, int64_t sn, int64_t C, const int64_t* target, const float* w,
                                 const float* st, float W, T* grad, int64_t N, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * sn;
    T* gr = grad + r * C;
    const float lse = st[r], a = st[N + r], b = st[2 * N + r];
    if (a == 0.f && b == 0.f) {  // an ignored row
      const T z = from_float<T>(0.f);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) gr[c] = z;
      continue;
    }
    const float bw = b * W;
    const int64_t t = target[r];
    const bool owned = t >= 0 && t < C;
    const float p_t = owned ? exp_fast(to_float(xr[t]) - lse) : 0.f;  // read before an in-place grad overwrites it
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float p = exp_fast(to_float(xr[c]) - lse);
      float g = a * p;
      if constexpr (kSmooth) g += bw * p - b * (kW ? w[c] : 1.f);
      gr[c] = from_float<T>(g);  // gr may alias xr: element c is read above
    }
    if (owned) {  // the one-hot term, on the rank that owns the target (kept out of the vector loop)
      float g = a * (p_t - 1.f);
      if constexpr (kSmooth) g += bw * p_t - b * (kW ? w[t] : 1.f);
      gr[t] = from_float<T>(g);
    }
  }
}

struct Checked {
  int64_t N, C, sn;
  const int64_t* target;
  const float* w;
};

Checked check_args(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight) {
  check_cpu_float(input, "input");
  STD_TORCH_CHECK(input.dim() == 2, "fastlm: input must be (N, C_local), got ", input.dim(), " dimensions");
  const int64_t N = input.size(0), C = input.size(1);
  STD_TORCH_CHECK(C <= 1 || input.stride(1) == 1, "fastlm: input must have unit stride along the classes, got ",
                  input.stride(1));
  STD_TORCH_CHECK(N <= 1 || input.stride(0) >= 0, "fastlm: input has a negative row stride");
  check_cpu(target, "target");
  STD_TORCH_CHECK(target.scalar_type() == ScalarType::Long, "fastlm: target must be int64, got ",
                  dtype_name(target.scalar_type()));
  STD_TORCH_CHECK(target.dim() == 1 && target.size(0) == N, "fastlm: target must be 1-D of size N = ", N);
  STD_TORCH_CHECK(N <= 1 || target.stride(0) == 1, "fastlm: target must be contiguous");
  if (weight) {
    check_cpu(*weight, "weight");
    STD_TORCH_CHECK(weight->scalar_type() == ScalarType::Float, "fastlm: weight must be float32, got ",
                    dtype_name(weight->scalar_type()));
    STD_TORCH_CHECK(weight->dim() == 1 && weight->size(0) == C, "fastlm: weight must be 1-D of size C_local = ", C);
    STD_TORCH_CHECK(C <= 1 || weight->stride(0) == 1, "fastlm: weight must be contiguous");
  }
  return {N, C, N > 0 ? input.stride(0) : C, static_cast<const int64_t*>(target.data_ptr()),
          weight ? static_cast<const float*>(weight->data_ptr()) : nullptr};
}

// The (N,)-sized rows of a (3, N) float32 statistics tensor.
void check_stats(const Tensor& st, int64_t N, const char* name) {
  check_cpu(st, name);
  STD_TORCH_CHECK(st.scalar_type() == ScalarType::Float && st.dim() == 2 && st.size(0) == 3 && st.size(1) == N &&
                      st.is_contiguous(),
                  "fastlm: ", name, " must be a contiguous (3, N = ", N, ") float32 tensor");
}

template <typename F>
void dispatch_flags(bool smooth, bool has_w, const F& f) {
  if (!smooth) {
    f(std::false_type{}, std::false_type{});
  } else if (has_w) {
    f(std::true_type{}, std::true_type{});
  } else {
    f(std::true_type{}, std::false_type{});
  }
}

Tensor vocab_parallel_ce_stats_cpu(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                                   bool smooth) {
  const Checked a = check_args(input, target, weight);
  Tensor out = torch::stable::new_empty(input, {3, a.N}, ScalarType::Float);
  float* op = static_cast<float*>(out.data_ptr());
  dispatch_float<half, bf16>(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(input.data_ptr());
    dispatch_flags(smooth, a.w != nullptr, [&](auto sm, auto hw) {
      parallel_rows(a.N, grain_for(a.C * static_cast<int64_t>(sizeof(T))), [&](int64_t r0, int64_t r1) {
        stats_rows<T, decltype(sm)::value, decltype(hw)::value>(x, a.sn, a.C, a.target, a.w, op, a.N, r0, r1);
      });
    });
  });
  return out;
}

void vocab_parallel_ce_grad_cpu(const Tensor& input, const Tensor& target, const Tensor& row_stats,
                                const std::optional<Tensor>& weight, double w_sum, bool smooth, Tensor grad) {
  const Checked a = check_args(input, target, weight);
  check_stats(row_stats, a.N, "row_stats");
  check_cpu(grad, "grad");
  STD_TORCH_CHECK(grad.scalar_type() == input.scalar_type() && grad.dim() == 2 && grad.size(0) == a.N &&
                      grad.size(1) == a.C && grad.is_contiguous(),
                  "fastlm: grad must be a contiguous tensor of input's shape and dtype");
  STD_TORCH_CHECK(a.N <= 1 || a.C == 0 || grad.data_ptr() != input.data_ptr() || a.sn == a.C,
                  "fastlm: an in-place grad needs a contiguous input");
  const float* st = static_cast<const float*>(row_stats.data_ptr());
  dispatch_float<half, bf16>(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(input.data_ptr());
    T* g = static_cast<T*>(grad.data_ptr());
    dispatch_flags(smooth, a.w != nullptr, [&](auto sm, auto hw) {
      parallel_rows(a.N, grain_for(2 * a.C * static_cast<int64_t>(sizeof(T))), [&](int64_t r0, int64_t r1) {
        grad_rows<T, decltype(sm)::value, decltype(hw)::value>(x, a.sn, a.C, a.target, a.w, st,
                                                               static_cast<float>(w_sum), g, a.N, r0, r1);
      });
    });
  });
}

}  // namespace
}  // namespace fastlm::cpu

STABLE_TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("vocab_parallel_ce_stats_cpu", TORCH_BOX(&fastlm::cpu::vocab_parallel_ce_stats_cpu));
  m.impl("vocab_parallel_ce_grad_cpu", TORCH_BOX(&fastlm::cpu::vocab_parallel_ce_grad_cpu));
}
