// Host code shared by the CPU (csrc/cpu/) and CUDA (csrc/cuda/) implementations of the fastlm ops: dtype names,
// the one dtype / head-dim dispatch every op uses, and the argument checks, output allocation and kernel-argument
// filling that both backends of an op do alike (same contract, same messages on both backends).
//
// Device checks stay with the backends: the op-level checks here take an `on_device(t, name)` callable, run first
// on every tensor argument (csrc/cpu/common.h's check_cpu, csrc/cuda/launch.h's CudaDevice). Plain host C++17 on
// the LibTorch stable ABI: the CPU sources and nvcc both compile it.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

// On the structs that hold tensors: torch::stable's types have hidden visibility (torch/headeronly/macros/Macros.h,
// HIDDEN_NAMESPACE_BEGIN), and a type with a hidden field must not be more visible than it.
#if defined(__GNUC__) && !defined(_WIN32)
#define FASTLM_HIDDEN __attribute__((visibility("hidden")))
#else
#define FASTLM_HIDDEN
#endif

namespace fastlm {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

inline const char* dtype_name(ScalarType t) {
  return t == ScalarType::Float      ? "float32"
         : t == ScalarType::Half     ? "float16"
         : t == ScalarType::BFloat16 ? "bfloat16"
         : t == ScalarType::Double   ? "float64"
         : t == ScalarType::Long     ? "int64"
         : t == ScalarType::Int      ? "int32"
         : t == ScalarType::Bool     ? "bool"
                                     : "an unsupported dtype";
}

// A new contiguous tensor on like's device, of like's dtype unless dtype is given, uninitialised: at::empty_strided
// through the AOTI C shim (aoti_torch_empty_strided, part of the stable ABI). torch::stable::new_empty, under
// TORCH_TARGET_VERSION 2.10, looks "aten::new_empty" up by name in the dispatcher and calls it boxed: about 1 us per
// tensor, measured as most of the C++ side of an 8 x 768 LayerNorm forward on the CPU (four outputs).
// Errors through TORCH_ERROR_CODE_CHECK (torch/headeronly, present since 2.10): STABLE_TORCH_ERROR_CODE_CHECK is newer
// than the 2.10 / 2.11 headers (the twin's source build failed on it).
inline Tensor empty_on(const Tensor& like, torch::headeronly::IntHeaderOnlyArrayRef sizes,
                       std::optional<ScalarType> dtype = std::nullopt) {
  constexpr size_t kMaxDim = 8;
  STD_TORCH_CHECK(sizes.size() <= kMaxDim, "fastlm: empty_on takes at most ", kMaxDim, " dimensions");
  int64_t strides[kMaxDim];
  int64_t stride = 1;
  for (size_t d = sizes.size(); d-- > 0;) {  // contiguous strides, as torch computes them (sizes 0 and 1 count as 1)
    strides[d] = stride;
    stride *= sizes[d] > 1 ? sizes[d] : 1;
  }
  const int32_t dt = torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype ? *dtype : like.scalar_type()));
  int32_t device_type, device_index;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(like.get(), &device_index));
  AtenTensorHandle h;
  TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(static_cast<int64_t>(sizes.size()), sizes.data(), strides, dt,
                                                         device_type, device_index, &h));
  return Tensor(h);
}

// t's dtype is one the kernels take: float32, float16 or bfloat16.
inline void check_float_dtype(const Tensor& t, const char* name) {
  const ScalarType dt = t.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::Half || dt == ScalarType::BFloat16, "fastlm: ", name,
                  " must be float32, float16 or bfloat16, got ", dtype_name(dt));
}

// ------------------------------------------------------------------------------------------------------------
// Dispatch, after FlashAttention's static_switch.h: a runtime dtype (or size) becomes a compile-time type (or
// constant) handed to a generic lambda, f(T{}) or f(std::integral_constant<int, V>{}):
//   dispatch_float<Half, BF16>(x.scalar_type(), [&](auto tag) { using T = decltype(tag); ... });
// Half and BF16 are the backend's 16-bit element types: CUDA's __half / __nv_bfloat16, csrc/cpu's half / bf16.
// The ops check their dtypes first, so the errors below only guard against a missing check.
// ------------------------------------------------------------------------------------------------------------

