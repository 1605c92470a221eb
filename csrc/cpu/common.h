// Helpers shared by the fastlm CPU kernels (csrc/cpu/*.cpp): element types and their fp32 conversions, a
// vectorisable exp, runtime ISA dispatch, the device checks, scratch buffers and the row-parallel loop (dtype
// names, dtype dispatch and the checks shared with the CUDA ops: csrc/checks.h).
//
// Written against the LibTorch stable ABI only (torch/csrc/stable, TORCH_TARGET_VERSION = 2.10), like the CUDA
// kernels, so the same abi3 wheel serves every torch >= 2.10. Threads come from torch's own pool through
// torch::stable::parallel_for (so torch.set_num_threads applies); no OpenMP runtime of our own.
//
// SIMD: the inner loops are plain fp32 loops written so that GCC/Clang vectorise them (-O3, `#pragma omp simd`
// with -fopenmp-simd for reductions: no -ffast-math, so NaN/inf semantics stay IEEE). The hot functions carry
// FASTLM_CPU_CLONES: the compiler emits an x86-64-v4 (AVX-512), a v3 (AVX2 + FMA + F16C) and a baseline copy
// and the loader picks one for the running CPU (GNU ifunc), so one portable wheel still runs AVX-512 code.
// Rules for that to work: a cloned function must not call non-inline helpers in its inner loops (they would
// run at the baseline ISA), so every helper here is FASTLM_INLINE; lambdas are never cloned, so a
// parallel_for body calls a cloned function for its range of rows.
#pragma once

#include "checks.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#define FASTLM_INLINE inline __attribute__((always_inline))
// The same for a lambda (`[&](auto r) FASTLM_INLINE_LAMBDA { ... }`): a lambda that is not inlined is compiled
// once, at the baseline ISA, even when called from a target_clones function (measured: the attention backward's
// dK/dV tiles ran 12x slower as an out-of-line SSE lambda).
#define FASTLM_INLINE_LAMBDA __attribute__((always_inline))
// target_clones needs GCC on x86-64 and the GNU C library's ifunc support (musl has none).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__) && !defined(FASTLM_NO_CLONES)
#define FASTLM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
// One ISA level's entry point, where the code itself differs per level (the attention's register tiles): a
// template instantiated per level and marked with that level's target compiles each level once, where
// target_clones would compile every level's tiles for all three ISAs (two of which never run: the tiles follow
// isa(), attention.h), which tripled the build time of the attention files (820 s for attention_bwd.cpp alone).
#define FASTLM_ISA_V4 __attribute__((target("arch=x86-64-v4")))
#define FASTLM_ISA_V3 __attribute__((target("arch=x86-64-v3")))
#else
#define FASTLM_CPU_CLONES
#define FASTLM_ISA_V4
#define FASTLM_ISA_V3
#endif

