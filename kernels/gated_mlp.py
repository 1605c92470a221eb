"""Fused gated-MLP activations, SwiGLU and GeGLU, forward and backward, in Triton.

What is fused: the activation of the gate projection and its product with the up projection,
``y = act(gate) * up``, in one pass (torch's eager code runs two kernels and writes ``act(gate)`` to memory); the
backward recomputes ``act(gate)`` from the saved inputs and writes both gradients from one pass. One kernel pair
serves the three activations: ``ACT`` is a constexpr (ACT_SILU, ACT_GELU_TANH, ACT_GELU_ERF).

Math (per element, fp32 inside; s = sigmoid):
    silu:       act(g) = g s(g)                                    act'(g) = s (1 + g (1 - s))
    gelu tanh:  act(g) = 0.5 g (1 + t),  t = tanh(c (g + a g^3)),  c = sqrt(2/pi),  a = 0.044715
                act'(g) = 0.5 (1 + t) + 0.5 g (1 - t^2) c (1 + 3 a g^2)
    gelu erf:   act(g) = g Phi(g)                                   act'(g) = Phi(g) + g phi(g)
                Phi(g) = 0.5 (1 + erf(g / sqrt(2))),  phi(g) = exp(-g^2 / 2) / sqrt(2 pi)
The tanh form is evaluated through the sigmoid, 0.5 (1 + tanh(z)) = s(2z) and 1 - t^2 = 4 s (1 - s): both
sigmoid activations are then act = g s(k(g)), act' = s + g s (1 - s) k'(g) with k(g) = g (silu) or
2 c (g + a g^3) (gelu tanh), which needs one exp and no tanh.
Backward, from the incoming gradient dy:  dgate = dy * up * act'(gate),  dup = dy * act(gate).

Layout: gate, up and dy are (M, N) row-major with unit column stride and any row stride (so the two halves of a
merged ``gate_up`` projection, ``x.chunk(2, -1)``, are read in place: the gate_up form is this same kernel given
two views of one tensor). The output and the gradients are written with a row stride as well (dgate / dup are the
two halves of one (M, 2N) gradient in the gate_up form). Row offsets are 64-bit.

Bytes moved (e = element size): forward reads gate and up and writes y, 3 * M * N * e; backward reads dy, gate, up
and writes dgate, dup, 5 * M * N * e.

Tiling: a program owns BLOCK_M rows x BLOCK_N columns (TILE elements); the grid is (row blocks, column blocks),
rows on axis x. Three block-size classes of BLOCK_N (64, 256, 1024) are the only specialisation; N is runtime.
"""

import triton
import triton.language as tl
from fastlm.kernels import empty, launch_grid, on_tensor_device

ACT_SILU, ACT_GELU_TANH, ACT_GELU_ERF = 0, 1, 2  # the ACT constexpr; also the `act` int of the registered ops
SILU, GELU_TANH = tl.constexpr(ACT_SILU), tl.constexpr(ACT_GELU_TANH)  # their twins for kernel code
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # c of the tanh approximation
GELU_A = tl.constexpr(0.044715)
SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)

TILE = 2048  # elements per program: 16 fp32 per thread per live tensor at 4 warps (spill-free on sm_90)
BLOCK_N_CLASSES = (64, 256, 1024)  # the column-block widths a launch can pick
NUM_WARPS = 4


