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
    MASK_KIND: tl.constexpr,  # KIND_NONE, KIND_BOOL (True = attend) or KIND_ADD (added to the scores)
    CAUSAL: tl.constexpr,  # keys after the query masked (top-left aligned)
    CHECK: tl.constexpr,  # keys at or past Sk masked (a ragged last tile)
    PREC: tl.constexpr,  # tl.dot's input precision ("ieee" for fp32 inputs)
):
    """Base-2 scores q k^T * scale * log2(e) of a [BLOCK_M, BLOCK_N] tile, -inf where masked."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
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
    return s


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
