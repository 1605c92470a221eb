"""LayerNorm / RMSNorm (+ residual add): registered ops, fake impls, autograd, backend dispatch, public functions.

Ops (2-D, hidden size N on the last dim, unit column stride, any row stride):
    fastlm::norm_fwd_<backend>(x, residual?, weight?, bias?, eps, rms) -> (y, h, mean, rstd)
    fastlm::norm_bwd_<backend>(dy, x, weight?, mean, rstd, dh?, rms, has_bias) -> (dx, dw, db)
for <backend> in {triton, cuda, cpu}. The Triton ops are Python ``custom_op``s; the C++ ops are defined in
``csrc/ops.cpp``. Both share the fake impls and the autograd formula below (``register_autograd`` builds the
custom autograd Function over the op pair). ``h`` is ``x + residual`` (empty without a residual); ``mean`` is empty
for RMSNorm; statistics are fp32.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastlm import reference
from fastlm.dispatch import resolve
from fastlm.ops.registry import call, check_device, check_tensor, register

MAX_N = 65536  # widest normalised row of the fused kernels (both backends)


# ---------------------------------------------------------------------------------------------------------------
# Triton ops


@torch.library.custom_op("fastlm::norm_fwd_triton", mutates_args=())
def norm_fwd_triton(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from fastlm.kernels import norms

    return norms.norm_fwd(x, residual, weight, bias, eps, rms)


@torch.library.custom_op("fastlm::norm_bwd_triton", mutates_args=())
def norm_bwd_triton(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    dh: Tensor | None,
    rms: bool,
    has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from fastlm.kernels import norms

    return norms.norm_bwd(dy, x, weight, mean, rstd, dh, rms, has_bias)


# ---------------------------------------------------------------------------------------------------------------
# Fake impls and autograd, shared by both backends


def _fwd_fake(x, residual, weight, bias, eps, rms):
    M, N = x.shape
    return (
        x.new_empty((M, N)),
        x.new_empty((M, N) if residual is not None else (0,)),
        x.new_empty((0,) if rms else (M,), dtype=torch.float32),
        x.new_empty((M,), dtype=torch.float32),
    )


def _bwd_fake(dy, x, weight, mean, rstd, dh, rms, has_bias):
    M, N = x.shape
    w_dtype = weight.dtype if weight is not None else torch.float32  # fp32 db without a weight (both backends)
    return (
        x.new_empty((M, N)),
        x.new_empty((N,) if weight is not None else (0,), dtype=w_dtype),
        x.new_empty((N,) if has_bias and not rms else (0,), dtype=w_dtype),
    )


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, rms = inputs
    y, h, mean, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.rms = rms
    ctx.mark_non_differentiable(mean, rstd)


def _backward(backend: str):
    bwd_op = NORM_BWD[backend]

    def backward(ctx, dy, dh, _dmean, _drstd):
        x, weight, mean, rstd = ctx.saved_tensors
        if dy.stride(-1) != 1:  # e.g. the expanded gradient of a .sum(): one copy
            dy = dy.contiguous()
        if ctx.has_residual and dh.stride(-1) != 1:
            dh = dh.contiguous()
        dx, dw, db = call(bwd_op, dy, x, weight, mean, rstd, dh if ctx.has_residual else None, ctx.rms, ctx.has_bias)
        # With a residual, input and residual receive the same gradient (autograd clones before accumulating it
        # into two leaves, so the two .grad tensors never alias).
        return (
            dx,
            dx if ctx.has_residual else None,
            dw if weight is not None else None,
            (db if db.dtype == ctx.bias_dtype else db.to(ctx.bias_dtype)) if ctx.has_bias else None,
            None,
            None,
        )

    return backward


NORM_BWD = register("norm_bwd", _bwd_fake)
NORM_FWD = register("norm_fwd", _fwd_fake, _backward, _setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Validation and the shared launch path


def _validate(
    input: Tensor, residual: Tensor | None, normalized_shape: Sequence[int], weight, bias, backend: str
) -> tuple[int, ...]:
    shape = tuple(normalized_shape) if isinstance(normalized_shape, Sequence) else (int(normalized_shape),)
    check_tensor(input, "input", backend)
    if len(shape) == 0 or input.dim() < len(shape) or input.shape[-len(shape) :] != shape:
        raise ValueError(
            f"normalized_shape {list(shape)} must match the trailing dims of input, whose shape is {list(input.shape)}"
        )
    n = math.prod(shape)
    if not 1 <= n <= MAX_N:
        raise ValueError(f"the normalised size prod(normalized_shape) = {n} must be in [1, {MAX_N}] for {backend}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} (normalized_shape), got {list(t.shape)}")
        check_device(t, name, input, "input")
        if t.dtype not in (input.dtype, torch.float32):
            raise TypeError(f"{name} must be {input.dtype} (input's dtype) or float32, got {t.dtype}")
    if residual is not None:
        if residual.shape != input.shape:
            raise ValueError(f"residual must have input's shape {list(input.shape)}, got {list(residual.shape)}")
        check_device(residual, "residual", input, "input")
        if residual.dtype != input.dtype:
            raise TypeError(f"residual must have input's dtype {input.dtype}, got {residual.dtype}")
    return shape


def _rows(t: Tensor, n: int) -> Tensor:
    """(..., *normalized_shape) -> (M, n) with unit column stride. A view whenever the trailing dims merge (row-
    strided inputs included); otherwise, and for a non-unit last stride, one visible copy."""
    t2 = t if t.dim() == 2 and t.shape[1] == n else t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _flat(t: Tensor | None) -> Tensor | None:
    if t is None or (t.dim() == 1 and t.stride(0) == 1):
        return t
    return t.reshape(-1).contiguous()


def _fused(input, residual, normalized_shape, weight, bias, eps, rms, backend):
    shape = _validate(input, residual, normalized_shape, weight, bias, backend)
    n = math.prod(shape)
    y, h, _, _ = call(
        NORM_FWD[backend],
        _rows(input, n),
        _rows(residual, n) if residual is not None else None,
        _flat(weight),
        _flat(bias),
        float(eps),
        rms,
    )
    if input.dim() != 2:
        y = y.view(input.shape)
        h = h.view(input.shape) if residual is not None else h
    return (y, h) if residual is not None else y


def _rms_eps(eps: float | None, dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if eps is None else eps  # torch.nn.functional.rms_norm's default


# ---------------------------------------------------------------------------------------------------------------
# Public functions (re-exported by fastlm.functional)


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """LayerNorm over the trailing ``normalized_shape`` dims; same signature and semantics as
    ``torch.nn.functional.layer_norm``.

    Args:
        input: ``(*, *normalized_shape)``, float32/float16/bfloat16 for the fused backends; rows may be strided.
        normalized_shape: trailing dims to normalise over; their product N is at most 65536.
        weight, bias: ``normalized_shape``, input's dtype or float32 (optional).
        eps: added to the variance.

    Returns:
        ``(*, *normalized_shape)`` in input's dtype; statistics are computed in float32.
    """
    backend = resolve("layer_norm", input)
    if backend == "torch":
        return TF.layer_norm(input, normalized_shape, weight, bias, eps)
    return _fused(input, None, normalized_shape, weight, bias, eps, False, backend)


def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """RMSNorm: ``input / sqrt(mean(input^2) + eps) * weight``; same signature and semantics as
    ``torch.nn.functional.rms_norm`` (``eps=None`` means ``torch.finfo(input.dtype).eps``).

    Shapes as in :func:`layer_norm`.
    """
    backend = resolve("rms_norm", input)
    if backend == "torch":
        return TF.rms_norm(input, normalized_shape, weight, eps)
    return _fused(input, None, normalized_shape, weight, None, _rms_eps(eps, input.dtype), True, backend)


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """``h = input + residual; return layer_norm(h, ...), h`` in one pass over memory.

    Args:
        input, residual: ``(*, *normalized_shape)``, same dtype and device.
        Other arguments as in :func:`layer_norm`.

    Returns:
        ``(out, h)``, both shaped like input and in its dtype; ``h`` (the new residual stream) is rounded to that
        dtype before it is normalised, as the unfused code would do.
    """
    backend = resolve("add_layer_norm", input)
    if backend == "torch":
        return reference.add_layer_norm(input, residual, normalized_shape, weight, bias, eps)
    return _fused(input, residual, normalized_shape, weight, bias, eps, False, backend)


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> tuple[Tensor, Tensor]:
    """``h = input + residual; return rms_norm(h, ...), h`` in one pass over memory. Shapes as in
    :func:`add_layer_norm`."""
    backend = resolve("add_rms_norm", input)
    if backend == "torch":
        return reference.add_rms_norm(input, residual, normalized_shape, weight, eps)
    return _fused(input, residual, normalized_shape, weight, None, _rms_eps(eps, input.dtype), True, backend)
