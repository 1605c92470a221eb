"""Linear cross-entropy for LM heads: ``cross_entropy(input @ linear_weight.T + linear_bias, target)`` without ever
materialising the (tokens, vocab) logits.

    fastlm::linear_cross_entropy_fwd(input, linear_weight, target, linear_bias?, weight?, ignore_index,
                                     label_smoothing, reduction, compute_grad, chunk_size, backend)
        -> (loss, grad_input, grad_linear_weight, grad_linear_bias)

Tokens are processed in chunks (:func:`lm_head_grads`): the chunk's logits (one matmul into one (chunk, vocab)
buffer that every chunk reuses) -> the fused row kernel (the Triton cross-entropy kernel, or on the cpu backend
csrc/cpu/cross_entropy.cpp's cross_entropy_rows_cpu) writes the chunk's losses and overwrites the logits with their
gradient, already scaled by 1 / (the batch's mean denominator) -> grad_input of the chunk (a matmul into its rows)
and grad_linear_weight (the first chunk's matmul writes it, the others accumulate with addmm_) and the bias
gradient (the column sums). The forward thus does all three matmuls of forward + backward; for loss.backward() the
backward hands the saved gradients on without a copy (any other incoming scalar scales them). Peak extra memory:
the (chunk, vocab) buffer, beside the gradients themselves.

With reduction "none" the per-token incoming gradients are needed before grad_linear_weight can be formed, so the
forward computes only the losses and the backward recomputes the chunks' logits (four matmuls in all instead of
three), the incoming gradients folded into the row kernel's gradient sweep (cpu) or applied in place (Triton). fp16
takes the same deferred path for every reduction (:func:`deferred`): the incoming gradient (a GradScaler's factor
times 1/N) is folded into the row kernel's fp32 gradient sweep, so nothing is rounded to fp16 before it is scaled.
Gradients are accumulated in the dtype of linear_weight (as Liger-Kernel does); with few chunks the rounding is
that of one bf16 matmul per chunk. The chunk size rule (:func:`chunk_size_for`) differs between GPU and CPU.
"""

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastlm.dispatch import resolve
from fastlm.ops import sharded_params, vocab_parallel
from fastlm.ops.cross_entropy import (
    REDUCTIONS,
    check_inputs,
    check_target_range,
    first_backward,
    loss_dtype,
    mean_denominator,
    reduce_losses,
    scale_saved_grad,
)
from fastlm.ops.registry import autocast_dtype, register


