"""Building blocks shared by the attention forward and backward kernels: which tile a program owns, where its
sequence starts, the masked base-2 scores of a tile, whether a user mask allows any of it, dropout's keep mask, and
a tile of Q/K/V/dO through a pointer or a TMA descriptor. Plus the host-side stride helpers of the two layouts.

Notation: a program owns BLOCK_M queries (forward, dQ) or BLOCK_N keys (dK/dV) of one (sequence, head); ``offs_m``
are query positions and ``offs_n`` key positions within the sequence; scores are in base 2
(s2 = q k^T * scale * log2(e)) so that exp2 is used.
"""

import triton
import triton.language as tl
from fastlm.kernels import KIND_BOOL, KIND_NONE, LOG2E


@triton.jit
def tile_ids(S_max, BLOCK: tl.constexpr):
    """(block index along the sequence, flattened batch * heads index) of this program. The grid is 1-D, with
    cdiv(S_max, BLOCK) consecutive programs per (batch, head), so that the blocks of one head run together (they
    share its K/V, or Q/dO, in L2) and batch * heads is not bound by the 65535 limit of grid axes y and z."""
    n = tl.cdiv(S_max, BLOCK)
    pid = tl.program_id(0)
    return pid % n, pid // n


@triton.jit
def seq_bounds(CuQ, CuK, b, Sq_max, Sk_max, VARLEN: tl.constexpr):
    """(first query token, first key token, Sq, Sk) of sequence b: from the cu_seqlens offsets (varlen), else
    (0, 0, Sq_max, Sk_max)."""
    if VARLEN:
        q0 = tl.load(CuQ + b)
        k0 = tl.load(CuK + b)
        return q0, k0, tl.load(CuQ + b + 1) - q0, tl.load(CuK + b + 1) - k0
    return b * 0, b * 0, Sq_max + b * 0, Sk_max + b * 0


@triton.jit
def dropout_seed(Seed, DROPOUT: tl.constexpr):
    """Dropout's Philox seed, read from device memory (a CUDA graph replays the launch, not the host's value: the
    op draws a fresh seed tensor on the device per call, which graph capture keeps fresh per replay)."""
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    return seed


