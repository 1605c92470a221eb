// Fused distillation losses (loss and the student's gradient from one read of each row of student and teacher logits;
// neither softmax is stored): the CPU kernel of fastlm::distillation_fwd_cpu (schema in csrc/ops.cpp, contract in
// fastlm/ops/distillation.py; the Triton twin is kernels/distillation.py, same math).
//
// With temperature T, x = s / T, y = t / T, p_s = softmax(x), p_t = softmax(y), per row:
//   kind 0, KL(p_t || p_s):   L = sum p_t (y - x) - lse_t + lse_s,   dL/dx = p_s - p_t
//   kind 1, KL(p_s || p_t):   L = sum p_s (x - y) - lse_s + lse_t,   dL/dx = p_s (log p_s - log p_t - L)
//   kind 2, JSD(beta), m = beta p_t + (1 - beta) p_s:
//                             L = beta KL(p_t || m) + (1 - beta) KL(p_s || m),
//                             dL/dx = (1 - beta) p_s (log p_s - log m - K),  K = KL(p_s || m)
// loss = T^2 L; d loss / ds = T dL/dx (times 1 / counted rows for batchmean). Zero-probability terms count 0.
// Rows whose target is ignore_index: loss 0, gradient 0.
//
// Steps:
//  1. serial, O(rows): (batchmean) the number of counted rows.
//  2. parallel over rows: per chunk of kChunk logits of both rows, a vectorised max, the rescaled running sums of
//     exp (and, for the two KLs, the running sum e_t (y - x) or e_s (x - y) against the same max, so the loss needs
//     no second pass); the exps are kept in two fp32 scratch rows (L2-resident), so the later sweeps exponentiate
//     nothing: the gradient is p = e * exp(chunk max - lse). JSD's loss sweep takes one log per logit (log m) and
//     keeps p_s and log p_s - log m for the gradient sweep.
//  3. (batchmean / sum) serial: the sum of the per-row losses in row order, in double.
// Every reduction has a fixed order: bitwise reproducible, independent of the thread count.
#include "checks.h"
#include "cpu/common.h"

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace fastlm::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kChunk = 2048;  // logits per online step: the chunk's exps stay in L1 for the sums
constexpr int kKL = 0, kReverseKL = 1, kJSD = 2;

// log(x) of x clamped at the smallest normal float (0 included: log = -87.34, never -inf), for the mixture m of the
// JSD; the clamp is on the bits (an fmaxf was scalarised per lane), the log is common.h's vectorisable log_fast.
FASTLM_INLINE float log_clamped(float x) {
  int32_t ix;
  std::memcpy(&ix, &x, 4);
  ix = ix > 0x00800000 ? ix : 0x00800000;
  return log_fast(bits_to_float(static_cast<uint32_t>(ix)));
}

// v where the probability p (>= 0) is nonzero, else 0: p * where_p(p, v) is 0 for a zero probability even where v
// is infinite (0 log 0 = 0, -inf logits). On the bits: a float compare-and-select here kept GCC's AVX2 clone at
// ~10 ns per logit (measured; ~1 ns this way).
FASTLM_INLINE float where_p(float p, float v) {
  return bits_to_float(float_to_bits(v) & (0u - static_cast<uint32_t>(float_to_bits(p) != 0u)));
}

template <typename T>
struct DistillArgs {
  const T* s;             // (rows, V) student logits, row stride ss
  const T* t;             // (rows, V) teacher logits, row stride st
  const int64_t* target;  // (rows,) or nullptr
  float* losses;          // (rows,)
  T* grad;                // (rows, V), row stride sg (V for a new gradient; ss when written over s); nullptr: none
  int64_t V, ss, st, sg;
  int64_t ignore_index;
  float beta, inv_temp, temp;
  float scale;          // gradient scale: 1 / counted rows for batchmean, else 1 (distillation_rows_cpu: grad_scale)
  const float* rscale;  // (rows,) per-row gradient scale (distillation_rows_cpu), or nullptr
};

