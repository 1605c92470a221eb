"""Fused distillation losses: one kernel reads a row of student logits s and teacher logits t (V classes) and writes
the row's loss and the gradient with respect to s; neither softmax is ever stored.

With temperature T, x = s / T, y = t / T, p_s = softmax(x), p_t = softmax(y) (fp32 math), per row:
    lse_s = log(sum(exp(x))), lse_t = log(sum(exp(y)))            (online max and sum over BLOCK_N-wide chunks)
    KIND_KL      (forward KL, Hinton):  L = KL(p_t || p_s) = sum p_t (y - x) - lse_t + lse_s
                                        dL/dx = p_s - p_t
    KIND_REV_KL  (reverse KL):          L = KL(p_s || p_t) = sum p_s (x - y) - lse_s + lse_t
                                        dL/dx = p_s * (d - L),  d = log p_s - log p_t
    KIND_JSD     (generalised JSD, 0 < beta < 1), m = beta p_t + (1 - beta) p_s:
                                        L = beta KL(p_t || m) + (1 - beta) KL(p_s || m)
                                        dL/dx = (1 - beta) p_s (log p_s - log m - K),  K = KL(p_s || m)
The row's loss is T^2 * L (Hinton et al.), its gradient with respect to s is T * dL/dx (times the gradient scale:
1 / number of counted rows for "batchmean", a chunk's weight in the linear distillation). Terms with a zero
probability count 0 (0 log 0 = 0), so -inf logits and the padding lanes of the last chunk give no NaN. Rows whose
target is ignore_index give loss 0 and gradient 0 and are not read.

Passes over the row (each reads s and t; the later ones are mostly L2 hits for rows that fit): KL and reverse KL
accumulate their loss online in the statistics pass (sum e_t (y - x) rescaled with the running max, like the sum of
exp), then write the gradient: 2 passes. JSD needs the normalised probabilities for log m, hence a loss pass
(which also gives K) and a gradient pass: 3 passes. Bytes (least traffic): read s and t, write the gradient:
3 * N * V * e. The gradient may be written in place of s (G == S): each element is read before it is overwritten.
"""

import torch
import triton
import triton.language as tl
from fastlm.kernels import empty, launch_grid, on_tensor_device

KL, REVERSE_KL, JSD = 0, 1, 2  # the KIND flag (launchers and the cpu op use these ints)
KIND_KL, KIND_REV_KL, KIND_JSD = tl.constexpr(KL), tl.constexpr(REVERSE_KL), tl.constexpr(JSD)
# Chunk width of the loop over classes and warps: two rows and six running vectors live in registers; 2048 wide on 4
# warps compiles without spills for every flag set, dtype and kind on sm_90 under Triton 3.6 and 3.8 (<= 128
# registers), where 2048 on 8 warps or 4096 on 8 / 16 warps left 8-byte stack spills under 3.6.
MAX_BLOCK = 2048
# The JSD's mixture m is clamped at the smallest normal float before its log (as the cpu kernel does): a subnormal
# p_s times (1 - beta) may round to 0 (or be flushed to zero on the GPU), and log 0 = -inf would give inf / NaN.
TINY = tl.constexpr(2.0**-126)  # exactly representable: an fp32 constant (1.17549435e-38 was typed fp64)


@triton.jit
def _lane_update(m_vec, l_vec, a_vec, v):
    """One online step of a per-lane running max m, sum of exp(v - m) l and weighted sum a (a is rescaled like l;
    the caller adds its new terms against the returned reference max)."""
    m_new = tl.maximum(m_vec, v)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_vec - m_ref)
    e = tl.exp(v - m_ref)
    return m_new, l_vec * alpha + e, a_vec * alpha, e