def chunk_size_for(tokens: int, vocab: int, hidden: int, device: torch.device | str = "cuda") -> int:
    """Tokens per chunk; the GPU and CPU rules are separate.

    GPU (the original rule, not re-measured: no GPU on the development machine): about as many logits per chunk as
    the input has elements (Liger-Kernel's rule), a power of two, at least 64 so the matmuls stay efficient.

    CPU: equal chunks, at least :data:`CPU_MIN_CHUNKS` of them (so the chunk's logits buffer, which becomes its
    gradient, is at most a third of the full logits; the unfused path holds about three full logits at its peak:
    log-softmax output, NLL gradient, logits gradient), more if a chunk would exceed :data:`CPU_CHUNK_BYTES` of
    fp32 logits, and at least :data:`CPU_MIN_ROWS` rows. Measured on the 2-core development machine (torch 2.14 CPU
    matmul = MKL sgemm, fp32, 2 threads; best of 9 interleaved rounds under load ~7), GFLOP/s of the three matmuls
    of a chunk of M rows at H = K = 512, V = 32000:

        M              64    128   256   512   1024  2048
        logits         36    51    71    84    90    91     (M x H) @ (H x V)
        grad_input     51    64    82    89    89    93     (M x V) @ (V x H)
        grad_weight    68    89    98    95    95    98     (V x M) @ (M x H), accumulated with addmm_

    so the matmuls are within a few percent of the unchunked ones from about 1000 rows (the logits matmul repacks
    the whole weight on every call, which small chunks pay for), 128 MiB of fp32 logits at V = 32000. Each chunk
    also costs a few thread-pool synchronisations (four parallel regions), which on a loaded machine cost far more
    than the matmuls' efficiency loss: few, large chunks. The fused row kernel itself is cheap (0.3-0.5 ns per
    logit, against the unfused path's four passes over (T, V) buffers); peak memory is one (chunk, V) buffer plus
    the (V, H) weight gradient and the (T, H) input gradient.
    """
    if torch.device(device).type != "cpu":
        ratio = max(1, -(-vocab // max(hidden, 1)))
        size = max(1, -(-tokens // ratio))
        return max(64, 1 << (size - 1).bit_length())
    chunks = max(CPU_MIN_CHUNKS, -(-tokens * vocab * 4 // CPU_CHUNK_BYTES))
    return max(1, min(tokens, max(CPU_MIN_ROWS, -(-tokens // chunks))))


CPU_CHUNK_BYTES = 128 << 20  # fp32 logits per chunk at most on the cpu backend (see chunk_size_for)
CPU_MIN_CHUNKS = 3
CPU_MIN_ROWS = 32


def chunk_logits(out: Tensor, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """The logits of a chunk of tokens, ``x @ w.T + b``, written into ``out`` ((rows, V), the reused chunk buffer)."""
    if b is None:
        return torch.mm(x, w.T, out=out)
    return torch.addmm(b, x, w.T, out=out)


def _rows_fake(input, target, weight, grad_scale, ignore_index, label_smoothing, grad):
    return input.new_empty((input.shape[0],), dtype=torch.float32)


# fastlm::cross_entropy_rows_cpu (schema and contract in csrc/ops.cpp): the chunk kernel of the cpu backend
CROSS_ENTROPY_ROWS = register("cross_entropy_rows", _rows_fake, backends=("cpu",))


def ce_rows(logits, t, weight, ignore_index, smoothing, backend, write_grad, grad_scale=None):
    """Per-row losses (fp32) of a chunk of logits and, if ``write_grad``, their gradient written over ``logits`` in
    place, times ``grad_scale`` where given: a (1,) or (rows,) fp32 tensor (1 / the whole batch's mean denominator,
    and / or the incoming gradients). The Triton kernel (backend "triton": a (1,) scale folded into its gradient
    sweep as the reciprocal of its Denom, (rows,) scales as its ROW_SCALE factors) or the CPU C++ kernel (backend
    "cpu": either folded into the kernel's gradient sweep). Folded means computed in fp32 before
    the one rounding to the logits' dtype: in fp16 that keeps a GradScaler's factor ahead of the rounding."""
    per_row = grad_scale is not None and grad_scale.shape[0] > 1
    if backend == "triton":
        from fastlm.kernels import cross_entropy as k

        denom = 1.0 / grad_scale if write_grad and grad_scale is not None and not per_row else None
        rows = grad_scale.float().contiguous() if write_grad and per_row else None  # folded: ROW_SCALE
        losses, _ = k.cross_entropy_rows(
            logits, t, weight, denom, ignore_index, smoothing, write_grad, grad=logits, row_scale=rows
        )
        return losses
    if backend != "cpu":
        raise ValueError(
            f"backend must be 'triton' or 'cpu' (the backends with a linear cross-entropy), got {backend!r}"
        )
    scale = grad_scale.float().contiguous() if write_grad and grad_scale is not None else None
    return CROSS_ENTROPY_ROWS["cpu"](logits, t, weight, scale, ignore_index, smoothing, logits if write_grad else None)


def lm_head_grads(x, w, b, t, weight, ignore_index, smoothing, chunk, backend, losses, grad_scale=None):
    """The chunk loop of forward + backward: for each chunk of tokens, its logits (one matmul into one reused
    (chunk, V) buffer) -> the fused kernel writes ``losses`` of the chunk and overwrites the logits with their
    gradient (times grad_scale) -> grad_input of the chunk (a matmul into its rows of the output) and
    grad_linear_weight (the first chunk's matmul writes it, the others accumulate with addmm_) and the fp32
    grad_linear_bias (the gradient's column sums). Returns (grad_input, grad_linear_weight, grad_linear_bias
    or None); grad_linear_weight in w's dtype, grad_linear_bias in b's.

    x: (T, H) contiguous; w: (V, H) contiguous; b: (V,) or None; t: (T,) int64; weight: (V,) fp32 or None; losses:
    (T,) fp32, written; grad_scale: None, or a (1,) or (T,) fp32 factor of each token's gradient (1 / the mean's
    denominator, the incoming gradients)."""

    def rows(g, s, e):
        gs = grad_scale[s:e] if grad_scale is not None and grad_scale.shape[0] > 1 else grad_scale
        losses[s:e] = ce_rows(g, t[s:e], weight, ignore_index, smoothing, backend, True, gs)

    return chunk_grads(x, w, b, chunk, rows)


def chunk_grads(x, w, b, chunk, write_grad, weight_grad=True):
    """The chunk loop of the LM-head losses' gradients: per chunk of tokens [s, e), its logits into one reused
    (chunk, V) buffer, ``write_grad(logits, s, e)`` (a row kernel) overwrites them with d loss / d logits, then
    grad_input of the chunk (a matmul into its rows), grad_linear_weight (the first chunk's matmul writes it, the
    others accumulate with addmm_; without ``weight_grad``, a frozen head: no matmul, an empty (0,) tensor) and the
    fp32 grad_linear_bias (column sums). Returns (grad_input, grad_linear_weight, grad_linear_bias in b's dtype or
    None)."""
    T, V = x.shape[0], w.shape[0]
    buf = x.new_empty((min(chunk, T), V))
    gx = torch.empty_like(x)
    if not weight_grad:
        gw = w.new_empty((0,))
    else:
        gw = torch.empty_like(w) if T > 0 else torch.zeros_like(w)
    gb = torch.zeros(V, dtype=torch.float32, device=x.device) if b is not None else None
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        g = chunk_logits(buf[: e - s], x[s:e], w, b)
        write_grad(g, s, e)
        torch.mm(g, w, out=gx[s:e])
        if weight_grad and s == 0:
            torch.mm(g.T, x[s:e], out=gw)
        elif weight_grad:
            gw.addmm_(g.T, x[s:e])
        if gb is not None:
            gb += g.sum(0, dtype=torch.float32)
    return gx, gw, (gb.to(b.dtype) if gb is not None else None)


def lm_head_losses(x, w, b, t, weight, ignore_index, smoothing, chunk, backend) -> Tensor:
    """The per-token fp32 losses only (no gradient): the chunks' logits into one reused buffer, the fused kernel."""
    T, V = x.shape[0], w.shape[0]
    losses = torch.empty(T, dtype=torch.float32, device=x.device)
    buf = x.new_empty((min(chunk, T), V))
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        lg = chunk_logits(buf[: e - s], x[s:e], w, b)
        losses[s:e] = ce_rows(lg, t[s:e], weight, ignore_index, smoothing, backend, False)
    return losses


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
    V = linear_weight.shape[0]
    denom = mean_denominator(target, weight, ignore_index, V) if reduction == 1 else None
    args = (input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, chunk_size, backend)
    empty = input.new_empty((0,))
    if not (compute_grad and not deferred(reduction, input)):  # losses only (deferred: the backward recomputes)
        return reduce_losses(lm_head_losses(*args), reduction, denom), empty, empty.clone(), empty.clone()
    losses = torch.empty(input.shape[0], dtype=torch.float32, device=input.device)
    gx, gw, gb = lm_head_grads(*args, losses, grad_scale=1.0 / denom if denom is not None else None)
    return reduce_losses(losses, reduction, denom), gx, gw, (gb if gb is not None else empty.clone())


def deferred(reduction: int, input: Tensor) -> bool:
    """Whether the gradients are formed in the backward (the chunks' logits recomputed: four matmuls instead of
    three) instead of the forward: for reduction "none" (the per-token incoming gradients are needed first), and in
    fp16, where the incoming gradient carries a GradScaler's factor that must multiply the logits' gradient before
    it is rounded to fp16 (it is folded into the row kernel's fp32 gradient sweep, 1 / the mean's denominator with
    it: the same rounding as torch's unfused fp16 path, whose cross-entropy runs in fp32 under autocast). Forming
    them in the forward would round 1/N-scaled values (underflow: p / N < 2^-24) or, unscaled, sum them over every
    token into grad_linear_weight (overflow beyond 65504 for frequent classes, where the GradScaler cannot help
    since the scale would come after)."""
    return reduction == 0 or input.dtype == torch.float16


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
    now = compute_grad and not deferred(reduction, input)
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
    ctx.reduction, ctx.has_bias, ctx.deferred = reduction, b is not None, deferred(reduction, x)
    ctx.args = (ignore_index, smoothing, chunk, backend)
    if ctx.deferred:  # gradients recomputed in the backward
        ctx.save_for_backward(x, w, t, b, weight)
    else:
        ctx.save_for_backward(output[1], output[2], output[3])
    # The gradient outputs are never differentiated: without this, autograd fills zero tensors of their sizes (a
    # whole (V, H) grad_linear_weight among them) as their incoming gradients on every backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, dloss, *_):
    nones = (None,) * 7
    if dloss is None:
        return (None,) * 11
    if not ctx.deferred:
        # a scalar loss: loss.backward() on CPU hands the saved gradients on without a copy (scale_saved_grad)
        first = first_backward(ctx)
        gx, gw, gb = (scale_saved_grad(g, dloss, 1, first) for g in ctx.saved_tensors)
        return gx, gw, None, (gb if ctx.has_bias else None), *nones
    x, w, t, b, weight = ctx.saved_tensors
    ignore_index, smoothing, chunk, backend = ctx.args
    scale = dloss.float().reshape(-1)  # (T,) incoming per-token gradients, or (1,) for a scalar loss
    if ctx.reduction == 1:
        scale = scale / mean_denominator(t, weight, ignore_index, w.shape[0])
    # (a sharded weight is gathered here already: FSDP2's pre-backward hook, sharded_params' ZeRO-3 hook)
    gx, gw, gb = linear_cross_entropy_bwd(
        x, w, b, t, weight, scale.contiguous(), ignore_index, smoothing, chunk, backend
    )
    return gx, gw, None, (gb if b is not None else None), *nones


@torch.library.custom_op("fastlm::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    grad_scale: Tensor,
    ignore_index: int,
    label_smoothing: float,
    chunk_size: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """The deferred backward (:func:`deferred`): the chunks' logits recomputed, ``grad_scale`` ((1,) or (T,) fp32)
    folded into the row kernel's gradient; an op of its own so that torch.compile traces it (the Triton kernel is
    launched inside)."""
    losses = torch.empty(input.shape[0], dtype=torch.float32, device=input.device)  # recomputed, unused
    gx, gw, gb = lm_head_grads(
        input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, chunk_size, backend,
        losses, grad_scale,
    )  # fmt: skip
    return gx, gw, (gb if gb is not None else input.new_empty((0,)))


@linear_cross_entropy_bwd.register_fake
def _bwd_fake(input, linear_weight, linear_bias, target, weight, grad_scale, ignore_index, smoothing, chunk, backend):
    gb = linear_bias.new_empty(linear_bias.shape) if linear_bias is not None else input.new_empty((0,))
    return input.new_empty(input.shape), linear_weight.new_empty(linear_weight.shape), gb


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

    FSDP2 / ZeRO-3: ``linear_weight`` (and ``linear_bias``) may be an FSDP2 module's sharded parameter or a
    partitioned ZeRO-3 one, passed outside that module's forward: gathered once for the call, through FSDP2's own
    hooks (its compute dtype; the gradient reduce-scattered into the sharded parameter) or DeepSpeed's
    ``GatheredParameters`` (fastlm/ops/sharded_params.py, which also states how an FSDP2 parameter is told from a
    vocab-sharded weight).

    Vocab-parallel: ``linear_weight`` a DTensor sharded on the vocabulary (``Shard(0)``) on a 1-D mesh: chunked
    the same way, never gathering the vocabulary; the loss a replicated DTensor (fastlm/ops/vocab_parallel.py).

    fp16: the gradients are formed in the backward, with the incoming gradient (a GradScaler's factor) folded into
    the kernel's fp32 gradient sweep (one more matmul: :func:`deferred`).
    """
    if sharded_params.needs_gather(linear_weight, linear_bias):

        def loss_fn(x, w, b):
            return linear_cross_entropy(
                x, w, target, linear_bias=b, weight=weight, reduction=reduction, ignore_index=ignore_index,
                label_smoothing=label_smoothing, chunk_size=chunk_size,
            )  # fmt: skip

        return sharded_params.call(loss_fn, (input,), (linear_weight, linear_bias))
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
    loss = fused_linear_cross_entropy(
        input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, chunk_size, backend
    )
    return loss.to(loss_dtype(input))


def check_head(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None) -> tuple:
    """Checks an LM head's (input (*, H), linear_weight (V, H), linear_bias (V,) or None) for the fused paths and
    returns them cast to the autocast dtype in force (as ``F.linear`` under autocast: the matmuls in that dtype,
    autograd casts the gradients back)."""
    amp = autocast_dtype(input)
    if amp is not None:
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
    return input, linear_weight, linear_bias


def fused_linear_cross_entropy(
    input, linear_weight, target, linear_bias, weight, reduction: str, ignore_index: int, label_smoothing: float,
    chunk_size: int | None, backend: str,
) -> Tensor:  # fmt: skip
    """The fused path of :func:`linear_cross_entropy` on ``backend`` ("triton" or "cpu"; plain tensors, arguments
    checked here): the loss in float32 (``linear_logprobs`` keeps it so)."""
    input, linear_weight, linear_bias = check_head(input, linear_weight, linear_bias)
    V = linear_weight.shape[0]
    if target.shape != input.shape[:-1]:
        raise ValueError(f"target must have shape {list(input.shape[:-1])}, got {list(target.shape)}")
    x = input.reshape(-1, input.shape[-1])
    check_inputs(x.new_empty((0, V)), target, weight, reduction, label_smoothing, backend)
    check_target_range(target, V, ignore_index)
    t = target.reshape(-1).to(torch.int64)
    chunk = chunk_size or chunk_size_for(x.shape[0], V, x.shape[1], x.device)
    if chunk < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
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
    return loss.view(target.shape) if reduction == "none" else loss
