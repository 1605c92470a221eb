"""Fused softmax / log-softmax, and the scaled, masked, causal softmax of attention scores, forward and backward.

One kernel family. A "row" is one softmax: R elements ``stride_col`` apart. Rows are addressed through a
(outer, R, inner) view: row r starts at ``(r // inner) * stride_outer + (r % inner) * stride_inner``; for the last
dim inner == 1 (Triton specialises that value, so the division vanishes) and rows may have any stride. A softmax
over another dim is the same kernel with a strided launch, not a transpose copy.

Forward, with s = x * scale (+ additive mask, or -inf where a bool mask is False or, causal, where col > row % Sq):
    m = max(s), e = exp(s - m), l = sum(e);  softmax = e / l;  log_softmax = s - m - log(l)
Masked rows whose every element is masked (l == 0) give zeros, not NaN. Unmasked softmax follows torch (a row
of -inf gives NaN).
Backward from the saved output y:  softmax: dx = scale * y * (dy - sum(y * dy));  log: dx = dy - exp(y) * sum(dy).

Rows up to MAX_FUSED elements live in registers (one read, one write). Wider rows (up to any length) are split
into CHUNK-wide pieces over a 2-D grid: a stats kernel writes each piece's (max, sum of exp) [backward: its partial
dot product] to a small fp32 workspace, and the main kernel combines the pieces of its row and writes its piece:
two reads, one write, and all SMs busy even for a handful of rows.

Bytes: forward reads x (+ mask) and writes y: 2 * rows * R * e (+ mask bytes); backward reads y, dy and writes dx:
3 * rows * R * e; the split path reads x (y, dy) once more.
"""

import math

import torch
import triton
import triton.language as tl
from fastlm.kernels import KIND_BOOL, KIND_NONE, MASK_ADD, MASK_BOOL, MASK_NONE, empty, launch_grid, on_tensor_device

MAX_FUSED = 16384  # widest row held in registers in one pass
CHUNK = 8192  # piece width of the split path
TILE = 4096  # elements per program for narrow rows


