"""Flash attention forward and backward in Triton: SDPA semantics, masks read tile by tile, GQA, dropout, varlen.

Forward (FA2): each program owns BLOCK_M queries of one (sequence, head) and streams BLOCK_N keys at a time; with
s2 = q k^T * scale * log2(e) (+ mask bias), in base 2 so that exp2 is used:
    m_new = max(m, rowmax(s2)); p = exp2(s2 - m_new); l = l * exp2(m - m_new) + rowsum(p)
    acc = acc * exp2(m - m_new) + dropout(p) v;      o = acc / l;  lse = (m + log2(l)) * ln(2)
Causal masking (top-left, key <= query, as torch) costs only on the diagonal band: the key blocks entirely at or
below the diagonal run without masks (off-band); the band and a ragged last block run with masks (on-band).
A user mask (bool, True = attend, or additive float; broadcast dims have stride 0) is read tile by tile, and a tile
whose mask allows nothing is skipped before its matmuls. A query whose keys are all masked gets a zero output, zero
gradients and lse = -inf. Dropout: Philox numbers from (seed, offset + row * Sk_max + key), regenerated in the
backward, so no mask is stored; the normaliser l uses the undropped probabilities, as torch.

The backward lives in kernels/attention_bwd.py (FA2 scheme: preprocess, dK/dV, dQ; no atomics).

Hopper (sm_90): when the layout allows (fp16/bf16, 16-byte aligned base and strides) Q, K and V come through host
TMA descriptors (`use_tma`; out-of-bounds rows and head-dim columns are zero-filled by the copy engine, so no
masks on those loads). On Triton 3.6 the autotune space also holds warp-specialised configs (WS: one TMA producer
warp group, two consumer warp groups; Triton's pass takes a single plain loop, so the WS variant runs one loop with
the causal and bounds masks on every tile, and is used only without a user mask or dropout). Launch configs, TMA
and WS rules: kernels/attention_configs.py (per head dim, the default first; a user mask or dropout takes the lean
tables; FASTLM_AUTOTUNE=1 searches the list, keyed on head dim, causal, mask kind, dropout, layout and dtype).

Layouts: q (B, H, Sq, D), k/v (B, Hkv, Sk, D), any strides with a unit last stride; varlen: (total, H, D) with
cu_seqlens (int32, n + 1). lse: (B, H, Sq) fp32, or (H, total_q) for varlen. Head dims up to 256, padded to a power
of two inside the kernel (masked loads), never with a copy.

FLOPs: forward 4 * B * H * Sq * Sk * D (half with causal), backward 2.5x that.
"""

import torch
import triton
import triton.language as tl
from fastlm.kernels import empty, launch_grid, on_tensor_device
from fastlm.kernels.attention_configs import (  # noqa: F401 (re-exported: the configs are part of this kernel's API)
    FWD_BOXES,
    FWD_FP32,
    FWD_LEAN,
    FWD_PTR,
    FWD_TMA,
    INTERPRET,
    INTERPRET_CFG,
    MASK_ADD,
    MASK_BOOL,
    MASK_NONE,
    SM90_SMEM,
    WS_TRITON,
    _autotuned,
    _bucket,
    _tma_strides,
    _ws_ok,
    autotune_enabled,
    block_d,
    descriptor,
    fp32_case,
    fwd_configs,
    lean_case,
    precision,
    static_configs,
    use_tma,
)

LOG2E = 1.4426950408889634


@triton.jit
def _seq(CuQ, CuK, b, Sq_max, Sk_max, VARLEN: tl.constexpr):
    """(first query token, first key token, Sq, Sk) of sequence b."""
    if VARLEN:
        q0 = tl.load(CuQ + b)
        k0 = tl.load(CuK + b)
        return q0, k0, tl.load(CuQ + b + 1) - q0, tl.load(CuK + b + 1) - k0
    return b * 0, b * 0, Sq_max + b * 0, Sk_max + b * 0


@triton.jit
def _tile_ids(S_max, BLOCK: tl.constexpr):
    """(block index along the sequence, flattened batch * heads index) of this program. The grid is 1-D, with
    cdiv(S_max, BLOCK) consecutive programs per (batch, head), so that the blocks of one head run together (they
    share its K/V, or Q/dO, in L2) and batch * heads is not bound by the 65535 limit of grid axes y and z."""
    n = tl.cdiv(S_max, BLOCK)
    pid = tl.program_id(0)
    return pid % n, pid // n