// f(Half{}) or f(BF16{}): the 16-bit types only.
template <typename Half, typename BF16, typename F>
void dispatch_half(ScalarType t, F&& f) {
  switch (t) {
    case ScalarType::Half: f(Half{}); return;
    case ScalarType::BFloat16: f(BF16{}); return;
    default: STD_TORCH_CHECK(false, "fastlm: unsupported dtype ", dtype_name(t));
  }
}

// f(float{}), f(Half{}) or f(BF16{}).
template <typename Half, typename BF16, typename F>
void dispatch_float(ScalarType t, F&& f) {
  if (t == ScalarType::Float) {
    f(float{});
    return;
  }
  dispatch_half<Half, BF16>(t, f);
}

// f(T{}, W{}) for an element type T (xt) and a weight type W (wt) that is T or float: five pairs (float x float is
// the one pair for float32 elements, whatever wt says).
template <typename Half, typename BF16, typename F>
void dispatch_float_weight(ScalarType xt, ScalarType wt, F&& f) {
  dispatch_float<Half, BF16>(xt, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      f(float{}, float{});
    } else if (wt == ScalarType::Float) {
      f(T{}, float{});
    } else {
      f(T{}, T{});
    }
  });
}

// f(std::integral_constant<int, V>{}) for the V in Vs... that equals v (e.g. the head dims of a kernel).
template <int... Vs, typename F>
void dispatch_int(int64_t v, const char* what, F&& f) {
  const bool found = ((v == Vs && (f(std::integral_constant<int, Vs>{}), true)) || ...);
  STD_TORCH_CHECK(found, "fastlm: unsupported ", what, " ", v);
}

// ------------------------------------------------------------------------------------------------------------
// LayerNorm / RMSNorm (norm_fwd_* / norm_bwd_*: csrc/cuda/norms.cu, csrc/cpu/norms.cpp).
// ------------------------------------------------------------------------------------------------------------
namespace norm {

constexpr int64_t kMaxN = 65536;  // widest normalised row of the fused kernels (both backends)

// x: (M, N) float32 / float16 / bfloat16, 1 <= N <= kMaxN, unit column stride (any row stride).
inline void check_x(const Tensor& x, const char* name) {
  STD_TORCH_CHECK(x.dim() == 2, "fastlm: ", name, " must be 2-D (M, N), got ", x.dim(), " dimensions");
  check_float_dtype(x, name);
  STD_TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= kMaxN, "fastlm: the normalised size N = ", x.size(1),
                  " must be in [1, ", kMaxN, "]");
  STD_TORCH_CHECK(x.size(1) == 1 || x.stride(1) == 1, "fastlm: ", name,
                  " must have unit stride along the last dimension, got stride ", x.stride(1));
}

// (M, N) matrix of x's dtype with unit column stride (any row stride: rows are only read).
inline void check_matrix(const Tensor& t, const char* name, const Tensor& x) {
  STD_TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), "fastlm: ", name,
                  " must have the shape of x (", x.size(0), ", ", x.size(1), ")");
  STD_TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastlm: ", name, " must have x's dtype (",
                  dtype_name(x.scalar_type()), "), got ", dtype_name(t.scalar_type()));
  STD_TORCH_CHECK(t.size(1) == 1 || t.stride(1) == 1, "fastlm: ", name,
                  " must have unit stride along the last dimension, got stride ", t.stride(1));
}

// (N,) vector of x's dtype or float32, unit stride.
inline void check_param(const Tensor& t, const char* name, const Tensor& x) {
  const int64_t N = x.size(1);
  STD_TORCH_CHECK(t.dim() == 1 && t.size(0) == N, "fastlm: ", name, " must be 1-D of size N = ", N);
  STD_TORCH_CHECK(N == 1 || t.stride(0) == 1, "fastlm: ", name, " must be contiguous");
  STD_TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == ScalarType::Float, "fastlm: ", name,
                  " must have x's dtype (", dtype_name(x.scalar_type()), ") or float32, got ",
                  dtype_name(t.scalar_type()));
}

