"""Decode-sized linear layers on the CPU: ``y = x W^T + b`` for the few rows one decoding step feeds a layer.

    linear(x, weight, bias=None) -> y
        x (*, K), weight (N, K), bias (N,) or None  ->  y (*, N), x's dtype (as ``torch.nn.functional.linear``)

With a few rows a linear layer is one pass over its weight, and its speed is the bandwidth that pass reaches.
torch's ``F.linear`` hands ``x @ W^T`` to MKL's sgemm, which on the 2-core EPYC dev machine ran 2-16 rows at 6-20
GB/s (a (4, 512) x 32000-row LM head: 11.4 ms, 46 % of a greedy decode) and ``torch.mv`` (1 row) at 11-40 GB/s.
``fastlm::linear_rows_cpu`` (csrc/cpu/linear_rows.cpp) streams the weight once, 4 rows at a time, fp32 accumulation.
Measured kernel against kernel (``scripts/cpu_kernels_vs_aten.py --only linear_rows``, fp32, 2 threads, median of
interleaved calls): the LM head above 4.1 ms (2.8x); 1-8 rows of 512- to 4096-wide layers and of a 151936 x 1024 head
1.4-3.8x ``aten::linear``; 16 rows 1.02-2.3x (the small layers level: MKL's blocked GEMM catches up), hence
``MAX_ROWS``.

The kernel runs when every condition holds: x on the CPU with at most ``MAX_ROWS`` rows (``x.numel() / K``), a
weight of at least ``MIN_WEIGHT_BYTES`` with unit last stride (an ``nn.Linear``'s), no gradient to record
(inference mode, ``torch.no_grad()``, or no input requiring grad), x, weight and bias float32 (bf16 / fp16 layers
stay ``F.linear``: oneDNN's 16-bit GEMM measured level with or faster than the kernel from 2 rows on; the op itself
takes all three dtypes) and bias None or (N,), plain tensors (no DTensor or other subclass), no autocast, not under
torch.compile, forward-mode AD, a ``torch.func`` transform or ``torch.jit.trace``, and fastlm._C loaded. Every
other call is ``F.linear`` itself, by design, not as a fallback: a training or a many-row call is a GEMM, which MKL
/ cuBLAS / inductor do best, and on a GPU cuBLAS already runs skinny products at bandwidth (no Triton kernel for
this family: it would add nothing there). ``fastlm.patch`` routes HF causal LMs' heads and every ``torch.nn.Linear``
of a patched model through :func:`linear` (``linear=False`` turns that off). Quantize (``quantize_dynamic``) before
patching: it matches ``nn.Linear`` by exact class.
"""

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastlm.dispatch import tracing
from fastlm.ops.registry import register

MAX_ROWS = 16  # rows per call up to which the kernel measured >= aten::linear on every layer shape
# smallest weight (bytes) given to the kernel: below ~1 MiB F.linear's call is a few us and the routing's own
# Python (~5 us) would eat the kernel's gain (measured: a 256 x 256 fp32 layer at 1 row, 6.6 us F.linear vs 14.6 us)
MIN_WEIGHT_BYTES = 1 << 20


def _fake(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    torch._check(weight.device == x.device, lambda: "linear_rows: weight must be on x's device")
    torch._check(bias is None or bias.device == x.device, lambda: "linear_rows: bias must be on x's device")
    return x.new_empty((x.shape[0], weight.shape[0]))


LINEAR_ROWS = register("linear_rows", _fake, backends=("cpu",))
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _transformed() -> bool:
    """Forward-mode AD (dual tensors) or torch.func transforms (jvp, vmap, grad) in progress: their rules are
    F.linear's (the kernel has none, and a dual tensor's tangent would be dropped)."""
    return torch.autograd.forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None


def uses_kernel(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """True when :func:`linear` runs fastlm's kernel for these inputs (see the module docstring): plain float32 CPU
    tensors, x (..., K) with at most MAX_ROWS rows, weight (N, K) with unit last stride and at least
    MIN_WEIGHT_BYTES, bias None or (N,), no gradient to record, no autocast, no transform or tracing."""
    if type(x) not in _PLAIN or type(weight) not in _PLAIN or (bias is not None and type(bias) not in _PLAIN):
        return False  # DTensor, FX proxies, other subclasses: F.linear's dispatch
    if torch.jit.is_tracing():
        return False  # the trace records F.linear (its shapes are traced values here)
    if x.device.type != "cpu" or weight.device.type != "cpu" or (bias is not None and bias.device.type != "cpu"):
        return False
    if "cpu" not in LINEAR_ROWS or x.dim() == 0 or weight.dim() != 2:
        return False
    N, K = weight.shape
    if K == 0 or x.shape[-1] != K or x.numel() > MAX_ROWS * K or x.dtype != torch.float32:
        return False  # a wrong width gets F.linear's own error
    if weight.dtype != x.dtype or (K > 1 and weight.stride(1) != 1) or N * K * x.element_size() < MIN_WEIGHT_BYTES:
        return False  # a transposed weight: MKL reads it in place (the kernel would need a copy)
    if bias is not None and (bias.dtype != x.dtype or bias.shape != (N,)):
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return False
    return not (torch.is_autocast_enabled("cpu") or tracing() or _transformed())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, on fastlm's decode kernel where :func:`uses_kernel` says so (same shapes and
    dtype; the values differ from MKL's only by the order of the fp32 sums)."""
    if not uses_kernel(x, weight, bias):
        return TF.linear(x, weight, bias)
    K = weight.shape[1]
    x2 = x.reshape(-1, K)
    if K > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    b = bias if bias is None or bias.is_contiguous() else bias.contiguous()
    with torch._C._AutoDispatchBelowAutograd():  # nothing to record (checked above): the kernel directly
        y = LINEAR_ROWS["cpu"](x2, weight, b)
    return y.view(*x.shape[:-1], weight.shape[0])


__all__ = ["LINEAR_ROWS", "MAX_ROWS", "MIN_WEIGHT_BYTES", "linear", "uses_kernel"]
