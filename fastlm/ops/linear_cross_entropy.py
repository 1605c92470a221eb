"""Linear cross-entropy for LM heads: ``cross_entropy(input @ linear_weight.T + linear_bias, target)`` without ever
materialising the (tokens, vocab) logits.

    fastlm::linear_cross_entropy_fwd(input, linear_weight, target, linear_bias?, weight?, ignore_index,
                                     label_smoothing, reduction, compute_grad, chunk_size, backend)
        -> (loss, grad_input, grad_linear_weight, grad_linear_bias)

Tokens are processed in chunks: the chunk's logits (one matmul, cuBLAS) -> the fused cross-entropy Triton kernel
(or, on the cpu backend, the CPU C++ one, which returns the gradient beside the logits) writes the chunk's losses
and overwrites the logits with their gradient -> grad_input of the chunk and the running
grad_linear_weight / grad_linear_bias (two more matmuls). The forward thus does all three matmuls of forward +
backward and the backward only scales the three gradients by the incoming scalar; peak extra memory is one
(chunk, vocab) logits buffer instead of the full logits and their gradient.

With reduction "none" the per-token incoming gradients are needed before grad_linear_weight can be formed, so the
forward computes only the losses and the backward recomputes the chunks' logits (four matmuls in all instead of
three). Gradients are accumulated in the dtype of linear_weight (as Liger-Kernel does); with few chunks the
rounding is that of one bf16 matmul per chunk.
"""

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastlm.dispatch import resolve
from fastlm.ops import vocab_parallel
from fastlm.ops.cross_entropy import (
    REDUCTIONS,
    check_inputs,
    check_target_range,
    loss_dtype,
    mean_denominator,
    reduce_losses,
    scale_grad,
)
from fastlm.ops.registry import autocast_dtype


