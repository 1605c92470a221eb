// fastlm._C: the one registration file of the fastlm op schemas (namespace "fastlm"), plus a minimal
// Python-limited-API module so that `import fastlm._C` loads the library and runs the static initialisers
// that register the ops with the dispatcher (torch must be imported first).
//
// The schemas are defined here whatever the build: without CUDA sources (FASTLM_BUILD_CUDA=0) the ops exist
// but have no CUDA kernel, so the Python side can say "built without CUDA kernels" instead of "no such op".
// Kernels register themselves for their dispatch key in their own files (csrc/cuda/*.cu).
//
// Python.h must come first (it may set feature macros that affect the standard headers).
#include <Python.h>

#include <torch/csrc/stable/library.h>

#include <string>

#ifdef FASTLM_WITH_CUDA
#define FASTLM_WITH_CUDA_FLAG 1
#else
#define FASTLM_WITH_CUDA_FLAG 0
#endif
#ifndef FASTLM_CUDA_VERSION
#define FASTLM_CUDA_VERSION ""
#endif
#ifndef FASTLM_CUDA_ARCHS
#define FASTLM_CUDA_ARCHS ""
#endif
#ifndef FASTLM_TORCH_BUILD_VERSION
#define FASTLM_TORCH_BUILD_VERSION ""
#endif