namespace fastlm::cpu {

// ------------------------------------------------------------------------------------------------------------
// Element types: 16-bit patterns converted with integer ops and one multiply, so that loops over them vectorise
// under every clone (GCC 12 converts the compiler's _Float16 one element at a time without AVX512-FP16: one scalar
// vcvtph2ps or a libcall per element, which kept every fp16 loop scalar). Widening is exact, narrowing rounds to
// nearest even, NaN stays NaN, overflow gives inf.

struct half {
  uint16_t bits;
};
struct bf16 {
  uint16_t bits;
};
static_assert(sizeof(half) == 2 && sizeof(bf16) == 2, "16-bit element types");

FASTLM_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
FASTLM_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

FASTLM_INLINE float to_float(float v) { return v; }
FASTLM_INLINE float to_float(bf16 v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }
FASTLM_INLINE float to_float(half v) {
  // Exponent and mantissa moved to the fp32 positions, then rebiased (15 -> 127) by a multiply by 2^112: exact,
  // and right for fp16 subnormals too (a subnormal half is a subnormal float before the multiply, normal after).
  const uint32_t em = static_cast<uint32_t>(v.bits & 0x7fffu) << 13;
  uint32_t u = float_to_bits(bits_to_float(em) * 0x1p112f);
  u = em >= (0x7c00u << 13) ? (em | 0x7f800000u) : u;  // inf / NaN (payload kept)
  return bits_to_float(u | (static_cast<uint32_t>(v.bits & 0x8000u) << 16));
}

template <typename T>
FASTLM_INLINE T from_float(float v);
template <>
FASTLM_INLINE float from_float<float>(float v) { return v; }
template <>
FASTLM_INLINE half from_float<half>(float v) {
  // Branch-free round to nearest even (F. Giesen's float_to_half_fast3_rtne).
  uint32_t f = float_to_bits(v);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  // |v| < 2^-14: an fp16 subnormal or zero; adding 0.5f rounds the mantissa at the right place (RNE, by the FPU).
  const uint32_t sub = float_to_bits(bits_to_float(f) + 0.5f) - 0x3f000000u;
  // Normal: rebias and round to nearest even on the 13 dropped bits (a carry into the exponent gives inf).
  const uint32_t norm = (f + 0xc8000fffu + ((f >> 13) & 1u)) >> 13;
  uint32_t o = f < 0x38800000u ? sub : norm;
  o = f >= 0x47800000u ? (f > 0x7f800000u ? 0x7e00u : 0x7c00u) : o;  // overflow to inf; NaN stays NaN
  return half{static_cast<uint16_t>(o | (sign >> 16))};
}
template <>
FASTLM_INLINE bf16 from_float<bf16>(float v) {
  // Round to nearest even; a NaN stays a (quiet) NaN.
  const uint32_t u = float_to_bits(v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return bf16{static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded)};
}

// The value v takes once stored as T, back in fp32.
template <typename T>
FASTLM_INLINE float round_to(float v) {
  return to_float(from_float<T>(v));
}

// ------------------------------------------------------------------------------------------------------------
// 16-bit rows walked as 32-bit pairs: word k of a row holds element 2k in its low half and element 2k + 1 in its high
// half (little-endian). A loop over the words vectorises with 32-bit lanes only: one AND or one shift widens 16 bf16
// of a 512-bit load, and a bf16 pair packs back with integer ops, where a loop over the 16-bit elements widens through
// 256-bit halves and narrows through permutes (vpermt2w). On Zen 4 (512-bit ops split in two) that was the bound of
// every bf16 row loop: a softmax backward over 512 x 4096 bf16 took 517 us per element loop, 375 us as pairs (GCC 12,
// x86-64-v4 clone, one thread). Loops that only reduce may visit the elements in this order; loops that write
// keep each result in its own element. memcpy: a 16-bit row need not be 4-byte aligned.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "fastlm: the CPU kernels assume a little-endian target");

template <typename T>
FASTLM_INLINE uint32_t load_pair(const T* p, int64_t k) {
  static_assert(sizeof(T) == 2, "pairs of 16-bit elements");
  uint32_t u;
  std::memcpy(&u, p + 2 * k, 4);
  return u;
}
template <typename T>
FASTLM_INLINE void store_pair(T* p, int64_t k, uint32_t u) {
  static_assert(sizeof(T) == 2, "pairs of 16-bit elements");
  std::memcpy(p + 2 * k, &u, 4);
}
// Element 2k (lo) and 2k + 1 (hi) of word u, in fp32.
template <typename T>
FASTLM_INLINE float pair_lo(uint32_t u) {
  if constexpr (std::is_same_v<T, bf16>) {
    return bits_to_float(u << 16);
  } else {
    return to_float(T{static_cast<uint16_t>(u)});
  }
}
template <typename T>
FASTLM_INLINE float pair_hi(uint32_t u) {
  if constexpr (std::is_same_v<T, bf16>) {
    return bits_to_float(u & 0xffff0000u);
  } else {
    return to_float(T{static_cast<uint16_t>(u >> 16)});
  }
}
// The word of elements (lo, hi), each rounded as from_float<T> does.
// kAnyNaN false (bf16): the caller guarantees that a NaN among lo, hi has a zero low 16 bits of payload, as every NaN
// has that fp32 arithmetic makes from 16-bit values widened to fp32 (their low bits are zero, and an operation either
// passes an operand's NaN on or makes the default NaN), unless an fp32 operand brought its own NaN (a NaN scalar
// argument: the host passes it as the default quiet NaN). Then the rounding add cannot carry a NaN's mantissa into
// its exponent and sign, and the NaN selects are skipped: 5 of the ~25 vector ops of a bf16 pair (a softmax backward
// over 8192 x 256 bf16: 551 -> 443 us, one thread, Zen 4).
template <typename T, bool kAnyNaN = true>
FASTLM_INLINE uint32_t pack_pair(float lo, float hi) {
  if constexpr (std::is_same_v<T, bf16>) {
    // from_float<bf16> on both halves, written on the 32-bit words (its 16-bit result kept GCC from vectorising):
    // round to nearest even, then a NaN keeps its upper half with the quiet bit set.
    const uint32_t l = float_to_bits(lo), h = float_to_bits(hi);
    uint32_t lr = (l + 0x7fffu + ((l >> 16) & 1u)) >> 16;
    uint32_t hr = (h + 0x7fffu + ((h >> 16) & 1u)) & 0xffff0000u;
    if constexpr (kAnyNaN) {
      lr = lo != lo ? ((l >> 16) | 0x40u) : lr;
      hr = hi != hi ? ((h & 0xffff0000u) | 0x400000u) : hr;
    }
    return lr | hr;
  } else {
    return static_cast<uint32_t>(from_float<T>(lo).bits) | (static_cast<uint32_t>(from_float<T>(hi).bits) << 16);
  }
}

// ------------------------------------------------------------------------------------------------------------
// exp(x) in fp32, branch-free so that loops over it vectorise (std::exp calls libm, which does not).
// exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n ln2 (ln2 split in two for accuracy), exp(r) by a degree-6
// polynomial on |r| <= ln2/2. Max relative error ~2 ulp over the normal range. exp(-inf) = 0, x < -87.3 gives 0
// (no denormal results), x > 88.7 gives +inf, NaN gives NaN.
FASTLM_INLINE float exp_fast(float x) {
  const float xc = x < -87.33654f ? -87.33654f : (x > 88.72283f ? 88.72283f : x);
  const float n = __builtin_rintf(xc * 1.44269504088896341f);
  float r = __builtin_fmaf(n, -0.693145751953125f, xc);
  r = __builtin_fmaf(n, -1.428606765330187045e-6f, r);
  float p = 1.9875691500e-4f;
  p = __builtin_fmaf(p, r, 1.3981999507e-3f);
  p = __builtin_fmaf(p, r, 8.3334519073e-3f);
  p = __builtin_fmaf(p, r, 4.1665795894e-2f);
  p = __builtin_fmaf(p, r, 1.6666665459e-1f);
  p = __builtin_fmaf(p, r, 5.0000001201e-1f);
  p = __builtin_fmaf(p * r, r, r) + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(n) << 23;
  float out;
  std::memcpy(&out, &bits, 4);
  out = x < -87.33654f ? 0.0f : out;
  out = x > 88.72283f ? std::numeric_limits<float>::infinity() : out;
  return x != x ? x : out;
}

// exp(x) for x <= 88.7 or NaN, such as the max-shifted arguments x - max(x) <= 0 of a softmax: exp_fast's
// polynomial without its clamps (x < -87.3 is zeroed by an integer mask at the end, x > 88.7 is out of range) and
// without its NaN select (a NaN argument gives NaN: the integer scaling adds 0 to its bits), so equal to exp_fast on
// that range. 20 vector instructions where exp_fast has ~30 (measured 15-20 % of a softmax sweep, Zen 4, GCC 12);
// and it vectorises in the x86-64-v3 clone too: there GCC 12 (-ftrapping-math) keeps a clamp or a select between
// float values that feeds float arithmetic as a branch, and a loop over exp_fast stays scalar.
FASTLM_INLINE float exp_nonpos(float x) {
  const float n = __builtin_rintf(x * 1.44269504088896341f);
  float r = __builtin_fmaf(n, -0.693145751953125f, x);
  r = __builtin_fmaf(n, -1.428606765330187045e-6f, r);
  float p = 1.9875691500e-4f;
  p = __builtin_fmaf(p, r, 1.3981999507e-3f);
  p = __builtin_fmaf(p, r, 8.3334519073e-3f);
  p = __builtin_fmaf(p, r, 4.1665795894e-2f);
  p = __builtin_fmaf(p, r, 1.6666665459e-1f);
  p = __builtin_fmaf(p, r, 5.0000001201e-1f);
  p = __builtin_fmaf(p * r, r, r) + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(n) << 23;  // n = INT_MIN for a NaN or infinite n: adds 0
  bits &= -static_cast<int32_t>(!(x < -87.33654f));  // exp(x < -87.3) = 0 (no denormal results), -inf included
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// tanh(x) in fp32, branch-free so that loops over it vectorise: the odd rational minimax approximation Eigen and
// XLA use (x * P(x^2) / Q(x^2), degrees 13 / 6) on |x| clamped to 7.9053 (where tanh rounds to +-1), x itself for
// |x| < 4e-4. Max relative error 4e-7 (about 7 ulp) against float64 tanh over [-10, 10]; NaN gives NaN.
FASTLM_INLINE float tanh_fast(float x) {
  constexpr float c = 7.90531110763549805f;
  const float xc = x < -c ? -c : (x > c ? c : x);
  const float x2 = xc * xc;
  float p = -2.76076847742355e-16f;
  p = __builtin_fmaf(p, x2, 2.00018790482477e-13f);
  p = __builtin_fmaf(p, x2, -8.60467152213735e-11f);
  p = __builtin_fmaf(p, x2, 5.12229709037114e-08f);
  p = __builtin_fmaf(p, x2, 1.48572235717979e-05f);
  p = __builtin_fmaf(p, x2, 6.37261928875436e-04f);
  p = __builtin_fmaf(p, x2, 4.89352455891786e-03f);
  float q = 1.19825839466702e-06f;
  q = __builtin_fmaf(q, x2, 1.18534705686654e-04f);
  q = __builtin_fmaf(q, x2, 2.26843463243900e-03f);
  q = __builtin_fmaf(q, x2, 4.89352518554385e-03f);
  const float t = xc * p / q;
  const float out = (x < 4e-4f && x > -4e-4f) ? x : t;
  return x != x ? x : out;
}

// log(x) in fp32, branch-free so that loops over it vectorise (musl's range reduction, Cephes' logf polynomial):
// x = 2^k * m with m in [sqrt(1/2), sqrt(2)) found with integer ops only, log(x) = k ln2 + log(1 + f), f = m - 1,
// by a degree-9 polynomial (ln2 split in two). Max relative error ~2 ulp; subnormals are scaled by 2^25 first.
// log(0) = -inf, log(x < 0) = NaN, log(inf) = inf, NaN gives NaN: added to the result, not selected, and every
// case test is an integer compare blended with masks, so that every operation runs for every x (GCC otherwise
// threads the tests into branches, and does not if-convert FP operations back under -ftrapping-math: the loop
// would not vectorise). Callers: select the input, not the call (log_fast(t == 0 ? 1 : t)), for the same reason.
FASTLM_INLINE float log_fast(float x) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  const uint32_t ux = float_to_bits(x);
  // +0 and positive subnormals: x * 2^25 (blended with integer masks: see above)
  const uint32_t sub = 0u - static_cast<uint32_t>(ux < 0x00800000u);
  const uint32_t u = (float_to_bits(x * 33554432.f) & sub) | (ux & ~sub);
  const uint32_t ix = u - 0x3f3504f3u;  // bits of sqrt(1/2)
  const float k = static_cast<float>((static_cast<int32_t>(ix) >> 23) - static_cast<int32_t>(sub & 25u));
  const float f = bits_to_float(u - (ix & 0xff800000u)) - 1.f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = __builtin_fmaf(y, f, -1.1514610310e-1f);
  y = __builtin_fmaf(y, f, 1.1676998740e-1f);
  y = __builtin_fmaf(y, f, -1.2420140846e-1f);
  y = __builtin_fmaf(y, f, 1.4249322787e-1f);
  y = __builtin_fmaf(y, f, -1.6668057665e-1f);
  y = __builtin_fmaf(y, f, 2.0000714765e-1f);
  y = __builtin_fmaf(y, f, -2.4999993993e-1f);
  y = __builtin_fmaf(y, f, 3.3333331174e-1f);
  y = y * f * z;
  y = __builtin_fmaf(k, -2.12194440e-4f, y);
  y = __builtin_fmaf(z, -0.5f, y);
  const float out = __builtin_fmaf(k, 0.693359375f, f + y);  // finite for x = 0 (-105) and x = inf (88.7)
  // +-0 -> -inf, +inf -> inf, negative or NaN -> NaN: added bit patterns chosen with integer compares
  const uint32_t mag = ux & 0x7fffffffu;
  const uint32_t zero = 0u - static_cast<uint32_t>(mag == 0u);
  const uint32_t pinf = 0u - static_cast<uint32_t>(ux == 0x7f800000u);
  const uint32_t bad = 0u - static_cast<uint32_t>((mag > 0x7f800000u) | ((ux >> 31) & (mag != 0u)));
  const float special = bits_to_float((float_to_bits(-inf) & zero) | (float_to_bits(inf) & pinf) | (0x7fc00000u & bad));
  return out + special;
}

// ------------------------------------------------------------------------------------------------------------
// Checks (the device-agnostic ones, and the dtype dispatch, are in csrc/checks.h).

// The device check of the CPU ops (checks.h's on_device).
inline void check_cpu(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.is_cpu(), "fastlm: ", name, " must be a CPU tensor for the cpu backend");
}