// (M,) float32 statistics, unit stride.
inline void check_stat(const Tensor& t, const char* name, int64_t M) {
  STD_TORCH_CHECK(t.dim() == 1 && t.size(0) == M, "fastlm: ", name, " must be 1-D of size M = ", M);
  STD_TORCH_CHECK(t.scalar_type() == ScalarType::Float, "fastlm: ", name, " must be float32, got ",
                  dtype_name(t.scalar_type()));
  STD_TORCH_CHECK(M <= 1 || t.stride(0) == 1, "fastlm: ", name, " must be contiguous");
}

// The checked arguments of norm_fwd: bias is None for RMSNorm (which has none: ignored), wt the weight type.
struct FASTLM_HIDDEN Fwd {
  int64_t M, N;
  ScalarType xt, wt;
  std::optional<Tensor> bias;
};

template <typename OnDevice>
Fwd check_fwd(const Tensor& x, const std::optional<Tensor>& residual, const std::optional<Tensor>& weight,
              const std::optional<Tensor>& bias_in, bool rms, const OnDevice& on_device) {
  on_device(x, "x");
  check_x(x, "x");
  Fwd f{x.size(0), x.size(1), x.scalar_type(), x.scalar_type(), rms ? std::nullopt : bias_in};
  auto param = [&](const Tensor& t, const char* name) {
    on_device(t, name);
    check_param(t, name, x);
  };
  if (residual) {
    on_device(*residual, "residual");
    check_matrix(*residual, "residual", x);
  }
  if (weight) param(*weight, "weight");
  if (f.bias) param(*f.bias, "bias");
  if (weight && f.bias) {
    STD_TORCH_CHECK(weight->scalar_type() == f.bias->scalar_type(), "fastlm: weight (",
                    dtype_name(weight->scalar_type()), ") and bias (", dtype_name(f.bias->scalar_type()),
                    ") must have the same dtype");
  }
  f.wt = weight ? weight->scalar_type() : f.bias ? f.bias->scalar_type() : f.xt;
  return f;
}

// y (M, N); h = x + residual (M, N), (0,) without a residual; mean (M,) float32, (0,) for RMS; rstd (M,) float32.
struct FASTLM_HIDDEN FwdOut {
  Tensor y, h, mean, rstd;
};

inline FwdOut fwd_outputs(const Tensor& x, const Fwd& f, bool residual, bool rms) {
  return {empty_on(x, {f.M, f.N}), residual ? empty_on(x, {f.M, f.N}) : empty_on(x, {0}),
          empty_on(x, {rms ? 0 : f.M}, ScalarType::Float), empty_on(x, {f.M}, ScalarType::Float)};
}

// The fields the CPU and CUDA kernel arguments FwdArgs<T, W> share (each backend sets its own others).
template <typename T, typename W, typename A>
void set_fwd_args(A& a, const Tensor& x, const std::optional<Tensor>& residual, const std::optional<Tensor>& weight,
                  const Fwd& f, const FwdOut& out, double eps, bool rms) {
  a.x = static_cast<const T*>(x.data_ptr());
  a.res = residual ? static_cast<const T*>(residual->data_ptr()) : nullptr;
  a.w = weight ? static_cast<const W*>(weight->data_ptr()) : nullptr;
  a.b = f.bias ? static_cast<const W*>(f.bias->data_ptr()) : nullptr;
  a.y = static_cast<T*>(out.y.data_ptr());
  a.h = residual ? static_cast<T*>(out.h.data_ptr()) : nullptr;
  a.mean = rms ? nullptr : static_cast<float*>(out.mean.data_ptr());
  a.rstd = static_cast<float*>(out.rstd.data_ptr());
  a.N = static_cast<decltype(a.N)>(f.N);
  a.sx = x.stride(0);
  a.sr = residual ? residual->stride(0) : 0;
  a.eps = static_cast<float>(eps);
  a.rms = rms;
}

// The checked arguments of norm_bwd. db takes the weight's dtype; without a weight it stays float32 (the caller
// casts it to the bias dtype): out_t.
struct Bwd {
  int64_t M, N;
  ScalarType xt, wt, out_t;
  bool need_dw, need_db;
};

