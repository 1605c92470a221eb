// Rotary position embedding of q and k, forward and backward (one kernel, a compile-time direction), out of place
// and in place: the CPU kernels of fastlm::rope_fwd_cpu and fastlm::rope_inplace_cpu (schemas in csrc/ops.cpp; the
// op contract is in fastlm/ops/rope.py, the Triton twin in kernels/rope.py).
//
// A pair (a, b) = (j, j + rot/2), or (2j, 2j + 1) interleaved, j < rot/2, with the tables' own entries at both:
//   forward:   y_a = x_a cos_a - x_b sin_a,   y_b = x_b cos_b + x_a sin_b
//   backward:  dx_a = dy_a cos_a + dy_b sin_b, dx_b = dy_b cos_b - dy_a sin_a   (the transposed map)
// The backward is the forward with the sine table swapped within each pair and negated: (sa, sb) <- (-sb, -sa),
// applied once per token row when the row's tables are converted to fp32. Dims rot..D pass through (copied out of
// place, untouched in place).
//
// Work: parallel over token rows (b, s) (torch's intra-op threads, chunks of ~64 KiB); a row converts its cos / sin
// to four fp32 arrays of rot/2 (skipped when consecutive rows share the table row), then rotates every head of q
// and of k with a vectorised loop over j (fp32 math; 16-bit I/O through csrc/cpu/common.h's conversions). Each
// element is computed by one thread: results do not depend on the thread count. In place, each pair is read before
// it is written (pairs are disjoint), so the vector loop is safe with y == x.
// Bytes: read q, k (and the tables once per distinct row), write q_out, k_out: one pass.
#include "checks.h"
#include "cpu/common.h"

#include <algorithm>
#include <array>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

