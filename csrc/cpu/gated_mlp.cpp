// SwiGLU / GeGLU: y = act(gate) * up, forward and backward CPU kernels, registered as the CPU implementations of
// fastlm::gated_mlp_fwd_cpu and fastlm::gated_mlp_bwd_cpu (schemas in csrc/ops.cpp; contract in
// fastlm/ops/gated_mlp.py; the Triton twin and the derivation of act' are in kernels/gated_mlp.py).
//
//   silu:      act = g s(g),  act' = s (1 + g (1 - s))                     s = sigmoid
//   gelu tanh: act = g s(k),  act' = s + g s (1 - s) k',  k = 2 c (g + a g^3), k' = 2 c (1 + 3 a g^2)
//              (0.5 (1 + tanh(z)) = s(2z): the tanh form through one exp)
//   gelu erf:  act = g Phi(g), act' = Phi(g) + g phi(g)
//   backward:  dgate = dy * up * act'(gate),  dup = dy * act(gate)   (act recomputed: nothing else was saved)
//
// Templates: element type T (float, half, bf16) x activation A (one kernel body, `if constexpr` on A). All math is
// fp32 and branch-free (exp_fast, and an erfc with < 1.2e-7 relative error built on it), so the inner loops over a
// row segment vectorise under every ISA clone (FASTLM_CPU_CLONES).
//
// Work layout: the (M, I) elements are cut into items of one row and at most kCols columns (so that a few wide rows
// still feed every thread), run in parallel on torch's intra-op threads. Each element is read and written once:
// forward 3 * M * I elements, backward 5 * M * I; every output element is computed by one thread (results do not
// depend on the thread count). The gate_up form (up None) is the same kernel with up = gate + I and, in the
// backward, dup = dgate + I, both with gate's / dgate's row stride: no copies.
// No FP traps are relied on here: without this, GCC's PRE turns exp_fast's clamp into a branch around a multiply that
// "could trap", and the AVX2 (x86-64-v3) and baseline clones' loops stay scalar (if-conversion refuses); AVX-512
// masks hide it. Before the includes, so that the inlined helpers are compiled with the same options.
#pragma GCC optimize("no-trapping-math")

#include "checks.h"
#include "cpu/common.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

namespace fastlm::cpu {
namespace {

enum Act : int { kSilu = 0, kGeluTanh = 1, kGeluErf = 2 };  // the ops' `act`
constexpr int64_t kCols = 4096;                               // columns per work item

constexpr float kSqrt2OverPi = 0.7978845608028654f;  // c
constexpr float kGeluA = 0.044715f;                   // a
constexpr float kSqrt1_2 = 0.7071067811865476f;       // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.3989422804014327f;    // 1 / sqrt(2 pi)

FASTLM_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_fast(-x)); }

// Phi(g), the standard normal CDF, from erfc (Numerical Recipes' erfcc, a Chebyshev fit: relative error < 1.2e-7 for
// every z >= 0), so that Phi of a negative g keeps its relative accuracy (no 1 + erf(..) cancellation):
// 0.5 erfc(z) = 0.5 t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), z = |g| / sqrt(2): one exp.
FASTLM_INLINE float normal_cdf(float g) {
  const float z = (g < 0.f ? -g : g) * kSqrt1_2;
  const float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = __builtin_fmaf(p, t, -0.82215223f);
  p = __builtin_fmaf(p, t, 1.48851587f);
  p = __builtin_fmaf(p, t, -1.13520398f);
  p = __builtin_fmaf(p, t, 0.27886807f);
  p = __builtin_fmaf(p, t, -0.18628806f);
  p = __builtin_fmaf(p, t, 0.09678418f);
  p = __builtin_fmaf(p, t, 0.37409196f);
  p = __builtin_fmaf(p, t, 1.00002368f);
  p = __builtin_fmaf(p, t, -1.26551223f);
  const float half_erfc = 0.5f * t * exp_fast(p - z * z);  // Phi(-|g|)
  return g < 0.f ? half_erfc : 1.0f - half_erfc;
}

