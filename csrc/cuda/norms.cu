// LayerNorm / RMSNorm with an optional fused residual add: forward and backward CUDA kernels, registered as
// the CUDA implementations of fastlm::norm_fwd_cuda and fastlm::norm_bwd_cuda (schemas in csrc/ops.cpp).
//
// Written against the LibTorch stable ABI only (torch/csrc/stable, TORCH_TARGET_VERSION = 2.10).
// Templates: element type T (float, __half, __nv_bfloat16) x weight type W (T or float): 5 combinations per
// kernel. Everything else (rms, residual, weight, bias, dh) is a runtime flag.
//
// Work layout shared by both directions: a row of N elements is cut into 16-byte chunks of V = 16/sizeof(T)
// elements; a "row group" of blockDim.x threads (a multiple of 32) owns one row, thread tx owns the chunks
// tx, tx + blockDim.x, ... ; a block holds blockDim.y row groups. Because a thread always revisits only its
// own chunks, per-thread caches and accumulators need no barriers; the only barriers are in the row
// reductions and before the backward's final cross-row-group sum.
//
// Numerics: all math in fp32; the build uses --use_fast_math (approximate division and rsqrt, ~2 ulp;
// denormals flushed to zero). The kernels are in norms_kernels.cuh, the checks in csrc/checks.h.
#include "checks.h"
#include "launch.h"
#include "norms_kernels.cuh"

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