// The schemas of the C++ backends: each op exists as <name>_cuda (csrc/cuda/, CUDA tensors) and <name>_cpu
// (csrc/cpu/, CPU tensors) with the same contract, so that the Python side wires both alike. Where a backend
// narrows the contract (the CUDA attention: fp16/bf16, D 64/128; the CPU attention: no varlen) the Python side
// raises UnsupportedCaseError before calling the op.
namespace {

// Defines "<name><suffix><rest>" (string literal pieces; the library copies the schema).
void def(torch::stable::detail::StableLibrary& m, const char* name, const char* suffix, const char* rest) {
  const std::string schema = std::string(name) + suffix + rest;
  m.def(schema.c_str());
}

void define_native_schemas(torch::stable::detail::StableLibrary& m, const char* B) {
  // LayerNorm (rms=false) / RMSNorm (rms=true) over the last dim of a 2-D x, with an optional fused residual
  // add. Returns y, h = x + residual (empty (0,) without residual), mean (float32 (M,), (0,) for RMS), rstd
  // (float32 (M,)).
  def(m,
      "norm_fwd_", B, "(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms) -> "
      "(Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  // Gradients of norm_fwd; x is the normalised input (h when there was a residual). dx includes dh when
  // given. dw/db (weight's dtype; db is float32 when weight is None) are empty (0,) when not wanted; they are
  // reduced without atomics, so they are bitwise reproducible.
  def(m,
      "norm_bwd_", B, "(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, Tensor? dh, bool rms, "
      "bool has_bias) -> (Tensor dx, Tensor dw, Tensor db)");
  // Softmax (log=false) / log-softmax (log=true) along dim. x is 2-D with unit last stride (any row stride) and
  // dim == 1, or contiguous of any rank with any dim (a strided launch, no transpose copy). Returns y: contiguous,
  // x's shape and dtype. A row of all -inf gives NaN (torch semantics).
  def(m, "softmax_fwd_", B, "(Tensor x, int dim, bool log) -> Tensor");
  // softmax(x * scale + mask) over the last dim of (B, H, Sq, Sk) scores with unit last stride. mask: None or an
  // expanded (B, H, Sq, Sk) view, bool (True = keep) or an additive float; causal: key > query is masked (top-left).
  // Returns y: contiguous (B, H, Sq, Sk), x's dtype; fully masked rows give zeros.
  def(m, "masked_softmax_fwd_", B, "(Tensor x, Tensor? mask, float scale, bool causal) -> Tensor");
  // Gradient of (log-)softmax from the saved output y (contiguous; or 2-D with unit last stride for dim == 1):
  // softmax: dx = scale * y * (dy - sum(y * dy)); log: dx = scale * (dy - exp(y) * sum(dy)). dx: contiguous, y's dtype.
  def(m, "softmax_bwd_", B, "(Tensor dy, Tensor y, int dim, bool log, float scale) -> Tensor");
  // Cross-entropy over class-index targets: input (N, C) with unit class stride or contiguous (N, C, D); target
  // (N*D,) int64; weight (C,) float32. reduction 0 none / 1 mean / 2 sum. Returns loss (float32: (N*D,) or 0-dim)
  // and grad = d loss / d input for an incoming gradient of 1 (input's shape and dtype, contiguous; (0,) when
  // compute_grad is false), both from one pass over the logits; deterministic reductions, no host sync.
  def(m,
      "cross_entropy_fwd_", B, "(Tensor input, Tensor target, Tensor? weight, int ignore_index, float label_smoothing, "
      "int reduction, bool compute_grad) -> (Tensor loss, Tensor grad)");
  // Flash-attention forward (csrc/cuda/attention_fwd.cu, csrc/cpu/attention.cpp), the op contract of
  // attention_fwd_triton: q (B, H, Sq, D), k/v (B, Hkv, Sk, D) with H % Hkv == 0, unit last stride; causal is
  // top-left (query i sees keys j <= i). Score modifiers, in this order, with off = Sk - Sq: softcap > 0 gives
  // s = softcap * tanh(s / softcap) (0 = none); alibi (B, H) float32 slopes add -slope * |i + off - j|; mask
  // adds; causal; window_left / window_right >= 0 hide keys j < i + off - left / j > i + off + right (bottom-right
  // aligned; -1 = unbounded); sinks (H,) float32 join each row's softmax denominator as exp(sink) (unscaled, no
  // value). Returns o (B, H, Sq, D) contiguous in q's dtype and lse (B, H, Sq) float32 (natural log of the scores'
  // sum-exp, sink included; -inf for a row with no visible key and no sink). The CUDA kernels take dense fp16/bf16
  // with D in {64, 128} only (mask, cu_q/cu_k, dropout_p > 0 and every modifier raise "unsupported case"; rng is
  // ignored); the CPU kernel takes everything but varlen, with dropout's seed read from the CPU int64 rng tensor
  // (the keep mask a function of (seed, b, h, i, j): its backward regenerates it).
  def(m,
      "attention_fwd_", B, "(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? cu_q, Tensor? cu_k, int max_q, "
      "int max_k, float scale, bool causal, float dropout_p, Tensor rng, int window_left, int window_right, "
      "float softcap, Tensor? sinks, Tensor? alibi) -> (Tensor o, Tensor lse)");
  // Gradients of attention_fwd (csrc/cuda/attention_bwd.cu, csrc/cpu/attention_bwd.cpp), without atomics
  // (deterministic): dq, dk, dv contiguous in q's, k's and v's shapes and dtype. Same scope as the forward.
  // mask_grad (an additive float mask only): dmask float32 of shape [1 if mask.stride(d) == 0 else mask.size(d)],
  // dL/dmask summed over the mask's stride-0 dims; else empty (0,). dsinks: (H,) float32 with sinks, else (0,).
  def(m,
      "attention_bwd_", B, "(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor? mask, "
      "Tensor? cu_q, Tensor? cu_k, int max_q, int max_k, float scale, bool causal, float dropout_p, Tensor rng, "
      "int window_left, int window_right, float softcap, Tensor? sinks, Tensor? alibi, bool mask_grad) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask, Tensor dsinks)");
}

// Op families with Triton and CPU kernels only (the CUDA C++ backend raises UnsupportedCaseError for them, in
// fastlm.dispatch): each family's schemas in its own function, defined with the "_cpu" suffix.
void define_rope_schemas(torch::stable::detail::StableLibrary& m) {
  // rotary position embedding (csrc/cpu/rope.cpp; fastlm/ops/rope.py has the contract). q (B, Hq, S, D) (head_axis
  // 1) or (B, S, Hq, D) (head_axis 2), k likewise with Hk heads, unit last strides; cos / sin (Bc, Sc, rot), Bc in
  // {1, B}, Sc in {1, S}, q's dtype or float32. backward: the transposed rotation. Outputs: dtype
  // promote(q, cos), q's / k's layout. The in-place op writes into q and k (their dtype).
  m.def(
      "rope_fwd_cpu(Tensor q, Tensor k, Tensor cos, Tensor sin, int head_axis, bool interleaved, bool backward) -> "
      "(Tensor q_out, Tensor k_out)");
  m.def("rope_inplace_cpu(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, int head_axis, bool interleaved) -> ()");
}

void define_gated_mlp_schemas(torch::stable::detail::StableLibrary& m) {
  // swiglu / geglu (csrc/cpu/gated_mlp.cpp; fastlm/ops/gated_mlp.py has the contract): y = act(gate) * up with act
  // 0 silu, 1 gelu tanh, 2 gelu erf. gate and up (M, I), unit column stride, any row stride; up None: gate is the
  // merged (M, 2I) gate_up tensor (first half gate). y (M, I) contiguous in gate's dtype.
  m.def("gated_mlp_fwd_cpu(Tensor gate, Tensor? up, int act) -> Tensor");
  // dgate = dy * up * act'(gate), dup = dy * act(gate) in one pass (act recomputed). dy (M, I), unit column stride.
  // Both (M, I) contiguous; with up None, dgate is the (M, 2I) gradient of gate_up and dup is empty (0,).
  m.def("gated_mlp_bwd_cpu(Tensor dy, Tensor gate, Tensor? up, int act) -> (Tensor dgate, Tensor dup)");
}

void define_linear_rows_schemas(torch::stable::detail::StableLibrary& m) {
  // decode-sized linear layer, inference only (csrc/cpu/linear_rows.cpp; fastlm/ops/linear_rows.py has the contract):
  // y = x W^T (+ bias), x (M, K) and weight (N, K) with unit last strides, bias (N,) contiguous, one dtype (float32,
  // float16, bfloat16; fp32 accumulation). y (M, N) contiguous in x's dtype. CPU only: on a GPU F.linear's cuBLAS
  // GEMMs already run skinny products at bandwidth.
  m.def("linear_rows_cpu(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

void define_vocab_parallel_schemas(torch::stable::detail::StableLibrary& m) {
  // vocab-parallel cross-entropy, one rank's shard (csrc/cpu/vocab_parallel.cpp has the contract; the collectives
  // are in fastlm/ops/vocab_parallel.py). input (N, Cl), unit class stride; target (N,) int64 local ids (outside
  // [0, Cl): not owned); weight (Cl,) float32. stats: (3, N) float32 (local lse, owned target logit or 0,
  // sum w x or 0). grad: from row_stats (3, N) = (global lse, a, b) and the global weight sum, into grad (may be input).
  m.def("vocab_parallel_ce_stats_cpu(Tensor input, Tensor target, Tensor? weight, bool smooth) -> Tensor");
  m.def(
      "vocab_parallel_ce_grad_cpu(Tensor input, Tensor target, Tensor row_stats, Tensor? weight, float w_sum, "
      "bool smooth, Tensor(a!) grad) -> ()");
}

void define_distillation_schemas(torch::stable::detail::StableLibrary& m) {
  // soft-target cross-entropy, kl_div, distillation losses (csrc/cpu/distillation.cpp; fastlm/ops/distillation.py)
  // soft-target cross-entropy (csrc/cpu/cross_entropy.cpp; fastlm/ops/cross_entropy.py): cross_entropy_fwd's contract
  // with a class-probability target of input's shape and dtype, no ignore_index; the mean divides by the number of
  // rows. target_grad = d loss / d target for an incoming gradient of 1 ((0,) unless compute_target_grad).
  m.def(
      "soft_cross_entropy_fwd_cpu(Tensor input, Tensor target, Tensor? weight, float label_smoothing, int reduction, "
      "bool compute_grad, bool compute_target_grad) -> (Tensor loss, Tensor grad, Tensor target_grad)");
  // kl_div (csrc/cpu/kl_div.cpp; fastlm/ops/kl_div.py): input and target contiguous, same shape and dtype.
  // reduction 0: loss elementwise (input's shape and dtype); 1: the float32 sum over divisor (0: NaN). grad / target_grad:
  // d loss / d input and d target for an incoming gradient of 1, over divisor ((0,) when not asked for).
  m.def(
      "kl_div_fwd_cpu(Tensor input, Tensor target, bool log_target, int reduction, SymInt divisor, bool compute_grad, "
      "bool compute_target_grad) -> (Tensor loss, Tensor grad, Tensor target_grad)");
  // distillation
  // Distillation loss between student and teacher logits (csrc/cpu/distillation.cpp; contract in
  // fastlm/ops/distillation.py): student / teacher (N, V) of one dtype, unit class stride, any row strides; target
  // (N,) int64 or None; kind 0 KL(p_t || p_s), 1 KL(p_s || p_t), 2 generalised JSD (0 < beta < 1); reduction 0 none /
  // 1 batchmean / 2 sum. Returns loss (float32: (N,) or 0-dim, times T^2) and grad = d loss / d student for an
  // incoming gradient of 1 (student's shape and dtype, contiguous; (0,) when compute_grad is false).
  m.def(
      "distillation_fwd_cpu(Tensor student, Tensor teacher, Tensor? target, int kind, float beta, float temperature, "
      "int ignore_index, int reduction, bool compute_grad) -> (Tensor loss, Tensor grad)");
}

void define_linear_loss_schemas(torch::stable::detail::StableLibrary& m) {
  // The chunk kernels of the linear losses on the cpu backend (fastlm/ops/linear_cross_entropy.py,
  // linear_distillation.py; the Triton launchers kernels/cross_entropy.cross_entropy_rows and
  // kernels/distillation.distillation_rows have the same contract). Rows only: no reduction, so the caller passes
  // the whole batch's 1 / denominator (or per-row incoming gradients) as grad_scale, None (1), (1,) or (N,) float32.
  // Returns the per-row float32 losses; with grad ((N, V), the logits' dtype, unit class stride), writes the
  // gradient times grad_scale into it. grad may be the logits themselves (input / student): each row is read before
  // it is overwritten, so a chunk's logits buffer becomes its gradient.
  m.def(
      "cross_entropy_rows_cpu(Tensor input, Tensor target, Tensor? weight, Tensor? grad_scale, int ignore_index, "
      "float label_smoothing, Tensor(a!)? grad) -> Tensor");
  // distillation_fwd_cpu's per-row losses (times T^2; 0 for ignored rows) and d loss / d student times grad_scale.
  m.def(
      "distillation_rows_cpu(Tensor student, Tensor teacher, Tensor? target, int kind, float beta, float temperature, "
      "int ignore_index, Tensor? grad_scale, Tensor(a!)? grad) -> Tensor");
  // linear_logprobs(..., return_entropy=True)'s row kernel (csrc/cpu/linear_logprobs.cpp; the Triton twin is
  // kernels/linear_logprobs.logprob_entropy_rows): per row (float32) the target's log-probability and the entropy
  // (0 for ignored rows); with grad (and grad_lp, grad_ent: (N,) float32), the gradient of sum(grad_lp * lp +
  // grad_ent * entropy) written into grad (the logits themselves allowed).
  m.def(
      "logprob_entropy_rows_cpu(Tensor input, Tensor target, int ignore_index, Tensor? grad_lp, Tensor? grad_ent, "
      "Tensor(a!)? grad) -> (Tensor, Tensor)");
}

}  // namespace

// A FRAGMENT, not a DEF: the Python side adds ops to the same namespace (torch.library.custom_op
// "fastlm::..."), and a fragment never competes with another library claiming to own "fastlm".
STABLE_TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  define_native_schemas(m, "cuda");
  // The CPU backend (csrc/cpu/).
  define_native_schemas(m, "cpu");
  define_rope_schemas(m);
  define_gated_mlp_schemas(m);
  define_distillation_schemas(m);
  define_vocab_parallel_schemas(m);
  define_linear_rows_schemas(m);
  define_linear_loss_schemas(m);
}

namespace {

PyModuleDef fastlm_module = {
    PyModuleDef_HEAD_INIT,
    "fastlm._C",
    "fastlm compiled ops (registered with the torch dispatcher as torch.ops.fastlm.*) and build information.",
    -1,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&fastlm_module);
  if (m == nullptr) return nullptr;
  PyObject* with_cuda = PyBool_FromLong(FASTLM_WITH_CUDA_FLAG);
  const bool ok = with_cuda != nullptr && PyModule_AddObjectRef(m, "with_cuda", with_cuda) == 0 &&
                  PyModule_AddStringConstant(m, "cuda_version", FASTLM_CUDA_VERSION) == 0 &&
                  PyModule_AddStringConstant(m, "cuda_archs", FASTLM_CUDA_ARCHS) == 0 &&
                  PyModule_AddStringConstant(m, "torch_build_version", FASTLM_TORCH_BUILD_VERSION) == 0;
  Py_XDECREF(with_cuda);
  if (!ok) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
