// LayerNorm / RMSNorm with an optional fused residual add: forward and backward CPU kernels, registered as the
// CPU implementations of fastlm::norm_fwd_cpu and fastlm::norm_bwd_cpu (schemas and contract in csrc/ops.cpp;
// the CUDA twin is csrc/cuda/norms.cu). The kernels are in csrc/cpu/norms_kernels.h, the checks in csrc/checks.h.
//
// Templates: element type T (float, half, bf16) x weight type W (T or float): 5 combinations per kernel.
// Everything else (rms, residual, weight, bias, dh) is a runtime flag, tested once per row outside the loops.
//
// Work layout: rows are independent; torch's thread pool runs a cloned worker (FASTLM_CPU_CLONES) on a range of
// rows. A row is at most 65536 elements, so the worker keeps it (and the weight/bias as fp32) in a per-range
// scratch buffer that stays in L1/L2 between the passes over the row: each element is read from memory once.
// All math is fp32; the inner loops are plain fp32 loops over the row (`#pragma omp simd` for the sums).
#include "checks.h"
#include "cpu/common.h"
#include "cpu/norms_kernels.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

namespace fastlm::cpu {
namespace {

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_cpu(const Tensor& x, const std::optional<Tensor>& residual,
                                                        const std::optional<Tensor>& weight,
                                                        const std::optional<Tensor>& bias_in, double eps, bool rms) {
  const norm::Fwd f = norm::check_fwd(x, residual, weight, bias_in, rms, check_cpu);
  const norm::FwdOut out = norm::fwd_outputs(x, f, residual.has_value(), rms);
  if (f.M == 0) return {out.y, out.h, out.mean, out.rstd};

  dispatch_float_weight<half, bf16>(f.xt, f.wt, [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    FwdArgs<T, W> a{};
    norm::set_fwd_args<T, W>(a, x, residual, weight, f, out, eps, rms);
    // A chunk of rows moves >= ~64 KiB (x, residual, y, h), so that 256 rows of 4096 still feed every thread.
    const int64_t row_bytes = f.N * static_cast<int64_t>(sizeof(T)) * (residual ? 4 : 2);
    parallel_rows(f.M, grain_for(row_bytes), [&](int64_t begin, int64_t end) { norm_fwd_rows<T, W>(a, begin, end); });
  });
  return {out.y, out.h, out.mean, out.rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_cpu(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight,
                                                const Tensor& mean, const Tensor& rstd, const std::optional<Tensor>& dh,
                                                bool rms, bool has_bias) {
  const norm::Bwd b = norm::check_bwd(dy, x, weight, mean, rstd, dh, rms, has_bias, check_cpu);
  const norm::BwdOut out = norm::bwd_outputs(x, b);
  if (b.M == 0) return {out.dx, out.dw, out.db};
  const int64_t M = b.M, N = b.N;

  // Blocks: at most kMaxBlocks (enough to balance the threads of a big machine, few enough that the partials'
  // extra traffic, S * N * 4 bytes each, stays small next to the M * N elements), and at least ~64 KiB of
  // input per block. Both bounds depend only on (M, N): the result does not depend on the thread count.
  constexpr int64_t kMaxBlocks = 32;
  const int64_t row_bytes = N * 4;
  const int64_t rows_per_block = std::max((M + kMaxBlocks - 1) / kMaxBlocks, grain_for(row_bytes, 64 * 1024));
  const int64_t S = (M + rows_per_block - 1) / rows_per_block;
  Tensor ws_dw = norm::workspace(x, b.need_dw, S, N);
  Tensor ws_db = norm::workspace(x, b.need_db, S, N);

  dispatch_float_weight<half, bf16>(b.xt, b.wt, [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    BwdArgs<T, W> a{};
    norm::set_bwd_args<T, W>(a, dy, x, weight, mean, rstd, dh, b, out,
                             b.need_dw ? static_cast<float*>(ws_dw.data_ptr()) : nullptr,
                             b.need_db ? static_cast<float*>(ws_db.data_ptr()) : nullptr, rms);
    a.rows_per_block = rows_per_block;
    parallel_rows(S, 1, [&](int64_t begin, int64_t end) { norm_bwd_blocks<T, W>(a, begin, end); });

    if (!b.need_dw && !b.need_db) return;
    norm::with_grad_type<W>(weight.has_value(), [&](auto o_tag) {
      using O = decltype(o_tag);
      O* odw = b.need_dw ? static_cast<O*>(out.dw.data_ptr()) : nullptr;
      O* odb = b.need_db ? static_cast<O*>(out.db.data_ptr()) : nullptr;
      // Column ranges of >= ~64 KiB of partials each.
      parallel_rows(N, grain_for(S * 4 * ((b.need_dw ? 1 : 0) + (b.need_db ? 1 : 0))), [&](int64_t c0, int64_t c1) {
        if (odw) col_sum<O>(a.pdw, odw, S, N, c0, c1);
        if (odb) col_sum<O>(a.pdb, odb, S, N, c0, c1);
      });
    });
  });
  return {out.dx, out.dw, out.db};
}

}  // namespace
}  // namespace fastlm::cpu

STABLE_TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("norm_fwd_cpu", TORCH_BOX(&fastlm::cpu::norm_fwd_cpu));
  m.impl("norm_bwd_cpu", TORCH_BOX(&fastlm::cpu::norm_bwd_cpu));
}
