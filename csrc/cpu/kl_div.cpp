// Fused KL divergence (torch.nn.functional.kl_div's pointwise loss, its reduction and both gradients in one pass):
// the CPU kernel of fastlm::kl_div_fwd_cpu (schema in csrc/ops.cpp; contract in fastlm/ops/kl_div.py).
//
// Pointwise, x the input (log-probabilities), t the target, as torch:
//   log_target = false:  l = xlogy(t, t) - t * x   (0 * log 0 = 0; t < 0 gives NaN)
//                        dl/dx = -t,        dl/dt = log(t) + 1 - x   (NaN where t == 0, as torch's xlogy backward)
//   log_target = true:   l = exp(t) * (t - x)
//                        dl/dx = -exp(t),   dl/dt = exp(t) * (t - x + 1)
// reduction 0: l elementwise (input's dtype); 1: scale * sum(l) as a float32 scalar (scale: 1 for "sum", 1 / numel for
// "mean", 1 / input.size(0) for "batchmean": the host's). The gradients, when asked for, are scale * dl/dx and
// scale * dl/dt (incoming gradient 1), written in the same pass (the backward only multiplies).
//
// Work split: fixed blocks of kBlock elements (independent of the thread count), each reduced in fp32 in a fixed
// order (SIMD lanes fixed per build / ISA clone), the block sums added serially in double: bitwise reproducible.
// Bytes: reads x and t once, writes l ("none") and each gradient asked for (a block is L1-resident between sweeps).
#include "checks.h"
#include "cpu/common.h"

#include <algorithm>
#include <tuple>
#include <limits>
#include <vector>