template <typename OnDevice>
Bwd check_bwd(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight, const Tensor& mean,
              const Tensor& rstd, const std::optional<Tensor>& dh, bool rms, bool has_bias, const OnDevice& on_device) {
  on_device(x, "x");
  check_x(x, "x");
  const int64_t M = x.size(0);
  auto matrix = [&](const Tensor& t, const char* name) {
    on_device(t, name);
    check_matrix(t, name, x);
  };
  auto stat = [&](const Tensor& t, const char* name) {
    on_device(t, name);
    check_stat(t, name, M);
  };
  matrix(dy, "dy");
  if (dh) matrix(*dh, "dh");
  if (weight) {
    on_device(*weight, "weight");
    check_param(*weight, "weight", x);
  }
  if (!rms) stat(mean, "mean");
  stat(rstd, "rstd");
  const ScalarType wt = weight ? weight->scalar_type() : x.scalar_type();
  return {M, x.size(1), x.scalar_type(), wt, weight ? wt : ScalarType::Float, weight.has_value(), has_bias && !rms};
}

// dx (M, N); dw and db (N,) of dtype out_t, (0,) when not wanted (float32 without a weight, as the fake's); zeros
// when M == 0 (the caller returns them at once).
struct FASTLM_HIDDEN BwdOut {
  Tensor dx, dw, db;
};

inline BwdOut bwd_outputs(const Tensor& x, const Bwd& b) {
  BwdOut o{empty_on(x, {b.M, b.N}), empty_on(x, {b.need_dw ? b.N : 0}, b.out_t),
           empty_on(x, {b.need_db ? b.N : 0}, b.out_t)};
  if (b.M == 0) {
    torch::stable::zero_(o.dw);
    torch::stable::zero_(o.db);
  }
  return o;
}

// The fields the CPU and CUDA kernel arguments BwdArgs<T, W> share; pdw / pdb: the backend's fp32 workspaces of
// dw / db partial sums (nullptr: not wanted).
template <typename T, typename W, typename A>
void set_bwd_args(A& a, const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight, const Tensor& mean,
                  const Tensor& rstd, const std::optional<Tensor>& dh, const Bwd& b, const BwdOut& out, float* pdw,
                  float* pdb, bool rms) {
  a.dy = static_cast<const T*>(dy.data_ptr());
  a.x = static_cast<const T*>(x.data_ptr());
  a.w = weight ? static_cast<const W*>(weight->data_ptr()) : nullptr;
  a.mean = rms ? nullptr : static_cast<const float*>(mean.data_ptr());
  a.rstd = static_cast<const float*>(rstd.data_ptr());
  a.dh = dh ? static_cast<const T*>(dh->data_ptr()) : nullptr;
  a.dx = static_cast<T*>(out.dx.data_ptr());
  a.pdw = pdw;
  a.pdb = pdb;
  a.M = b.M;
  a.N = static_cast<decltype(a.N)>(b.N);
  a.sdy = dy.stride(0);
  a.sx = x.stride(0);
  a.sdh = dh ? dh->stride(0) : 0;
  a.rms = rms;
}

// An fp32 workspace of (rows, cols) partial sums, (0, 0) when not wanted.
inline Tensor workspace(const Tensor& x, bool need, int64_t rows, int64_t cols) {
  return empty_on(x, {need ? rows : 0, need ? cols : 0}, ScalarType::Float);
}

// Calls reduce(O{}) with the dtype O of dw / db: the weight's (W), or float32 when there is no weight (then only db
// exists).
template <typename W, typename F>
void with_grad_type(bool has_weight, F&& reduce) {
  if (has_weight) {
    reduce(W{});
  } else {
    reduce(float{});
  }
}

}  // namespace norm

