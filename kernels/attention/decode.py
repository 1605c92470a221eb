"""Split-KV attention forward (flash-decoding) for few queries against many keys: decode steps and KV caches.

The ordinary forward (forward.py) parallelises over query blocks; with Sq <= 16 that is one program per (batch,
head), each streaming all Sk keys, which leaves most of a GPU idle and reads a GQA group's keys once per query
head. Here the keys are split across programs and the query heads of a GQA group share one tile:

- ``decode_split_kernel``: grid (batch, kv head, split, row block). A program packs the Sq * GROUP queries of its
  kv head's GROUP query heads (row r = query r // GROUP of head hkv * GROUP + r % GROUP; padded to >= 16 rows for
  tl.dot) and runs the online softmax (base 2, as forward.py) over every n_splits-th key tile (split s: tiles s,
  s + n_splits, ...) of the keys any of its queries can see (the batch's length, cut to a window or top-left causal
  band): dealt in turn, so that every split has work even where the lengths (read on the device only) are far below
  the cache's capacity, from which the split count is chosen; a split with no tile writes an empty partial. It
  writes the partial o_s = acc / l (fp32) and lse2_s = m + log2(l) (-inf when no key of the split is visible) to
  scratch (B * H * Sq, splits, D) and (B * H * Sq, splits).
- ``decode_combine_kernel``: one program per (batch, head, query) merges the splits with their log-sum-exp, and the
  sink when given: M = max(lse2_s, sink2), w_s = exp2(lse2_s - M), den = sum_s w_s + exp2(sink2 - M),
  o = sum_s w_s o_s / den, lse = (M + log2(den)) ln 2. No visible key and no sink: o = 0, lse = -inf.

Same semantics as the ordinary forward (SPEC of issue 18): scale, softcap (c tanh(s / c) on the scaled scores), ALiBi
(-slope |i + off - j|), a bool or additive user mask (B, H, Sq, Sk) view, top-left causal, a bottom-right window
(off = L_b - Sq), sinks, and the same (o, lse), so the ordinary backward runs after it. Keys: dense
(B, Hkv, Sk, D), optionally with per-batch key counts L_b = seqlens[b] (<= Sk), or paged (num_blocks, block_size,
Hkv, D) with block_table (B, max_blocks) (key j of batch b: row j % block_size of block block_table[b, j //
block_size]). On the device seqlens are clamped into [0, capacity] and block indices into [0, num_blocks): invalid
values give unspecified results, never an out-of-bounds access (the host checks them where that costs no sync).

Bytes: the K/V rows read once per kv head (2 * B * Hkv * L * D * elt), plus the scratch (B * H * Sq * splits * D * 4,
written and read once): memory-bound, the split count fills the GPU.
"""

import functools
import os

import torch
import triton
import triton.language as tl
from fastlm.kernels import (
    KIND_BOOL,
    KIND_NONE,
    LN2,
    LOG2E,
    MASK_ADD,
    MASK_BOOL,
    MASK_NONE,
    empty,
    launch_grid,
    on_tensor_device,
)
from fastlm.kernels.attention.configs import INTERPRET, block_d, precision

MAX_DECODE_Q = 16  # the split-KV path takes at most this many queries per (batch, head)
SPLIT_KV_MIN_KEYS = 512  # attn_fwd routes here from this many keys on (fewer: the ordinary grid is as good)
MAX_SPLITS = 128
MIN_TILES_PER_SPLIT = 2 if INTERPRET else 4  # a split streams at least this many key tiles (256 keys on a GPU)


