"""The row kernel of ``linear_logprobs(..., return_entropy=True)`` (fastlm/ops/linear_logprobs.py): per row of a
chunk's logits z (V classes) with target t, the selected token's log-probability and the entropy of the softmax,

    lse = log sum_k exp(z_k),   lp = z_t - lse,   p = exp(z - lse),   H = lse - sum_k p_k z_k

in one sweep (an online max m per lane, and per lane L = sum exp(z - m) and A = sum exp(z - m) (z - m), rescaled as
m grows: A' = e^-d (A - d L) for a max raised by d; then H = log L - A / L over the lanes combined), and, with
WRITE_GRAD, the gradient of ``a * lp + c * H`` (a, c: the incoming per-row gradients) written over the logits:

    d/dz_k = a ([k == t] - p_k) - c p_k (z_k - E_p[z]),   E_p[z] = lse - H

(a second sweep; the first recomputes lse and H). Rows whose target is ignore_index give lp = H = 0 and a zero
gradient; a target outside [0, V) gives NaN (the host checks CPU tensors). Logits of -inf (banned tokens) count 0 in
H and get a zero gradient (p log p -> 0). Bytes: reads z once per sweep and writes
the gradient: ~3 * rows * V * e with WRITE_GRAD, rows * V * e without.
"""

import torch
import triton
import triton.language as tl
from fastlm.kernels import empty, launch_grid, on_tensor_device

MAX_BLOCK = 4096  # chunk width of the loop over classes
# 16 warps at 4096 classes: ~50 registers (8 warps: ~97, 2 CTAs per SM), compiled for sm_90 here; not timed on a GPU


@triton.jit
def logprob_entropy_kernel(
    X,  # (rows, V) logits, unit class stride, row stride stride_row; the gradient is written here (WRITE_GRAD)
    T,  # (rows,) int64 targets
    LP,  # (rows,) fp32 log-probabilities, written
    ENT,  # (rows,) fp32 entropies, written
    GA,  # (rows,) fp32 d loss / d lp (WRITE_GRAD)
    GC,  # (rows,) fp32 d loss / d entropy (WRITE_GRAD)
    V,
    stride_row,
    ignore_index,
    WRITE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_row
    cols = tl.arange(0, BLOCK_N)
    t = tl.load(T + row)
    ignored = t == ignore_index
    valid = (t >= 0) & (t < V)
    m_vec = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_vec = tl.zeros([BLOCK_N], tl.float32)
    a_vec = tl.zeros([BLOCK_N], tl.float32)
    for off in range(0, V, BLOCK_N):
        c = off + cols
        x = tl.load(x_row + c, mask=c < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_vec, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = tl.where(m_vec == float("-inf"), 0.0, m_safe - m_vec)  # the lane's max raised by d
        scale = tl.exp(-d)
        e = tl.exp(x - m_safe)
        # 0 where z = -inf (a banned token; the masked lanes): e = 0 there, and 0 * -inf would be NaN
        a_vec = scale * (a_vec - d * l_vec) + e * tl.where(x > float("-inf"), x - m_safe, 0.0)
        l_vec = scale * l_vec + e
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lane = tl.where(m_vec == float("-inf"), 0.0, m_vec - m_safe)  # <= 0
    f = tl.exp(lane)
    L = tl.sum(l_vec * f, axis=0)
    A = tl.sum(f * (a_vec + lane * l_vec), axis=0)  # sum exp(z - m) (z - m)
    ent = tl.log(L) - A / L
    lse = m_safe + tl.log(L)
    t_safe = tl.where(valid, t, 0)
    x_t = tl.load(x_row + t_safe).to(tl.float32)
    lp = tl.where(valid, x_t - lse, float("nan"))
    tl.store(LP + row, tl.where(ignored, 0.0, lp))
    tl.store(ENT + row, tl.where(ignored, 0.0, tl.where(valid, ent, float("nan"))))
    if WRITE_GRAD:
        ga = tl.load(GA + row)
        gc = tl.load(GC + row)
        mean_z = lse - ent
        for off in range(0, V, BLOCK_N):
            c = off + cols
            x = tl.load(x_row + c, mask=c < V, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            g = ga * (tl.where(c == t, 1.0, 0.0) - p) - gc * tl.where(p > 0.0, p * (x - mean_z), 0.0)
            g = tl.where(valid, g, float("nan"))
            g = tl.where(ignored, 0.0, g)
            tl.store(x_row + c, g.to(X.dtype.element_ty), mask=c < V)


@on_tensor_device
def logprob_entropy_rows(x, target, ignore_index: int, grad_lp=None, grad_ent=None):
    """(lp, entropy) fp32 per row of ``x`` ((rows, V), unit class stride); with ``grad_lp`` and ``grad_ent``
    ((rows,) fp32), the gradient of ``sum(grad_lp * lp + grad_ent * entropy)`` written over ``x``."""
    rows, V = x.shape
    if x.stride(1) != 1:
        raise ValueError(f"logprob_entropy_rows: the logits need a unit class stride, got strides {x.stride()}")
    lp = empty((rows,), torch.float32, x.device)
    ent = empty((rows,), torch.float32, x.device)
    if rows == 0:
        return lp, ent
    write = grad_lp is not None
    block = min(MAX_BLOCK, triton.next_power_of_2(V))  # fastlm/bench/shipped.py lists these configs
    logprob_entropy_kernel[launch_grid(rows)](
        x, target, lp, ent, grad_lp if write else lp, grad_ent if write else ent, V, x.stride(0), ignore_index,
        WRITE_GRAD=write, BLOCK_N=block, num_warps=max(1, min(16, block // 256)),
    )  # fmt: skip
    return lp, ent