template <typename T, int kKind>
FASTLM_CPU_CLONES void distill_rows(const DistillArgs<T>& a, int64_t r0, int64_t r1) {
  const int64_t V = a.V;
  const int64_t nchunks = (V + kChunk - 1) / kChunk;
  const float it = a.inv_temp, beta = a.beta, omb = 1.f - a.beta;
  Scratch es_buf(V), et_buf(V);
  float* es = es_buf.get();  // exp(x - chunk max); JSD: then p_s
  float* et = et_buf.get();  // exp(y - chunk max); JSD: then log p_s - log m
  std::vector<float> cms(nchunks), cmt(nchunks);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = a.s + r * a.ss;
    const T* yr = a.t + r * a.st;
    T* gr = a.grad ? a.grad + r * a.sg : nullptr;
    if (a.target && a.target[r] == a.ignore_index) {
      a.losses[r] = 0.f;
      if (gr) {
        const T z = from_float<T>(0.f);
#pragma omp simd
        for (int64_t c = 0; c < V; ++c) gr[c] = z;
      }
      continue;
    }
    // Statistics, online over chunks: running maxima ms / mt, sums of exp ss / st, the KLs' weighted sum acc.
    float ms = kNegInf, mt = kNegInf, ss = 0.f, st = 0.f, acc = 0.f;
    for (int64_t ci = 0; ci < nchunks; ++ci) {
      const int64_t c0 = ci * kChunk;
      const int64_t n = std::min(kChunk, V - c0);
      const T* p = xr + c0;
      const T* q = yr + c0;
      float cs_max = kNegInf, ct_max = kNegInf;
#pragma omp simd reduction(max : cs_max, ct_max)
      for (int64_t k = 0; k < n; ++k) {
        const float xv = to_float(p[k]) * it, yv = to_float(q[k]) * it;
        cs_max = xv > cs_max ? xv : cs_max;
        ct_max = yv > ct_max ? yv : ct_max;
      }
      const float mrs_old = ms == kNegInf ? 0.f : ms, mrt_old = mt == kNegInf ? 0.f : mt;
      if (cs_max > ms) {
        const float f = exp_fast(ms - cs_max);  // ms = -inf (first chunk): 0
        ss *= f;
        if constexpr (kKind == kReverseKL) acc *= f;
        ms = cs_max;
      }
      if (ct_max > mt) {
        const float f = exp_fast(mt - ct_max);
        st *= f;
        if constexpr (kKind == kKL) acc *= f;
        mt = ct_max;
      }
      // exps against 0 while every logit so far is -inf (they are 0 then): no exp(-inf + inf) = NaN
      const float mrs = ms == kNegInf ? 0.f : ms, mrt = mt == kNegInf ? 0.f : mt;
      // The KLs' sums hold log-probability differences against the running maxima, (y - mt) - (x - ms), never y - x
      // and lse_t - lse_s apart: those are large for large logits and the KL (small when the rows agree) would
      // cancel. New maxima shift the terms summed so far.
      if constexpr (kKind == kKL) acc += st * ((mrs - mrs_old) - (mrt - mrt_old));
      if constexpr (kKind == kReverseKL) acc += ss * ((mrt - mrt_old) - (mrs - mrs_old));
      cms[ci] = mrs;
      cmt[ci] = mrt;
      float* esc = es + c0;
      float* etc = et + c0;
      float cs = 0.f, ct = 0.f, ca = 0.f;
#pragma omp simd reduction(+ : cs, ct, ca)
      for (int64_t k = 0; k < n; ++k) {
        const float xv = to_float(p[k]) * it, yv = to_float(q[k]) * it;
        const float e1 = exp_fast(xv - mrs), e2 = exp_fast(yv - mrt);
        esc[k] = e1;
        etc[k] = e2;
        cs += e1;
        ct += e2;
        if constexpr (kKind == kKL) ca += e2 * where_p(e2, (yv - mrt) - (xv - mrs));
        if constexpr (kKind == kReverseKL) ca += e1 * where_p(e1, (xv - mrs) - (yv - mrt));
      }
      ss += cs;
      st += ct;
      acc += ca;
    }
    const float lse_s = ms + std::log(ss), lse_t = mt + std::log(st);
    float loss = 0.f, K = 0.f;
    // acc is against the maxima, so the KL is acc / st + log(ss) - log(st): no large term (a row of only -inf
    // logits has a zero sum of exps: log 0 = -inf, as lse would be)
    if constexpr (kKind == kKL) {
      loss = acc / st + std::log(ss) - std::log(st);
    } else if constexpr (kKind == kReverseKL) {
      loss = acc / ss + std::log(st) - std::log(ss);
    } else {
      // JSD: the loss and K from the normalised probabilities (one log per logit: log m)
      for (int64_t ci = 0; ci < nchunks; ++ci) {
        const int64_t c0 = ci * kChunk;
        const int64_t n = std::min(kChunk, V - c0);
        const T* p = xr + c0;
        const T* q = yr + c0;
        const float fs = exp_fast(cms[ci] - lse_s), ft = exp_fast(cmt[ci] - lse_t);
        float* esc = es + c0;
        float* etc = et + c0;
        float cl = 0.f, ck = 0.f;
#pragma omp simd reduction(+ : cl, ck)
        for (int64_t k = 0; k < n; ++k) {
          const float ps = esc[k] * fs, pt = etc[k] * ft;
          const float lps = to_float(p[k]) * it - lse_s, lpt = to_float(q[k]) * it - lse_t;
          const float lm = log_clamped(beta * pt + omb * ps);  // finite: clamped at the smallest normal
          const float ds = where_p(ps, lps) - lm, dt = where_p(pt, lpt) - lm;
          const float ts = ps * ds;
          cl += beta * pt * dt + omb * ts;
          ck += ts;
          esc[k] = ps;
          etc[k] = ds;
        }
        loss += cl;
        K += ck;
      }
    }
    a.losses[r] = loss * a.temp * a.temp;
    if (!gr) continue;

    // Every read of this row's logits below is of the same element just before its gradient overwrites it (the
    // gradient may be written over the student logits, gr == xr).
    const float coef = a.temp * (a.rscale ? a.scale * a.rscale[r] : a.scale);
    for (int64_t ci = 0; ci < nchunks; ++ci) {
      const int64_t c0 = ci * kChunk;
      const int64_t n = std::min(kChunk, V - c0);
      const float* esc = es + c0;
      const float* etc = et + c0;
      T* gc = gr + c0;
      if constexpr (kKind == kKL) {
        const float fs = exp_fast(cms[ci] - lse_s), ft = exp_fast(cmt[ci] - lse_t);
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) gc[k] = from_float<T>(coef * (esc[k] * fs - etc[k] * ft));
      } else if constexpr (kKind == kReverseKL) {
        const float fs = exp_fast(cms[ci] - lse_s);
        const float off = lse_t - lse_s - loss;
        const T* p = xr + c0;
        const T* q = yr + c0;
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) {
          const float ps = esc[k] * fs;
          const float d = (to_float(p[k]) - to_float(q[k])) * it + off;
          gc[k] = from_float<T>(coef * ps * where_p(ps, d));
        }
      } else {
        const float c2 = coef * omb;
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) {
          const float ps = esc[k];
          gc[k] = from_float<T>(c2 * ps * (etc[k] - K));  // ps = 0: etc is finite (where_p above)
        }
      }
    }
  }
}