// ------------------------------------------------------------------------------------------------------------
// Softmax / log-softmax, masked softmax and their backward (csrc/cuda/softmax.cu, csrc/cpu/softmax.cpp).
// ------------------------------------------------------------------------------------------------------------
namespace softmax {

inline int64_t normalize_dim(const Tensor& t, int64_t dim, const char* name) {
  const int64_t nd = t.dim();
  STD_TORCH_CHECK(nd >= 1, "fastlm: ", name, " must have at least 1 dimension");
  STD_TORCH_CHECK(dim >= -nd && dim < nd, "fastlm: dim ", dim, " is out of range for ", name, " with ", nd,
                  " dimensions");
  return dim < 0 ? dim + nd : dim;
}

// A tensor along dim as (outer, R, inner): element j of row (o, i) at o * R * inner + j * inner + i.
struct Split {
  int64_t outer, R, inner;
};

inline Split split_dims(const Tensor& t, int64_t dim) {
  Split s{1, t.size(dim), 1};
  for (int64_t d = 0; d < dim; ++d) s.outer *= t.size(d);
  for (int64_t d = dim + 1; d < t.dim(); ++d) s.inner *= t.size(d);
  return s;
}

// x of softmax_fwd: 2-D with unit last stride and no negative row stride (rows2d: dim == 1), else contiguous.
inline void check_layout(const Tensor& x, bool rows2d) {
  if (rows2d) {
    STD_TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "fastlm: x must have unit stride along dim 1, got stride ",
                    x.stride(1));
    STD_TORCH_CHECK(x.size(0) <= 1 || x.stride(0) >= 0, "fastlm: x has a negative row stride");
  } else {
    STD_TORCH_CHECK(x.is_contiguous(), "fastlm: x must be contiguous (or 2-D with unit last stride and dim == 1)");
  }
}

// dy of softmax_bwd: y's dtype and shape.
inline void check_dy(const Tensor& dy, const Tensor& y) {
  STD_TORCH_CHECK(dy.scalar_type() == y.scalar_type(), "fastlm: dy (", dtype_name(dy.scalar_type()),
                  ") must have y's dtype (", dtype_name(y.scalar_type()), ")");
  STD_TORCH_CHECK(dy.dim() == y.dim(), "fastlm: dy must have y's shape");
  for (int64_t d = 0; d < y.dim(); ++d) {
    STD_TORCH_CHECK(dy.size(d) == y.size(d), "fastlm: dy must have y's shape (mismatch at dim ", d, ")");
  }
}

// y and dy of softmax_bwd: as check_layout, both of them.
inline void check_bwd_layout(const Tensor& y, const Tensor& dy, bool rows2d) {
  if (rows2d) {
    STD_TORCH_CHECK(y.size(1) <= 1 || (y.stride(1) == 1 && dy.stride(1) == 1),
                    "fastlm: y and dy must have unit stride along dim 1");
    STD_TORCH_CHECK(y.size(0) <= 1 || (y.stride(0) >= 0 && dy.stride(0) >= 0),
                    "fastlm: y and dy must have non-negative row strides");
  } else {
    STD_TORCH_CHECK(y.is_contiguous(), "fastlm: y must be contiguous (or 2-D with unit last stride and dim == 1)");
    STD_TORCH_CHECK(dy.is_contiguous(), "fastlm: dy must be contiguous (or 2-D with unit last stride and dim == 1)");
  }
}

// x of masked_softmax_fwd: (B, H, Sq, Sk) scores, unit last stride, no negative stride.
struct Scores {
  int64_t B, H, Sq, Sk;
};

inline Scores check_scores(const Tensor& x) {
  STD_TORCH_CHECK(x.dim() == 4, "fastlm: x must be 4-D (B, H, Sq, Sk), got ", x.dim(), " dimensions");
  const Scores s{x.size(0), x.size(1), x.size(2), x.size(3)};
  STD_TORCH_CHECK(s.Sk <= 1 || x.stride(3) == 1, "fastlm: x must have unit stride along the last dim, got stride ",
                  x.stride(3));
  for (int d = 0; d < 3; ++d) {
    STD_TORCH_CHECK(x.size(d) <= 1 || x.stride(d) >= 0, "fastlm: x has a negative stride");
  }
  return s;
}