namespace fastlm::cpu {
namespace {

// One of q / k: its input, its output (== x in place) and their (batch, position, head) strides in elements.
template <typename T, typename O>
struct Side {
  const T* x;
  O* y;
  int64_t H;
  int64_t xb, xs, xh;
  int64_t yb, ys, yh;
};

template <typename T, typename C, typename O>
struct RopeArgs {
  Side<T, O> q, k;
  const C* cos;
  const C* sin;
  int64_t S, rot, D;
  int64_t cb, cs, sb, ss;  // tables' batch / position strides (0 where they broadcast)
  bool copy_pass;          // out of place with rot < D: copy dims rot..D
};

// One head: the rotated pairs, then (copy_pass) the pass-through dims.
template <typename T, typename O, bool kInter>
FASTLM_INLINE void rotate_head(const T* x, O* y, const float* __restrict__ ca, const float* __restrict__ cb,
                               const float* __restrict__ sa, const float* __restrict__ sb, int64_t npairs, int64_t rot,
                               int64_t D, bool copy_pass) {
  if constexpr (kInter) {
#pragma omp simd
    for (int64_t j = 0; j < npairs; ++j) {
      const float xa = to_float(x[2 * j]), xb = to_float(x[2 * j + 1]);
      y[2 * j] = from_float<O>(xa * ca[j] - xb * sa[j]);
      y[2 * j + 1] = from_float<O>(xb * cb[j] + xa * sb[j]);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < npairs; ++j) {
      const float xa = to_float(x[j]), xb = to_float(x[j + npairs]);
      y[j] = from_float<O>(xa * ca[j] - xb * sa[j]);
      y[j + npairs] = from_float<O>(xb * cb[j] + xa * sb[j]);
    }
  }
  if (copy_pass) {
#pragma omp simd
    for (int64_t d = rot; d < D; ++d) y[d] = from_float<O>(to_float(x[d]));
  }
}

template <typename T, typename C, typename O, bool kInter, bool kBwd>
FASTLM_CPU_CLONES void rope_rows(const RopeArgs<T, C, O>& a, int64_t r0, int64_t r1) {
  const int64_t npairs = a.rot / 2;
  std::vector<float> tab(4 * static_cast<size_t>(npairs));
  float* ca = tab.data();
  float* cb = ca + npairs;
  float* sa = cb + npairs;
  float* sb = sa + npairs;
  int64_t prev_c = -1, prev_s = -1;  // table offsets of the row converted last
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / a.S, s = r % a.S;
    const int64_t oc = b * a.cb + s * a.cs, os = b * a.sb + s * a.ss;
    if (oc != prev_c || os != prev_s) {
      const C* c = a.cos + oc;
      const C* n = a.sin + os;
      const int64_t ia = kInter ? 2 : 1, ib = kInter ? 1 : npairs;  // a = ia * j, b = ia * j + ib
      for (int64_t j = 0; j < npairs; ++j) {
        ca[j] = to_float(c[ia * j]);
        cb[j] = to_float(c[ia * j + ib]);
        const float na = to_float(n[ia * j]), nb = to_float(n[ia * j + ib]);
        sa[j] = kBwd ? -nb : na;
        sb[j] = kBwd ? -na : nb;
      }
      prev_c = oc;
      prev_s = os;
    }
    for (const Side<T, O>* side : {&a.q, &a.k}) {
      const T* x = side->x + b * side->xb + s * side->xs;
      O* y = side->y + b * side->yb + s * side->ys;
      for (int64_t h = 0; h < side->H; ++h) {
        rotate_head<T, O, kInter>(x + h * side->xh, y + h * side->yh, ca, cb, sa, sb, npairs, a.rot, a.D, a.copy_pass);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Host side.

// (batch, position, head) strides of a 4-D (B, H, S, D) (head_axis 1) or (B, S, H, D) (head_axis 2) tensor.
std::array<int64_t, 3> axes(const Tensor& t, int64_t head_axis) {
  return {t.stride(0), t.stride(3 - head_axis), t.stride(head_axis)};
}

// fastlm/ops/rope.py's empty_in_layout: t's leading dims ordered by stride (largest first, ties in dim order), the
// last dim innermost, dense; allocated in that order and transposed back to t's dim order.
Tensor empty_in_layout(const Tensor& t, ScalarType dtype) {
  std::array<int64_t, 3> order{0, 1, 2};
  std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return t.stride(i) > t.stride(j); });
  Tensor out = torch::stable::new_empty(t, {t.size(order[0]), t.size(order[1]), t.size(order[2]), t.size(3)}, dtype);
  std::array<int64_t, 3> cur = order;  // cur[p]: the dim of t at position p of out
  for (int64_t i = 0; i < 3; ++i) {
    const int64_t p = std::find(cur.begin(), cur.end(), i) - cur.begin();
    if (p != i) {
      out = torch::stable::transpose(out, i, p);
      std::swap(cur[i], cur[p]);
    }
  }
  return out;
}

struct Shape {
  int64_t B, S, D, Hq, Hk, rot;
};

Shape check(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin, int64_t head_axis) {
  check_cpu_float(q, "q");
  check_cpu_float(k, "k");
  check_cpu_float(cos, "cos");
  check_cpu_float(sin, "sin");
  STD_TORCH_CHECK(head_axis == 1 || head_axis == 2, "fastlm: head_axis must be 1 or 2, got ", head_axis);
  STD_TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "fastlm: q and k must be 4-D");
  const int64_t seq = 3 - head_axis;
  Shape sh{q.size(0), q.size(seq), q.size(3), q.size(head_axis), k.size(head_axis), cos.dim() == 3 ? cos.size(2) : 0};
  STD_TORCH_CHECK(k.size(0) == sh.B && k.size(seq) == sh.S && k.size(3) == sh.D, "fastlm: k must have q's batch (",
                  sh.B, "), seq (", sh.S, ") and head_dim (", sh.D, ")");
  STD_TORCH_CHECK(k.scalar_type() == q.scalar_type(), "fastlm: k must have q's dtype (", dtype_name(q.scalar_type()),
                  "), got ", dtype_name(k.scalar_type()));
  STD_TORCH_CHECK(cos.scalar_type() == sin.scalar_type() &&
                      (cos.scalar_type() == q.scalar_type() || cos.scalar_type() == ScalarType::Float),
                  "fastlm: cos and sin must both have q's dtype or float32");
  STD_TORCH_CHECK(cos.dim() == 3 && sin.dim() == 3, "fastlm: cos and sin must be 3-D (Bc, Sc, rot)");
  for (int64_t d = 0; d < 3; ++d) {
    STD_TORCH_CHECK(cos.size(d) == sin.size(d), "fastlm: cos and sin must have the same shape");
  }
  STD_TORCH_CHECK((cos.size(0) == 1 || cos.size(0) == sh.B) && (cos.size(1) == 1 || cos.size(1) == sh.S),
                  "fastlm: cos and sin (", cos.size(0), ", ", cos.size(1), ", rot) must broadcast over batch ", sh.B,
                  " and seq ", sh.S);
  STD_TORCH_CHECK(sh.D % 2 == 0, "fastlm: head_dim must be even, got ", sh.D);
  STD_TORCH_CHECK(sh.rot % 2 == 0 && sh.rot >= 2 && sh.rot <= sh.D, "fastlm: the rotary dim must be even and in [2, ",
                  sh.D, "], got ", sh.rot);
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&q, "q"}, {&k, "k"}, {&cos, "cos"},
                                {&sin, "sin"}}) {
    STD_TORCH_CHECK(t->size(t->dim() - 1) <= 1 || t->stride(t->dim() - 1) == 1, "fastlm: ", name,
                    " must have unit stride along its last dim");
  }
  return sh;
}

