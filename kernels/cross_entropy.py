"""Fused cross-entropy: one pass over the logits computes the loss and writes the gradient; the softmax is never
stored.

For a row of logits x (C classes), target t, class weights w (1 without), smoothing eps:
    lse    = log(sum(exp(x)))                                   (online max and sum over BLOCK_N-wide chunks)
    loss   = (1 - eps) * w_t * (lse - x_t) + eps / C * (W * lse - sum_c w_c x_c),   W = sum_c w_c
    dloss/dx_c = (1 - eps) * w_t * (p_c - [c == t]) + eps / C * (W * p_c - w_c),     p = softmax(x)
Rows whose target is ignore_index give 0 loss and 0 gradient; a target outside [0, C) that is not ignore_index
gives a NaN loss and gradient (checked on the host only for CPU tensors, where the check costs no device sync).
With reduction "mean" the gradient is divided by the denominator (sum of w_t over the rows that are not ignored,
as torch), read from a device scalar so that no sync is needed.

Rows are addressed as in kernels/softmax.py: (N, C) with any row stride, or contiguous (N, C, d...) with the
classes strided by d. Bytes: reads x once per pass (two passes: statistics, then gradient; the second is mostly
an L2 hit for rows that fit) and writes the gradient: ~3 * N * C * e.
The gradient may be written in place of the logits (G == X): each element is read before it is overwritten.
"""

import torch
import triton
import triton.language as tl
from fastlm.kernels import empty, launch_grid, on_tensor_device
from fastlm.kernels.softmax import row_offsets, row_view

MAX_BLOCK = 8192  # chunk width of the loop over classes


@triton.jit
def cross_entropy_kernel(
    X,  # logits, addressed through (inner, stride_outer, stride_inner, stride_col)
    T,  # (n_rows,) int64 targets
    W,  # (C,) fp32 class weights (HAS_W)
    Loss,  # (n_rows,) fp32 per-row loss (weighted, not divided by the denominator)
    G,  # gradient, addressed like X with the g_* strides (WRITE_GRAD); may alias X
    Denom,  # (1,) fp32 denominator of the mean (MEAN)
    WSum,  # (1,) fp32 sum of the class weights (HAS_W; C without weights)
    n_rows,
    C,
    inner,
    stride_outer,
    stride_inner,
    stride_col,
    g_stride_outer,
    g_stride_inner,
    g_stride_col,
    ignore_index,
    smoothing,
    HAS_W: tl.constexpr,
    MEAN: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SMOOTH: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row_offsets(row, inner, stride_outer, stride_inner)
    x_row = X + base
    cols = tl.arange(0, BLOCK_N)
    t = tl.load(T + row)
    ignored = t == ignore_index
    valid = (t >= 0) & (t < C)
    # pass 1: per-lane running max and sum of exp (and the smoothing sum), combined at the end
    m_vec = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_vec = tl.zeros([BLOCK_N], tl.float32)
    sx_vec = tl.zeros([BLOCK_N], tl.float32)
    for off in range(0, C, BLOCK_N):
        c = off + cols
        x = tl.load(x_row + c.to(tl.int64) * stride_col, mask=c < C, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_vec, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_vec = l_vec * tl.exp(m_vec - m_safe) + tl.exp(x - m_safe)
        m_vec = m_new
        if SMOOTH:
            if HAS_W:
                wx = tl.load(W + c, mask=c < C, other=0.0) * x
            else:
                wx = x
            sx_vec += tl.where(c < C, wx, 0.0)
    m = tl.max(m_vec, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lse = m_safe + tl.log(tl.sum(l_vec * tl.exp(m_vec - m_safe), axis=0))
    t_safe = tl.where(valid, t, 0)
    x_t = tl.load(x_row + t_safe * stride_col).to(tl.float32)
    if HAS_W:
        w_t = tl.load(W + t_safe)
        w_sum = tl.load(WSum)
    else:
        w_t = 1.0
        w_sum = C * 1.0
    loss = (1.0 - smoothing) * w_t * (lse - x_t)
    if SMOOTH:
        loss += smoothing / C * (w_sum * lse - tl.sum(sx_vec, axis=0))
    loss = tl.where(valid, loss, float("nan"))
    loss = tl.where(ignored, 0.0, loss)
    tl.store(Loss + row, loss)
    if WRITE_GRAD:
        if MEAN:
            scale = 1.0 / tl.load(Denom)
        else:
            scale = 1.0
        g_row = G + row_offsets(row, inner, g_stride_outer, g_stride_inner)
        coef = (1.0 - smoothing) * w_t * scale
        for off in range(0, C, BLOCK_N):
            c = off + cols
            x = tl.load(x_row + c.to(tl.int64) * stride_col, mask=c < C, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            g = coef * (p - tl.where(c == t, 1.0, 0.0))
            if SMOOTH:
                if HAS_W:
                    w_c = tl.load(W + c, mask=c < C, other=0.0)
                else:
                    w_c = 1.0
                g += smoothing / C * scale * (w_sum * p - w_c)
            g = tl.where(valid, g, float("nan"))
            g = tl.where(ignored, 0.0, g)
            tl.store(g_row + c.to(tl.int64) * g_stride_col, g.to(G.dtype.element_ty), mask=c < C)


def block_n(C: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(C))


def warps(C: int) -> int:
    return max(1, min(16, block_n(C) // 512))


@on_tensor_device
def cross_entropy_rows(x, target, weight, denom, ignore_index: int, smoothing: float, write_grad: bool, grad=None):
    """Per-row losses (fp32) and, if ``write_grad``, the gradient (into ``grad`` if given, e.g. x itself).

    x: (N, C) with unit class stride, or contiguous (N, C, D); target: (rows,) int64; weight: (C,) fp32 or None;
    denom: (1,) fp32 device scalar for the mean, or None.
    """
    n_rows, C, inner, so, si, sc = row_view(x, 1)
    losses = empty((n_rows,), torch.float32, x.device)
    if write_grad and grad is None:
        grad = empty(x.shape, x.dtype, x.device)
    if n_rows == 0:
        return losses, grad
    g = grad if write_grad else x
    go, gi, gc = row_view(g, 1)[3:]
    w_sum = weight.sum().reshape(1) if weight is not None else losses  # a device scalar: no sync
    cross_entropy_kernel[launch_grid(n_rows)](
        x,
        target,
        weight if weight is not None else x,
        losses,
        g,
        denom if denom is not None else losses,
        w_sum,
        n_rows,
        C,
        inner,
        so,
        si,
        sc,
        go,
        gi,
        gc,
        ignore_index,
        smoothing,
        HAS_W=weight is not None,
        MEAN=denom is not None,
        WRITE_GRAD=write_grad,
        SMOOTH=smoothing > 0.0,
        BLOCK_N=block_n(C),
        num_warps=warps(C),
    )
    return losses, grad