// The mask of masked_softmax_fwd: an expanded (B, H, Sq, Sk) view, no negative stride, bool (True = keep) or
// floating point (additive: float16, bfloat16, float32, float64).
template <typename OnDevice>
void check_mask(const Tensor& mask, const Scores& s, const OnDevice& on_device) {
  on_device(mask, "mask");
  STD_TORCH_CHECK(mask.dim() == 4 && mask.size(0) == s.B && mask.size(1) == s.H && mask.size(2) == s.Sq &&
                      mask.size(3) == s.Sk,
                  "fastlm: mask must be an expanded view of x's shape (B, H, Sq, Sk)");
  for (int d = 0; d < 4; ++d) {
    STD_TORCH_CHECK(mask.size(d) <= 1 || mask.stride(d) >= 0, "fastlm: mask has a negative stride");
  }
  const ScalarType mt = mask.scalar_type();
  STD_TORCH_CHECK(mt == ScalarType::Bool || mt == ScalarType::Half || mt == ScalarType::BFloat16 ||
                      mt == ScalarType::Float || mt == ScalarType::Double,
                  "fastlm: mask must be bool (True = keep) or floating point (additive), got ", dtype_name(mt));
}

}  // namespace softmax

// ------------------------------------------------------------------------------------------------------------
// Cross-entropy (cross_entropy_fwd_*: csrc/cuda/cross_entropy.cu, csrc/cpu/cross_entropy.cpp).
// ------------------------------------------------------------------------------------------------------------
namespace ce {

// input (N, C) or (N, C, D): rows = N * D rows of C logits.
struct Shape {
  int64_t N, C, D, rows;
};

inline Shape input_shape(const Tensor& input) {
  STD_TORCH_CHECK(input.dim() == 2 || input.dim() == 3, "fastlm: input must be (N, C) or (N, C, D), got ",
                  input.dim(), " dimensions");
  const int64_t N = input.size(0);
  const int64_t D = input.dim() == 3 ? input.size(2) : 1;
  return {N, input.size(1), D, N * D};
}

// (N, C): unit class stride (where class_stride) and no negative row stride; (N, C, D): contiguous.
inline void check_input_layout(const Tensor& input, const Shape& s, bool class_stride) {
  if (input.dim() == 2) {
    STD_TORCH_CHECK(s.C == 1 || !class_stride || input.stride(1) == 1,
                    "fastlm: input must have unit stride along the classes, got ", input.stride(1));
    STD_TORCH_CHECK(s.N <= 1 || input.stride(0) >= 0, "fastlm: input has a negative row stride");
  } else {
    STD_TORCH_CHECK(input.is_contiguous(), "fastlm: a 3-D input (N, C, D) must be contiguous");
  }
}

// weight None or (C,) float32 contiguous, reduction 0 / 1 / 2.
template <typename OnDevice>
void check_weight_reduction(const std::optional<Tensor>& weight, int64_t reduction, const Shape& s,
                            const OnDevice& on_device) {
  if (weight) {
    on_device(*weight, "weight");
    STD_TORCH_CHECK(weight->scalar_type() == ScalarType::Float, "fastlm: weight must be float32, got ",
                    dtype_name(weight->scalar_type()));
    STD_TORCH_CHECK(weight->dim() == 1 && weight->size(0) == s.C, "fastlm: weight must be 1-D of size C = ", s.C);
    STD_TORCH_CHECK(s.C == 1 || weight->stride(0) == 1, "fastlm: weight must be contiguous");
  }
  STD_TORCH_CHECK(reduction >= 0 && reduction <= 2, "fastlm: reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
                  reduction);
}

// target (rows,) int64 contiguous, weight None or (C,) float32 contiguous, reduction 0 / 1 / 2.
template <typename OnDevice>
void check_target_weight(const Tensor& target, const std::optional<Tensor>& weight, int64_t reduction, const Shape& s,
                         const OnDevice& on_device) {
  on_device(target, "target");
  STD_TORCH_CHECK(target.scalar_type() == ScalarType::Long, "fastlm: target must be int64, got ",
                  dtype_name(target.scalar_type()));
  STD_TORCH_CHECK(target.dim() == 1 && target.size(0) == s.rows, "fastlm: target must be 1-D of size N * D = ",
                  s.rows);
  STD_TORCH_CHECK(s.rows <= 1 || target.stride(0) == 1, "fastlm: target must be contiguous");
  check_weight_reduction(weight, reduction, s, on_device);
}

// Soft (class-probability) target: input's shape and dtype; (N, C): unit class stride, no negative row stride;
// (N, C, D): contiguous.
template <typename OnDevice>
void check_soft_target(const Tensor& target, const Tensor& input, const Shape& s, const OnDevice& on_device) {
  on_device(target, "target");
  STD_TORCH_CHECK(target.scalar_type() == input.scalar_type(), "fastlm: target must have input's dtype (",
                  dtype_name(input.scalar_type()), "), got ", dtype_name(target.scalar_type()));
  bool same = target.dim() == input.dim();
  for (int64_t d = 0; same && d < input.dim(); ++d) same = target.size(d) == input.size(d);
  STD_TORCH_CHECK(same, "fastlm: a class-probability target must have input's shape");
  if (input.dim() == 2) {
    STD_TORCH_CHECK(s.C == 1 || s.N == 0 || target.stride(1) == 1,
                    "fastlm: target must have unit stride along the classes, got ", target.stride(1));
    STD_TORCH_CHECK(s.N <= 1 || target.stride(0) >= 0, "fastlm: target has a negative row stride");
  } else {
    STD_TORCH_CHECK(target.is_contiguous(), "fastlm: a 3-D target (N, C, D) must be contiguous");
  }
}

// The fields the CPU and CUDA kernel arguments CeArgs<T> share (each backend sets its own others).
template <typename T, typename A>
void set_args(A& a, const Tensor& input, const int64_t* target, const float* w, float* losses, T* grad, const Shape& s,
              int64_t ignore_index, double label_smoothing) {
  a.x = static_cast<const T*>(input.data_ptr());
  a.target = target;
  a.w = w;
  a.losses = losses;
  a.grad = grad;
  a.C = static_cast<decltype(a.C)>(s.C);
  a.D = s.D;
  a.sn = input.dim() == 2 ? input.stride(0) : s.C * s.D;
  a.ignore_index = ignore_index;
  a.eps = static_cast<float>(label_smoothing);
  a.eps_c = static_cast<float>(label_smoothing / static_cast<double>(s.C));
}

}  // namespace ce

