"""Flash attention forward in Triton: SDPA semantics, masks read tile by tile, GQA, dropout, varlen.

FA2 scheme: each program owns BLOCK_M queries of one (sequence, head) and streams BLOCK_N keys at a time; with
s2 = q k^T * scale * log2(e) (+ mask bias), in base 2 so that exp2 is used:
    m_new = max(m, rowmax(s2)); p = exp2(s2 - m_new); l = l * exp2(m - m_new) + rowsum(p)
    acc = acc * exp2(m - m_new) + dropout(p) v;      o = acc / l;  lse = (m + log2(l)) * ln(2)
Causal masking (top-left, key <= query, as torch) costs only on the diagonal band: the key blocks entirely at or
below the diagonal run without masks (off-band); the band and a ragged last block run with masks (on-band).
A user mask (bool, True = attend, or additive float; broadcast dims have stride 0) is read tile by tile, and a tile
whose mask allows nothing is skipped before its matmuls. A query whose keys are all masked gets a zero output, zero
gradients and lse = -inf. Dropout: Philox numbers from (seed, offset + row * Sk_max + key), regenerated in the
backward (backward.py), so no mask is stored; the normaliser l uses the undropped probabilities, as torch.

Score modifiers (constexpr flags, off by default, when they compile to exactly the plain kernel): a sliding window
(WINDOW: keys i + off - left .. i + off + right, off = Sk - Sq per sequence, bottom-right aligned; the loop visits
only the band's key tiles, masked on the band's edge tiles and unmasked inside), a soft cap (SOFTCAP: c * tanh(s / c)
on the scaled scores, in natural units), ALiBi (ALIBI: s -= slope * |i + off - j|) and sinks (SINKS: the online
softmax starts from m = sink, l = 1, a key with no value; lse includes it). Order: cap, ALiBi, mask, causal/window.

Hopper (sm_90): when the layout allows (fp16/bf16, 16-byte aligned base and strides) Q, K and V come through host
TMA descriptors (out-of-bounds rows and head-dim columns are zero-filled by the copy engine, so no masks on those
loads). On Triton 3.6 the autotune space also holds warp-specialised configs (WS: one TMA producer warp group, two
consumer warp groups; Triton's pass takes a single plain loop, so the WS variant runs one loop with the causal and
bounds masks on every tile, and is used only without a user mask or dropout). Launch configs and the rules that
pick them: configs.py.

Layouts: q (B, H, Sq, D), k/v (B, Hkv, Sk, D), any strides with a unit last stride; varlen: (total, H, D) with
cu_seqlens (int32, n + 1). lse: (B, H, Sq) fp32, or (H, total_q) for varlen. Head dims up to 256, padded to a power
of two inside the kernel (masked loads), never with a copy.

FLOPs: 4 * B * H * Sq * Sk * D (half with causal).
"""

import torch
import triton
import triton.language as tl
from fastlm.kernels import LN2, LOG2E, MASK_ADD, MASK_BOOL, MASK_NONE, empty, launch_grid, on_tensor_device
from fastlm.kernels.attention import decode  # split-KV decode hook in attn_fwd
from fastlm.kernels.attention.configs import (
    FWD_BOXES,
    FWD_FP32,
    FWD_LEAN,
    FWD_PTR,
    FWD_TMA,
    INTERPRET,
    WS_TRITON,
    autotune_enabled,
    autotuned,
    block_d,
    descriptor,
    fp32_case,
    fwd_configs,
    is_lean,
    lean_case,
    precision,
    use_tma,
    ws_ok,
)
from fastlm.kernels.attention.tiles import (
    dense_strides,
    dropout_seed,
    keep,
    load_tile,
    scores,
    seq_bounds,
    tile_allowed,
    tile_ids,
    varlen_strides,
    window_keys,
)


