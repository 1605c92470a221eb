"""Fused LayerNorm / RMSNorm (+ optional residual add), forward and backward, in Triton.

One kernel family; ``RMS`` is a constexpr flag, as are the residual, weight and bias switches.

Math (per row of N elements, statistics in fp32):
    h     = x + residual                        (only with a residual; rounded to x's dtype, then normalised)
    LN:   mean = sum(h) / N,  var = sum((h - mean)^2) / N,  rstd = 1 / sqrt(var + eps),  xhat = (h - mean) * rstd
    RMS:  rstd = 1 / sqrt(sum(h^2) / N + eps),  xhat = h * rstd
    y     = xhat * w + b
Backward, with g = dy * w:
    c1 = sum(xhat * g) / N,  c2 = sum(g) / N (LN only)
    dx = rstd * (g - (xhat * c1 + c2))          (+ dh, the gradient flowing into the residual-sum output)
    dw = sum_rows(dy * xhat),  db = sum_rows(dy)
dw/db use a two-stage reduction without atomics: each of G programs owns a fixed, contiguous range of rows and writes
one fp32 partial row into a (G, N) workspace; the host sums the G partials (a fixed-order reduction), so the
backward is bitwise deterministic run to run.

Bytes moved (e = element size): forward reads x (+ residual) and writes y (+ h): (2 [+2]) * M * N * e; backward
reads x, dy (+ dh) and writes dx: (3 [+1]) * M * N * e, plus the (G, N) fp32 partials.

Rows that fit on chip (N <= MAX_FUSED_N_*) are processed in one pass from registers, several rows per program for
small N. Wider rows (up to MAX_N) loop over chunks of the row: two passes for RMSNorm, three for LayerNorm (the
re-reads come from L2). The block-size classes below are the only specialisation: eps and N are runtime values.
"""

import torch
import triton
import triton.language as tl
from fastlm.kernels import empty, launch_grid, on_tensor_device

MAX_N = 65536  # widest row the kernels accept
MAX_FUSED_N_FWD = 16384  # widest row held in registers by the forward (16 warps x 32 fp32 each: no spills on sm_90)
MAX_FUSED_N_BWD = 8192  # the backward also keeps dw/db accumulators live, so it chunks earlier
CHUNK_N = 4096  # chunk width of the multi-pass path
TILE_FWD = 4096  # elements per program for narrow rows (BLOCK_M rows x BLOCK_N columns)
TILE_BWD = 2048  # the backward holds x, dy and their products: half the tile keeps it spill-free


