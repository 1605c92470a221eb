"""Fused KL divergence (``torch.nn.functional.kl_div``): one elementwise pass computes the pointwise loss, its
per-program partial sums (or the elementwise loss for reduction "none") and the gradients w.r.t. the input and the
target; nothing else is stored.

Pointwise, x the input (log-probabilities), t the target, as torch:
    log_target = False:  l = xlogy(t, t) - t * x   (0 * log 0 = 0; t < 0 gives NaN; t = 0 with x = -inf gives NaN)
                         dl/dx = -t,       dl/dt = log(t) + 1 - x   (NaN where t == 0, as torch's xlogy backward)
    log_target = True:   l = exp(t) * (t - x)
                         dl/dx = -exp(t),  dl/dt = exp(t) * (t - x + 1)
Both gradients are written times ``scale`` (the reduction's factor: 1 / numel for "mean", 1 / input.size(0) for
"batchmean", 1 otherwise), so that the backward only multiplies by the incoming gradient.

Reduced losses: each program writes the fp32 sum of its BLOCK elements to Partials[pid] (fixed order); the host
adds the partials with one torch sum (deterministic: no atomics). Bytes: reads x and t once (2 * n * e) and writes
each gradient asked for (n * e each) and, for "none", the loss (n * e). Offsets are 64-bit (n may exceed 2**31).
"""

import math

import torch
import triton
import triton.language as tl
from fastlm.kernels import empty, launch_grid, on_tensor_device

BLOCK = 2048  # elements per program
WARPS = 4


@triton.jit
def kl_div_kernel(
    X,  # (N,) input (log-probabilities), contiguous
    T,  # (N,) target, contiguous, X's dtype
    Loss,  # (N,) elementwise loss in X's dtype (not REDUCE)
    Partials,  # (programs,) fp32 per-program sums of the loss (REDUCE)
    GX,  # (N,) scale * dl/dx (WRITE_GX)
    GT,  # (N,) scale * dl/dt (WRITE_GT)
    N,  # number of elements
    scale,  # factor of both gradients
    LOG_TARGET: tl.constexpr,  # the target holds log-probabilities
    REDUCE: tl.constexpr,  # write per-program partial sums instead of the elementwise loss
    WRITE_GX: tl.constexpr,
    WRITE_GT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(T + offs, mask=mask, other=0.0).to(tl.float32)
    if LOG_TARGET:
        et = tl.exp(t)
        loss = et * (t - x)
    else:
        log_t = tl.log(t)
        loss = tl.where(t == 0.0, 0.0, t * log_t) - t * x
    if REDUCE:
        tl.store(Partials + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0))
    else:
        tl.store(Loss + offs, loss.to(Loss.dtype.element_ty), mask=mask)
    if WRITE_GX:
        if LOG_TARGET:
            gx = -scale * et
        else:
            gx = -scale * t
        tl.store(GX + offs, gx.to(GX.dtype.element_ty), mask=mask)
    if WRITE_GT:
        if LOG_TARGET:
            gt = scale * et * (t - x + 1.0)
        else:
            gt = scale * tl.where(t == 0.0, float("nan"), log_t + 1.0 - x)
        tl.store(GT + offs, gt.to(GT.dtype.element_ty), mask=mask)


@on_tensor_device
def kl_div_fwd(x, t, log_target: bool, reduce: bool, divisor: int, write_gx: bool, write_gt: bool):
    """(loss, gx or None, gt or None) for contiguous x and t of one shape and dtype: loss is the elementwise loss
    (x's shape and dtype), or with ``reduce`` the fp32 scalar ``sum / divisor``; scale = 1 / divisor (NaN for 0).
    The divisor is an int op argument, not a float scale, so that torch.compile(dynamic=True) traces it as a
    symbolic size instead of guarding on its value (a recompile per batch size)."""
    scale = 1.0 / divisor if divisor else math.nan
    n = x.numel()
    programs = triton.cdiv(n, BLOCK)
    partials = empty((programs,), torch.float32, x.device) if reduce else None
    loss = None if reduce else empty(x.shape, x.dtype, x.device)
    gx = empty(x.shape, x.dtype, x.device) if write_gx else None
    gt = empty(x.shape, x.dtype, x.device) if write_gt else None
    if n:
        kl_div_kernel[launch_grid(programs)](
            x,
            t,
            loss if loss is not None else x,
            partials if partials is not None else x,
            gx if gx is not None else x,
            gt if gt is not None else x,
            n,
            scale,
            LOG_TARGET=log_target,
            REDUCE=reduce,
            WRITE_GX=write_gx,
            WRITE_GT=write_gt,
            BLOCK=BLOCK,
            num_warps=WARPS,
        )
    if reduce:
        loss = partials.sum() * scale
    return loss, gx, gt
