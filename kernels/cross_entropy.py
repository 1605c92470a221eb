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

Soft (class-probability) targets, SOFT: T holds a target of x's shape (addressed like x, with its own row stride),
t' = (1 - eps) * t + eps / C, and per row, as torch's probability path:
    S = sum_c w_c t'_c,   loss = S * lse - sum_c w_c t'_c x_c
    dloss/dx_c = p_c * S - w_c t'_c,     dloss/dt_c = -(1 - eps) * w_c * (x_c - lse)   (WRITE_TGRAD, same sweep)
no ignore_index; with reduction "mean" both gradients are divided by the number of rows (torch's denominator there).
Bytes (soft): reads x and t once per pass and writes the gradient(s): ~(4 + 2 with the target's gradient) * N * C * e.

Vocab-parallel (the logits of a row split over ranks by classes; fastlm/ops/vocab_parallel.py holds the collectives
and the combination of the statistics), two more modes of the same kernel over one rank's (N, C_local) shard:
    STATS:    writes per row (local lse, x_t if this rank owns the target else 0, sum_c w_c x_c with SMOOTH) into
              RowStats (3, n_rows); T holds the local target id, any id outside [0, C_local) meaning "not owned".
    EXT_GRAD: the gradient from the global statistics, without pass 1: RowStats (3, n_rows) holds (global lse,
              a = (1 - eps) * w_t * scale, b = eps / C_global * scale) and WSum the global weight sum W:
              dloss/dx_c = a * (p_c - [c == t]) + b * (W * p_c - w_c),   p = exp(x - lse)
              (a = b = 0 for ignored rows; the host folds the mean's denominator or a per-row incoming gradient
              into a and b). Bytes: reads x once, writes the gradient once: ~2 * N * C_local * e.

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
def soft_weight(t_row, W, c, C, stride_col, one_m_eps, eps_c, HAS_W: tl.constexpr):
    """w_c * t'_c for the classes c of a chunk (0 outside [0, C)), t' = (1 - eps) * t + eps / C."""
    t = tl.load(t_row + c.to(tl.int64) * stride_col, mask=c < C, other=0.0).to(tl.float32)
    wt = one_m_eps * t + eps_c
    if HAS_W:
        wt *= tl.load(W + c, mask=c < C, other=0.0)
    return tl.where(c < C, wt, 0.0)


@triton.jit
def cross_entropy_kernel(
    X,  # logits, addressed through (inner, stride_outer, stride_inner, stride_col)
    T,  # (n_rows,) int64 targets; SOFT: class probabilities addressed like X with row stride t_stride_outer
    W,  # (C,) fp32 class weights (HAS_W)
    Loss,  # (n_rows,) fp32 per-row loss (weighted, not divided by the denominator)
    G,  # gradient, addressed like X with the g_* strides (WRITE_GRAD); may alias X
    Denom,  # (1,) fp32 denominator of the mean (MEAN); ROW_SCALE: (n_rows,) fp32 per-row gradient factors
    WSum,  # (1,) fp32 sum of the class weights (HAS_W; C without weights)
    TGrad,  # SOFT: d loss / d target, addressed like G (WRITE_TGRAD)
    RowStats,  # STATS / EXT_GRAD: (3, n_rows) fp32 per-row statistics (see the module docstring)
    n_rows,
    C,
    inner,
    stride_outer,
    stride_inner,
    stride_col,
    g_stride_outer,
    g_stride_inner,
    g_stride_col,
    t_stride_outer,  # SOFT: row stride of the target's (outer) view; its other strides are X's
    ignore_index,
    smoothing,
    HAS_W: tl.constexpr,
    MEAN: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SMOOTH: tl.constexpr,
    SOFT: tl.constexpr,  # class-probability targets
    WRITE_TGRAD: tl.constexpr,  # SOFT: write d loss / d target
    STATS: tl.constexpr,  # vocab-parallel pass 1: the local statistics into RowStats, nothing else
    EXT_GRAD: tl.constexpr,  # vocab-parallel pass 2: the gradient from RowStats' global statistics (no pass 1)
    ROW_SCALE: tl.constexpr,  # the gradient of row r times Denom[r] (class-index targets; folded before the rounding)
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row_offsets(row, inner, stride_outer, stride_inner)
    x_row = X + base
    cols = tl.arange(0, BLOCK_N)
    if SOFT:
        t_row = T + row_offsets(row, inner, t_stride_outer, stride_inner)
        one_m_eps = 1.0 - smoothing
        eps_c = smoothing / C
    else:
        t = tl.load(T + row)
        ignored = t == ignore_index
        valid = (t >= 0) & (t < C)
    if EXT_GRAD:
        lse = tl.load(RowStats + row)
    else:
        # pass 1: per-lane running max and sum of exp (and the smoothing sum; SOFT: sum w t' and sum w t' x), combined
        # at the end
        m_vec = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l_vec = tl.zeros([BLOCK_N], tl.float32)
        sx_vec = tl.zeros([BLOCK_N], tl.float32)
        sw_vec = tl.zeros([BLOCK_N], tl.float32)
        for off in range(0, C, BLOCK_N):
            c = off + cols
            x = tl.load(x_row + c.to(tl.int64) * stride_col, mask=c < C, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_vec, x)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_vec = l_vec * tl.exp(m_vec - m_safe) + tl.exp(x - m_safe)
            if SOFT:
                # sx = sum w t' (x - m_lane), kept relative to the lane's running max (shifted when it grows), so that
                # the loss never subtracts two large numbers (lse and sum w t' x) for large logits
                wt = soft_weight(t_row, W, c, C, stride_col, one_m_eps, eps_c, HAS_W)
                sx_vec -= tl.where(m_vec == float("-inf"), 0.0, sw_vec * (m_safe - m_vec))
                sw_vec += wt
                sx_vec += tl.where(c < C, wt * (x - m_safe), 0.0)
            elif SMOOTH:
                if HAS_W:
                    wx = tl.load(W + c, mask=c < C, other=0.0) * x
                else:
                    wx = x
                sx_vec += tl.where(c < C, wx, 0.0)
            m_vec = m_new
        m = tl.max(m_vec, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        log_sum = tl.log(tl.sum(l_vec * tl.exp(m_vec - m_safe), axis=0))  # lse - m, exact of lse's own rounding
        lse = m_safe + log_sum
    if SOFT:
        s_wt = tl.sum(sw_vec, axis=0)
        # sum w t' x - s_wt * m = sum over lanes of sx + sw * (m_lane - m)
        lane_shift = tl.where(m_vec == float("-inf"), 0.0, sw_vec * (m_vec - m_safe))
        tl.store(Loss + row, s_wt * log_sum - tl.sum(sx_vec + lane_shift, axis=0))
        if WRITE_GRAD or WRITE_TGRAD:
            if MEAN:
                scale = 1.0 / tl.load(Denom)
            else:
                scale = 1.0
            g_base = row_offsets(row, inner, g_stride_outer, g_stride_inner)
            for off in range(0, C, BLOCK_N):
                c = off + cols
                g_off = g_base + c.to(tl.int64) * g_stride_col
                x = tl.load(x_row + c.to(tl.int64) * stride_col, mask=c < C, other=0.0).to(tl.float32)
                if WRITE_GRAD:
                    wt = soft_weight(t_row, W, c, C, stride_col, one_m_eps, eps_c, HAS_W)
                    g = scale * (tl.exp(x - lse) * s_wt - wt)
                    tl.store(G + g_off, g.to(G.dtype.element_ty), mask=c < C)
                if WRITE_TGRAD:
                    if HAS_W:
                        w_c = tl.load(W + c, mask=c < C, other=0.0)
                    else:
                        w_c = 1.0
                    dt = -scale * one_m_eps * w_c * (x - lse)
                    tl.store(TGrad + g_off, dt.to(TGrad.dtype.element_ty), mask=c < C)
    elif STATS:
        t_safe = tl.where(valid, t, 0)
        x_t = tl.load(x_row + t_safe * stride_col, mask=valid, other=0.0).to(tl.float32)
        tl.store(RowStats + row, lse)  # row is int64, so every offset below is (no 32-bit 2 * n_rows)
        tl.store(RowStats + (row + n_rows), x_t)
        if SMOOTH:
            tl.store(RowStats + (row + n_rows) + n_rows, tl.sum(sx_vec, axis=0))
        else:
            tl.store(RowStats + (row + n_rows) + n_rows, 0.0)
    else:
        if EXT_GRAD:
            coef = tl.load(RowStats + (row + n_rows))
            smc = tl.load(RowStats + (row + n_rows) + n_rows)
            w_sum = tl.load(WSum)
        else:
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
            if MEAN:
                scale = 1.0 / tl.load(Denom)
            elif ROW_SCALE:
                scale = tl.load(Denom + row)
            else:
                scale = 1.0
            coef = (1.0 - smoothing) * w_t * scale
            smc = smoothing / C * scale
        if WRITE_GRAD:
            g_row = G + row_offsets(row, inner, g_stride_outer, g_stride_inner)
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
                    g += smc * (w_sum * p - w_c)
                if EXT_GRAD:  # an ignored row (a = b = 0): exact zeros, also where p is NaN (x = lse = -inf)
                    g = tl.where((coef == 0.0) & (smc == 0.0), 0.0, g)
                else:
                    g = tl.where(valid, g, float("nan"))
                    g = tl.where(ignored, 0.0, g)
                tl.store(g_row + c.to(tl.int64) * g_stride_col, g.to(G.dtype.element_ty), mask=c < C)


def block_n(C: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(C))


def warps(C: int) -> int:
    return max(1, min(16, block_n(C) // 512))


@on_tensor_device
def cross_entropy_rows(
    x, target, weight, denom, ignore_index: int, smoothing: float, write_grad: bool, grad=None, row_scale=None
):
    """Per-row losses (fp32) and, if ``write_grad``, the gradient (into ``grad`` if given, e.g. x itself).

    x: (N, C) with unit class stride, or contiguous (N, C, D); target: (rows,) int64; weight: (C,) fp32 or None;
    denom: (1,) fp32 device scalar for the mean, or None; row_scale: (rows,) fp32 factors of each row's gradient
    (folded into the fp32 gradient sweep, before the one rounding to x's dtype), or None; not with denom.
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
        denom if denom is not None else (row_scale if row_scale is not None else losses),
        w_sum,
        x,
        losses,
        n_rows,
        C,
        inner,
        so,
        si,
        sc,
        go,
        gi,
        gc,
        0,
        ignore_index,
        smoothing,
        HAS_W=weight is not None,
        MEAN=denom is not None,
        WRITE_GRAD=write_grad,
        SMOOTH=smoothing > 0.0,
        SOFT=False,
        WRITE_TGRAD=False,
        STATS=False,
        EXT_GRAD=False,
        ROW_SCALE=row_scale is not None and write_grad,
        BLOCK_N=block_n(C),
        num_warps=warps(C),
    )
    return losses, grad


@on_tensor_device
def soft_cross_entropy_rows(x, target, weight, denom, smoothing: float, write_grad: bool, write_target_grad: bool):
    """Per-row losses (fp32) for class-probability targets and, if asked, the gradients w.r.t. x and the target.

    x: (N, C) with unit class stride, or contiguous (N, C, D); target: x's shape and dtype ((N, C): unit class stride,
    any row stride; (N, C, D): contiguous); weight: (C,) fp32 or None; denom: (1,) fp32 number of rows for the mean,
    or None. Returns (losses, grad or None, target_grad or None); the gradients are contiguous.
    """
    n_rows, C, inner, so, si, sc = row_view(x, 1)
    losses = empty((n_rows,), torch.float32, x.device)
    grad = empty(x.shape, x.dtype, x.device) if write_grad else None
    tgrad = empty(x.shape, x.dtype, x.device) if write_target_grad else None
    if n_rows == 0:
        return losses, grad, tgrad
    g = grad if write_grad else (tgrad if write_target_grad else x)
    go, gi, gc = row_view(g, 1)[3:]
    cross_entropy_kernel[launch_grid(n_rows)](
        x,
        target,
        weight if weight is not None else x,
        losses,
        grad if write_grad else g,
        denom if denom is not None else losses,
        losses,
        tgrad if write_target_grad else g,
        losses,
        n_rows,
        C,
        inner,
        so,
        si,
        sc,
        go,
        gi,
        gc,
        target.stride(0),
        0,
        smoothing,
        HAS_W=weight is not None,
        MEAN=denom is not None,
        WRITE_GRAD=write_grad,
        SMOOTH=smoothing > 0.0,
        SOFT=True,
        WRITE_TGRAD=write_target_grad,
        STATS=False,
        EXT_GRAD=False,
        ROW_SCALE=False,
        BLOCK_N=block_n(C),
        num_warps=warps(C),
    )
    return losses, grad, tgrad


def _vocab_parallel_launch(x, target, weight, w_sum, row_stats, grad, smoothing: float, stats: bool):
    """One launch of the kernel in its STATS or EXT_GRAD mode over x (N, C_local) with unit class stride."""
    n_rows, C, inner, so, si, sc = row_view(x, 1)
    g = grad if grad is not None else x
    go, gi, gc = row_view(g, 1)[3:]
    cross_entropy_kernel[launch_grid(n_rows)](
        x,
        target,
        weight if weight is not None else x,
        row_stats,  # Loss: unused
        g,
        row_stats,  # Denom: unused (the host folds the mean's denominator into RowStats)
        w_sum if w_sum is not None else row_stats,
        x,
        row_stats,
        n_rows,
        C,
        inner,
        so,
        si,
        sc,
        go,
        gi,
        gc,
        0,
        -1,
        smoothing,
        HAS_W=weight is not None,
        MEAN=False,
        WRITE_GRAD=not stats,
        SMOOTH=smoothing > 0.0,
        SOFT=False,
        WRITE_TGRAD=False,
        STATS=stats,
        EXT_GRAD=not stats,
        ROW_SCALE=False,
        BLOCK_N=block_n(C),
        num_warps=warps(C),
    )


@on_tensor_device
def vocab_parallel_stats(x, target, weight, smooth: bool):
    """The local statistics of one rank's vocabulary shard: (3, N) fp32 rows (lse of the local logits, x[t] where
    this rank owns the target else 0, sum_c w_c x_c when ``smooth`` else 0).

    x: (N, C_local) with unit class stride; target: (N,) int64 local ids (outside [0, C_local): not owned);
    weight: (C_local,) fp32 or None.
    """
    n_rows, C = x.shape
    stats = empty((3, n_rows), torch.float32, x.device)
    if n_rows and C:
        _vocab_parallel_launch(x, target, weight, None, stats, None, 1.0 if smooth else 0.0, True)
    elif n_rows:  # a rank with no classes (an uneven split): lse -inf, nothing owned
        stats[0].fill_(float("-inf"))
        stats[1:].zero_()
    return stats


@on_tensor_device
def vocab_parallel_grad(x, target, row_stats, weight, w_sum, smooth: bool, grad=None):
    """d loss / d x of one rank's shard from the global statistics: ``row_stats`` (3, N) fp32 = (global lse, a, b),
    ``w_sum`` (1,) fp32 the global weight sum W (C_global without weights); written into ``grad`` (x itself for an
    in-place gradient) or a new tensor. a * (p - onehot) + b * (W p - w), p = exp(x - lse)."""
    if grad is None:
        grad = empty(x.shape, x.dtype, x.device)
    if x.shape[0] and x.shape[1]:
        _vocab_parallel_launch(x, target, weight, w_sum, row_stats, grad, 1.0 if smooth else 0.0, False)
    return grad