@triton.jit
def row_offsets(rows, inner, stride_outer, stride_inner):
    """Element offset of the first column of each row: row r is (r // inner, r % inner) in the (outer, inner) view."""
    rows = rows.to(tl.int64)
    return (rows // inner) * stride_outer + (rows % inner) * stride_inner


@triton.jit
def row_scores(
    X,
    Mask,
    rows,
    cols,
    mask2d,
    x_base,
    stride_col,
    scale,
    Sq,
    H,
    sm_b,
    sm_h,
    sm_q,
    sm_k,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """The fp32 scores of a [rows, cols] tile: x * scale, masked; -inf outside the row or where masked."""
    s = tl.load(X + x_base[:, None] + cols[None, :].to(tl.int64) * stride_col, mask=mask2d, other=float("-inf"))
    s = s.to(tl.float32) * scale
    if MASK_KIND != KIND_NONE:
        # rows enumerate (batch, head, q) of a (B, H, Sq, Sk) score tensor; the mask is an expanded (B, H, Sq, Sk)
        # view whose broadcast dims have stride 0.
        r64 = rows.to(tl.int64)
        q = r64 % Sq
        bh = r64 // Sq
        m_base = (bh // H) * sm_b + (bh % H) * sm_h + q * sm_q
        mv = tl.load(Mask + m_base[:, None] + cols[None, :].to(tl.int64) * sm_k, mask=mask2d, other=0)
        if MASK_KIND == KIND_BOOL:
            s = tl.where(mv != 0, s, float("-inf"))
        else:
            s = s + mv.to(tl.float32)
    if CAUSAL:
        q_idx = rows % Sq
        s = tl.where(cols[None, :] <= q_idx[:, None], s, float("-inf"))
    return s


@triton.jit
def softmax_stats_kernel(
    X,
    Mask,
    WS,  # WS: (rows, n_chunks, 2) fp32 piece max and sum of exp
    n_rows,
    R,
    inner,
    stride_outer,
    stride_inner,
    stride_col,
    scale,
    Sq,
    H,
    sm_b,
    sm_h,
    sm_q,
    sm_k,
    n_chunks,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    rows = row + tl.arange(0, 1)
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    mask2d = (rows < n_rows)[:, None] & (cols < R)[None, :]
    base = row_offsets(rows, inner, stride_outer, stride_inner)
    s = row_scores(
        X, Mask, rows, cols, mask2d, base, stride_col, scale, Sq, H, sm_b, sm_h, sm_q, sm_k, MASK_KIND, CAUSAL
    )
    m = tl.max(s, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    ls = tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
    out = WS + (row.to(tl.int64) * n_chunks + chunk) * 2
    tl.store(out + tl.arange(0, 1), m)
    tl.store(out + 1 + tl.arange(0, 1), ls)


@triton.jit
def softmax_fwd_kernel(
    X,
    Mask,
    Y,
    WS,
    n_rows,
    R,
    inner,
    stride_outer,
    stride_inner,
    stride_col,
    y_stride_outer,
    y_stride_inner,
    y_stride_col,
    scale,
    Sq,
    H,
    sm_b,
    sm_h,
    sm_q,
    sm_k,
    n_chunks,
    LOG: tl.constexpr,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    ZERO_EMPTY: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask2d = row_ok[:, None] & (cols < R)[None, :]
    base = row_offsets(rows, inner, stride_outer, stride_inner)
    s = row_scores(
        X, Mask, rows, cols, mask2d, base, stride_col, scale, Sq, H, sm_b, sm_h, sm_q, sm_k, MASK_KIND, CAUSAL
    )
    if SPLIT:
        # combine the pieces' (max, sum): m = max_c m_c, l = sum_c l_c * exp(m_c - m)
        c = tl.arange(0, CHUNKS)
        ws = WS + rows.to(tl.int64)[:, None] * (n_chunks * 2) + c[None, :] * 2
        c_ok = row_ok[:, None] & (c < n_chunks)[None, :]
        mc = tl.load(ws, mask=c_ok, other=float("-inf"))
        lc = tl.load(ws + 1, mask=c_ok, other=0.0)
        m = tl.max(mc, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l = tl.sum(lc * tl.exp(mc - m_safe[:, None]), axis=1)
    else:
        m = tl.max(s, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l = tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
    if LOG:
        y = s - m_safe[:, None] - tl.log(l)[:, None]
    else:
        inv = 1.0 / l
        if ZERO_EMPTY:
            inv = tl.where(l > 0, inv, 0.0)
        y = tl.exp(s - m_safe[:, None]) * inv[:, None]
    y_base = row_offsets(rows, inner, y_stride_outer, y_stride_inner)
    tl.store(Y + y_base[:, None] + cols[None, :].to(tl.int64) * y_stride_col, y.to(Y.dtype.element_ty), mask=mask2d)


@triton.jit
def softmax_bwd_stats_kernel(
    Y,
    DY,
    WS,  # WS: (rows, n_chunks) fp32 partial sums of y * dy (softmax) or dy (log-softmax)
    n_rows,
    R,
    inner,
    stride_outer,
    stride_inner,
    stride_col,
    dy_stride_outer,
    dy_stride_inner,
    dy_stride_col,
    n_chunks,
    LOG: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    rows = row + tl.arange(0, 1)
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    mask2d = (rows < n_rows)[:, None] & (cols < R)[None, :]
    c64 = cols[None, :].to(tl.int64)
    dy_base = row_offsets(rows, inner, dy_stride_outer, dy_stride_inner)
    dy = tl.load(DY + dy_base[:, None] + c64 * dy_stride_col, mask=mask2d, other=0.0).to(tl.float32)
    if LOG:
        part = tl.sum(dy, axis=1)
    else:
        base = row_offsets(rows, inner, stride_outer, stride_inner)
        y = tl.load(Y + base[:, None] + c64 * stride_col, mask=mask2d, other=0.0).to(tl.float32)
        part = tl.sum(y * dy, axis=1)
    tl.store(WS + row.to(tl.int64) * n_chunks + chunk + tl.arange(0, 1), part)


@triton.jit
def softmax_bwd_kernel(
    Y,
    DY,
    DX,
    WS,
    n_rows,
    R,
    inner,
    stride_outer,
    stride_inner,
    stride_col,
    dy_stride_outer,
    dy_stride_inner,
    dy_stride_col,
    scale,
    n_chunks,
    LOG: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    """dx has y's layout (y and dx are both contiguous outputs of this module or y's strided twin)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask2d = row_ok[:, None] & (cols < R)[None, :]
    c64 = cols[None, :].to(tl.int64)
    base = row_offsets(rows, inner, stride_outer, stride_inner)
    dy_base = row_offsets(rows, inner, dy_stride_outer, dy_stride_inner)
    y = tl.load(Y + base[:, None] + c64 * stride_col, mask=mask2d, other=0.0).to(tl.float32)
    dy = tl.load(DY + dy_base[:, None] + c64 * dy_stride_col, mask=mask2d, other=0.0).to(tl.float32)
    if SPLIT:
        c = tl.arange(0, CHUNKS)
        ws = WS + rows.to(tl.int64)[:, None] * n_chunks + c[None, :]
        dot = tl.sum(tl.load(ws, mask=row_ok[:, None] & (c < n_chunks)[None, :], other=0.0), axis=1)
    else:
        if LOG:
            dot = tl.sum(dy, axis=1)
        else:
            dot = tl.sum(y * dy, axis=1)
    if LOG:
        dx = dy - tl.exp(y) * dot[:, None]
    else:
        dx = y * (dy - dot[:, None])
    dx = dx * scale
    tl.store(DX + base[:, None] + c64 * stride_col, dx.to(DX.dtype.element_ty), mask=mask2d)


# ---------------------------------------------------------------------------------------------------------------
# Launch heuristics


def config(R: int) -> dict:
    """Tile and warps for rows of R elements; SPLIT for rows wider than MAX_FUSED."""
    if R <= MAX_FUSED:
        block_n = triton.next_power_of_2(R)
        block_m = max(1, TILE // block_n)
        return dict(SPLIT=False, BLOCK_M=block_m, BLOCK_N=block_n, n_chunks=1, num_warps=_warps(block_m * block_n))
    n_chunks = triton.cdiv(R, CHUNK)
    return dict(SPLIT=True, BLOCK_M=1, BLOCK_N=CHUNK, n_chunks=n_chunks, num_warps=_warps(CHUNK))


def _warps(tile: int) -> int:
    return max(1, min(16, tile // 512))  # ~16 fp32 per thread and live tile


def _chunks_pow2(n_chunks: int) -> int:
    return max(2, triton.next_power_of_2(n_chunks))


# ---------------------------------------------------------------------------------------------------------------
# Host functions: views are prepared (and validated) by fastlm.ops.softmax.


def row_view(t: torch.Tensor, dim: int):
    """(outer, R, inner) addressing of ``t`` along ``dim``: (n_rows, R, inner, stride_outer, stride_inner,
    stride_col). ``t`` is either 2-D with dim == 1 (rows of any stride) or contiguous (any dim)."""
    R = t.shape[dim]
    if t.dim() == 2 and dim == 1:
        return t.shape[0], R, 1, t.stride(0), 0, t.stride(1)
    inner = math.prod(t.shape[dim + 1 :])  # contiguous: the dims after ``dim`` are the inner stride
    n_rows = t.numel() // R if R else 0
    return n_rows, R, inner, R * inner, 1, inner


@on_tensor_device
def softmax_fwd(x, dim: int, log: bool, mask=None, scale: float = 1.0, causal: bool = False, mask_view=None):
    """y = (log_)softmax(x * scale + mask) along ``dim``; ``mask_view`` = (mask4d, B, H, Sq) for masks / causal."""
    y = empty(x.shape, x.dtype, x.device)
    n_rows, R, inner, so, si, sc = row_view(x, dim)
    yo, yi, yc = row_view(y, dim)[3:]
    if n_rows == 0 or R == 0:
        return y
    cfg = config(R)
    mask_kind = MASK_NONE
    sm = (0, 0, 0, 0)
    Sq, H = 1, 1
    if mask_view is not None:
        mask4d, H, Sq = mask_view
        if mask4d is not None:
            mask_kind = MASK_BOOL if mask4d.dtype == torch.bool else MASK_ADD
            sm = mask4d.stride()
            mask = mask4d
    mask_arg = mask if mask_kind != MASK_NONE else x
    ws = x
    if cfg["SPLIT"]:
        ws = torch.empty((n_rows, cfg["n_chunks"], 2), dtype=torch.float32, device=x.device)
        softmax_stats_kernel[launch_grid(n_rows, cfg["n_chunks"])](
            x,
            mask_arg,
            ws,
            n_rows,
            R,
            inner,
            so,
            si,
            sc,
            scale,
            Sq,
            H,
            *sm,
            cfg["n_chunks"],
            MASK_KIND=mask_kind,
            CAUSAL=causal,
            BLOCK_N=cfg["BLOCK_N"],
            num_warps=cfg["num_warps"],
        )
    grid = launch_grid(triton.cdiv(n_rows, cfg["BLOCK_M"]), cfg["n_chunks"])
    softmax_fwd_kernel[grid](
        x,
        mask_arg,
        y,
        ws,
        n_rows,
        R,
        inner,
        so,
        si,
        sc,
        yo,
        yi,
        yc,
        scale,
        Sq,
        H,
        *sm,
        cfg["n_chunks"],
        LOG=log,
        MASK_KIND=mask_kind,
        CAUSAL=causal,
        ZERO_EMPTY=mask_view is not None,
        SPLIT=cfg["SPLIT"],
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        CHUNKS=_chunks_pow2(cfg["n_chunks"]),
        num_warps=cfg["num_warps"],
    )
    return y


@on_tensor_device
def softmax_bwd(dy, y, dim: int, log: bool, scale: float = 1.0):
    """dx of (log_)softmax from the saved output ``y`` (times ``scale`` for the scaled softmax); dx has y's layout."""
    dx = empty(y.shape, y.dtype, y.device)  # y comes from softmax_fwd: contiguous, so dx shares its addressing
    n_rows, R, inner, so, si, sc = row_view(y, dim)
    do, di, dc = row_view(dy, dim)[3:]
    if n_rows == 0 or R == 0:
        return dx
    cfg = config(R)
    ws = y
    if cfg["SPLIT"]:
        ws = torch.empty((n_rows, cfg["n_chunks"]), dtype=torch.float32, device=y.device)
        softmax_bwd_stats_kernel[launch_grid(n_rows, cfg["n_chunks"])](
            y,
            dy,
            ws,
            n_rows,
            R,
            inner,
            so,
            si,
            sc,
            do,
            di,
            dc,
            cfg["n_chunks"],
            LOG=log,
            BLOCK_N=cfg["BLOCK_N"],
            num_warps=cfg["num_warps"],
        )
    grid = launch_grid(triton.cdiv(n_rows, cfg["BLOCK_M"]), cfg["n_chunks"])
    softmax_bwd_kernel[grid](
        y,
        dy,
        dx,
        ws,
        n_rows,
        R,
        inner,
        so,
        si,
        sc,
        do,
        di,
        dc,
        scale,
        cfg["n_chunks"],
        LOG=log,
        SPLIT=cfg["SPLIT"],
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        CHUNKS=_chunks_pow2(cfg["n_chunks"]),
        num_warps=cfg["num_warps"],
    )
    return dx