@triton.jit
def tanh(x):
    """tanh in fp32 from exp2 (Triton 3.6 and 3.8, compiled and interpreted alike): (1 - e) / (1 + e) with
    e = exp(-2|x|) (no overflow), an odd Taylor polynomial below |x| = 1/8 (no cancellation in 1 - e)."""
    ax = tl.abs(x)
    e = tl.math.exp2(ax * (-2.0 * LOG2E))
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.125, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def scores(
    q,  # [BLOCK_M, BLOCK_D] queries
    k,  # [BLOCK_N, BLOCK_D] keys
    Mask,  # the user mask of this (batch, head), element (m, n) at m * sm_m + n * sm_n (MASK_KIND != KIND_NONE)
    offs_m,  # [BLOCK_M] query positions
    offs_n,  # [BLOCK_N] key positions
    Sq,  # queries of the sequence
    Sk,  # keys of the sequence
    sm_m,  # mask stride over queries (0 when broadcast)
    sm_n,  # mask stride over keys
    qk_scale,  # softmax scale * log2(e)
    softcap,  # the soft cap c > 0 in natural units (SOFTCAP)
    slope2,  # this (sequence, head)'s ALiBi slope * log2(e) (ALIBI)
    win_left,  # window: keys before query + off - win_left masked (WINDOW; never negative: the host maps -1 to Sq + Sk)
    win_right,  # window: keys after query + off + win_right masked
    MASK_KIND: tl.constexpr,  # KIND_NONE, KIND_BOOL (True = attend) or KIND_ADD (added to the scores)
    CAUSAL: tl.constexpr,  # keys after the query masked (top-left aligned)
    CHECK: tl.constexpr,  # keys at or past Sk masked (a ragged last tile)
    PREC: tl.constexpr,  # tl.dot's input precision ("ieee" for fp32 inputs)
    SOFTCAP: tl.constexpr,  # s = c * tanh(s / c) on the scaled scores
    ALIBI: tl.constexpr,  # s -= slope * |query + off - key| (off = Sk - Sq: bottom-right aligned)
    WINDOW: tl.constexpr,  # the sliding-window mask on this tile (bottom-right aligned)
):
    """Base-2 scores of a [BLOCK_M, BLOCK_N] tile, -inf where masked: q k^T * scale (soft-capped), + ALiBi bias,
    + additive mask, all times log2(e). Returns (scores, t) with t = tanh(q k^T * scale / c) under SOFTCAP (its
    derivative 1 - t^2 is the backward's), else the scores again (unused)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    t = s
    if SOFTCAP:  # in natural units: c * tanh(s / c), then back to base 2
        t = tanh(s * (1.0 / (softcap * LOG2E)))
        s = t * (softcap * LOG2E)
    if ALIBI:
        dist = offs_m[:, None] + (Sk - Sq) - offs_n[None, :]
        s = s - slope2 * tl.abs(dist).to(tl.float32)
    if MASK_KIND != KIND_NONE:
        ok = (offs_m < Sq)[:, None] & (offs_n < Sk)[None, :]
        mv = tl.load(Mask + offs_m[:, None].to(tl.int64) * sm_m + offs_n[None, :].to(tl.int64) * sm_n, mask=ok, other=0)
        if MASK_KIND == KIND_BOOL:
            s = tl.where(mv != 0, s, float("-inf"))
        else:
            s = s + mv.to(tl.float32) * LOG2E
    if CHECK:
        s = tl.where((offs_n < Sk)[None, :], s, float("-inf"))
    if CAUSAL:
        s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
    if WINDOW:
        diag = offs_m[:, None] + (Sk - Sq)  # the bottom-right aligned diagonal key of each query
        inside = (offs_n[None, :] >= diag - win_left) & (offs_n[None, :] <= diag + win_right)
        s = tl.where(inside, s, float("-inf"))
    return s, t


@triton.jit
def window_keys(start_m, end_m, Sq, Sk, win_left, win_right, BLOCK_N: tl.constexpr):
    """Key range [lo, hi) that queries [start_m, end_m) can see through the window (lo a multiple of BLOCK_N), and
    [full_lo, full_hi): the keys every one of those queries sees (no window mask needed there; may be empty)."""
    off = Sk - Sq
    lo = tl.maximum(start_m + off - win_left, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(end_m - 1 + off + win_right + 1, Sk)
    full_lo = end_m - 1 + off - win_left
    full_hi = start_m + off + win_right + 1
    return lo, tl.maximum(hi, lo), full_lo, full_hi


@triton.jit
def window_queries(start_n, end_n, Sq, Sk, win_left, win_right, BLOCK_M: tl.constexpr):
    """Query range [lo, hi) (lo a multiple of BLOCK_M) whose windows reach any of keys [start_n, end_n)."""
    off = Sk - Sq
    lo = tl.maximum(start_n - off - win_right, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(end_n - 1 - off + win_left + 1, Sq)
    return lo, tl.maximum(hi, lo)


@triton.jit
def tile_allowed(Mask, offs_m, offs_n, Sq, Sk, sm_m, sm_n, MASK_KIND: tl.constexpr):
    """False when the user mask allows no (query, key) pair of the tile (arguments as in ``scores``): the tile can be
    skipped before its matmuls."""
    if MASK_KIND == KIND_NONE:
        return True
    ok = (offs_m < Sq)[:, None] & (offs_n < Sk)[None, :]
    mv = tl.load(Mask + offs_m[:, None].to(tl.int64) * sm_m + offs_n[None, :].to(tl.int64) * sm_n, mask=ok, other=0)
    if MASK_KIND == KIND_BOOL:
        allowed = ok & (mv != 0)
    else:
        allowed = ok & (mv.to(tl.float32) > float("-inf"))
    return tl.max(allowed.to(tl.int32)) > 0


@triton.jit
def keep(seed, rng_rows, offs_n, dropout_p):
    """Dropout's keep mask of a tile, from Philox at (rng_rows[m] + key): rng_rows = offset + row * Sk_max, a
    function of (row, key) only, so the forward and the backward draw the same numbers whatever their tiles."""
    return tl.rand(seed, rng_rows[:, None] + offs_n[None, :]) >= dropout_p


@triton.jit
def load_tile(
    Ptr,  # the rows' base (pointer path): row r at Ptr + r * stride
    Desc,  # the host TMA descriptor of the dense (B, H, S, D) tensor (TMA path)
    b,  # batch index (TMA path)
    h,  # head index (TMA path)
    start,  # first row of the tile
    offs,  # [BLOCK_R] row positions (start + arange)
    offs_d,  # [BLOCK_D] head-dim positions
    S,  # rows of the sequence
    D,  # head dim
    stride,  # row stride (pointer path)
    TMA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows [start, start + BLOCK_R) x [0, BLOCK_D) of one (batch, head), zero beyond S and D. TMA: the copy engine
    zero-fills out-of-bounds rows and columns; otherwise masked pointer loads."""
    if TMA:
        return Desc.load([b, h, start, 0]).reshape(BLOCK_R, BLOCK_D)
    ok = (offs < S)[:, None] & (offs_d < D)[None, :]
    return tl.load(Ptr + offs[:, None].to(tl.int64) * stride + offs_d[None, :], mask=ok, other=0.0)


def dense_strides(t):
    """(stride_b, stride_h, stride_s) of a dense (B, H, S, D) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def varlen_strides(t):
    """(0, stride_h, stride_token) of a packed (total, H, D) tensor (one "batch": the sequences are rows)."""
    return 0, t.stride(1), t.stride(0)