@triton.jit
def decode_split_kernel(
    Q,  # queries (B, H, Sq, D) any strides, unit last
    K,  # keys: dense (B, Hkv, Sk, D) or paged (num_blocks, block_size, Hkv, D); unit last stride
    V,  # values, K's layout
    Mask,  # user mask (B, H, Sq, Sk) view, bool or additive (MASK_KIND != none); else unused
    Seqlens,  # (B,) int32 keys per batch (SEQLENS); else unused
    BlockTable,  # (B, max_blocks) int32 (PAGED); else unused
    Alibi,  # (B, H) fp32 contiguous slopes (ALIBI); else unused
    OPart,  # (B * H * Sq, n_splits, D) fp32 partial outputs
    LPart,  # (B * H * Sq, n_splits) fp32 partial base-2 lse
    stride_qb,  # Q strides: batch, head, row
    stride_qh,
    stride_qm,
    stride_kb,  # K strides: batch (dense) or block (paged), head, row (dense) or row in the block (paged)
    stride_kh,
    stride_kn,
    stride_vb,  # V strides, as K's
    stride_vh,
    stride_vn,
    sm_b,  # Mask strides: batch, head, query, key (0 on broadcast dims)
    sm_h,
    sm_m,
    sm_n,
    stride_bt,  # BlockTable row stride
    H,  # query heads
    Hkv,  # kv heads
    GROUP,  # H // Hkv
    Sq,  # queries per (batch, head)
    Sk_cap,  # key capacity per batch: Sk (dense) or max_blocks * block_size (paged)
    D,  # head dim
    n_splits,  # splits of the key range
    n_mblocks,  # row blocks: cdiv(Sq * GROUP, BLOCK_M)
    block_size,  # rows per page (PAGED)
    num_blocks,  # pages in the cache (PAGED: block indices are clamped into [0, num_blocks))
    scale,  # softmax scale (natural units)
    softcap,  # soft-cap c (SOFTCAP)
    window_left,  # -1 = unbounded (WINDOW)
    window_right,
    MASK_KIND: tl.constexpr,  # none / bool / additive (fastlm.kernels.MASK_*)
    CAUSAL: tl.constexpr,  # top-left causal: key j <= query i
    WINDOW: tl.constexpr,  # bottom-right window (window_left / window_right)
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    SEQLENS: tl.constexpr,
    PAGED: tl.constexpr,
    BLOCK_M: tl.constexpr,  # packed rows per program (>= 16)
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two
    EVEN_D: tl.constexpr,  # D == BLOCK_D: no head-dim mask on the loads (keeps them 128-bit wide)
    PREC: tl.constexpr,  # tl.dot input precision ("ieee" for fp32)
):
    pid = tl.program_id(0)
    mblk = pid % n_mblocks  # row blocks of one (batch, kv head, split) are neighbours: they read the same keys
    rest = pid // n_mblocks
    split = rest % n_splits
    bh = rest // n_splits
    b = bh // Hkv
    hkv = bh % Hkv
    b64 = b.to(tl.int64)
    L = Sk_cap + b * 0
    if SEQLENS:
        L = tl.minimum(tl.maximum(tl.load(Seqlens + b), 0), Sk_cap)
    off = L - Sq  # bottom-right alignment of the window and of ALiBi
    # packed rows: r -> (query i, head h)
    offs_r = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < Sq * GROUP
    i_r = offs_r // GROUP
    h_r = hkv * GROUP + offs_r % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < D) | EVEN_D
    offs_n0 = tl.arange(0, BLOCK_N)
    # the keys some row of this block can see, cut to this split
    i_lo = mblk * BLOCK_M // GROUP
    i_hi = tl.minimum((mblk * BLOCK_M + BLOCK_M - 1) // GROUP, Sq - 1)
    lo = b * 0
    hi = L
    if CAUSAL:
        hi = tl.minimum(hi, i_hi + 1)
    if WINDOW:
        if window_left >= 0:
            lo = tl.maximum(lo, tl.maximum(i_lo + off - window_left, 0))
        if window_right >= 0:
            hi = tl.minimum(hi, i_hi + off + window_right + 1)
    q_ptrs = Q + b64 * stride_qb + h_r[:, None].to(tl.int64) * stride_qh + i_r[:, None].to(tl.int64) * stride_qm
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_head = K + hkv.to(tl.int64) * stride_kh
    v_head = V + hkv.to(tl.int64) * stride_vh
    mask_rows = Mask + b64 * sm_b + h_r.to(tl.int64) * sm_h + i_r.to(tl.int64) * sm_m  # [BLOCK_M]
    slope2 = tl.zeros([BLOCK_M], tl.float32)
    if ALIBI:
        slope2 = tl.load(Alibi + b64 * H + h_r, mask=row_ok, other=0.0) * LOG2E
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # the key tiles of [lo, hi) are dealt to the splits in turn (split s takes tiles s, s + n_splits, ...), so that
    # every split has work whatever the keys' actual count: a cache allocated far beyond its sequences (lengths
    # only known on the device) still spreads over all the programs
    t0 = lo // BLOCK_N
    first = t0 + (split - t0 % n_splits + n_splits) % n_splits
    for start_n in range(first * BLOCK_N, hi, n_splits * BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < hi
        if PAGED:
            blk = tl.load(BlockTable + b64 * stride_bt + offs_n // block_size, mask=n_ok, other=0)
            blk = tl.minimum(tl.maximum(blk, 0), num_blocks - 1)
            k_off = blk.to(tl.int64) * stride_kb + (offs_n % block_size).to(tl.int64) * stride_kn
            v_off = blk.to(tl.int64) * stride_vb + (offs_n % block_size).to(tl.int64) * stride_vn
        else:
            k_off = b64 * stride_kb + offs_n.to(tl.int64) * stride_kn
            v_off = b64 * stride_vb + offs_n.to(tl.int64) * stride_vn
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_head + k_off[:, None] + offs_d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        if SOFTCAP:  # c tanh(scale qk / c), tanh(x) = 1 - 2 / (exp(2x) + 1)
            t = tl.math.exp2(s * (2.0 * LOG2E * scale / softcap))
            s = (softcap * LOG2E) * (1.0 - 2.0 / (t + 1.0))
        else:
            s = s * (scale * LOG2E)
        if ALIBI:
            dist = tl.abs(i_r[:, None] + off - offs_n[None, :]).to(tl.float32)
            s = s - slope2[:, None] * dist
        ok = row_ok[:, None] & n_ok[None, :]
        if MASK_KIND != KIND_NONE:
            mv = tl.load(mask_rows[:, None] + offs_n[None, :].to(tl.int64) * sm_n, mask=ok, other=0)
            if MASK_KIND == KIND_BOOL:
                ok = ok & (mv != 0)
            else:
                s = s + mv.to(tl.float32) * LOG2E
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= i_r[:, None])
        if WINDOW:
            ok = ok & ((window_left < 0) | (offs_n[None, :] >= i_r[:, None] + off - window_left))
            ok = ok & ((window_right < 0) | (offs_n[None, :] <= i_r[:, None] + off + window_right))
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + v_off[:, None] + offs_d[None, :], mask=kv_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    part = ((b64 * H + h_r) * Sq + i_r) * n_splits + split  # [BLOCK_M] scratch row of (b, h, i, split)
    o_ptrs = OPart + part[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(o_ptrs, acc / l_safe[:, None], mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LPart + part, tl.where(empty_row, float("-inf"), m_i + tl.math.log2(l_safe)), mask=row_ok)


@triton.jit
def decode_combine_kernel(
    OPart,  # (B * H * Sq, n_splits, D) fp32 partial outputs
    LPart,  # (B * H * Sq, n_splits) fp32 partial base-2 lse (-inf: an empty split)
    Sinks,  # (H,) fp32 sink logits, natural units (SINKS); else unused
    O,  # output (B, H, Sq, D), q's dtype, strides below
    Lse,  # (B, H, Sq) fp32 contiguous, natural units
    stride_ob,  # O strides: batch, head, row
    stride_oh,
    stride_om,
    H,  # query heads
    Sq,  # queries per (batch, head)
    D,  # head dim
    n_splits,
    SINKS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # n_splits padded to a power of two
    SPLIT_TILE: tl.constexpr,  # partial rows merged per step
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,  # D == BLOCK_D: no head-dim mask
):
    row = tl.program_id(0)  # (b * H + h) * Sq + i
    i = row % Sq
    h = (row // Sq) % H
    b = row // (Sq * H)
    row64 = row.to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < D) | EVEN_D
    lse_s = tl.load(LPart + row64 * n_splits + offs_s, mask=offs_s < n_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    sink2 = float("-inf")
    if SINKS:
        sink2 = tl.load(Sinks + h) * LOG2E
        m = tl.maximum(m, sink2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse_s - m_safe)  # 0 for empty splits
    den = tl.sum(w, 0)
    if SINKS:
        den += tl.math.exp2(sink2 - m_safe)
    o = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, n_splits, SPLIT_TILE):  # SPLIT_TILE partial rows per load (independent, issued together)
        offs_t = s0 + tl.arange(0, SPLIT_TILE)
        t_ok = offs_t < n_splits
        w_t = tl.math.exp2(tl.load(LPart + row64 * n_splits + offs_t, mask=t_ok, other=float("-inf")) - m_safe)
        ok = (t_ok & (w_t > 0.0))[:, None] & d_ok[None, :]  # an empty split's row is not read
        part = tl.load(OPart + (row64 * n_splits + offs_t)[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
        o += tl.sum(w_t[:, None] * part, 0)
    den_safe = tl.where(den == 0.0, 1.0, den)
    o = o / den_safe
    lse = tl.where(den == 0.0, float("-inf"), (m_safe + tl.math.log2(den_safe)) * LN2)
    o_ptr = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + i.to(tl.int64) * stride_om
    tl.store(o_ptr + offs_d, o.to(O.dtype.element_ty), mask=d_ok)
    tl.store(Lse + row64, lse)


# ---------------------------------------------------------------------------------------------------------------
# Launch heuristics


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached); a small stand-in under the interpreter."""
    if INTERPRET or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_config(rows: int, D: int, dtype: torch.dtype) -> dict:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for ``rows`` = Sq * GROUP packed rows at head dim D."""
    if INTERPRET:
        return dict(BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=16, num_warps=4, num_stages=1)
    bd = block_d(D)
    fp32 = dtype == torch.float32
    # static sm_90 compiles (fastlm/bench/shipped.py, Triton 3.6 and 3.8): fp32 spills at 32 rows (D = 256 with a
    # mask: 6 KB; D = 128 paged without a mask: 152-392 B), none at 16; bf16 at D = 128 takes 255 registers with 4
    # warps at 16 rows (8 warps: 154)
    block_m = min(max(16, triton.next_power_of_2(rows)), 16 if fp32 else 32 if bd > 128 else 64)
    block_n = 16 if fp32 else 32 if bd > 128 else 64  # fp32: 32 keys spill a few bytes at D = 64 and 256
    # fp32 16 x 16 tiles: 4 warps (8 warps left 8 B of stack at D = 128 with a mask, Triton 3.6 and 3.8)
    warps = 8 if bd >= 128 and not fp32 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=2 if fp32 else 3)


def num_splits(programs: int, Sk: int, block_n: int, device: torch.device) -> int:
    """Key splits so that ``programs`` (batch x kv heads x row blocks) times the splits fill about two waves of the
    device's SMs, each split streaming at least MIN_TILES_PER_SPLIT key tiles."""
    tiles = triton.cdiv(Sk, block_n)
    want = triton.cdiv(2 * sm_count(device), max(programs, 1))
    return max(1, min(want, tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))


def use_split_kv(q: torch.Tensor, k: torch.Tensor, dropout_p: float, varlen: bool = False) -> bool:
    """Whether attn_fwd runs this dense call on the split-KV path: no dropout, Sq <= MAX_DECODE_Q, Sk >=
    SPLIT_KV_MIN_KEYS, and either GQA (a group's query heads share one tile here: the keys are read once per kv
    head, not once per query head) or an ordinary grid (one program per 64 queries of each (batch, head)) that would
    not fill two waves of the GPU. FASTLM_SPLIT_KV=0 / 1 forces it off / on (for dense calls without dropout with Sq <=
    MAX_DECODE_Q; tests)."""
    if varlen or dropout_p > 0 or q.dim() != 4 or q.shape[2] > MAX_DECODE_Q:
        return False
    forced = os.environ.get("FASTLM_SPLIT_KV")
    if forced is not None and forced != "":
        return forced == "1"
    B, H, Sq = q.shape[:3]
    gqa = k.shape[1] < H  # the ordinary grid reads a kv head once per query head; here once per group
    return k.shape[2] >= SPLIT_KV_MIN_KEYS and (gqa or B * H * triton.cdiv(Sq, 64) < 2 * sm_count(q.device))


# ---------------------------------------------------------------------------------------------------------------
# Host function


@on_tensor_device
def decode_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    *,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    seqlens: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    splits: int | None = None,
    config: dict | None = None,
):
    """Split-KV forward: (o, lse), as attn_fwd's dense forward.

    Args:
        q: (B, H, Sq, D), any strides with a unit last stride; Sq small (any value works, the tile holds Sq * GROUP
            rows in blocks).
        k, v: dense (B, Hkv, Sk, D), or paged (num_blocks, block_size, Hkv, D) with ``block_table``; unit last
            stride. H a multiple of Hkv.
        mask: None or a (B, H, Sq, Sk) view (bool, True = attend, or additive float); dense keys only.
        scale, causal (top-left), window (left, right; -1 unbounded; bottom-right with off = L_b - Sq), softcap
            (0 = none), sinks (H,) fp32, alibi (B, H) fp32 slopes: the semantics of SPEC (attn_fwd's).
        seqlens: (B,) int32 keys of each batch (<= Sk, or <= max_blocks * block_size paged); None = all.
        block_table: (B, max_blocks) int32 page indices (paged keys).
        out: where to write o (a (B, H, Sq, D) view, e.g. of a (B, Sq, H, D) tensor); None = a new contiguous one.
        splits: force the number of key splits (tests); None = ``num_splits``.
        config: force the launch config (a ``decode_config`` dict; tests); None = ``decode_config``.

    Returns:
        o (q's shape and dtype) and lse (B, H, Sq) fp32, natural log.
    """
    B, H, Sq, D = q.shape
    paged = block_table is not None
    if paged:
        Hkv, bs = k.shape[2], k.shape[1]
        Sk_cap = block_table.shape[1] * bs
        k_strides = (k.stride(0), k.stride(2), k.stride(1))
        v_strides = (v.stride(0), v.stride(2), v.stride(1))
    else:
        Hkv, bs = k.shape[1], 1
        Sk_cap = k.shape[2]
        k_strides = (k.stride(0), k.stride(1), k.stride(2))
        v_strides = (v.stride(0), v.stride(1), v.stride(2))
    if mask is not None and (paged or seqlens is not None):
        raise ValueError("decode_fwd: a user mask needs dense keys without seqlens")
    o = empty(q.shape, q.dtype, q.device) if out is None else out
    lse = empty((B, H, Sq), torch.float32, q.device)
    if o.numel() == 0 or Sq == 0:
        return o, lse
    group = H // Hkv
    cfg = config or decode_config(Sq * group, D, q.dtype)
    n_mblocks = triton.cdiv(Sq * group, cfg["BLOCK_M"])
    n_split = splits if splits is not None else num_splits(B * Hkv * n_mblocks, Sk_cap, cfg["BLOCK_N"], q.device)
    n_split = max(1, min(n_split, triton.cdiv(max(Sk_cap, 1), cfg["BLOCK_N"])))
    o_part = torch.empty((B * H * Sq, n_split, D), dtype=torch.float32, device=q.device)
    l_part = torch.empty((B * H * Sq, n_split), dtype=torch.float32, device=q.device)
    mask_kind = MASK_NONE if mask is None else (MASK_BOOL if mask.dtype == torch.bool else MASK_ADD)
    wl, wr = int(window[0]), int(window[1])
    dummy = l_part  # any device tensor for the unused pointers
    decode_split_kernel[launch_grid(B * Hkv * n_split * n_mblocks)](
        q,
        k,
        v,
        mask if mask is not None else dummy,
        seqlens if seqlens is not None else dummy,
        block_table if paged else dummy,
        alibi if alibi is not None else dummy,
        o_part,
        l_part,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        *k_strides,
        *v_strides,
        *(mask.stride() if mask is not None else (0, 0, 0, 0)),
        block_table.stride(0) if paged else 0,
        H,
        Hkv,
        group,
        Sq,
        Sk_cap,
        D,
        n_split,
        n_mblocks,
        bs,
        k.shape[0] if paged else 1,
        float(scale),
        float(softcap) if softcap else 1.0,
        wl,
        wr,
        MASK_KIND=mask_kind,
        CAUSAL=bool(causal),
        WINDOW=wl >= 0 or wr >= 0,
        SOFTCAP=bool(softcap),
        ALIBI=alibi is not None,
        SEQLENS=seqlens is not None,
        PAGED=paged,
        BLOCK_D=block_d(D),
        EVEN_D=D == block_d(D),
        PREC=precision(q.dtype),
        **cfg,
    )
    decode_combine_kernel[launch_grid(B * H * Sq)](
        o_part,
        l_part,
        sinks if sinks is not None else dummy,
        o,
        lse,
        o.stride(0),
        o.stride(1),
        o.stride(2),
        H,
        Sq,
        D,
        n_split,
        SINKS=sinks is not None,
        BLOCK_S=max(2, triton.next_power_of_2(n_split)),
        SPLIT_TILE=min(16, max(2, triton.next_power_of_2(n_split))),
        BLOCK_D=block_d(D),
        EVEN_D=D == block_d(D),
        num_warps=1 if INTERPRET else 4,
    )
    return o, lse