namespace fastlm {
namespace {

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_cuda(const Tensor& x, const std::optional<Tensor>& residual,
                                                         const std::optional<Tensor>& weight,
                                                         const std::optional<Tensor>& bias_in, double eps,
                                                         bool rms) {
  const int32_t dev = x.get_device_index();
  const norm::Fwd f = norm::check_fwd(x, residual, weight, bias_in, rms, CudaDevice{dev, "x", kSameDevice});
  const int N = static_cast<int>(f.N);

  torch::stable::accelerator::DeviceGuard guard(dev);
  const norm::FwdOut out = norm::fwd_outputs(x, f, residual.has_value(), rms);
  if (f.M == 0) return {out.y, out.h, out.mean, out.rstd};

  const int optin = smem_optin(dev);
  const cudaStream_t stream = current_stream(dev);
  dispatch_float_weight<__half, __nv_bfloat16>(f.xt, f.wt, [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    constexpr int V = kVec<T>;
    FwdArgs<T, W> a{};
    norm::set_fwd_args<T, W>(a, x, residual, weight, f, out, eps, rms);
    a.M = f.M;
    a.vec = N % V == 0 && rows_aligned(a.x, f.M, a.sx, sizeof(T)) &&
            (!a.res || rows_aligned(a.res, f.M, a.sr, sizeof(T))) && (!a.w || aligned16(a.w)) &&
            (!a.b || aligned16(a.b)) && aligned16(a.y) && (!a.h || aligned16(a.h));
    // The row cache: h as T, in whole 16-byte chunks.
    const int nchunks = (N + V - 1) / V;
    const RowsLaunch l = rows_launch(f.M, nchunks, 4, static_cast<size_t>(nchunks) * 16, optin);
    a.cache = l.cache;
    allow_dynamic_smem(norm_fwd_kernel<T, W>, l.smem, optin - static_cast<int>(kSmemMargin));
    norm_fwd_kernel<T, W><<<l.blocks, l.block, l.smem, stream>>>(a);
    check_cuda(cudaGetLastError(), "norm_fwd_kernel launch");
  });
  return {out.y, out.h, out.mean, out.rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_cuda(const Tensor& dy, const Tensor& x,
                                                 const std::optional<Tensor>& weight, const Tensor& mean,
                                                 const Tensor& rstd, const std::optional<Tensor>& dh, bool rms,
                                                 bool has_bias) {
  const int32_t dev = x.get_device_index();
  const norm::Bwd b = norm::check_bwd(dy, x, weight, mean, rstd, dh, rms, has_bias, CudaDevice{dev, "x", kSameDevice});
  const int64_t M = b.M;
  const int N = static_cast<int>(b.N);

  torch::stable::accelerator::DeviceGuard guard(dev);
  const norm::BwdOut out = norm::bwd_outputs(x, b);
  if (M == 0) return {out.dx, out.dw, out.db};

  const int sms = sm_count(dev);
  const int optin = smem_optin(dev);
  const cudaStream_t stream = current_stream(dev);
  dispatch_float_weight<__half, __nv_bfloat16>(b.xt, b.wt, [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    constexpr int V = kVec<T>;
    const int nchunks = (N + V - 1) / V;
    const int npad = nchunks * V;
    const int nacc = (b.need_dw ? 1 : 0) + (b.need_db ? 1 : 0);
    int tpr, rpb;
    row_shape(nchunks, 2, tpr, rpb);
    const size_t acc_bytes = static_cast<size_t>(rpb) * nacc * npad * sizeof(float);
    const bool smem_acc = nacc > 0 && acc_bytes + kSmemMargin <= static_cast<size_t>(optin);
    // Without shared-memory accumulators each block's workspace row must belong to one row group.
    if (nacc > 0 && !smem_acc) rpb = 1;
    // G blocks: enough to fill every SM with 2048 threads, never more than there are row groups. G depends
    // only on (M, N, dtypes, SM count), so the partial-sum layout, hence dw/db, are reproducible.
    const int64_t groups = (M + rpb - 1) / rpb;
    const int64_t per_sm = std::max(1, 2048 / (tpr * rpb));
    const int64_t G = std::min<int64_t>(groups, static_cast<int64_t>(sms) * per_sm);
    STD_TORCH_CHECK(G <= 0x7fffffff, "fastlm: too many rows (", M, ")");
    Tensor ws_dw = norm::workspace(x, b.need_dw, G, npad);
    Tensor ws_db = norm::workspace(x, b.need_db, G, npad);

    BwdArgs<T, W> a{};
    norm::set_bwd_args<T, W>(a, dy, x, weight, mean, rstd, dh, b, out,
                             b.need_dw ? static_cast<float*>(ws_dw.data_ptr()) : nullptr,
                             b.need_db ? static_cast<float*>(ws_db.data_ptr()) : nullptr, rms);
    a.vec = N % V == 0 && rows_aligned(a.dy, M, a.sdy, sizeof(T)) && rows_aligned(a.x, M, a.sx, sizeof(T)) &&
            (!a.dh || rows_aligned(a.dh, M, a.sdh, sizeof(T))) && (!a.w || aligned16(a.w)) && aligned16(a.dx);
    // Accumulator chunks are accessed as whole 16-byte words: the workspaces come from the caching allocator
    // (>= 256-byte aligned) and npad * 4 is a multiple of 16.
    STD_TORCH_CHECK((!a.pdw || aligned16(a.pdw)) && (!a.pdb || aligned16(a.pdb)), "fastlm: misaligned workspace");
    a.smem_acc = smem_acc;
    const size_t smem = smem_acc ? acc_bytes : 0;
    allow_dynamic_smem(norm_bwd_kernel<T, W>, smem, optin - static_cast<int>(kSmemMargin));
    norm_bwd_kernel<T, W><<<static_cast<unsigned>(G), dim3(tpr, rpb), smem, stream>>>(a);
    check_cuda(cudaGetLastError(), "norm_bwd_kernel launch");

    if (nacc == 0) return;
    const float* ws0 = b.need_dw ? a.pdw : a.pdb;
    const float* ws1 = b.need_dw && b.need_db ? a.pdb : nullptr;
    const dim3 grid((N + 31) / 32, nacc);
    norm::with_grad_type<W>(weight.has_value(), [&](auto o_tag) {
      using O = decltype(o_tag);
      O* out0 = static_cast<O*>(b.need_dw ? out.dw.data_ptr() : out.db.data_ptr());
      O* out1 = b.need_dw && b.need_db ? static_cast<O*>(out.db.data_ptr()) : nullptr;
      col_sum_kernel<O><<<grid, dim3(32, 32), 0, stream>>>(ws0, ws1, out0, out1, G, N, npad);
      check_cuda(cudaGetLastError(), "col_sum_kernel launch");
    });
  });
  return {out.dx, out.dw, out.db};
}

}  // namespace
}  // namespace fastlm

STABLE_TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("norm_fwd_cuda", TORCH_BOX(&fastlm::norm_fwd_cuda));
  m.impl("norm_bwd_cuda", TORCH_BOX(&fastlm::norm_bwd_cuda));
}