// ------------------------------------------------------------------------------------------------------------
// Attention (attention_fwd_*: csrc/cuda/attention_fwd.cu, csrc/cpu/attention.cpp; attention_bwd_cuda).
// ------------------------------------------------------------------------------------------------------------
namespace attn {

// q (B, H, Sq, D), k and v (B, Hkv, Sk, D).
struct Dims {
  int64_t B, H, Hkv, Sq, Sk, D;
};

// The shapes of 4-D q, k, v: batch and head dim shared, k and v alike.
inline Dims qkv_dims(const Tensor& q, const Tensor& k, const Tensor& v) {
  const Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  STD_TORCH_CHECK(k.size(0) == d.B && v.size(0) == d.B, "fastlm: q, k and v must share the batch size");
  STD_TORCH_CHECK(k.size(3) == d.D && v.size(3) == d.D, "fastlm: q, k and v must share the head dim");
  STD_TORCH_CHECK(v.size(1) == d.Hkv && v.size(2) == d.Sk, "fastlm: k and v must have the same shape");
  return d;
}

// GQA: the query heads split evenly over the key/value heads.
inline void check_heads(const Dims& d) {
  STD_TORCH_CHECK(d.Hkv >= 1 || d.H == 0, "fastlm: k must have at least one head");
  STD_TORCH_CHECK(d.Hkv == 0 || d.H % d.Hkv == 0, "fastlm: the number of query heads (", d.H,
                  ") must be a multiple of the number of key/value heads (", d.Hkv, ")");
}

// o (B, H, Sq, D) in q's dtype and lse (B, H, Sq) float32 of attention_fwd. done: nothing left to compute (no
// query; or no key: every row is empty, o = 0 and lse = -inf, filled here).
struct FASTLM_HIDDEN FwdOut {
  Tensor o, lse;
  bool done;
};

inline FwdOut fwd_outputs(const Tensor& q, const Dims& d) {
  FwdOut r{torch::stable::new_empty(q, {d.B, d.H, d.Sq, d.D}),
           torch::stable::new_empty(q, {d.B, d.H, d.Sq}, ScalarType::Float), d.B == 0 || d.H == 0 || d.Sq == 0};
  if (!r.done && d.Sk == 0) {
    torch::stable::zero_(r.o);
    torch::stable::fill_(r.lse, -std::numeric_limits<double>::infinity());
    r.done = true;
  }
  return r;
}

}  // namespace attn

}  // namespace fastlm