def chunk_size_for(tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk: about as many logits per chunk as the input has elements (Liger's rule), a power of two,
    at least 64 so the matmuls stay efficient."""
    ratio = max(1, -(-vocab // max(hidden, 1)))
    size = max(1, -(-tokens // ratio))
    return max(64, 1 << (size - 1).bit_length())


def ce_rows(logits, t, weight, denom, ignore_index, smoothing, write_grad, backend):
    """Per-row losses (fp32) and, if ``write_grad``, the gradient of the chunk's logits: the Triton kernel writes it
    over the logits in place (backend "triton"); the CPU C++ kernel (backend "cpu") returns it (then scaled by 1 /
    denom for the mean)."""
    if backend not in ("triton", "cpu"):
        raise ValueError(
            f"backend must be 'triton' or 'cpu' (the backends with a linear cross-entropy), got {backend!r}"
        )
    if backend == "triton":
        from fastlm.kernels import cross_entropy as k

        return k.cross_entropy_rows(logits, t, weight, denom, ignore_index, smoothing, write_grad, grad=logits)
    losses, g = torch.ops.fastlm.cross_entropy_fwd_cpu(logits, t, weight, ignore_index, smoothing, 0, write_grad)
    if write_grad and denom is not None:
        g.div_(denom)  # fp32 denominator: in fp16 a mean over more than 65504 tokens would be inf
    return losses, g


def _chunk_grads(x, w, b, t, weight, denom, ignore_index, smoothing, s, e, backend, row_scale=None):
    """Logits of tokens [s, e) and their gradient; returns (losses, grad_logits)."""
    logits = x[s:e] @ w.T
    if b is not None:
        logits += b
    losses, g = ce_rows(logits, t[s:e], weight, denom, ignore_index, smoothing, True, backend)
    if row_scale is not None:
        g = scale_grad(g, row_scale[s:e, None])
    return losses, g


@torch.library.custom_op("fastlm::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    compute_grad: bool,
    chunk_size: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    T = input.shape[0]
    V = linear_weight.shape[0]
    denom = mean_denominator(target, weight, ignore_index, V) if reduction == 1 else None
    losses = torch.empty(T, dtype=torch.float32, device=input.device)
    grads_now = compute_grad and reduction != 0
    gx = torch.empty_like(input) if grads_now else input.new_empty((0,))
    gw = torch.zeros_like(linear_weight) if grads_now else input.new_empty((0,))
    gb = torch.zeros(V, dtype=torch.float32, device=input.device) if grads_now and linear_bias is not None else None
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        if grads_now:
            losses[s:e], g = _chunk_grads(
                input, linear_weight, linear_bias, target, weight, denom, ignore_index, label_smoothing, s, e, backend
            )
            torch.mm(g, linear_weight, out=gx[s:e])
            gw.addmm_(g.T, input[s:e])
            if gb is not None:
                gb += g.sum(0, dtype=torch.float32)
        else:
            logits = input[s:e] @ linear_weight.T
            if linear_bias is not None:
                logits += linear_bias
            losses[s:e], _ = ce_rows(logits, target[s:e], weight, None, ignore_index, label_smoothing, False, backend)
    gb_out = gb.to(linear_bias.dtype) if gb is not None else input.new_empty((0,))
    return reduce_losses(losses, reduction, denom), gx, gw, gb_out


@linear_cross_entropy_fwd.register_fake
def _fake(
    input,
    linear_weight,
    target,
    linear_bias,
    weight,
    ignore_index,
    label_smoothing,
    reduction,
    compute_grad,
    chunk_size,
    backend,
):
    loss = input.new_empty((input.shape[0],) if reduction == 0 else (), dtype=torch.float32)
    now = compute_grad and reduction != 0
    return (
        loss,
        input.new_empty(input.shape if now else (0,)),
        linear_weight.new_empty(linear_weight.shape if now else (0,)),
        input.new_empty(
            linear_bias.shape if now and linear_bias is not None else (0,),
            dtype=linear_bias.dtype if linear_bias is not None else input.dtype,
        ),
    )


def _setup(ctx, inputs, output):
    x, w, t, b, weight, ignore_index, smoothing, reduction, compute_grad, chunk, backend = inputs
    ctx.reduction, ctx.has_bias = reduction, b is not None
    ctx.args = (ignore_index, smoothing, chunk, backend)
    if reduction == 0:  # gradients recomputed in the backward
        ctx.save_for_backward(x, w, t, b, weight)
    else:
        ctx.save_for_backward(output[1], output[2], output[3])


def _backward(ctx, dloss, *_):
    if ctx.reduction != 0:
        gx, gw, gb = ctx.saved_tensors
        gb = scale_grad(gb, dloss) if ctx.has_bias else None
        return scale_grad(gx, dloss), scale_grad(gw, dloss), None, gb, None, None, None, None, None, None, None
    x, w, t, b, weight = ctx.saved_tensors
    ignore_index, smoothing, chunk, backend = ctx.args
    gx, gw = torch.empty_like(x), torch.zeros_like(w)
    gb = torch.zeros(w.shape[0], dtype=torch.float32, device=x.device) if b is not None else None
    for s in range(0, x.shape[0], chunk):
        e = min(s + chunk, x.shape[0])
        _, g = _chunk_grads(x, w, b, t, weight, None, ignore_index, smoothing, s, e, backend, row_scale=dloss)
        torch.mm(g, w, out=gx[s:e])
        gw.addmm_(g.T, x[s:e])
        if gb is not None:
            gb += g.sum(0, dtype=torch.float32)
    return gx, gw, None, (gb.to(b.dtype) if gb is not None else None), None, None, None, None, None, None, None


torch.library.register_autograd("fastlm::linear_cross_entropy_fwd", _backward, setup_context=_setup)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> Tensor:
    """``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` without materialising the logits;
    the signature of ``torch.nn.functional.linear_cross_entropy`` (class-index targets; ``chunk_size`` is
    fastlm's own knob, default from :func:`chunk_size_for`).

    Args:
        input: ``(*, H)`` hidden states (e.g. ``(B, S, H)``).
        linear_weight: ``(V, H)`` LM-head weight (e.g. tied embeddings); linear_bias: ``(V,)``.
        target: ``(*)`` class indices, the leading shape of ``input``.
        weight: ``(V,)`` class weights; ``ignore_index`` None means -100, as torch.

    Returns:
        The loss in input's dtype: a scalar, or ``target``'s shape for ``reduction="none"``.

    Vocab-parallel: ``linear_weight`` a DTensor sharded on the vocabulary (``Shard(0)``) on a 1-D mesh: chunked
    the same way, never gathering the vocabulary; the loss a replicated DTensor (fastlm/ops/vocab_parallel.py).
    """
    if vocab_parallel.is_dtensor(linear_weight) or vocab_parallel.is_dtensor(input):
        return vocab_parallel.linear_cross_entropy(
            input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, chunk_size
        )
    ignore_index = -100 if ignore_index is None else ignore_index
    backend = resolve("linear_cross_entropy", input)
    if backend == "torch":
        logits = TF.linear(input, linear_weight, linear_bias)
        return TF.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        ).reshape(target.shape if reduction == "none" else ())
    amp = autocast_dtype(input)
    if amp is not None:  # as F.linear under autocast: the matmuls in the autocast dtype (autograd casts grads back)
        input, linear_weight = input.to(amp), linear_weight.to(amp)
        linear_bias = linear_bias.to(amp) if linear_bias is not None else None
    if input.dim() < 1 or linear_weight.dim() != 2 or input.shape[-1] != linear_weight.shape[1]:
        raise ValueError(
            f"input (*, H) and linear_weight (V, H) must share H: got {list(input.shape)} and "
            f"{list(linear_weight.shape)}"
        )
    if linear_weight.dtype != input.dtype or linear_weight.device != input.device:
        raise TypeError(
            f"linear_weight must match input's dtype and device ({input.dtype}, {input.device}), got "
            f"{linear_weight.dtype} on {linear_weight.device}"
        )
    V = linear_weight.shape[0]
    if linear_bias is not None and (linear_bias.shape != (V,) or linear_bias.dtype != input.dtype):
        raise ValueError(
            f"linear_bias must be a ({V},) tensor of {input.dtype}, got {list(linear_bias.shape)} {linear_bias.dtype}"
        )
    if target.shape != input.shape[:-1]:
        raise ValueError(f"target must have shape {list(input.shape[:-1])}, got {list(target.shape)}")
    x = input.reshape(-1, input.shape[-1])
    check_inputs(x.new_empty((0, V)), target, weight, reduction, label_smoothing, backend)
    check_target_range(target, V, ignore_index)
    t = target.reshape(-1).to(torch.int64)
    chunk = chunk_size or chunk_size_for(x.shape[0], V, x.shape[1])
    needs_grad = torch.is_grad_enabled() and (
        input.requires_grad or linear_weight.requires_grad or (linear_bias is not None and linear_bias.requires_grad)
    )
    with torch.autocast(input.device.type, enabled=False):  # the op's matmuls and gradients in the input's dtype
        loss, *_ = linear_cross_entropy_fwd(
            x.contiguous(),
            linear_weight.contiguous(),
            t,
            linear_bias,
            weight.float().contiguous() if weight is not None else None,
            int(ignore_index),
            float(label_smoothing),
            REDUCTIONS[reduction],
            needs_grad,
            int(chunk),
            backend,
        )
    return (loss.view(target.shape) if reduction == "none" else loss).to(loss_dtype(input))