@triton.jit
def norm_fwd_kernel(
    X,  # (M, N) input, row stride stride_x, unit column stride
    R,  # (M, N) residual (HAS_RES), row stride stride_r
    W,  # (N,) weight (HAS_W)
    B,  # (N,) bias (HAS_B)
    Y,  # (M, N) output, contiguous
    H,  # (M, N) x + residual (HAS_RES), contiguous
    Mean,  # (M,) fp32 mean (LayerNorm only)
    Rstd,  # (M,) fp32 1 / std
    stride_x,
    stride_r,
    M,
    N,
    eps,
    RMS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    pid = tl.program_id(0)
    if SINGLE_PASS:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            h = (x + r).to(H.dtype.element_ty)
            tl.store(H + rows64[:, None] * N + cols[None, :], h, mask=mask)
            x = h.to(tl.float32)
        if RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
            xhat = x * rstd[:, None]
        else:
            mean = tl.sum(x, axis=1) / N
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
            xhat = xc * rstd[:, None]
            tl.store(Mean + rows, mean, mask=row_ok)
        tl.store(Rstd + rows, rstd, mask=row_ok)
        y = xhat
        if HAS_W:
            y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows64[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # One row per program, BLOCK_N-wide chunks. Pass 1 forms h (with a residual) and the first moment.
        row = pid.to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        x_row = X + row * stride_x
        h_row = H + row * N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            c = off + cols
            x = tl.load(x_row + c, mask=c < N, other=0.0).to(tl.float32)
            if HAS_RES:
                r = tl.load(R + row * stride_r + c, mask=c < N, other=0.0).to(tl.float32)
                h = (x + r).to(H.dtype.element_ty)
                tl.store(h_row + c, h, mask=c < N)
                x = h.to(tl.float32)
            if RMS:
                acc += x * x
            else:
                acc += x
        if HAS_RES:
            src = h_row  # later passes read the rounded sum, as the single-pass path does
        else:
            src = x_row
        if RMS:
            mean = 0.0
            rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        else:
            mean = tl.sum(acc, axis=0) / N
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                x = tl.load(src + c, mask=c < N, other=0.0).to(tl.float32)
                xc = tl.where(c < N, x - mean, 0.0)
                acc += xc * xc
            rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
            tl.store(Mean + row, mean)
        tl.store(Rstd + row, rstd)
        for off in range(0, N, BLOCK_N):
            c = off + cols
            y = (tl.load(src + c, mask=c < N, other=0.0).to(tl.float32) - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + c, mask=c < N, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + c, mask=c < N, other=0.0).to(tl.float32)
            tl.store(Y + row * N + c, y.to(Y.dtype.element_ty), mask=c < N)


@triton.jit
def bwd_chunk(X, DY, W, row, c, stride_x, stride_dy, N, mean, rstd, HAS_W: tl.constexpr):
    """Columns ``c`` of one row in the chunked backward: (dy, xhat, g = dy * w), fp32, zero past N."""
    x = tl.load(X + row * stride_x + c, mask=c < N, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + c, mask=c < N, other=0.0).to(tl.float32)
    xhat = tl.where(c < N, (x - mean) * rstd, 0.0)
    if HAS_W:
        g = dy * tl.load(W + c, mask=c < N, other=0.0).to(tl.float32)
    else:
        g = dy
    return dy, xhat, g


@triton.jit
def norm_bwd_kernel(
    DY,  # (M, N) incoming gradient, row stride stride_dy
    X,  # (M, N) normalised input (h with a residual), row stride stride_x
    W,  # (N,) weight (HAS_W)
    Mean,  # (M,) fp32 (LayerNorm only)
    Rstd,  # (M,) fp32
    DH,  # (M, N) gradient of the residual-sum output (HAS_DH), row stride stride_dh
    DX,  # (M, N) output gradient, contiguous
    DW,  # (G, N) fp32 partial sums of dy * xhat, one row per program (HAS_W)
    DB,  # (G, N) fp32 partial sums of dy, one row per program (HAS_DB)
    stride_dy,
    stride_x,
    stride_dh,
    M,
    N,
    rows_per_program,
    RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_DB: tl.constexpr,
    HAS_DH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # 64-bit row offsets: M * N may exceed 2**31
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_PASS:
        col_ok = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(row_start, row_end, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
            if RMS:
                xhat = x * rstd[:, None]
            else:
                mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_W:
                g = dy * w[None, :]
            else:
                g = dy
            c1 = tl.sum(xhat * g, axis=1) / N
            if RMS:
                dx = (g - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(g, axis=1) / N
                dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DH:
                dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_W:
                dw_acc += tl.sum(dy * xhat, axis=0)
            if HAS_DB:
                db_acc += tl.sum(dy, axis=0)
        if HAS_W:
            tl.store(DW + pid * N + cols, dw_acc, mask=col_ok)
        if HAS_DB:
            tl.store(DB + pid * N + cols, db_acc, mask=col_ok)
    else:
        # One row at a time, BLOCK_N-wide chunks: pass 1 reduces c1 (and c2), pass 2 writes dx and adds this row's
        # contribution into the program's own partial row of DW/DB (zero-initialised by the host; no other program
        # touches it, so the read-modify-write is race-free and ordered).
        for row in range(row_start, row_end):
            rstd = tl.load(Rstd + row)
            if RMS:
                mean = 0.0
            else:
                mean = tl.load(Mean + row)
            acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                dy, xhat, g = bwd_chunk(X, DY, W, row, c, stride_x, stride_dy, N, mean, rstd, HAS_W)
                acc1 += xhat * g
                acc2 += g
            c1 = tl.sum(acc1, axis=0) / N
            c2 = tl.sum(acc2, axis=0) / N
            for off in range(0, N, BLOCK_N):
                c = off + cols
                dy, xhat, g = bwd_chunk(X, DY, W, row, c, stride_x, stride_dy, N, mean, rstd, HAS_W)
                if RMS:
                    dx = (g - xhat * c1) * rstd
                else:
                    dx = (g - (xhat * c1 + c2)) * rstd
                if HAS_DH:
                    dx += tl.load(DH + row * stride_dh + c, mask=c < N, other=0.0).to(tl.float32)
                tl.store(DX + row * N + c, dx.to(DX.dtype.element_ty), mask=c < N)
                if HAS_W:
                    p = DW + pid * N + c
                    tl.store(p, tl.load(p, mask=c < N, other=0.0) + dy * xhat, mask=c < N)
                if HAS_DB:
                    p = DB + pid * N + c
                    tl.store(p, tl.load(p, mask=c < N, other=0.0) + dy, mask=c < N)


# ---------------------------------------------------------------------------------------------------------------
# Launch heuristics: the one place that maps a row width to block sizes and warps.


def _config(N: int, max_fused: int, tile: int, per_thread: int) -> dict:
    """Rows of up to ``max_fused`` elements in one pass, ``tile`` elements per program; wider rows in CHUNK_N-wide
    chunks, one row per program."""
    if N <= max_fused:
        block_n = triton.next_power_of_2(N)
        block_m, single = max(1, tile // block_n), True
    else:
        block_n, block_m, single = CHUNK_N, 1, False
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_PASS=single, num_warps=_warps(block_m * block_n, per_thread))


def fwd_config(N: int) -> dict:
    """Block sizes and warps of the forward for a row of N elements."""
    return _config(N, MAX_FUSED_N_FWD, TILE_FWD, 16)


def bwd_config(N: int) -> dict:
    """Block sizes and warps of the backward for a row of N elements."""
    return _config(N, MAX_FUSED_N_BWD, TILE_BWD, 8)


def _warps(tile: int, per_thread: int) -> int:
    # About per_thread fp32 elements of each live tile per thread; 16 warps at most (512 threads, 128 registers).
    return max(1, min(16, tile // (32 * per_thread)))


def _num_programs_bwd(M: int, block_m: int, device: torch.device) -> int:
    """G, the number of backward programs: a function of M, the block size and the device only (determinism)."""
    if device.type == "cuda":
        slots = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        slots = 8  # the interpreter runs programs one after another: fewer, longer programs cost the same
    return max(1, min(triton.cdiv(M, block_m), slots))


# ---------------------------------------------------------------------------------------------------------------
# Host functions. Arguments are validated by fastlm.ops.norms; these assume 2-D inputs with unit column stride.


@on_tensor_device
def norm_fwd(x, residual, weight, bias, eps: float, rms: bool):
    """Forward launch. x, residual: (M, N); weight, bias: (N,) or None. Returns (y, h, mean, rstd)."""
    M, N = x.shape
    y = empty((M, N), x.dtype, x.device)
    h = empty((M, N) if residual is not None else (0,), x.dtype, x.device)
    mean = empty((0,) if rms else (M,), torch.float32, x.device)
    rstd = empty((M,), torch.float32, x.device)
    if M == 0:
        return y, h, mean, rstd
    cfg = fwd_config(N)
    grid = launch_grid(triton.cdiv(M, cfg["BLOCK_M"]))
    norm_fwd_kernel[grid](
        x,
        residual if residual is not None else x,
        weight if weight is not None else x,
        bias if bias is not None else x,
        y,
        h if residual is not None else y,
        mean if not rms else rstd,
        rstd,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        M,
        N,
        eps,
        RMS=rms,
        HAS_RES=residual is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        **cfg,
    )
    return y, h, mean, rstd


@on_tensor_device
def norm_bwd(dy, x, weight, mean, rstd, dh, rms: bool, has_bias: bool):
    """Backward launch. dy, x, dh: (M, N). Returns (dx, dw, db); dw/db are (0,) when absent."""
    M, N = x.shape
    dev = x.device
    dx = empty((M, N), x.dtype, dev)
    has_w = weight is not None
    has_db = has_bias and not rms
    w_dtype = weight.dtype if has_w else torch.float32  # dw/db in the weight's dtype; fp32 db without a weight
    if M == 0:
        dw = torch.zeros((N,) if has_w else (0,), dtype=w_dtype, device=dev)
        db = torch.zeros((N,) if has_db else (0,), dtype=w_dtype, device=dev)
        return dx, dw, db
    cfg = bwd_config(N)
    G = _num_programs_bwd(M, cfg["BLOCK_M"], dev)
    rows_per_program = triton.cdiv(triton.cdiv(M, G), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    G = triton.cdiv(M, rows_per_program)
    # The chunked path accumulates into its partial row, so it starts from zeros; the single pass writes it whole.
    alloc = empty if cfg["SINGLE_PASS"] else lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device)
    dw_part = alloc((G, N) if has_w else (0,), torch.float32, dev)
    db_part = alloc((G, N) if has_db else (0,), torch.float32, dev)
    norm_bwd_kernel[launch_grid(G)](
        dy,
        x,
        weight if has_w else x,
        mean if not rms else rstd,
        rstd,
        dh if dh is not None else dy,
        dx,
        dw_part if has_w else dx,
        db_part if has_db else dx,
        dy.stride(0),
        x.stride(0),
        dh.stride(0) if dh is not None else 0,
        M,
        N,
        rows_per_program,
        RMS=rms,
        HAS_W=has_w,
        HAS_DB=has_db,
        HAS_DH=dh is not None,
        **cfg,
    )
    # Stage 2: a fixed-order sum over the G partial rows (deterministic).
    dw = dw_part.sum(0).to(w_dtype) if has_w else dw_part.to(w_dtype)
    db = db_part.sum(0).to(w_dtype) if has_db else db_part.to(w_dtype)
    return dx, dw, db
