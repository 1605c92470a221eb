// Softmax / log-softmax, the scaled-masked-causal softmax of attention scores, and their backward: CUDA kernels
// registered as the CUDA implementations of fastlm::softmax_fwd_cuda, fastlm::masked_softmax_fwd_cuda and
// fastlm::softmax_bwd_cuda (schemas in csrc/ops.cpp). Same op contract as kernels/softmax.py (Triton).
//
// Written against the LibTorch stable ABI only (torch/csrc/stable, TORCH_TARGET_VERSION = 2.10).
// Templates: the element type T (float, __half, __nv_bfloat16) only; everything else is a runtime flag.
//
// Two work layouts:
//  * "rows" (softmax along a dim with unit stride): a row of R elements is cut into 16-byte chunks of
//    V = 16/sizeof(T) elements; a row group of blockDim.x threads (a multiple of 32) owns one row, thread tx owns
//    the chunks tx, tx + blockDim.x, ...; a block holds blockDim.y row groups. Forward: pass 1 reads the scores
//    and keeps a per-thread running (max, sum of exp) (online softmax, any R), the row group combines them, pass 2
//    writes y from a shared-memory copy of the scores (when the row fits) or from a re-read of x. A thread only
//    revisits its own chunks, so the cache needs no barrier. Backward: pass 1 forms sum(y * dy) (or sum(dy)),
//    pass 2 writes dx, from a shared-memory copy of (y, dy) when it fits.
//  * "strided" (softmax along a dim of a contiguous tensor with inner size > 1, no transpose copy): element j of
//    row (o, i) is at o * R * inner + j * inner + i. Block (bx, by): bx lanes over consecutive i (coalesced), by
//    threads split the R elements of each row (j = ty, ty + by, ...); the by partials are combined through shared
//    memory in a fixed order.
//
// Numerics: all math in fp32; the build uses --use_fast_math (exp/log via ex2/lg2.approx, approximate division;
// denormals flushed to zero). Combinations are in a fixed order set by the launch shape: deterministic.
// The kernels are in softmax_kernels.cuh, the checks shared with csrc/cpu/softmax.cpp in csrc/checks.h.
#include "checks.h"
#include "launch.h"
#include "softmax_kernels.cuh"

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <optional>

