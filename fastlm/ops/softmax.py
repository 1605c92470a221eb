"""Softmax, log-softmax and the scaled-masked softmax: registered ops, fake impls, autograd, public functions.

Ops (for <backend> in {triton, cuda, cpu}):
    fastlm::softmax_fwd_<backend>(x, dim, log) -> y
    fastlm::masked_softmax_fwd_<backend>(x, mask?, scale, causal) -> y      x: (B, H, Sq, Sk), mask: (B, H, Sq, Sk) view
    fastlm::softmax_bwd_<backend>(dy, y, dim, log, scale) -> dx
``x`` is either 2-D (rows with any stride, unit last stride) with dim 1, or contiguous with any dim; ``y`` and
``dx`` are contiguous. The masked op's mask is an expanded view (broadcast dims have stride 0): bool, True = keep,
or additive float.
"""

import math

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastlm.dispatch import resolve
from fastlm.ops.registry import call, check_device, check_tensor, register

# ---------------------------------------------------------------------------------------------------------------
# Triton ops


@torch.library.custom_op("fastlm::softmax_fwd_triton", mutates_args=())
def softmax_fwd_triton(x: Tensor, dim: int, log: bool) -> Tensor:
    from fastlm.kernels import softmax

    if not -x.dim() <= dim < x.dim():
        raise IndexError(f"dim {dim} out of range for a {x.dim()}-d input")
    return softmax.softmax_fwd(x, dim % x.dim(), log)


@torch.library.custom_op("fastlm::masked_softmax_fwd_triton", mutates_args=())
def masked_softmax_fwd_triton(x: Tensor, mask: Tensor | None, scale: float, causal: bool) -> Tensor:
    from fastlm.kernels import softmax

    B, H, Sq, Sk = x.shape
    y = softmax.softmax_fwd(
        x.view(B * H * Sq, Sk) if x.is_contiguous() else x.reshape(-1, Sk),
        1,
        False,
        scale=scale,
        causal=causal,
        mask_view=(mask, H, Sq),
    )
    return y.view(B, H, Sq, Sk)


@torch.library.custom_op("fastlm::softmax_bwd_triton", mutates_args=())
def softmax_bwd_triton(dy: Tensor, y: Tensor, dim: int, log: bool, scale: float) -> Tensor:
    from fastlm.kernels import softmax

    return softmax.softmax_bwd(dy, y, dim, log, scale)


# ---------------------------------------------------------------------------------------------------------------
# Fakes and autograd, shared by the backends


def _fwd_fake(x, dim, log):
    return x.new_empty(x.shape)


def _masked_fwd_fake(x, mask, scale, causal):
    return x.new_empty(x.shape)


def _bwd_fake(dy, y, dim, log, scale):
    return y.new_empty(y.shape)


def _dy_like(dy: Tensor, dim: int) -> Tensor:
    """The incoming gradient in the addressing the kernels take (see the module docstring)."""
    if dy.dim() == 2 and dim == 1:
        return dy if dy.stride(1) == 1 else dy.contiguous()
    return dy.contiguous()


def _setup(ctx, inputs, output):
    ctx.dim, ctx.log = inputs[1], inputs[2]
    ctx.save_for_backward(output)


def _backward(backend: str):
    bwd = SOFTMAX_BWD[backend]

    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return call(bwd, _dy_like(dy, ctx.dim), y, ctx.dim, ctx.log, 1.0), None, None

    return backward


def _masked_setup(ctx, inputs, output):
    ctx.scale = inputs[2]
    ctx.save_for_backward(output)


def _masked_backward(backend: str):
    bwd = SOFTMAX_BWD[backend]

    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        B, H, Sq, Sk = y.shape
        dx = call(bwd, _dy_like(dy.reshape(-1, Sk), 1), y.view(-1, Sk), 1, False, ctx.scale)
        return dx.view(B, H, Sq, Sk), None, None, None

    return backward


SOFTMAX_BWD = register("softmax_bwd", _bwd_fake)
SOFTMAX_FWD = register("softmax_fwd", _fwd_fake, _backward, _setup)
MASKED_SOFTMAX_FWD = register("masked_softmax_fwd", _masked_fwd_fake, _masked_backward, _masked_setup)


# ---------------------------------------------------------------------------------------------------------------
# Public functions