// A CPU tensor of float32 / float16 / bfloat16.
inline void check_cpu_float(const Tensor& t, const char* name) {
  check_cpu(t, name);
  check_float_dtype(t, name);
}

// The gradient arguments of the linear losses' row kernels (cross_entropy_rows_cpu, distillation_rows_cpu):
// grad_scale None (1), (1,) or (N,) float32; grad None or (N, C) in x's dtype with unit class stride, possibly x
// itself (then with x's strides: the kernels read each logit before they overwrite it).
struct RowGrad {
  void* ptr;            // grad's data, or nullptr: no gradient
  int64_t row_stride;   // grad's row stride
  float scale;          // grad_scale of shape (1,) (1 without)
  const float* rscale;  // grad_scale of shape (N,), or nullptr
};

inline RowGrad check_row_grad(const Tensor& x, const char* name, const std::optional<Tensor>& grad_scale,
                              const std::optional<Tensor>& grad) {
  const int64_t N = x.size(0), C = x.size(1);
  RowGrad g{nullptr, C, 1.f, nullptr};
  if (grad_scale) {
    check_cpu(*grad_scale, "grad_scale");
    const bool one = grad_scale->dim() == 1 && grad_scale->size(0) == 1;
    STD_TORCH_CHECK(grad_scale->scalar_type() == ScalarType::Float && grad_scale->dim() == 1 &&
                        (one || (grad_scale->size(0) == N && grad_scale->stride(0) == 1)),
                    "fastlm: grad_scale must be a contiguous float32 tensor of shape (1,) or (N,) = (", N, ",)");
    const float* p = static_cast<const float*>(grad_scale->data_ptr());
    if (one) {
      g.scale = p[0];
    } else {
      g.rscale = p;
    }
  }
  if (grad) {
    check_cpu(*grad, "grad");
    STD_TORCH_CHECK(grad->scalar_type() == x.scalar_type() && grad->dim() == 2 && grad->size(0) == N &&
                        grad->size(1) == C,
                    "fastlm: grad must have ", name, "'s shape and dtype");
    STD_TORCH_CHECK((C == 1 || grad->stride(1) == 1) && (N <= 1 || grad->stride(0) >= C),
                    "fastlm: grad must have unit stride along the classes and rows that do not overlap");
    STD_TORCH_CHECK(grad->data_ptr() != x.data_ptr() || N <= 1 || grad->stride(0) == x.stride(0),
                    "fastlm: a grad written over ", name, " must have its strides");
    g.ptr = grad->data_ptr();
    g.row_stride = N > 1 ? grad->stride(0) : C;
  }
  return g;
}