// act(g) and act'(g) (the latter only when kGrad).
template <int A, bool kGrad>
FASTLM_INLINE void activation(float g, float& a, float& da) {
  if constexpr (A == kGeluErf) {
    const float cdf = normal_cdf(g);
    a = g * cdf;
    if constexpr (kGrad) da = cdf + g * exp_fast(-0.5f * g * g) * kInvSqrt2Pi;  // + g phi(g)
  } else {
    float k = g, dk = 1.0f;
    if constexpr (A == kGeluTanh) {
      const float g2 = g * g;
      k = 2.0f * kSqrt2OverPi * (g + kGeluA * g2 * g);
      dk = 2.0f * kSqrt2OverPi * (1.0f + 3.0f * kGeluA * g2);
    }
    const float s = sigmoid(k);
    a = g * s;
    if constexpr (kGrad) da = s + g * s * (1.0f - s) * dk;
  }
}

template <typename T>
struct Args {
  const T* g;   // (M, I) gate, row stride sg
  const T* u;   // (M, I) up, row stride su (gate_up form: g + I)
  const T* dy;  // (M, I) incoming gradient, row stride sdy (backward)
  T* y;         // (M, I) output, contiguous (forward)
  T* dg;        // (M, I) gradient of gate, row stride sd (backward)
  T* du;        // (M, I) gradient of up, row stride sd (gate_up form: dg + I)
  int64_t I, nb;  // columns; work items per row (ceil(I / kCols))
  int64_t sg, su, sdy, sd;
};

template <typename T, int A>
FASTLM_CPU_CLONES void fwd_items(const Args<T>& a, int64_t begin, int64_t end) {
  for (int64_t item = begin; item < end; ++item) {
    const int64_t r = item / a.nb;
    const int64_t c0 = (item % a.nb) * kCols;
    const int64_t n = std::min(kCols, a.I - c0);
    const T* __restrict__ gr = a.g + r * a.sg + c0;
    const T* __restrict__ ur = a.u + r * a.su + c0;
    T* __restrict__ yr = a.y + r * a.I + c0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float act, unused;
      activation<A, false>(to_float(gr[j]), act, unused);
      yr[j] = from_float<T>(act * to_float(ur[j]));
    }
  }
}

template <typename T, int A>
FASTLM_CPU_CLONES void bwd_items(const Args<T>& a, int64_t begin, int64_t end) {
  for (int64_t item = begin; item < end; ++item) {
    const int64_t r = item / a.nb;
    const int64_t c0 = (item % a.nb) * kCols;
    const int64_t n = std::min(kCols, a.I - c0);
    const T* __restrict__ dyr = a.dy + r * a.sdy + c0;
    const T* __restrict__ gr = a.g + r * a.sg + c0;
    const T* __restrict__ ur = a.u + r * a.su + c0;
    T* __restrict__ dgr = a.dg + r * a.sd + c0;
    T* __restrict__ dur = a.du + r * a.sd + c0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float act, dact;
      activation<A, true>(to_float(gr[j]), act, dact);
      const float d = to_float(dyr[j]);
      dgr[j] = from_float<T>(d * to_float(ur[j]) * dact);
      dur[j] = from_float<T>(d * act);
    }
  }
}

// f(std::integral_constant<int, A>{}) for the runtime activation act.
template <typename F>
void dispatch_act(int64_t act, F&& f) {
  dispatch_int<kSilu, kGeluTanh, kGeluErf>(act, "activation", f);
}

// The checked shapes: M rows of I columns; gate (M, I) or, with up None, (M, 2I).
struct Shape {
  int64_t M, I;
};

// A 2-D CPU float32 / float16 / bfloat16 tensor with unit column stride (or a single column).
void check_matrix(const Tensor& x, const char* name) {
  check_cpu_float(x, name);
  STD_TORCH_CHECK(x.dim() == 2, "fastlm: ", name, " must be 2-D (M, I), got ", x.dim(), " dimensions");
  STD_TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "fastlm: ", name,
                  " must have unit stride along the last dimension, got stride ", x.stride(1));
}

Shape check_inputs(const Tensor& gate, const std::optional<Tensor>& up, int64_t act) {
  STD_TORCH_CHECK(act == kSilu || act == kGeluTanh || act == kGeluErf, "fastlm: act must be 0 (silu), 1 (gelu tanh) "
                  "or 2 (gelu erf), got ", act);
  check_matrix(gate, "gate");
  if (!up) {
    STD_TORCH_CHECK(gate.size(1) % 2 == 0, "fastlm: with up None, gate is the merged (M, 2I) gate_up tensor and its "
                    "last dim must be even, got ", gate.size(1));
    return {gate.size(0), gate.size(1) / 2};
  }
  check_matrix(*up, "up");
  STD_TORCH_CHECK(up->size(0) == gate.size(0) && up->size(1) == gate.size(1), "fastlm: up must have gate's shape (",
                  gate.size(0), ", ", gate.size(1), "), got (", up->size(0), ", ", up->size(1), ")");
  STD_TORCH_CHECK(up->scalar_type() == gate.scalar_type(), "fastlm: up must have gate's dtype (",
                  dtype_name(gate.scalar_type()), "), got ", dtype_name(up->scalar_type()));
  return {gate.size(0), gate.size(1)};
}

