"""SwiGLU / GeGLU, the gated activations of an MLP: registered ops, fake impls, autograd, public functions.

Ops (for <backend> in {triton, cpu}; the math and the kernels: kernels/gated_mlp.py, csrc/cpu/gated_mlp.cpp):
    fastlm::gated_mlp_fwd_<backend>(gate, up?, act) -> y
    fastlm::gated_mlp_bwd_<backend>(dy, gate, up?, act) -> (dgate, dup)
``gate`` and ``up`` are (M, I) with unit column stride and any row stride; ``y`` is (M, I) contiguous. With ``up``
None, ``gate`` is the (M, 2I) output of a merged projection (first half gate, second half up, as
``gate, up = gate_up.chunk(2, dim=-1)``), split inside the kernel; then ``dgate`` is the (M, 2I) gradient of that
tensor and ``dup`` is empty (0,). ``act`` is 0 silu, 1 gelu tanh, 2 gelu erf. The autograd saves only the inputs
(gate and up, or gate_up), never the activation: the backward recomputes it and writes both gradients in one pass.
"""

import math

import torch
from torch import Tensor

from fastlm import reference
from fastlm.dispatch import resolve
from fastlm.ops.registry import call, check_device, check_tensor, register

ACT_SILU, ACT_GELU_TANH, ACT_GELU_ERF = 0, 1, 2  # the ops' `act` (kernels/gated_mlp.py's ACT constexpr)
GELU_ACT = {"tanh": ACT_GELU_TANH, "none": ACT_GELU_ERF}  # geglu's `approximate` -> act


# ---------------------------------------------------------------------------------------------------------------
# Triton ops


@torch.library.custom_op("fastlm::gated_mlp_fwd_triton", mutates_args=())
def gated_mlp_fwd_triton(gate: Tensor, up: Tensor | None, act: int) -> Tensor:
    from fastlm.kernels import gated_mlp

    return gated_mlp.gated_mlp_fwd(gate, up, act)


@torch.library.custom_op("fastlm::gated_mlp_bwd_triton", mutates_args=())
def gated_mlp_bwd_triton(dy: Tensor, gate: Tensor, up: Tensor | None, act: int) -> tuple[Tensor, Tensor]:
    from fastlm.kernels import gated_mlp

    return gated_mlp.gated_mlp_bwd(dy, gate, up, act)


# ---------------------------------------------------------------------------------------------------------------
# Fake impls and autograd, shared by both backends