namespace fastlm {
namespace {

// Widest row (elements): keeps every column index and chunk count in int.
constexpr int64_t kMaxR = INT_MAX / 2;

// Launches a rows-layout kernel over a.rows rows of a.R elements (the caller sets the rest of a), with a shared-memory
// copy of `copies` fp32 rows per row group (x's scores forward; y and dy backward) when it fits.
template <typename T, typename A>
void launch_rows(void (*kernel)(A), A a, int copies, const char* what, int dev, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const int nchunks = (a.R + V - 1) / V;
  const RowsLaunch l =
      rows_launch(a.rows, nchunks, 4, static_cast<size_t>(copies) * nchunks * V * sizeof(float), smem_optin(dev));
  a.cache = l.cache;
  allow_dynamic_smem(kernel, l.smem);
  kernel<<<l.blocks, l.block, l.smem, stream>>>(a);
  check_cuda(cudaGetLastError(), what);
}

template <typename T>
void launch_strided(StridedArgs<T> a, bool backward, cudaStream_t stream) {
  int bx, by;
  strided_shape(a.inner, a.R, kStridedThreads, bx, by);
  a.nib = (a.inner + bx - 1) / bx;
  STD_TORCH_CHECK(a.outer <= INT_MAX / a.nib, "fastlm: tensor too large for the strided softmax launch");
  const unsigned blocks = static_cast<unsigned>(a.outer * a.nib);
  if (backward) {
    softmax_bwd_strided_kernel<T><<<blocks, dim3(bx, by), 0, stream>>>(a);
    check_cuda(cudaGetLastError(), "softmax_bwd_strided_kernel launch");
  } else {
    softmax_fwd_strided_kernel<T><<<blocks, dim3(bx, by), 0, stream>>>(a);
    check_cuda(cudaGetLastError(), "softmax_fwd_strided_kernel launch");
  }
}

// t along dim as (outer, R, inner), R within the kernels' reach.
softmax::Split split_dims(const Tensor& t, int64_t dim) {
  const softmax::Split s = softmax::split_dims(t, dim);
  STD_TORCH_CHECK(s.R <= kMaxR, "fastlm: softmax size ", s.R, " along dim ", dim, " exceeds ", kMaxR);
  return s;
}

Tensor softmax_fwd_cuda(const Tensor& x, int64_t dim_in, bool log) {
  check_cuda_float(x, "x");
  const int64_t dim = softmax::normalize_dim(x, dim_in, "x");
  const int32_t dev = x.get_device_index();
  const bool rows2d = x.dim() == 2 && dim == 1;
  softmax::check_layout(x, rows2d);
  const softmax::Split sh = split_dims(x, dim);

  torch::stable::accelerator::DeviceGuard guard(dev);
  Tensor y = torch::stable::new_empty(x, x.sizes());
  if (x.numel() == 0) return y;
  const cudaStream_t stream = current_stream(dev);
  dispatch_float<__half, __nv_bfloat16>(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec<T>;
    const int R = static_cast<int>(sh.R);
    if (sh.inner == 1) {
      FwdRowsArgs<T> a{};
      a.x = static_cast<const T*>(x.data_ptr());
      a.y = static_cast<T*>(y.data_ptr());
      a.mask = nullptr;
      a.rows = sh.outer;
      a.Sq = 1;
      a.H = 1;
      a.s0 = rows2d ? x.stride(0) : sh.R;
      a.R = R;
      a.mask_kind = kMaskNone;
      a.scale = 1.f;
      a.causal = false;
      a.log = log;
      a.zero_empty = false;
      a.vec = R % V == 0 && aligned16(a.x) && stride_aligned(sh.outer, a.s0, sizeof(T)) && aligned16(a.y);
      launch_rows<T>(softmax_fwd_rows_kernel<T>, a, 1, "softmax_fwd_rows_kernel launch", dev, stream);
    } else {
      StridedArgs<T> a{};
      a.x = static_cast<const T*>(x.data_ptr());
      a.out = static_cast<T*>(y.data_ptr());
      a.outer = sh.outer;
      a.inner = sh.inner;
      a.R = R;
      a.log = log;
      launch_strided(a, false, stream);
    }
  });
  return y;
}

Tensor masked_softmax_fwd_cuda(const Tensor& x, const std::optional<Tensor>& mask, double scale, bool causal) {
  check_cuda_float(x, "x");
  const softmax::Scores sc = softmax::check_scores(x);
  const int32_t dev = x.get_device_index();
  const int64_t B = sc.B, H = sc.H, Sq = sc.Sq, Sk = sc.Sk;
  STD_TORCH_CHECK(Sk <= kMaxR, "fastlm: Sk = ", Sk, " exceeds ", kMaxR);
  int kind = kMaskNone;
  if (mask) {
    softmax::check_mask(*mask, sc, CudaDevice{dev, "x", ""});
    switch (mask->scalar_type()) {
      case ScalarType::Bool: kind = kMaskBool; break;
      case ScalarType::Half: kind = kMaskHalf; break;
      case ScalarType::BFloat16: kind = kMaskBF16; break;
      case ScalarType::Float: kind = kMaskFloat; break;
      default: kind = kMaskDouble; break;
    }
  }

  torch::stable::accelerator::DeviceGuard guard(dev);
  Tensor y = torch::stable::new_empty(x, {B, H, Sq, Sk});
  if (x.numel() == 0) return y;
  const cudaStream_t stream = current_stream(dev);
  dispatch_float<__half, __nv_bfloat16>(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec<T>;
    FwdRowsArgs<T> a{};
    a.x = static_cast<const T*>(x.data_ptr());
    a.y = static_cast<T*>(y.data_ptr());
    a.mask = mask ? mask->data_ptr() : nullptr;
    a.rows = B * H * Sq;
    a.Sq = Sq;
    a.H = H;
    a.s0 = x.stride(0);
    a.s1 = x.stride(1);
    a.s2 = x.stride(2);
    if (mask) {
      a.m0 = mask->stride(0);
      a.m1 = mask->stride(1);
      a.m2 = mask->stride(2);
      a.m3 = mask->stride(3);
    }
    a.R = static_cast<int>(Sk);
    a.mask_kind = kind;
    a.scale = static_cast<float>(scale);
    a.causal = causal;
    a.log = false;
    a.zero_empty = true;
    a.vec = Sk % V == 0 && aligned16(a.x) && stride_aligned(B, a.s0, sizeof(T)) &&
            stride_aligned(H, a.s1, sizeof(T)) && stride_aligned(Sq, a.s2, sizeof(T)) && aligned16(a.y);
    launch_rows<T>(softmax_fwd_rows_kernel<T>, a, 1, "softmax_fwd_rows_kernel launch", dev, stream);
  });
  return y;
}