template <typename T, int kKind>
void run(const DistillArgs<T>& a, int64_t rows) {
  const int64_t passes = a.grad ? 3 : 2;
  parallel_rows(rows, grain_for(a.V * passes * 2 * static_cast<int64_t>(sizeof(T))),
                [&](int64_t r0, int64_t r1) { distill_rows<T, kKind>(a, r0, r1); });
}

// The checks of both ops; returns the number of counted rows (not ignored).
int64_t check_distill(const Tensor& student, const Tensor& teacher, const std::optional<Tensor>& target, int64_t kind,
                      double beta, double temperature, int64_t ignore_index) {
  check_cpu_float(student, "student");
  check_cpu(teacher, "teacher");
  STD_TORCH_CHECK(student.dim() == 2, "fastlm: student must be 2-D (N, V), got ", student.dim(), " dimensions");
  const int64_t N = student.size(0), V = student.size(1);
  STD_TORCH_CHECK(V >= 1, "fastlm: the number of classes V = ", V, " must be at least 1");
  STD_TORCH_CHECK(teacher.dim() == 2 && teacher.size(0) == N && teacher.size(1) == V,
                  "fastlm: teacher must have student's shape (", N, ", ", V, ")");
  STD_TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), "fastlm: teacher must have student's dtype (",
                  dtype_name(student.scalar_type()), "), got ", dtype_name(teacher.scalar_type()));
  STD_TORCH_CHECK(V == 1 || (student.stride(1) == 1 && teacher.stride(1) == 1),
                  "fastlm: student and teacher must have unit stride along the classes");
  if (target) {
    check_cpu(*target, "target");
    STD_TORCH_CHECK(target->scalar_type() == ScalarType::Long, "fastlm: target must be int64, got ",
                    dtype_name(target->scalar_type()));
    STD_TORCH_CHECK(target->dim() == 1 && target->size(0) == N, "fastlm: target must be 1-D of size N = ", N);
    STD_TORCH_CHECK(N <= 1 || target->stride(0) == 1, "fastlm: target must be contiguous");
  }
  STD_TORCH_CHECK(kind >= 0 && kind <= 2, "fastlm: kind must be 0 (kl), 1 (reverse kl) or 2 (jsd), got ", kind);
  STD_TORCH_CHECK(kind != kJSD || (beta > 0.0 && beta < 1.0), "fastlm: the jsd kind needs 0 < beta < 1, got ", beta);
  STD_TORCH_CHECK(temperature > 0.0, "fastlm: temperature must be positive, got ", temperature);
  // Step 1: the batchmean's denominator.
  if (!target) return N;
  const int64_t* tp = static_cast<const int64_t*>(target->data_ptr());
  int64_t count = 0;
  for (int64_t r = 0; r < N; ++r) count += tp[r] != ignore_index;
  return count;
}