@triton.jit
def _lane_combine(m_vec, l_vec, a_vec):
    """The row's max m, sum of exp l and weighted sum a (both against m) from the per-lane ones."""
    m = tl.max(m_vec, axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    f = tl.exp(m_vec - m_ref)
    return m_ref, tl.sum(l_vec * f, axis=0), tl.sum(a_vec * f, axis=0)


@triton.jit
def distillation_kernel(
    S,  # (n_rows, C) student logits, row stride stride_s, unit class stride
    Tch,  # (n_rows, C) teacher logits, row stride stride_t, unit class stride (S's dtype)
    Tgt,  # (n_rows,) int64 targets (HAS_TARGET): rows equal to ignore_index are skipped
    Loss,  # (n_rows,) fp32 per-row loss (T^2 * L; 0 for ignored rows)
    G,  # (n_rows, C) gradient w.r.t. S, row stride stride_g (WRITE_GRAD); may alias S
    Scale,  # (1,) fp32 gradient scale (HAS_SCALE), e.g. 1 / counted rows
    C,  # classes per row (the vocabulary V)
    stride_s,  # row stride of S (elements)
    stride_t,  # row stride of Tch
    stride_g,  # row stride of G
    ignore_index,  # target value of rows left out
    beta,  # JSD weight of the teacher end (0 < beta < 1)
    inv_temp,  # 1 / T
    temp,  # T
    KIND: tl.constexpr,  # KIND_KL, KIND_REV_KL or KIND_JSD
    HAS_TARGET: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = Tch + row * stride_t
    g_row = G + row * stride_g
    cols = tl.arange(0, BLOCK_N)
    ignored = False
    if HAS_TARGET:
        ignored = tl.load(Tgt + row) == ignore_index
    if ignored:
        tl.store(Loss + row, 0.0)
        if WRITE_GRAD:
            for off in range(0, C, BLOCK_N):
                c = off + cols
                tl.store(g_row + c, tl.zeros([BLOCK_N], tl.float32).to(G.dtype.element_ty), mask=c < C)
    else:
        # pass 1: statistics of both rows, per lane; KL / reverse KL also accumulate sum e_t (y - x) / e_s (x - y)
        m_s = tl.full([BLOCK_N], float("-inf"), tl.float32)
        m_t = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l_s = tl.zeros([BLOCK_N], tl.float32)
        l_t = tl.zeros([BLOCK_N], tl.float32)
        a_s = tl.zeros([BLOCK_N], tl.float32)
        a_t = tl.zeros([BLOCK_N], tl.float32)
        for off in range(0, C, BLOCK_N):
            c = off + cols
            x = tl.load(s_row + c, mask=c < C, other=float("-inf")).to(tl.float32) * inv_temp
            y = tl.load(t_row + c, mask=c < C, other=float("-inf")).to(tl.float32) * inv_temp
            r_s = tl.where(m_s == float("-inf"), 0.0, m_s)  # the lanes' references before this chunk
            r_t = tl.where(m_t == float("-inf"), 0.0, m_t)
            m_s, l_s, a_s, e_s = _lane_update(m_s, l_s, a_s, x)
            m_t, l_t, a_t, e_t = _lane_update(m_t, l_t, a_t, y)
            # The KLs' sums are of log-probability differences against the lanes' maxima, (y - m_t) - (x - m_s),
            # never of y - x and lse_t - lse_s separately: those are large for large logits and their difference
            # (the KL, small when the rows agree) would cancel. A new maximum shifts the old terms (l - e of them).
            dr_s = tl.where(m_s == float("-inf"), 0.0, m_s) - r_s
            dr_t = tl.where(m_t == float("-inf"), 0.0, m_t) - r_t
            d = (y - r_t - dr_t) - (x - r_s - dr_s)  # log p_t - log p_s up to the row constants
            if KIND == KIND_KL:
                a_t += (l_t - e_t) * (dr_s - dr_t) + tl.where(e_t > 0.0, e_t * d, 0.0)
            if KIND == KIND_REV_KL:
                a_s += (l_s - e_s) * (dr_t - dr_s) - tl.where(e_s > 0.0, e_s * d, 0.0)
        ms, ls, as_ = _lane_combine(m_s, l_s, a_s)
        mt, lt, at = _lane_combine(m_t, l_t, a_t)
        lse_s = ms + tl.log(ls)
        lse_t = mt + tl.log(lt)
        # the lanes' sums moved from their own maxima to the row's: (ms - lane's m_s) - (mt - lane's m_t) per term
        shift = (ms - tl.where(m_s == float("-inf"), 0.0, m_s)) - (mt - tl.where(m_t == float("-inf"), 0.0, m_t))
        if KIND == KIND_KL:
            at += tl.sum(tl.where(l_t > 0.0, l_t * tl.exp(m_t - mt) * shift, 0.0), axis=0)
            loss = at / lt + tl.log(ls) - tl.log(lt)  # sum p_t (log p_t - log p_s), all against the maxima
        elif KIND == KIND_REV_KL:
            as_ -= tl.sum(tl.where(l_s > 0.0, l_s * tl.exp(m_s - ms) * shift, 0.0), axis=0)
            loss = as_ / ls + tl.log(lt) - tl.log(ls)
        else:
            # pass 2 (JSD): the loss and K = KL(p_s || m), from the normalised probabilities
            acc = tl.zeros([BLOCK_N], tl.float32)
            acc_k = tl.zeros([BLOCK_N], tl.float32)
            for off in range(0, C, BLOCK_N):
                c = off + cols
                x = tl.load(s_row + c, mask=c < C, other=float("-inf")).to(tl.float32) * inv_temp
                y = tl.load(t_row + c, mask=c < C, other=float("-inf")).to(tl.float32) * inv_temp
                lp_s = x - lse_s
                lp_t = y - lse_t
                p_s = tl.exp(lp_s)
                p_t = tl.exp(lp_t)
                lm = tl.log(tl.maximum(beta * p_t + (1.0 - beta) * p_s, TINY))
                term_s = tl.where(p_s > 0.0, p_s * (lp_s - lm), 0.0)
                term_t = tl.where(p_t > 0.0, p_t * (lp_t - lm), 0.0)
                acc += beta * term_t + (1.0 - beta) * term_s
                acc_k += term_s
            loss = tl.sum(acc, axis=0)
            k_sm = tl.sum(acc_k, axis=0)
        tl.store(Loss + row, loss * temp * temp)
        if WRITE_GRAD:
            coef = temp
            if HAS_SCALE:
                coef = coef * tl.load(Scale)
            for off in range(0, C, BLOCK_N):
                c = off + cols
                x = tl.load(s_row + c, mask=c < C, other=float("-inf")).to(tl.float32) * inv_temp
                y = tl.load(t_row + c, mask=c < C, other=float("-inf")).to(tl.float32) * inv_temp
                lp_s = x - lse_s
                p_s = tl.exp(lp_s)
                if KIND == KIND_KL:
                    g = p_s - tl.exp(y - lse_t)
                elif KIND == KIND_REV_KL:
                    g = tl.where(p_s > 0.0, p_s * (lp_s - (y - lse_t) - loss), 0.0)
                else:
                    lm = tl.log(tl.maximum(beta * tl.exp(y - lse_t) + (1.0 - beta) * p_s, TINY))
                    g = tl.where(p_s > 0.0, (1.0 - beta) * p_s * (lp_s - lm - k_sm), 0.0)
                tl.store(g_row + c, (coef * g).to(G.dtype.element_ty), mask=c < C)


def block_n(V: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(V))


def warps(V: int) -> int:
    return max(1, min(8, block_n(V) // 512))


@on_tensor_device
def distillation_rows(
    s, t, target, kind: int, beta: float, temperature: float, ignore_index: int, scale, write_grad: bool, grad=None
):
    """Per-row losses (fp32, T^2 * L, 0 for ignored rows) and, if ``write_grad``, the gradient w.r.t. ``s`` times
    T * ``scale`` (into ``grad`` if given, e.g. ``s`` itself).

    s, t: (N, V) of one dtype with unit class stride (any row strides); target: (N,) int64 or None; scale: (1,) fp32
    device tensor or None (1); kind: KL / REVERSE_KL / JSD (JSD needs 0 < beta < 1).
    """
    n_rows, V = s.shape
    losses = empty((n_rows,), torch.float32, s.device)
    if write_grad and grad is None:
        grad = empty(s.shape, s.dtype, s.device)
    if n_rows == 0:
        return losses, grad
    g = grad if write_grad else s
    distillation_kernel[launch_grid(n_rows)](
        s,
        t,
        target if target is not None else losses,
        losses,
        g,
        scale if scale is not None else losses,
        V,
        s.stride(0),
        t.stride(0),
        g.stride(0),
        ignore_index,
        beta,
        1.0 / temperature,
        temperature,
        KIND=kind,
        HAS_TARGET=target is not None,
        HAS_SCALE=scale is not None,
        WRITE_GRAD=write_grad,
        BLOCK_N=block_n(V),
        num_warps=warps(V),
    )
    return losses, grad