namespace fastlm::cpu {
namespace {

constexpr int64_t kBlock = 4096;  // elements per block: x and t of a block (32 KiB in fp32) stay in L1 between sweeps

template <typename T>
struct KlArgs {
  const T* x;
  const T* t;
  T* loss;       // reduction 0: elementwise loss, else nullptr
  float* sums;   // reduction 1: one sum per block, else nullptr
  T* gx;         // scale * dl/dx, or nullptr
  T* gt;         // scale * dl/dt, or nullptr
  int64_t n;     // elements
  float scale;
};

// All ones where t is +-0, else 0; as integer masks, never FP selects (log_fast's note: they would keep the loops
// from vectorising).
FASTLM_INLINE uint32_t zero_mask(float t) { return 0u - static_cast<uint32_t>((float_to_bits(t) & 0x7fffffffu) == 0u); }

// t with +-0 replaced by 1 (so that t * log(t) is 0 * 0 there).
FASTLM_INLINE float zero_to_one(float t) {
  const uint32_t z = zero_mask(t);
  return bits_to_float((float_to_bits(t) & ~z) | (0x3f800000u & z));
}

template <bool kLog>
FASTLM_INLINE float kl_point(float x, float t) {
  if constexpr (kLog) {
    return exp_fast(t) * (t - x);
  } else {
    // xlogy(t, t) - t x, with 0 * log(1) for t = 0 (log_fast's note); t = 0 and x = -inf gives NaN, as torch
    return t * log_fast(zero_to_one(t)) - t * x;
  }
}

template <typename T, bool kLog>
FASTLM_CPU_CLONES void kl_blocks(const KlArgs<T>& a, int64_t b0, int64_t b1) {
  const float scale = a.scale;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t i0 = b * kBlock;
    const int64_t n = std::min(kBlock, a.n - i0);
    const T* x = a.x + i0;
    const T* t = a.t + i0;
    if (a.loss) {
      T* l = a.loss + i0;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) l[k] = from_float<T>(kl_point<kLog>(to_float(x[k]), to_float(t[k])));
    } else {
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < n; ++k) acc += kl_point<kLog>(to_float(x[k]), to_float(t[k]));
      a.sums[b] = acc;
    }
    if (a.gx) {
      T* g = a.gx + i0;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        const float tv = to_float(t[k]);
        g[k] = from_float<T>(-scale * (kLog ? exp_fast(tv) : tv));
      }
    }
    if (a.gt) {
      T* g = a.gt + i0;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        const float xv = to_float(x[k]), tv = to_float(t[k]);
        float d;
        if constexpr (kLog) {
          d = exp_fast(tv) * (tv - xv + 1.f);
        } else {
          d = log_fast(tv) + 1.f - xv + bits_to_float(0x7fc00000u & zero_mask(tv));  // NaN at t = 0, as torch
        }
        g[k] = from_float<T>(scale * d);
      }
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> kl_div_fwd_cpu(const Tensor& input, const Tensor& target, bool log_target,
                                                  int64_t reduction, int64_t divisor, bool compute_grad,
                                                  bool compute_target_grad) {
  check_cpu_float(input, "input");
  check_cpu(target, "target");
  STD_TORCH_CHECK(target.scalar_type() == input.scalar_type(), "fastlm: target must have input's dtype (",
                  dtype_name(input.scalar_type()), "), got ", dtype_name(target.scalar_type()));
  bool same = target.dim() == input.dim();
  for (int64_t d = 0; same && d < input.dim(); ++d) same = target.size(d) == input.size(d);
  STD_TORCH_CHECK(same, "fastlm: target must have input's shape (broadcast on the host)");
  STD_TORCH_CHECK(input.is_contiguous() && target.is_contiguous(), "fastlm: input and target must be contiguous");
  STD_TORCH_CHECK(reduction == 0 || reduction == 1, "fastlm: reduction must be 0 (none) or 1 (scaled sum), got ",
                  reduction);
  STD_TORCH_CHECK(divisor >= 0, "fastlm: divisor must be >= 0, got ", divisor);
  // the reduction's factor; 0 elements / an empty batch: NaN, as torch's mean of nothing
  const double scale = divisor > 0 ? 1.0 / static_cast<double>(divisor) : std::numeric_limits<double>::quiet_NaN();
  const int64_t n = input.numel();
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  Tensor loss = reduction == 0 ? torch::stable::new_empty(input, input.sizes())
                               : torch::stable::new_empty(input, std::vector<int64_t>{}, ScalarType::Float);
  Tensor gx = compute_grad ? torch::stable::new_empty(input, input.sizes()) : torch::stable::new_empty(input, {0});
  Tensor gt = compute_target_grad ? torch::stable::new_empty(input, input.sizes()) : torch::stable::new_empty(input, {0});
  std::vector<float> sums(reduction == 1 ? nblocks : 0);
  dispatch_float<half, bf16>(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    KlArgs<T> a{static_cast<const T*>(input.data_ptr()),
                static_cast<const T*>(target.data_ptr()),
                reduction == 0 ? static_cast<T*>(loss.data_ptr()) : nullptr,
                sums.data(),
                compute_grad ? static_cast<T*>(gx.data_ptr()) : nullptr,
                compute_target_grad ? static_cast<T*>(gt.data_ptr()) : nullptr,
                n,
                static_cast<float>(scale)};
    const int64_t passes = 2 + (reduction == 0) + compute_grad + compute_target_grad;
    const int64_t grain = grain_for(kBlock * passes * static_cast<int64_t>(sizeof(T)));
    parallel_rows(nblocks, grain, [&](int64_t b0, int64_t b1) {
      if (log_target) {
        kl_blocks<T, true>(a, b0, b1);
      } else {
        kl_blocks<T, false>(a, b0, b1);
      }
    });
  });
  if (reduction == 1) {
    double total = 0.0;
    for (int64_t b = 0; b < nblocks; ++b) total += sums[b];
    *static_cast<float*>(loss.data_ptr()) = static_cast<float>(total * scale);
  }
  return {loss, gx, gt};
}

}  // namespace
}  // namespace fastlm::cpu

STABLE_TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("kl_div_fwd_cpu", TORCH_BOX(&fastlm::cpu::kl_div_fwd_cpu)); }