// A 64-byte aligned fp32 buffer: thread-local scratch, allocated once per row range (never per row).
class Scratch {
 public:
  explicit Scratch(int64_t n) {
    // A size computed from tensor shapes (an expanded, stride-0 tensor can be huge without memory behind it): no
    // wrap-around into a tiny allocation.
    STD_TORCH_CHECK(n <= (int64_t{1} << 40), "fastlm: ", n, " floats of scratch: more than the CPU kernels allow");
    const size_t bytes = (static_cast<size_t>(n > 0 ? n : 1) * sizeof(float) + 63) / 64 * 64;
    p_ = static_cast<float*>(std::aligned_alloc(64, bytes));
    STD_TORCH_CHECK(p_ != nullptr, "fastlm: out of memory (", bytes, " bytes of scratch)");
  }
  ~Scratch() { std::free(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* get() const { return p_; }

 private:
  float* p_;
};

// FASTLM_POISON=1 (the test suite sets it): fill a kernel's freshly allocated output with NaN before the kernel
// writes it, so that an element it forgets to write fails the comparison with the reference (as the Triton
// launchers' fastlm.kernels.empty does). Read once per process.
inline void poison(const Tensor& t) {
  static const bool on = [] {
    const char* e = std::getenv("FASTLM_POISON");
    return e != nullptr && std::strcmp(e, "1") == 0;
  }();
  if (on && t.numel() > 0) torch::stable::fill_(t, std::numeric_limits<double>::quiet_NaN());
}

// Runs f(begin, end) over [0, n) on torch's intra-op thread pool, in chunks of at least `grain` items (pick grain
// so that a chunk is >= ~32 KiB of work: smaller chunks cost more in scheduling than they gain).
template <typename F>
void parallel_rows(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  if (n <= grain) {
    f(int64_t{0}, n);
    return;
  }
  torch::stable::parallel_for(0, n, grain, f);
}

// Rows per parallel chunk such that each chunk touches about `bytes_per_chunk` bytes.
inline int64_t grain_for(int64_t bytes_per_row, int64_t bytes_per_chunk = 64 * 1024) {
  const int64_t g = bytes_per_chunk / (bytes_per_row > 0 ? bytes_per_row : 1);
  return g < 1 ? 1 : g;
}

}  // namespace fastlm::cpu