def _softmax(input: Tensor, dim: int, dtype, log: bool) -> Tensor:
    if dtype is not None:
        input = input.to(dtype)  # torch semantics: cast first, then softmax in that dtype
    backend = resolve("log_softmax" if log else "softmax", input)
    if backend == "torch":
        return (TF.log_softmax if log else TF.softmax)(input, dim)
    check_tensor(input, "input", backend)
    if input.dim() == 0:
        input = input.reshape(1)
        return _softmax(input, 0, None, log).reshape(())
    nd = input.dim()
    if not -nd <= dim < nd:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-nd}, {nd - 1}], but got {dim})")
    d = dim % nd
    if nd == 2 and d == 1 and input.stride(1) == 1:  # rows as they are: no reshape, no view
        return call(SOFTMAX_FWD[backend], input, 1, log)
    if d == nd - 1:
        R = input.shape[-1]
        x2 = input.reshape(-1, R)  # a view for row-strided inputs
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()  # non-unit last stride: one copy
        return call(SOFTMAX_FWD[backend], x2, 1, log).view(input.shape)
    return call(
        SOFTMAX_FWD[backend], input.contiguous(), d, log
    )  # a strided launch along ``d``; copies only a strided input


def softmax(input: Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> Tensor:
    """Softmax along ``dim``; same signature and semantics as ``torch.nn.functional.softmax`` (``dim`` is
    required in spirit: the default is the last dim, where torch's implicit choice is deprecated).

    Args:
        input: any shape, float32/float16/bfloat16 on the fused backends; rows of any width.
        dim: the dim to normalise; other dims than the last run as a strided launch (no transpose copy).
        dtype: cast the input to this dtype first (as torch).

    Returns:
        Tensor of input's shape and dtype (or ``dtype``).
    """
    return _softmax(input, dim, dtype, log=False)


def log_softmax(input: Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> Tensor:
    """Log-softmax along ``dim``; same signature and semantics as ``torch.nn.functional.log_softmax``. See
    :func:`softmax`."""
    return _softmax(input, dim, dtype, log=True)


def _as_4d(t: Tensor) -> tuple[Tensor, tuple]:
    """(..., Sq, Sk) -> (B, H, Sq, Sk) with B, H the merged leading dims."""
    lead = t.shape[:-2]
    H = lead[-1] if len(lead) >= 1 else 1
    B = math.prod(lead[:-1]) if len(lead) >= 2 else 1
    return t.reshape(B, H, *t.shape[-2:]), lead


def scaled_masked_softmax(
    input: Tensor, mask: Tensor | None = None, scale: float = 1.0, is_causal: bool = False
) -> Tensor:
    """``softmax(input * scale + mask)`` over the last dim of attention scores, in one pass.

    Args:
        input: ``(..., Sq, Sk)`` scores, float32/float16/bfloat16; any Sk (rows wider than 16384 are split).
        mask: optional, broadcastable to ``input`` as in torch SDPA: bool (True = keep) or an additive float mask.
            The mask receives no gradient.
        scale: multiplies the scores before the mask is applied.
        is_causal: keep only ``key <= query`` (top-left aligned, as torch's ``is_causal``).

    Returns:
        ``(..., Sq, Sk)`` probabilities in input's dtype. A row whose every element is masked gives zeros (torch's
        unfused composition gives NaN there).
    """
    if input.dim() < 2:
        raise ValueError(f"input must have at least 2 dims (..., Sq, Sk), got shape {list(input.shape)}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask must be bool (True = keep) or floating point (additive), got {mask.dtype}")
        check_device(mask, "mask", input, "input")
        try:
            torch.broadcast_shapes(mask.shape, input.shape)
        except RuntimeError:
            raise ValueError(
                f"mask of shape {list(mask.shape)} is not broadcastable to input's {list(input.shape)}"
            ) from None
        if torch.broadcast_shapes(mask.shape, input.shape) != input.shape:
            raise ValueError(f"mask of shape {list(mask.shape)} would broadcast input {list(input.shape)} up")
        if mask.requires_grad:
            raise ValueError("mask requires grad, but scaled_masked_softmax gives the mask no gradient")
    backend = resolve("scaled_masked_softmax", input)
    if backend == "torch":
        from fastlm import reference

        return reference.scaled_masked_softmax(input, mask, scale, is_causal)
    check_tensor(input, "input", backend)
    x4, lead = _as_4d(input)
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    m4 = None
    if mask is not None:
        m4 = mask.expand(input.shape).reshape(x4.shape)  # a stride-0 view unless the leading dims cannot merge
    y = call(MASKED_SOFTMAX_FWD[backend], x4, m4, float(scale), bool(is_causal))
    return y.view(input.shape)
