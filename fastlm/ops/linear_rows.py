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

The kernel runs when every condition holds: x on the CPU with at most ``MAX_ROWS`` rows (``x.numel() / K``), no
gradient to record (inference mode, ``torch.no_grad()``, or no input requiring grad), x, weight and bias of one
float dtype (float32 / float16 / bfloat16), plain tensors (no DTensor or other subclass), not under torch.compile,
and fastlm._C loaded. Every other call is ``F.linear`` itself, by design, not as a fallback: a training or a
many-row call is a GEMM, which MKL / cuBLAS / inductor do best, and on a GPU cuBLAS already runs skinny products at
bandwidth (no Triton kernel for this family: it would add nothing there). ``fastlm.patch`` routes HF causal LMs'
heads and every ``torch.nn.Linear`` of a patched model through :func:`linear`.
"""

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastlm.dispatch import FUSED_DTYPES, tracing
from fastlm.ops.registry import call, plain, register

MAX_ROWS = 16  # rows per call up to which the kernel measured >= aten::linear on every layer shape


def _fake(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


LINEAR_ROWS = register("linear_rows", _fake, backends=("cpu",))


def uses_kernel(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """True when :func:`linear` runs fastlm's kernel for these inputs (see the module docstring)."""
    if x.device.type != "cpu" or "cpu" not in LINEAR_ROWS or x.dim() == 0 or tracing():
        return False
    K = x.shape[-1]
    rows = x.numel() // K if K else x.numel()
    if rows > MAX_ROWS or x.dtype not in FUSED_DTYPES or weight.dtype != x.dtype:
        return False
    if bias is not None and (bias.dtype != x.dtype or bias.dim() != 1):
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return False
    return weight.dim() == 2 and weight.device.type == "cpu" and plain((x, weight, bias))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, on fastlm's decode kernel where :func:`uses_kernel` says so (same shapes and
    dtype; the values differ from MKL's only by the order of the fp32 sums)."""
    if not uses_kernel(x, weight, bias):
        return TF.linear(x, weight, bias)
    K = weight.shape[1]
    if x.shape[-1] != K:
        raise ValueError(f"linear: x's last dim must be weight.shape[1] = {K}, got x of shape {tuple(x.shape)}")
    x2 = x.reshape(-1, K)
    if K > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    w = weight if K <= 1 or weight.stride(1) == 1 else weight.contiguous()
    b = bias if bias is None or bias.is_contiguous() else bias.contiguous()
    y = call(LINEAR_ROWS["cpu"], x2, w, b)
    return y.view(*x.shape[:-1], weight.shape[0])


__all__ = ["MAX_ROWS", "LINEAR_ROWS", "linear", "uses_kernel"]