Tensor softmax_bwd_cuda(const Tensor& dy, const Tensor& y, int64_t dim_in, bool log, double scale) {
  check_cuda_float(y, "y");
  check_cuda_float(dy, "dy");
  const int64_t dim = softmax::normalize_dim(y, dim_in, "y");
  const int32_t dev = y.get_device_index();
  CudaDevice{dev, "y", ""}(dy, "dy");
  softmax::check_dy(dy, y);
  const bool rows2d = y.dim() == 2 && dim == 1;
  softmax::check_bwd_layout(y, dy, rows2d);
  const softmax::Split sh = split_dims(y, dim);

  torch::stable::accelerator::DeviceGuard guard(dev);
  Tensor dx = torch::stable::new_empty(y, y.sizes());
  if (y.numel() == 0) return dx;
  const cudaStream_t stream = current_stream(dev);
  dispatch_float<__half, __nv_bfloat16>(y.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec<T>;
    const int R = static_cast<int>(sh.R);
    if (sh.inner == 1) {
      BwdRowsArgs<T> a{};
      a.y = static_cast<const T*>(y.data_ptr());
      a.dy = static_cast<const T*>(dy.data_ptr());
      a.dx = static_cast<T*>(dx.data_ptr());
      a.rows = sh.outer;
      a.sy = rows2d ? y.stride(0) : sh.R;
      a.sdy = rows2d ? dy.stride(0) : sh.R;
      a.R = R;
      a.scale = static_cast<float>(scale);
      a.log = log;
      a.vec = R % V == 0 && aligned16(a.y) && aligned16(a.dy) && aligned16(a.dx) &&
              stride_aligned(sh.outer, a.sy, sizeof(T)) && stride_aligned(sh.outer, a.sdy, sizeof(T));
      launch_rows<T>(softmax_bwd_rows_kernel<T>, a, 2, "softmax_bwd_rows_kernel launch", dev, stream);
    } else {
      StridedArgs<T> a{};
      a.x = static_cast<const T*>(y.data_ptr());
      a.dy = static_cast<const T*>(dy.data_ptr());
      a.out = static_cast<T*>(dx.data_ptr());
      a.outer = sh.outer;
      a.inner = sh.inner;
      a.R = R;
      a.scale = static_cast<float>(scale);
      a.log = log;
      launch_strided(a, true, stream);
    }
  });
  return dx;
}

}  // namespace
}  // namespace fastlm

STABLE_TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("softmax_fwd_cuda", TORCH_BOX(&fastlm::softmax_fwd_cuda));
  m.impl("masked_softmax_fwd_cuda", TORCH_BOX(&fastlm::masked_softmax_fwd_cuda));
  m.impl("softmax_bwd_cuda", TORCH_BOX(&fastlm::softmax_bwd_cuda));
}