// Step 2 over every row: losses into lp and, with grad (row stride sg), the gradient times scale (times rscale[r]).
void run_distill(const Tensor& student, const Tensor& teacher, const std::optional<Tensor>& target, int64_t kind,
                 double beta, double temperature, int64_t ignore_index, float* lp, void* grad, int64_t sg, float scale,
                 const float* rscale) {
  const int64_t N = student.size(0);
  if (N == 0) return;
  dispatch_float<half, bf16>(student.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    DistillArgs<T> a{};
    a.s = static_cast<const T*>(student.data_ptr());
    a.t = static_cast<const T*>(teacher.data_ptr());
    a.target = target ? static_cast<const int64_t*>(target->data_ptr()) : nullptr;
    a.losses = lp;
    a.grad = static_cast<T*>(grad);
    a.V = student.size(1);
    a.ss = student.stride(0);
    a.st = teacher.stride(0);
    a.sg = sg;
    a.ignore_index = ignore_index;
    a.beta = static_cast<float>(beta);
    a.inv_temp = static_cast<float>(1.0 / temperature);
    a.temp = static_cast<float>(temperature);
    a.scale = scale;
    a.rscale = rscale;
    if (kind == kKL) {
      run<T, kKL>(a, N);
    } else if (kind == kReverseKL) {
      run<T, kReverseKL>(a, N);
    } else {
      run<T, kJSD>(a, N);
    }
  });
}

std::tuple<Tensor, Tensor> distillation_fwd_cpu(const Tensor& student, const Tensor& teacher,
                                                const std::optional<Tensor>& target, int64_t kind, double beta,
                                                double temperature, int64_t ignore_index, int64_t reduction,
                                                bool compute_grad) {
  const int64_t count = check_distill(student, teacher, target, kind, beta, temperature, ignore_index);
  STD_TORCH_CHECK(reduction >= 0 && reduction <= 2,
                  "fastlm: reduction must be 0 (none), 1 (batchmean) or 2 (sum), got ", reduction);
  const int64_t N = student.size(0), V = student.size(1);
  Tensor losses = torch::stable::new_empty(student, {N}, ScalarType::Float);
  Tensor grad = compute_grad ? torch::stable::new_empty(student, {N, V}) : torch::stable::new_empty(student, {0});
  float* lp = static_cast<float*>(losses.data_ptr());
  run_distill(student, teacher, target, kind, beta, temperature, ignore_index, lp,
              compute_grad ? grad.data_ptr() : nullptr, V,
              reduction == 1 ? static_cast<float>(1.0 / static_cast<double>(count)) : 1.f, nullptr);
  if (reduction == 0) return {losses, grad};
  // Step 3: fixed-order sum.
  double total = 0.0;
  for (int64_t r = 0; r < N; ++r) total += lp[r];
  Tensor loss = torch::stable::new_empty(student, std::vector<int64_t>{}, ScalarType::Float);
  *static_cast<float*>(loss.data_ptr()) =
      reduction == 1 ? static_cast<float>(total / static_cast<double>(count)) : static_cast<float>(total);
  return {loss, grad};
}

// The chunk kernel of the linear distillation (fastlm/ops/linear_distillation.py): the per-row float32 losses and,
// with grad ((N, V), student's dtype, unit class stride; student itself allowed: each logit is read before its
// gradient overwrites it), d loss_r / d student_r times grad_scale (None: 1; (1,) or (N,) float32).
Tensor distillation_rows_cpu(const Tensor& student, const Tensor& teacher, const std::optional<Tensor>& target,
                             int64_t kind, double beta, double temperature, int64_t ignore_index,
                             const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& grad) {
  check_distill(student, teacher, target, kind, beta, temperature, ignore_index);
  const int64_t N = student.size(0);
  const RowGrad g = check_row_grad(student, "student", grad_scale, grad);
  STD_TORCH_CHECK(g.ptr != teacher.data_ptr() || N <= 1 || g.row_stride == teacher.stride(0),
                  "fastlm: a grad written over teacher must have its strides");
  Tensor losses = torch::stable::new_empty(student, {N}, ScalarType::Float);
  run_distill(student, teacher, target, kind, beta, temperature, ignore_index,
              static_cast<float*>(losses.data_ptr()), g.ptr, g.row_stride, g.scale, g.rscale);
  return losses;
}

}  // namespace
}  // namespace fastlm::cpu

STABLE_TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("distillation_fwd_cpu", TORCH_BOX(&fastlm::cpu::distillation_fwd_cpu));
  m.impl("distillation_rows_cpu", TORCH_BOX(&fastlm::cpu::distillation_rows_cpu));
}