def _fwd_fake(gate, up, act):
    M, n = gate.shape
    return gate.new_empty((M, n if up is not None else n // 2))


def _bwd_fake(dy, gate, up, act):
    return gate.new_empty(gate.shape), gate.new_empty(up.shape if up is not None else (0,))


def _setup_context(ctx, inputs, output):
    gate, up, act = inputs
    ctx.save_for_backward(gate, up)
    ctx.act = act


def _backward(backend: str):
    bwd_op = GATED_MLP_BWD[backend]

    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        if dy.stride(-1) != 1 and dy.shape[-1] > 1:  # e.g. the expanded gradient of a .sum(): one copy
            dy = dy.contiguous()
        dgate, dup = call(bwd_op, dy, gate, up, ctx.act)
        return dgate, (dup if up is not None else None), None

    return backward


GATED_MLP_BWD = register("gated_mlp_bwd", _bwd_fake, backends=("triton", "cpu"))
GATED_MLP_FWD = register("gated_mlp_fwd", _fwd_fake, _backward, _setup_context, backends=("triton", "cpu"))


# ---------------------------------------------------------------------------------------------------------------
# Validation and the shared launch path


def _validate(gate: Tensor, up: Tensor | None, name: str) -> None:
    """Shapes, dtypes and devices (every backend): gate and up alike, or an even last dim in the gate_up form."""
    if not isinstance(gate, Tensor):
        raise TypeError(f"{name}: gate must be a Tensor, got {type(gate).__name__}")
    if up is None:
        if gate.dim() == 0 or gate.shape[-1] % 2:
            raise ValueError(
                f"{name}: with up=None, gate is the merged gate_up tensor [..., 2*I] (first half gate, second half up) "
                f"and its last dim must be even, got shape {list(gate.shape)}"
            )
        return
    if not isinstance(up, Tensor):
        raise TypeError(f"{name}: up must be a Tensor or None, got {type(up).__name__}")
    if up.shape != gate.shape:
        raise ValueError(f"{name}: up must have gate's shape {list(gate.shape)}, got {list(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"{name}: up must have gate's dtype {gate.dtype}, got {up.dtype}")
    check_device(up, "up", gate, "gate")


def _rows(t: Tensor, n: int) -> Tensor:
    """(..., n) -> (M, n) with unit column stride: a view whenever the leading dims merge (a chunk of a merged
    projection and other row-strided inputs included); otherwise, and for a non-unit last stride, one copy."""
    t2 = t.reshape(math.prod(t.shape[:-1]), n) if t.dim() else t.reshape(1, 1)
    return t2 if t2.stride(-1) == 1 or n <= 1 else t2.contiguous()


def _fused(gate: Tensor, up: Tensor | None, act: int, backend: str) -> Tensor:
    check_tensor(gate, "gate", backend)
    n = gate.shape[-1] if gate.dim() else 1
    out_shape = gate.shape if up is not None else (*gate.shape[:-1], n // 2)
    y = call(GATED_MLP_FWD[backend], _rows(gate, n), None if up is None else _rows(up, n), act)
    return y.view(out_shape)


# ---------------------------------------------------------------------------------------------------------------
# Public functions (re-exported by fastlm.functional)


def swiglu(gate: Tensor, up: Tensor | None = None) -> Tensor:
    """SwiGLU: ``torch.nn.functional.silu(gate) * up`` in one pass (and one pass for both gradients).

    Args:
        gate: ``(*, I)``; float32/float16/bfloat16 for the fused backends (math in float32), any dtype on the torch
            backend (float64 goes there under ``auto``). With ``up=None``: ``(*, 2*I)``, the output of a merged
            gate-up projection (Phi-3's ``gate_up_proj``): its first half along the last dim is the gate, its
            second half the up projection, i.e. ``gate, up = gate.chunk(2, dim=-1)``; the split happens inside the
            kernel and the gradient is one ``(*, 2*I)`` tensor.
        up: ``(*, I)``, gate's shape, dtype and device; or None (the merged form above).

    Returns:
        ``(*, I)`` in gate's dtype. Inputs whose last dim has unit stride and whose leading dims merge into rows of
        one stride (e.g. the ``chunk`` halves of a merged projection) are read in place; others are copied once.
    """
    _validate(gate, up, "swiglu")
    backend = resolve("swiglu", gate)
    if backend == "torch":
        return reference.swiglu(gate, up)
    return _fused(gate, up, ACT_SILU, backend)


def geglu(gate: Tensor, up: Tensor | None = None, approximate: str = "tanh") -> Tensor:
    """GeGLU: ``torch.nn.functional.gelu(gate, approximate=approximate) * up`` in one pass.

    Args:
        gate, up: as in :func:`swiglu` (``up=None``: ``gate`` is the merged ``(*, 2*I)`` gate_up tensor).
        approximate: ``"tanh"`` (the default, as in Gemma and GPT-2's GELU) or ``"none"`` (exact, with erf).

    Returns:
        ``(*, I)`` in gate's dtype.
    """
    if approximate not in GELU_ACT:
        raise ValueError(f"geglu: approximate must be 'tanh' or 'none', got {approximate!r}")
    _validate(gate, up, "geglu")
    backend = resolve("geglu", gate)
    if backend == "torch":
        return reference.geglu(gate, up, approximate)
    return _fused(gate, up, GELU_ACT[approximate], backend)