@triton.jit
def activation(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32 for a tile g of fp32 gate values (the module docstring has the math)."""
    if ACT == SILU:
        s = 1.0 / (1.0 + tl.exp(-g))
        return g * s, s * (1.0 + g * (1.0 - s))
    elif ACT == GELU_TANH:
        g2 = g * g
        k = 2.0 * SQRT_2_OVER_PI * (g + GELU_A * g2 * g)
        s = 1.0 / (1.0 + tl.exp(-k))
        dk = 2.0 * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_A * g2)
        return g * s, s + g * s * (1.0 - s) * dk
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * SQRT1_2))
        pdf = tl.exp(-0.5 * g * g) * INV_SQRT_2PI
        return g * cdf, cdf + g * pdf


@triton.jit
def gated_mlp_fwd_kernel(
    G,  # (M, N) gate, row stride stride_g, unit column stride
    U,  # (M, N) up, row stride stride_u, unit column stride (gate_up form: G + N with G's row stride)
    Y,  # (M, N) output act(gate) * up, contiguous
    stride_g,  # row stride of G in elements
    stride_u,  # row stride of U in elements
    M,  # rows
    N,  # columns (the intermediate size I)
    ACT: tl.constexpr,  # ACT_SILU, ACT_GELU_TANH or ACT_GELU_ERF
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per program
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # 64-bit: M * N may exceed 2**31
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, _ = activation(g, ACT)
    tl.store(Y + rows[:, None] * N + cols[None, :], (a * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def gated_mlp_bwd_kernel(
    DY,  # (M, N) incoming gradient, row stride stride_dy, unit column stride
    G,  # (M, N) gate, row stride stride_g, unit column stride
    U,  # (M, N) up, row stride stride_u, unit column stride (gate_up form: G + N)
    DG,  # (M, N) gradient of gate, row stride stride_d (N; gate_up form: 2N, the first half of each row)
    DU,  # (M, N) gradient of up, row stride stride_d (N; gate_up form: DG + N, the second half)
    stride_dy,  # row stride of DY in elements
    stride_g,  # row stride of G in elements
    stride_u,  # row stride of U in elements
    stride_d,  # row stride of DG and DU in elements
    M,  # rows
    N,  # columns (the intermediate size I)
    ACT: tl.constexpr,  # ACT_SILU, ACT_GELU_TANH or ACT_GELU_ERF
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per program
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, da = activation(g, ACT)  # recomputed: the forward saved only gate and up
    out = rows[:, None] * stride_d + cols[None, :]
    tl.store(DG + out, (dy * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + out, (dy * a).to(DU.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launch heuristic: the one place that maps a row width to block sizes.


def config(N: int) -> dict:
    """Block sizes and warps for rows of N columns: the smallest BLOCK_N class that holds the row (the widest class
    for longer rows), and BLOCK_M rows so that a program owns TILE elements."""
    block_n = next((b for b in BLOCK_N_CLASSES if N <= b), BLOCK_N_CLASSES[-1])
    return dict(BLOCK_M=TILE // block_n, BLOCK_N=block_n, num_warps=NUM_WARPS)


def _grid(M: int, N: int, cfg: dict) -> tuple:
    return launch_grid(triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))


def split_gate_up(gate, up):
    """(gate, up) as two (M, N) views: ``up`` None means ``gate`` is the (M, 2N) gate_up tensor (first half gate)."""
    if up is None:
        n = gate.shape[1] // 2
        return gate[:, :n], gate[:, n:]
    return gate, up


# ---------------------------------------------------------------------------------------------------------------
# Host functions. Arguments are validated by fastlm.ops.gated_mlp: 2-D, unit column stride (or width 1).


@on_tensor_device
def gated_mlp_fwd(gate, up, act: int):
    """Forward launch. gate, up: (M, N), or gate (M, 2N) and up None (the gate_up form). Returns y (M, N)."""
    g, u = split_gate_up(gate, up)
    M, N = g.shape
    y = empty((M, N), g.dtype, g.device)
    if M == 0 or N == 0:
        return y
    cfg = config(N)
    gated_mlp_fwd_kernel[_grid(M, N, cfg)](g, u, y, g.stride(0), u.stride(0), M, N, ACT=act, **cfg)
    return y


@on_tensor_device
def gated_mlp_bwd(dy, gate, up, act: int):
    """Backward launch. dy: (M, N); gate, up as in :func:`gated_mlp_fwd`. Returns (dgate, dup), each (M, N); in the
    gate_up form (dgate_up (M, 2N), an empty (0,) tensor)."""
    g, u = split_gate_up(gate, up)
    M, N = g.shape
    if up is None:
        dgu = empty((M, 2 * N), g.dtype, g.device)
        dg, du = dgu[:, :N], dgu[:, N:]
        outs = (dgu, empty((0,), g.dtype, g.device))
    else:
        dg, du = empty((M, N), g.dtype, g.device), empty((M, N), g.dtype, g.device)
        outs = (dg, du)
    if M == 0 or N == 0:
        return outs
    cfg = config(N)
    gated_mlp_bwd_kernel[_grid(M, N, cfg)](
        dy, g, u, dg, du, dy.stride(0), g.stride(0), u.stride(0), dg.stride(0), M, N, ACT=act, **cfg
    )
    return outs