@triton.jit
def _seed(Seed, DROPOUT: tl.constexpr):
    """Dropout's Philox seed, read from device memory (a CUDA graph replays the launch, not the host's value:
    the op draws a fresh seed tensor on the device per call, which graph capture keeps fresh per replay)."""
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    return seed


@triton.jit
def _scores(
    q,
    k,
    Mask,
    offs_m,
    offs_n,
    Sq,
    Sk,
    sm_m,
    sm_n,
    qk_scale,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    CHECK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Base-2 scores q k^T * scale * log2(e) of a [BLOCK_M, BLOCK_N] tile, masked."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASK_KIND != 0:
        ok = (offs_m < Sq)[:, None] & (offs_n < Sk)[None, :]
        mv = tl.load(Mask + offs_m[:, None].to(tl.int64) * sm_m + offs_n[None, :].to(tl.int64) * sm_n, mask=ok, other=0)
        if MASK_KIND == 1:
            s = tl.where(mv != 0, s, float("-inf"))
        else:
            s = s + mv.to(tl.float32) * 1.4426950408889634
    if CHECK:
        s = tl.where((offs_n < Sk)[None, :], s, float("-inf"))
    if CAUSAL:
        s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
    return s


@triton.jit
def _tile_allowed(Mask, offs_m, offs_n, Sq, Sk, sm_m, sm_n, MASK_KIND: tl.constexpr):
    """False when the user mask allows no (query, key) pair of the tile: the tile can be skipped."""
    if MASK_KIND == 0:
        return True
    ok = (offs_m < Sq)[:, None] & (offs_n < Sk)[None, :]
    mv = tl.load(Mask + offs_m[:, None].to(tl.int64) * sm_m + offs_n[None, :].to(tl.int64) * sm_n, mask=ok, other=0)
    if MASK_KIND == 1:
        allowed = ok & (mv != 0)
    else:
        allowed = ok & (mv.to(tl.float32) > float("-inf"))
    return tl.max(allowed.to(tl.int32)) > 0


@triton.jit
def _keep(seed, rng_rows, offs_n, dropout_p):
    """Dropout's keep mask of a tile, from Philox at (row * Sk_max + key)."""
    return tl.rand(seed, rng_rows[:, None] + offs_n[None, :]) >= dropout_p


@triton.jit
def _kv_tile(
    Ptr, Desc, b, h, start, offs, offs_d, S, D, stride, TMA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Rows [start, start + BLOCK_R) x [0, BLOCK_D) of one (batch, head), zero beyond S and D. TMA: through the
    host tensor descriptor of the dense (B, H, S, D) tensor (the copy engine zero-fills out-of-bounds rows and
    columns); otherwise masked pointer loads."""
    if TMA:
        return Desc.load([b, h, start, 0]).reshape(BLOCK_R, BLOCK_D)
    ok = (offs < S)[:, None] & (offs_d < D)[None, :]
    return tl.load(Ptr + offs[:, None].to(tl.int64) * stride + offs_d[None, :], mask=ok, other=0.0)


@triton.jit
def _fwd_block(
    acc,
    m_i,
    l_i,
    q,
    K_,
    V_,
    Kd,
    Vd,
    b,
    hkv,
    M_,
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
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    CHECK: tl.constexpr,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
    TMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_n = start_n + offs_n0
    if _tile_allowed(M_, offs_m, offs_n, Sq, Sk, sm_m, sm_n, MASK_KIND):
        k = _kv_tile(K_, Kd, b, hkv, start_n, offs_n, offs_d, Sk, D, stride_kn, TMA, BLOCK_N, BLOCK_D)
        s = _scores(q, k, M_, offs_m, offs_n, Sq, Sk, sm_m, sm_n, qk_scale, MASK_KIND, CAUSAL, CHECK, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            p = tl.where(_keep(seed, rng_rows, offs_n, dropout_p), p / (1.0 - dropout_p), 0.0)
        v = _kv_tile(V_, Vd, b, hkv, start_n, offs_n, offs_d, Sk, D, stride_vn, TMA, BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Qd,
    Kd,
    Vd,
    Mask,
    O,
    Lse,
    CuQ,
    CuK,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    sm_b,
    sm_h,
    sm_m,
    sm_n,
    lse_sb,
    lse_sh,
    H,
    GROUP,
    Sq_max,
    Sk_max,
    D,
    qk_scale,
    dropout_p,
    Seed,
    rng_offset,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
    TMA: tl.constexpr,
    WS: tl.constexpr,
):
    pid_m, bh = _tile_ids(Sq_max, BLOCK_M)
    b = bh // H
    h = bh % H
    seed = _seed(Seed, DROPOUT)
    q0, k0, Sq, Sk = _seq(CuQ, CuK, b, Sq_max, Sk_max, VARLEN)
    start_m = pid_m * BLOCK_M
    if VARLEN:  # dense launches cover exactly cdiv(Sq, BLOCK_M) blocks (and warp specialisation needs no exit)
        if start_m >= Sq:
            return
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
    Q_ = Q + b64 * stride_qb + q0.to(tl.int64) * stride_qm + h64 * stride_qh
    q = _kv_tile(Q_, Qd, b, h, start_m, offs_m, offs_d, Sq, D, stride_qm, TMA, BLOCK_M, BLOCK_D)
    K_ = K + b64 * stride_kb + k0.to(tl.int64) * stride_kn + (h64 // GROUP) * stride_kh
    V_ = V + b64 * stride_vb + k0.to(tl.int64) * stride_vn + (h64 // GROUP) * stride_vh
    M_ = Mask + b64 * sm_b + h64 * sm_h
    lse_row = b64 * lse_sb + h64 * lse_sh + q0.to(tl.int64) + offs_m  # also the dropout row index
    rng_rows = rng_offset + lse_row * Sk_max
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if CAUSAL:
        hi = tl.minimum(Sk, start_m + BLOCK_M)
        full_hi = tl.minimum(start_m + 1, Sk) // BLOCK_N * BLOCK_N  # every key <= every query of the block
    else:
        hi = Sk
        full_hi = Sk // BLOCK_N * BLOCK_N
    hkv = h // GROUP
    # WS: Triton's Hopper warp specialisation takes a single plain loop, so the masked loop covers every tile
    lo = 0
    if not WS:
        for start_n in range(0, full_hi, BLOCK_N):  # off-band: no causal or bounds masks
            acc, m_i, l_i = _fwd_block(
                acc,
                m_i,
                l_i,
                q,
                K_,
                V_,
                Kd,
                Vd,
                b,
                hkv,
                M_,
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
                MASK_KIND,
                False,
                False,
                DROPOUT,
                PREC,
                TMA,
                BLOCK_N,
                BLOCK_D,
            )
        lo = full_hi
    # on-band: the diagonal and the ragged last block (with WS: every tile)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        acc, m_i, l_i = _fwd_block(
            acc,
            m_i,
            l_i,
            q,
            K_,
            V_,
            Kd,
            Vd,
            b,
            hkv,
            M_,
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
            MASK_KIND,
            CAUSAL,
            True,
            DROPOUT,
            PREC,
            TMA,
            BLOCK_N,
            BLOCK_D,
        )
    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty_row, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    O_ = O + b64 * stride_ob + q0.to(tl.int64) * stride_om + h64 * stride_oh
    tl.store(O_ + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :], o.to(O.dtype.element_ty), mask=q_ok)
    tl.store(Lse + lse_row, lse, mask=offs_m < Sq)


_attn_fwd_tuned = _autotuned(
    _attn_fwd_kernel,
    (FWD_TMA, FWD_PTR, *({b: [c] for b, c in t.items()} for t in (*FWD_LEAN.values(), *FWD_FP32.values()))),
    FWD_BOXES,
    lambda kw: fwd_configs(
        kw["BLOCK_D"],
        kw["TMA"],
        _ws_ok(kw["TMA"], kw["MASK_KIND"], kw["DROPOUT"]),
        False,
        lean_case(kw),
        fp32_case(kw),
    ),
)


# ---------------------------------------------------------------------------------------------------------------
# Host functions. Validation, GQA head counts and layouts are prepared by fastlm.ops.attention.


def _dense_strides(t):  # (B, H, S, D) -> (stride_b, stride_h, stride_s)
    return t.stride(0), t.stride(1), t.stride(2)


def _varlen_strides(t):  # (total, H, D) -> (0, stride_h, stride_token)
    return 0, t.stride(1), t.stride(0)


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
):
    """o, lse. Dense: q (B, H, Sq, D), k/v (B, Hkv, Sk, D), mask a (B, H, Sq, Sk) view or None.
    Varlen: q (total_q, H, D), k/v (total_k, Hkv, D), cu_q/cu_k (n + 1,) int32; no mask.
    seed: dropout's Philox seed, an int64 tensor on q's device (read by the kernel, only with dropout_p > 0).
    config / tma: force a launch config (one of fwd_configs) and the TMA path (tests); None = the defaults."""
    varlen = cu_q is not None
    D = q.shape[-1]
    if varlen:
        n_seq, H, Hkv = cu_q.shape[0] - 1, q.shape[1], k.shape[1]
        Sq, Sk = max_q, max_k
        qs, ks, vs = _varlen_strides(q), _varlen_strides(k), _varlen_strides(v)
        o = empty(q.shape, q.dtype, q.device)
        os_ = _varlen_strides(o)
        lse = empty((H, q.shape[0]), torch.float32, q.device)
        lse_sb, lse_sh = 0, q.shape[0]
    else:
        n_seq, H, Sq = q.shape[0], q.shape[1], q.shape[2]
        Hkv, Sk = k.shape[1], k.shape[2]
        qs, ks, vs = _dense_strides(q), _dense_strides(k), _dense_strides(v)
        o = empty(q.shape, q.dtype, q.device)
        os_ = _dense_strides(o)
        lse = empty((n_seq, H, Sq), torch.float32, q.device)
        lse_sb, lse_sh = H * Sq, Sq
    if o.numel() == 0 or Sq == 0:
        return o, lse
    if Sk == 0:  # no keys: every row is empty (zero output, lse = -inf)
        return o.zero_(), lse.fill_(float("-inf"))
    mask_kind = MASK_NONE if mask is None else (MASK_BOOL if mask.dtype == torch.bool else MASK_ADD)
    sm = mask.stride() if mask is not None else (0, 0, 0, 0)
    tma = (not varlen and use_tma(q, k, v)) if tma is None else tma
    ws = _ws_ok(tma, mask_kind, dropout_p > 0.0)
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
        *qs,
        *ks,
        *vs,
        *os_,
        *sm,
        lse_sb,
        lse_sh,
        H,
        H // Hkv,
        Sq,
        Sk,
        D,
        scale * LOG2E,
        dropout_p,
        seed,
        offset,
    ]
    flags = dict(
        MASK_KIND=mask_kind,
        CAUSAL=causal,
        DROPOUT=dropout_p > 0.0,
        VARLEN=varlen,
        BLOCK_D=block_d(D),
        PREC=precision(q.dtype),
        TMA=tma,
    )
    if config is None and autotune_enabled(q):
        if tma:  # boxes are set per config by the pre-hook
            args[3:6] = [descriptor(t, 16) for t in (q, k, v)]
        _attn_fwd_tuned[lambda meta: launch_grid(triton.cdiv(Sq, meta["BLOCK_M"]) * n_seq * H)](*args, **flags)
        return o, lse
    lean, fp32 = mask_kind != MASK_NONE or dropout_p > 0.0, q.dtype == torch.float32
    cfg = dict(config or fwd_configs(D, tma, ws, lean=lean, fp32=fp32)[0])
    if cfg["WS"] and not (INTERPRET or (WS_TRITON and tma)):
        raise ValueError(f"warp-specialised configs need TMA and Triton 3.6 (this is {triton.__version__}): {cfg}")
    if tma:
        args[3:6] = [descriptor(q, cfg["BLOCK_M"]), descriptor(k, cfg["BLOCK_N"]), descriptor(v, cfg["BLOCK_N"])]
    _attn_fwd_kernel[launch_grid(triton.cdiv(Sq, cfg["BLOCK_M"]) * n_seq * H)](*args, **flags, **cfg)
    return o, lse
