// Flash-attention backward (FlashAttention-2 scheme, no atomics: deterministic), registered as the CUDA
// implementation of fastlm::attention_bwd_cuda (schema in csrc/ops.cpp). Same scope as attention_fwd.cu.
//
// Three kernels, all 4 warps, mma.sync m16n8k16 with fp32 accumulators, cp.async double buffering:
//   1. delta = rowsum(dO * O) (float32, (B, H, Sq)).
//   2. dK/dV: a block owns BN = 64 keys of one (batch, kv head) (warp w: keys [16w, 16w + 16)) and streams
//      the query tiles (BMQ queries) of EVERY query head of its GQA group, so no two blocks write the same
//      dK/dV rows. In the transposed form (key rows, query columns):
//        s^T = K Q^T; p^T = exp2(s^T * scale * log2 e - lse[q] * log2 e)   (lse = -inf or q >= Sq: p = 0)
//        dV += p^T dO;  dP^T = V dO^T;  dS^T = p^T (dP^T - delta[q]);  dK += dS^T Q;   dK *= scale at the end
//   3. dQ: a block owns BM = 64 queries of one (batch, head) and streams key tiles (BNK keys):
//        s = Q K^T; p = exp2(...); dP = dO V^T; dS = p (dP - delta); dQ += dS K;   dQ *= scale at the end
// Causal (top-left, query i sees keys j <= i): the dK/dV kernel starts at the first query tile that reaches its
// keys, the dQ kernel stops after the last key tile its queries reach; only diagonal / ragged tiles mask.
// p and dS are rounded to the input dtype as the A operands of the second matmuls (as FlashAttention).
// The kernels are in attention_bwd_kernels.cuh, the checks shared with the forward in attention.cuh.
#include "attention.cuh"
#include "attention_bwd_kernels.cuh"

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/ops.h>

#include <cmath>
#include <tuple>

namespace fastlm {
namespace attn {
namespace {

template <typename T, int D>
void launch_bwd(const BwdParams& p, int64_t B, cudaStream_t stream) {
  {
    constexpr int RPB = kThreads / (D / 8);
    const dim3 grid(static_cast<unsigned>((p.Sq + RPB - 1) / RPB), static_cast<unsigned>(p.H),
                    static_cast<unsigned>(B));
    attention_bwd_delta_kernel<T, D><<<grid, kThreads, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "attention_bwd_delta_kernel launch");
  }
  {
    constexpr size_t smem = dkdv_smem_bytes<D>();
    allow_dynamic_smem(attention_bwd_dkdv_kernel<T, D>, smem);
    const dim3 grid(static_cast<unsigned>((p.Sk + kBN - 1) / kBN), static_cast<unsigned>(p.Hkv),
                    static_cast<unsigned>(B));
    attention_bwd_dkdv_kernel<T, D><<<grid, kThreads, smem, stream>>>(p);
    check_cuda(cudaGetLastError(), "attention_bwd_dkdv_kernel launch");
  }
  {
    constexpr size_t smem = dq_smem_bytes<D>();
    allow_dynamic_smem(attention_bwd_dq_kernel<T, D>, smem);
    const dim3 grid(static_cast<unsigned>((p.Sq + kBM - 1) / kBM), static_cast<unsigned>(p.H),
                    static_cast<unsigned>(B));
    attention_bwd_dq_kernel<T, D><<<grid, kThreads, smem, stream>>>(p);
    check_cuda(cudaGetLastError(), "attention_bwd_dq_kernel launch");
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_bwd_cuda(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
    const std::optional<Tensor>& mask, const std::optional<Tensor>& cu_q, const std::optional<Tensor>& cu_k,
    int64_t /*max_q*/, int64_t /*max_k*/, double scale, bool causal, double dropout_p, const Tensor& /*rng*/,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<Tensor>& sinks,
    const std::optional<Tensor>& alibi, bool mask_grad) {
  check_no_modifiers(window_left, window_right, softcap, sinks, alibi, mask_grad);
  const Dims d = check_inputs(q, k, v, mask, cu_q, cu_k, dropout_p);
  const int32_t dev = q.get_device_index();
  const ScalarType dt = q.scalar_type();
  check_bhsd(o, "o", dt, dev);
  check_bhsd(dout, "do", dt, dev);
  for (int i = 0; i < 4; ++i) {
    STD_TORCH_CHECK(o.size(i) == q.size(i) && dout.size(i) == q.size(i), "fastlm: o and do must have q's shape");
  }
  STD_TORCH_CHECK(lse.is_cuda() && lse.get_device_index() == dev, "fastlm: lse must be on q's device");
  STD_TORCH_CHECK(lse.scalar_type() == ScalarType::Float, "fastlm: lse must be float32, got ",
                  dtype_name(lse.scalar_type()));
  STD_TORCH_CHECK(lse.dim() == 3 && lse.size(0) == d.B && lse.size(1) == d.H && lse.size(2) == d.Sq,
                  "fastlm: lse must have shape (B, H, Sq) = (", d.B, ", ", d.H, ", ", d.Sq, ")");

  torch::stable::accelerator::DeviceGuard guard(dev);
  Tensor dq = torch::stable::new_empty(q, {d.B, d.H, d.Sq, d.D});
  Tensor dk = torch::stable::new_empty(k, {d.B, d.Hkv, d.Sk, d.D});
  Tensor dv = torch::stable::new_empty(v, {d.B, d.Hkv, d.Sk, d.D});
  // No mask gradient and no sinks here (check_no_modifiers): both are empty (0,) float32, as the schema says.
  Tensor dmask = torch::stable::new_empty(q, {0}, ScalarType::Float);
  Tensor dsinks = torch::stable::new_empty(q, {0}, ScalarType::Float);
  if (d.B == 0 || d.H == 0) return {dq, dk, dv, dmask, dsinks};
  if (d.Sq == 0 || d.Sk == 0) {  // no (query, key) pair: every gradient is zero
    torch::stable::zero_(dq);
    torch::stable::zero_(dk);
    torch::stable::zero_(dv);
    return {dq, dk, dv, dmask, dsinks};
  }
  Tensor delta = torch::stable::new_empty(q, {d.B, d.H, d.Sq}, ScalarType::Float);

  BwdParams p{};
  set_qkv_params(p, q, k, v, d, scale, causal);
  set_bhs(o, p.o, p.o_sb, p.o_sh, p.o_ss);
  set_bhs(dout, p.dout, p.do_sb, p.do_sh, p.do_ss);
  set_bhs(lse, p.lse, p.l_sb, p.l_sh, p.l_ss);
  p.delta = static_cast<float*>(delta.data_ptr());
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.Hkv = static_cast<int>(d.Hkv);
  p.scale = static_cast<float>(scale);

  const cudaStream_t stream = current_stream(dev);
  dispatch_kernels(dt, d.D, [&](auto t, auto dd) { launch_bwd<decltype(t), decltype(dd)::value>(p, d.B, stream); });
  return {dq, dk, dv, dmask, dsinks};
}

}  // namespace
}  // namespace attn
}  // namespace fastlm

STABLE_TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("attention_bwd_cuda", TORCH_BOX(&fastlm::attn::attention_bwd_cuda));
}