@triton.jit
def fwd_block(
    acc,  # [BLOCK_M, BLOCK_D] fp32 running sum of p v
    m_i,  # [BLOCK_M] running max of the base-2 scores
    l_i,  # [BLOCK_M] running sum of exp2(s2 - m_i)
    q,  # [BLOCK_M, BLOCK_D] the program's queries
    k_rows,  # this (batch, kv head)'s first key row (pointer path); row r at k_rows + r * stride_kn
    v_rows,  # this (batch, kv head)'s first value row (pointer path)
    KDesc,  # K's TMA descriptor (TMA path)
    VDesc,  # V's TMA descriptor (TMA path)
    b,  # batch index
    hkv,  # kv head index
    mask_rows,  # this (batch, head)'s user mask: element (m, n) at m * sm_m + n * sm_n
    start_n,  # first key of this tile
    offs_m,  # [BLOCK_M] query positions
    offs_n0,  # [BLOCK_N] arange(0, BLOCK_N)
    offs_d,  # [BLOCK_D] head-dim positions
    Sq,  # queries of the sequence
    Sk,  # keys of the sequence
    D,  # head dim
    stride_kn,  # K row stride
    stride_vn,  # V row stride
    sm_m,  # mask stride over queries
    sm_n,  # mask stride over keys
    qk_scale,  # softmax scale * log2(e)
    dropout_p,  # dropout probability
    seed,  # dropout's Philox seed
    rng_rows,  # [BLOCK_M] Philox offset of each query row's first key
    softcap,  # soft cap c (SOFTCAP)
    slope2,  # ALiBi slope * log2(e) (ALIBI)
    win_left,  # window extents, -1 mapped to Sq_max + Sk_max (WINDOW)
    win_right,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,  # the causal mask on this tile (on-band)
    CHECK: tl.constexpr,  # the key-bounds mask on this tile (on-band)
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
    TMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    WINDOW: tl.constexpr,  # the window mask on this tile (a tile straddling the band's edge)
):
    """One key tile of the online softmax: returns the updated (acc, m_i, l_i)."""
    offs_n = start_n + offs_n0
    if tile_allowed(mask_rows, offs_m, offs_n, Sq, Sk, sm_m, sm_n, MASK_KIND):
        k = load_tile(k_rows, KDesc, b, hkv, start_n, offs_n, offs_d, Sk, D, stride_kn, TMA, BLOCK_N, BLOCK_D)
        s, _ = scores(
            q,
            k,
            mask_rows,
            offs_m,
            offs_n,
            Sq,
            Sk,
            sm_m,
            sm_n,
            qk_scale,
            softcap,
            slope2,
            win_left,
            win_right,
            MASK_KIND,
            CAUSAL,
            CHECK,
            PREC,
            SOFTCAP,
            ALIBI,
            WINDOW,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            p = tl.where(keep(seed, rng_rows, offs_n, dropout_p), p / (1.0 - dropout_p), 0.0)
        v = load_tile(v_rows, VDesc, b, hkv, start_n, offs_n, offs_d, Sk, D, stride_vn, TMA, BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attn_fwd_kernel(
    Q,  # queries: dense (B, H, Sq, D) or varlen (total_q, H, D); unit last stride
    K,  # keys: (B, Hkv, Sk, D) or (total_k, Hkv, D)
    V,  # values, K's shape
    QDesc,  # TMA descriptor of Q (TMA), boxes [1, 1, BLOCK_M, BLOCK_D]; else unused (any pointer)
    KDesc,  # TMA descriptor of K (TMA), boxes [1, 1, BLOCK_N, BLOCK_D]
    VDesc,  # TMA descriptor of V (TMA), boxes [1, 1, BLOCK_N, BLOCK_D]
    Mask,  # user mask (B, H, Sq, Sk) view, bool or additive (MASK_KIND != none); else unused
    O,  # output, Q's shape, its own strides
    Lse,  # (B, H, Sq) or (H, total_q) fp32 log-sum-exp of the scores
    CuQ,  # (n + 1,) int32 query offsets (VARLEN); else unused
    CuK,  # (n + 1,) int32 key offsets (VARLEN); else unused
    Sinks,  # (H,) fp32 per-head sink logits, natural units (SINKS); else unused
    Alibi,  # (B, H) or (n, H) fp32 contiguous ALiBi slopes (ALIBI); else unused
    stride_qb,  # Q strides: batch (0 for varlen), head, row
    stride_qh,
    stride_qm,
    stride_kb,  # K strides: batch, head, row
    stride_kh,
    stride_kn,
    stride_vb,  # V strides: batch, head, row
    stride_vh,
    stride_vn,
    stride_ob,  # O strides: batch, head, row
    stride_oh,
    stride_om,
    sm_b,  # Mask strides: batch, head, query, key (0 on broadcast dims)
    sm_h,
    sm_m,
    sm_n,
    lse_sb,  # Lse strides: batch, head (rows are contiguous)
    lse_sh,
    H,  # query heads
    GROUP,  # query heads per kv head (GQA), H // Hkv
    Sq_max,  # queries per sequence (dense) or max_seqlen_q (varlen)
    Sk_max,  # keys per sequence (dense) or max_seqlen_k (varlen)
    D,  # head dim
    qk_scale,  # softmax scale * log2(e)
    dropout_p,  # dropout probability (DROPOUT)
    Seed,  # (1,) int64 Philox seed on the device (DROPOUT); else unused
    rng_offset,  # Philox offset of row 0, key 0
    softcap,  # soft cap c > 0 (SOFTCAP)
    win_left,  # window: keys j < i + off - win_left masked; -1 (unbounded) mapped to Sq_max + Sk_max (WINDOW)
    win_right,  # window: keys j > i + off + win_right masked; likewise
    MASK_KIND: tl.constexpr,  # none / bool / additive (fastlm.kernels.MASK_*)
    CAUSAL: tl.constexpr,  # top-left aligned causal mask
    DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,  # packed sequences: Q, K, V rows through CuQ / CuK
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two
    PREC: tl.constexpr,  # tl.dot input precision ("ieee" for fp32)
    TMA: tl.constexpr,  # Q, K, V through the descriptors
    WS: tl.constexpr,  # warp-specialised: one loop over every key tile (Triton 3.6, TMA, no mask, no dropout)
    SOFTCAP: tl.constexpr,  # s = c * tanh(s / c) on the scaled scores
    SINKS: tl.constexpr,  # a per-head sink logit in every row's denominator
    ALIBI: tl.constexpr,  # s -= slope * |i + off - j|
    WINDOW: tl.constexpr,  # sliding window (bottom-right aligned): key tiles outside the band are never visited
):
    pid_m, bh = tile_ids(Sq_max, BLOCK_M)
    b = bh // H
    h = bh % H
    seed = dropout_seed(Seed, DROPOUT)
    q0, k0, Sq, Sk = seq_bounds(CuQ, CuK, b, Sq_max, Sk_max, VARLEN)
    start_m = pid_m * BLOCK_M
    if VARLEN:  # dense launches cover exactly cdiv(Sq, BLOCK_M) blocks (and warp specialisation needs no exit)
        if start_m >= Sq:
            return
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    hkv = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
    q_rows = Q + b64 * stride_qb + q0.to(tl.int64) * stride_qm + h64 * stride_qh
    q = load_tile(q_rows, QDesc, b, h, start_m, offs_m, offs_d, Sq, D, stride_qm, TMA, BLOCK_M, BLOCK_D)
    k_rows = K + b64 * stride_kb + k0.to(tl.int64) * stride_kn + (h64 // GROUP) * stride_kh
    v_rows = V + b64 * stride_vb + k0.to(tl.int64) * stride_vn + (h64 // GROUP) * stride_vh
    mask_rows = Mask + b64 * sm_b + h64 * sm_h
    lse_row = b64 * lse_sb + h64 * lse_sh + q0.to(tl.int64) + offs_m  # also the dropout row index
    rng_rows = rng_offset + lse_row * Sk_max
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if SINKS:  # the sink: a key of logit sinks[h] and no value, which the online softmax starts from
        m_i = tl.full([BLOCK_M], 0.0, tl.float32) + tl.load(Sinks + h) * LOG2E
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(Alibi + b64 * H + h64) * LOG2E
    if CAUSAL:
        hi = tl.minimum(Sk, start_m + BLOCK_M)
        full_hi = tl.minimum(start_m + 1, Sk) // BLOCK_N * BLOCK_N  # every key <= every query of the block
    else:
        hi = Sk
        full_hi = Sk // BLOCK_N * BLOCK_N
    # WS: Triton's Hopper warp specialisation takes a single plain loop, so the masked loop covers every tile
    lo = 0
    if WINDOW:  # only the band's tiles [lo, hi): masked [lo, mid), unmasked [mid, full_hi), masked [full_hi, hi)
        lo, w_hi, w_full_lo, w_full_hi = window_keys(
            start_m, tl.minimum(start_m + BLOCK_M, Sq), Sq, Sk, win_left, win_right, BLOCK_N
        )
        hi = tl.maximum(tl.minimum(hi, w_hi), lo)
        mid = tl.minimum(tl.maximum(lo, tl.cdiv(tl.maximum(w_full_lo, 0), BLOCK_N) * BLOCK_N), hi)
        full_hi = tl.maximum(mid, tl.minimum(full_hi, tl.maximum(w_full_hi, 0) // BLOCK_N * BLOCK_N))
    if not WS:
        if WINDOW:
            for start_n in range(lo, mid, BLOCK_N):  # the band's leading edge: masked
                acc, m_i, l_i = fwd_block(
                    acc,
                    m_i,
                    l_i,
                    q,
                    k_rows,
                    v_rows,
                    KDesc,
                    VDesc,
                    b,
                    hkv,
                    mask_rows,
                    start_n,
                    offs_m,
                    offs_n0,
                    offs_d,
                    Sq,
                    Sk,
                    D,
                    stride_kn,
                    stride_vn,
                    sm_m,
                    sm_n,
                    qk_scale,
                    dropout_p,
                    seed,
                    rng_rows,
                    softcap,
                    slope2,
                    win_left,
                    win_right,
                    MASK_KIND,
                    CAUSAL,
                    True,
                    DROPOUT,
                    PREC,
                    TMA,
                    BLOCK_N,
                    BLOCK_D,
                    SOFTCAP,
                    ALIBI,
                    True,
                )
            lo = mid
        for start_n in range(lo, full_hi, BLOCK_N):  # off-band: no causal, bounds or window masks
            acc, m_i, l_i = fwd_block(
                acc,
                m_i,
                l_i,
                q,
                k_rows,
                v_rows,
                KDesc,
                VDesc,
                b,
                hkv,
                mask_rows,
                start_n,
                offs_m,
                offs_n0,
                offs_d,
                Sq,
                Sk,
                D,
                stride_kn,
                stride_vn,
                sm_m,
                sm_n,
                qk_scale,
                dropout_p,
                seed,
                rng_rows,
                softcap,
                slope2,
                win_left,
                win_right,
                MASK_KIND,
                False,
                False,
                DROPOUT,
                PREC,
                TMA,
                BLOCK_N,
                BLOCK_D,
                SOFTCAP,
                ALIBI,
                False,
            )
        lo = full_hi
    # on-band: the diagonal and the ragged last block (with WS: every tile)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        acc, m_i, l_i = fwd_block(
            acc,
            m_i,
            l_i,
            q,
            k_rows,
            v_rows,
            KDesc,
            VDesc,
            b,
            hkv,
            mask_rows,
            start_n,
            offs_m,
            offs_n0,
            offs_d,
            Sq,
            Sk,
            D,
            stride_kn,
            stride_vn,
            sm_m,
            sm_n,
            qk_scale,
            dropout_p,
            seed,
            rng_rows,
            softcap,
            slope2,
            win_left,
            win_right,
            MASK_KIND,
            CAUSAL,
            True,
            DROPOUT,
            PREC,
            TMA,
            BLOCK_N,
            BLOCK_D,
            SOFTCAP,
            ALIBI,
            WINDOW,
        )
    empty_row = l_i == 0.0  # never with a sink (l starts at 1; lse = the sink)
    l_safe = tl.where(empty_row, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty_row, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_rows = O + b64 * stride_ob + q0.to(tl.int64) * stride_om + h64 * stride_oh
    tl.store(o_rows + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :], o.to(O.dtype.element_ty), mask=q_ok)
    tl.store(Lse + lse_row, lse, mask=offs_m < Sq)


attn_fwd_tuned = autotuned(
    attn_fwd_kernel,
    (FWD_TMA, FWD_PTR, *({b: [c] for b, c in t.items()} for t in (*FWD_LEAN.values(), *FWD_FP32.values()))),
    FWD_BOXES,
    lambda kw: fwd_configs(
        kw["BLOCK_D"],
        kw["TMA"],
        ws_ok(kw["TMA"], kw["MASK_KIND"], kw["DROPOUT"], kw),
        False,
        lean_case(kw, fwd=True),
        fp32_case(kw),
    ),
)


# ---------------------------------------------------------------------------------------------------------------
# Host function. Validation, GQA head counts and layouts are prepared by fastlm.ops.attention.


def mask_kind_of(mask) -> int:
    """MASK_NONE / MASK_BOOL / MASK_ADD for a user mask tensor (or None)."""
    return MASK_NONE if mask is None else (MASK_BOOL if mask.dtype == torch.bool else MASK_ADD)


def feature_args(q, n_seq: int, H: int, Sq: int, Sk: int, window, softcap: float, sinks, alibi):
    """The kernels' feature flags (SOFTCAP, SINKS, ALIBI, WINDOW) and scalar arguments (softcap, win_left,
    win_right) after checking the feature tensors (n_seq sequences, H query heads, Sq / Sk the (max) lengths).
    A window side of -1 (unbounded) becomes Sq + Sk, which no query's band reaches past; window (-1, -1) is off."""
    left, right = (int(w) for w in window)
    if left < -1 or right < -1:
        raise ValueError(f"window: sides must be >= 0, or -1 for unbounded; got {tuple(window)}")
    if not softcap >= 0.0 or softcap == float("inf"):
        raise ValueError(f"softcap: expected a finite c >= 0 (0 = off), got {softcap}")
    if sinks is not None and (
        sinks.shape != (H,) or sinks.dtype != torch.float32 or sinks.device != q.device or not sinks.is_contiguous()
    ):
        raise ValueError(
            f"sinks: expected a contiguous ({H},) float32 tensor on {q.device}, got {tuple(sinks.shape)} {sinks.dtype}"
        )
    if alibi is not None and (
        alibi.shape != (n_seq, H)
        or alibi.dtype != torch.float32
        or alibi.device != q.device
        or not alibi.is_contiguous()
    ):
        raise ValueError(
            f"alibi: expected ({n_seq}, {H}) contiguous float32 slopes on {q.device}, got {tuple(alibi.shape)} "
            f"{alibi.dtype}"
        )
    win = (left, right) != (-1, -1)
    flags = dict(SOFTCAP=softcap > 0.0, SINKS=sinks is not None, ALIBI=alibi is not None, WINDOW=win)
    unbounded = Sq + Sk
    return flags, (float(softcap), left if left >= 0 else unbounded, right if right >= 0 else unbounded)


@on_tensor_device
def attn_fwd(
    q,
    k,
    v,
    mask,
    scale: float,
    causal: bool,
    dropout_p: float,
    seed: torch.Tensor,
    offset: int,
    cu_q=None,
    cu_k=None,
    max_q: int = 0,
    max_k: int = 0,
    config: dict | None = None,
    tma: bool | None = None,
    *,
    window: tuple = (-1, -1),
    softcap: float = 0.0,
    sinks=None,
    alibi=None,
):
    """o, lse. Dense: q (B, H, Sq, D), k/v (B, Hkv, Sk, D), mask a (B, H, Sq, Sk) view or None.
    Varlen: q (total_q, H, D), k/v (total_k, Hkv, D), cu_q/cu_k (n + 1,) int32; no mask.
    seed: dropout's Philox seed, an int64 tensor on q's device (read by the kernel, only with dropout_p > 0).
    config / tma: force a launch config (one of fwd_configs) and the TMA path (tests); None = the defaults.
    window: (left, right) keys around the bottom-right aligned diagonal i + Sk - Sq, -1 = unbounded on that side;
    softcap: c > 0 caps the scaled scores to c * tanh(s / c), 0 = off; sinks: (H,) fp32 per-head sink logits (in
    lse too); alibi: (B, H) fp32 slopes ((n, H) varlen), s -= slope * |i + Sk - Sq - j|. See feature_args."""
    # >>> split-KV decode hook (kernels/attention/decode.py): few queries, long keys; same (o, lse) as below
    if cu_q is None and config is None and tma is None and decode.use_split_kv(q, k, dropout_p):
        feature_args(q, q.shape[0], q.shape[1], q.shape[2], k.shape[2], window, softcap, sinks, alibi)  # checks
        kw = dict(window=window, softcap=softcap, sinks=sinks, alibi=alibi)
        return decode.decode_fwd(q, k, v, mask, scale, causal, **kw)
    # <<< split-KV decode hook
    varlen = cu_q is not None
    D = q.shape[-1]
    o = empty(q.shape, q.dtype, q.device)
    if varlen:
        n_seq, H, Hkv = cu_q.shape[0] - 1, q.shape[1], k.shape[1]
        Sq, Sk = max_q, max_k
        strides = varlen_strides
        lse = empty((H, q.shape[0]), torch.float32, q.device)
        lse_sb, lse_sh = 0, q.shape[0]
    else:
        n_seq, H, Sq = q.shape[0], q.shape[1], q.shape[2]
        Hkv, Sk = k.shape[1], k.shape[2]
        strides = dense_strides
        lse = empty((n_seq, H, Sq), torch.float32, q.device)
        lse_sb, lse_sh = H * Sq, Sq
    feats, (softcap_arg, wl, wr) = feature_args(q, n_seq, H, Sq, Sk, window, softcap, sinks, alibi)
    if o.numel() == 0 or Sq == 0:
        return o, lse
    if Sk == 0:  # no keys: every row is empty (zero output, lse = -inf, or the sink)
        lse.fill_(float("-inf"))
        if sinks is not None:
            lse.copy_(sinks[:, None].expand(H, lse.shape[1]) if varlen else sinks[None, :, None].expand(lse.shape))
        return o.zero_(), lse
    mask_kind = mask_kind_of(mask)
    tma = (not varlen and use_tma(q, k, v)) if tma is None else tma
    args = [
        q,
        k,
        v,
        q,
        k,
        v,
        mask if mask is not None else q,
        o,
        lse,
        cu_q if varlen else lse,
        cu_k if varlen else lse,
        sinks if sinks is not None else lse,
        alibi if alibi is not None else lse,
        *strides(q),
        *strides(k),
        *strides(v),
        *strides(o),
        *(mask.stride() if mask is not None else (0, 0, 0, 0)),
        lse_sb,
        lse_sh,
        H,
        H // Hkv,
        Sq,
        Sk,
        D,
        scale * LOG2E.value,
        dropout_p,
        seed,
        offset,
        softcap_arg,
        wl,
        wr,
    ]
    flags = dict(
        MASK_KIND=mask_kind,
        CAUSAL=causal,
        DROPOUT=dropout_p > 0.0,
        VARLEN=varlen,
        BLOCK_D=block_d(D),
        PREC=precision(q.dtype),
        TMA=tma,
        **feats,
    )
    if config is None and autotune_enabled(q):
        if tma:  # boxes are set per config by the pre-hook
            args[3:6] = [descriptor(t, 16) for t in (q, k, v)]
        attn_fwd_tuned[lambda meta: launch_grid(triton.cdiv(Sq, meta["BLOCK_M"]) * n_seq * H)](*args, **flags)
        return o, lse
    ws = ws_ok(tma, mask_kind, dropout_p > 0.0, feats)
    lean, fp32 = is_lean(mask_kind, dropout_p > 0.0, feats, tma, fwd=True), q.dtype == torch.float32
    cfg = dict(config or fwd_configs(D, tma, ws, lean=lean, fp32=fp32)[0])
    if cfg["WS"] and not (INTERPRET or (WS_TRITON and tma)):
        raise ValueError(f"warp-specialised configs need TMA and Triton 3.6 (this is {triton.__version__}): {cfg}")
    if tma:
        args[3:6] = [descriptor(q, cfg["BLOCK_M"]), descriptor(k, cfg["BLOCK_N"]), descriptor(v, cfg["BLOCK_N"])]
    attn_fwd_kernel[launch_grid(triton.cdiv(Sq, cfg["BLOCK_M"]) * n_seq * H)](*args, **flags, **cfg)
    return o, lse