// The pointers and strides shared by both directions (gate_up form: up = gate + I).
template <typename T>
Args<T> input_args(const Tensor& gate, const std::optional<Tensor>& up, const Shape& s) {
  Args<T> a{};
  a.g = static_cast<const T*>(gate.data_ptr());
  a.sg = gate.stride(0);
  a.u = up ? static_cast<const T*>(up->data_ptr()) : a.g + s.I;
  a.su = up ? up->stride(0) : a.sg;
  a.I = s.I;
  a.nb = (s.I + kCols - 1) / kCols;
  return a;
}

Tensor gated_mlp_fwd_cpu(const Tensor& gate, const std::optional<Tensor>& up, int64_t act) {
  const Shape s = check_inputs(gate, up, act);
  Tensor y = torch::stable::new_empty(gate, {s.M, s.I});
  if (s.M == 0 || s.I == 0) return y;
  dispatch_float<half, bf16>(gate.scalar_type(), [&](auto t_tag) {
    using T = decltype(t_tag);
    Args<T> a = input_args<T>(gate, up, s);
    a.y = static_cast<T*>(y.data_ptr());
    // An item moves 3 * min(I, kCols) elements: chunks of >= ~64 KiB.
    const int64_t grain = grain_for(3 * std::min(s.I, kCols) * static_cast<int64_t>(sizeof(T)));
    dispatch_act(act, [&](auto a_tag) {
      constexpr int A = decltype(a_tag)::value;
      parallel_rows(s.M * a.nb, grain, [&](int64_t begin, int64_t end) { fwd_items<T, A>(a, begin, end); });
    });
  });
  return y;
}

std::tuple<Tensor, Tensor> gated_mlp_bwd_cpu(const Tensor& dy, const Tensor& gate, const std::optional<Tensor>& up,
                                             int64_t act) {
  const Shape s = check_inputs(gate, up, act);
  check_matrix(dy, "dy");
  STD_TORCH_CHECK(dy.size(0) == s.M && dy.size(1) == s.I, "fastlm: dy must have the output's shape (", s.M, ", ", s.I,
                  "), got (", dy.size(0), ", ", dy.size(1), ")");
  STD_TORCH_CHECK(dy.scalar_type() == gate.scalar_type(), "fastlm: dy must have gate's dtype (",
                  dtype_name(gate.scalar_type()), "), got ", dtype_name(dy.scalar_type()));
  // gate_up form: one (M, 2I) gradient, dup its second half; dup itself is returned empty.
  Tensor dgate = torch::stable::new_empty(gate, {s.M, up ? s.I : 2 * s.I});
  Tensor dup = up ? torch::stable::new_empty(gate, {s.M, s.I}) : torch::stable::new_empty(gate, {0});
  if (s.M == 0 || s.I == 0) return {dgate, dup};
  dispatch_float<half, bf16>(gate.scalar_type(), [&](auto t_tag) {
    using T = decltype(t_tag);
    Args<T> a = input_args<T>(gate, up, s);
    a.dy = static_cast<const T*>(dy.data_ptr());
    a.sdy = dy.stride(0);
    a.dg = static_cast<T*>(dgate.data_ptr());
    a.sd = dgate.stride(0);
    a.du = up ? static_cast<T*>(dup.data_ptr()) : a.dg + s.I;
    const int64_t grain = grain_for(5 * std::min(s.I, kCols) * static_cast<int64_t>(sizeof(T)));
    dispatch_act(act, [&](auto a_tag) {
      constexpr int A = decltype(a_tag)::value;
      parallel_rows(s.M * a.nb, grain, [&](int64_t begin, int64_t end) { bwd_items<T, A>(a, begin, end); });
    });
  });
  return {dgate, dup};
}

}  // namespace
}  // namespace fastlm::cpu

STABLE_TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("gated_mlp_fwd_cpu", TORCH_BOX(&fastlm::cpu::gated_mlp_fwd_cpu));
  m.impl("gated_mlp_bwd_cpu", TORCH_BOX(&fastlm::cpu::gated_mlp_bwd_cpu));
}