template <typename T, typename C, typename O>
void launch(const Tensor& q, const Tensor& k, const Tensor& qo, const Tensor& ko, const Tensor& cos,
            const Tensor& sin, const Shape& sh, int64_t head_axis, bool interleaved, bool backward, bool inplace) {
  RopeArgs<T, C, O> a{};
  auto side = [&](const Tensor& x, const Tensor& y, int64_t H) {
    const auto xs = axes(x, head_axis), ys = axes(y, head_axis);
    return Side<T, O>{static_cast<const T*>(x.data_ptr()), static_cast<O*>(y.data_ptr()), H, xs[0], xs[1], xs[2],
                      ys[0], ys[1], ys[2]};
  };
  a.q = side(q, qo, sh.Hq);
  a.k = side(k, ko, sh.Hk);
  a.cos = static_cast<const C*>(cos.data_ptr());
  a.sin = static_cast<const C*>(sin.data_ptr());
  a.S = sh.S;
  a.rot = sh.rot;
  a.D = sh.D;
  a.cb = cos.size(0) > 1 ? cos.stride(0) : 0;
  a.cs = cos.size(1) > 1 ? cos.stride(1) : 0;
  a.sb = sin.size(0) > 1 ? sin.stride(0) : 0;
  a.ss = sin.size(1) > 1 ? sin.stride(1) : 0;
  a.copy_pass = !inplace && sh.rot < sh.D;
  const int64_t bytes_per_row = (sh.Hq + sh.Hk) * sh.D * static_cast<int64_t>(sizeof(T) + sizeof(O));
  auto run = [&](auto inter, auto bwd) {
    parallel_rows(sh.B * sh.S, grain_for(bytes_per_row), [&](int64_t r0, int64_t r1) {
      rope_rows<T, C, O, decltype(inter)::value, decltype(bwd)::value>(a, r0, r1);
    });
  };
  using F = std::false_type;
  using Tr = std::true_type;
  if (interleaved) {
    backward ? run(Tr{}, Tr{}) : run(Tr{}, F{});
  } else {
    backward ? run(F{}, Tr{}) : run(F{}, F{});
  }
}

// Out of place: outputs of dtype promote(q, cos) (= cos's dtype: q's or float32) in q's / k's layout.
std::tuple<Tensor, Tensor> rope_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                        int64_t head_axis, bool interleaved, bool backward) {
  const Shape sh = check(q, k, cos, sin, head_axis);
  Tensor qo = empty_in_layout(q, cos.scalar_type());
  Tensor ko = empty_in_layout(k, cos.scalar_type());
  if (sh.B * sh.S == 0) return {qo, ko};
  dispatch_float_weight<half, bf16>(q.scalar_type(), cos.scalar_type(), [&](auto t, auto c) {
    using T = decltype(t);
    using C = decltype(c);
    launch<T, C, C>(q, k, qo, ko, cos, sin, sh, head_axis, interleaved, backward, false);
  });
  return {qo, ko};
}

// In place: the result written into q and k, in their dtype.
void rope_inplace_cpu(Tensor q, Tensor k, const Tensor& cos, const Tensor& sin, int64_t head_axis, bool interleaved) {
  const Shape sh = check(q, k, cos, sin, head_axis);
  if (sh.B * sh.S == 0) return;
  dispatch_float_weight<half, bf16>(q.scalar_type(), cos.scalar_type(), [&](auto t, auto c) {
    using T = decltype(t);
    using C = decltype(c);
    launch<T, C, T>(q, k, q, k, cos, sin, sh, head_axis, interleaved, false, true);
  });
}

}  // namespace
}  // namespace fastlm::cpu

STABLE_TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("rope_fwd_cpu", TORCH_BOX(&fastlm::cpu::rope_fwd_cpu));
  m.impl("rope_inplace_cpu", TORCH_BOX(&fastlm::cpu::rope_inplace_cpu));
}
