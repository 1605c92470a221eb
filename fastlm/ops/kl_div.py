"""KL divergence with torch.nn.functional.kl_div's semantics: registered ops, fake impl, autograd, public function.

Ops (for <backend> in {triton, cpu}; the kernels: kernels/kl_div.py, csrc/cpu/kl_div.cpp):
    fastlm::kl_div_fwd_<backend>(input, target, log_target, reduction, divisor, compute_grad, compute_target_grad)
        -> (loss, grad, target_grad)
``input`` and ``target`` are contiguous, of one shape and dtype (the public function broadcasts them first).
reduction 0: ``loss`` elementwise (input's shape and dtype); 1: ``loss`` = sum / divisor, a float32 scalar (divisor
0 gives NaN). ``grad`` and ``target_grad`` are d loss / d input and d loss / d target for an incoming gradient of 1
(so divided by ``divisor``), written in the same pass as the loss, (0,) when not asked for; the backward only
multiplies them by the incoming gradient.

Pointwise (x = input, t = target), as torch: ``t * (log t - x)`` with 0 where t == 0 (torch's xlogy), or
``exp(t) * (t - x)`` with ``log_target``. d/dx = -t (-exp(t)); d/dt = log t + 1 - x, NaN where t == 0 as torch's
(xlogy's derivative; the true limit is -inf), or exp(t) * (t - x + 1). Reductions: "sum"; "mean" over all elements
(torch's, with its warning: "batchmean" is the KL divergence); "batchmean" = sum / input.size(0) (the sum for a 0-d
input); "none". Bytes: reads input and target once, writes each gradient asked for (and the loss for "none").
"""

import math
import warnings

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastlm.dispatch import resolve
from fastlm.ops.cross_entropy import first_backward, fp16_unscaled, loss_dtype, scale_saved_grad
from fastlm.ops.registry import call, check_device, check_tensor, register

REDUCTIONS = ("none", "batchmean", "sum", "mean")
MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)  # torch's own words (torch.nn.functional.kl_div), so that filters written for torch's warning apply


@torch.library.custom_op("fastlm::kl_div_fwd_triton", mutates_args=())
def kl_div_fwd_triton(
    input: Tensor,
    target: Tensor,
    log_target: bool,
    reduction: int,
    divisor: int,
    compute_grad: bool,
    compute_target_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from fastlm.kernels import kl_div as k

    loss, gx, gt = k.kl_div_fwd(input, target, log_target, reduction == 1, divisor, compute_grad, compute_target_grad)
    gx = gx if gx is not None else input.new_empty((0,))
    gt = gt if gt is not None else input.new_empty((0,))  # a second tensor: outputs must not alias
    return loss, gx, gt


def _kl_fake(input, target, log_target, reduction, divisor, compute_grad, compute_target_grad):
    loss = input.new_empty(input.shape) if reduction == 0 else input.new_empty((), dtype=torch.float32)
    grad = input.new_empty(input.shape if compute_grad else (0,))
    return loss, grad, input.new_empty(input.shape if compute_target_grad else (0,))


def _kl_setup(ctx, inputs, output):
    ctx.reduction, ctx.compute_grad, ctx.compute_target_grad = inputs[3], inputs[5], inputs[6]
    ctx.save_for_backward(output[1], output[2])
    ctx.set_materialize_grads(False)  # the gradient outputs are never differentiated


def _scale(saved: Tensor, dloss: Tensor, reduction: int, first: bool) -> Tensor:
    if reduction == 0:
        return saved * dloss  # elementwise incoming gradient, in the loss's (= input's) dtype
    return scale_saved_grad(saved, dloss, reduction, first)  # a scalar: the first loss.backward() takes it as it is


def _kl_backward(ctx, dloss, _dgrad, _dtgrad):
    grad, tgrad = ctx.saved_tensors
    first = first_backward(ctx)
    dx = _scale(grad, dloss, ctx.reduction, first) if ctx.compute_grad and dloss is not None else None
    dt = _scale(tgrad, dloss, ctx.reduction, first) if ctx.compute_target_grad and dloss is not None else None
    return dx, dt, None, None, None, None, None


KL_DIV_FWD = register("kl_div_fwd", _kl_fake, lambda backend: _kl_backward, _kl_setup, backends=("triton", "cpu"))


class _Fp16LogTarget(torch.autograd.Function):
    """fp16 with ``log_target``: the fused kernel computes the loss only; the backward forms the gradients
    -exp(t) * g and exp(t) * (t - x + 1) * g in fp32 with the incoming gradient g (a GradScaler's factor, times
    1 / divisor) and rounds them to fp16 once, as torch's unfused path (kl_div in fp32 under autocast). Stored in
    the forward, -exp(t) would round to 0 in fp16 wherever exp(t) < 2^-25 (log-probabilities below -17.3; the
    GradScaler's S / N keeps them down to -17.3 - log(S / N)) and have no bound that admits a power-of-two prescale
    (cross_entropy.fp16_prescale). These two elementwise expressions are torch ops: one read of x and t and one write
    per gradient, the bytes the fused kernel's gradient sweep would move. Without ``log_target`` the stored
    gradient -t is exact in fp16 and the fused kernel writes it (unscaled, :func:`kl_div`)."""

    @staticmethod
    def forward(ctx, x, t, reduction, divisor, backend):
        loss, _, _ = call(KL_DIV_FWD[backend], x, t, True, reduction, divisor, False, False)
        ctx.save_for_backward(x, t)
        ctx.scale = (1.0 / divisor if divisor else math.nan) if reduction == 1 else None
        return loss

    @staticmethod
    def backward(ctx, dloss):
        x, t = ctx.saved_tensors
        g = dloss.float() if ctx.scale is None else dloss.float() * ctx.scale
        et = t.float().exp()
        gx = (-et * g).to(x.dtype) if ctx.needs_input_grad[0] else None
        gt = (et * (t.float() - x.float() + 1.0) * g).to(t.dtype) if ctx.needs_input_grad[1] else None
        return gx, gt, None, None, None


def kl_div(
    input: Tensor,
    target: Tensor,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    log_target: bool = False,
) -> Tensor:
    """The KL divergence loss; same signature and semantics as ``torch.nn.functional.kl_div``.

    Args:
        input: log-probabilities, any shape (float32 / float16 / bfloat16 on the fused backends; other dtypes run
            torch's function under ``auto``).
        target: probabilities (log-probabilities with ``log_target``), broadcastable with ``input`` as torch
            allows (a broadcast operand is expanded into a copy first); input's dtype on the fused backends. A
            target of exactly 0 contributes 0 (its own gradient is NaN there, as torch's).
        size_average, reduce: torch's deprecated arguments (mapped to ``reduction`` as torch does).
        reduction: ``"none"`` (the broadcast shape), ``"sum"``, ``"mean"`` (over all elements: torch's, and its
            UserWarning), or ``"batchmean"`` (sum / input.size(0); the sum for a 0-d input).
        log_target: the target holds log-probabilities.

    Returns:
        The loss in input's dtype (reduced in float32). Gradients w.r.t. input and target (when they require
        grad) are written in the forward pass; the backward only scales them (fp16: stored unscaled, the reduction's
        divisor and the incoming gradient applied in fp32 in the backward; see cross_entropy.fp16_unscaled).
    """
    backend = resolve("kl_div", input)
    if backend == "torch":
        return TF.kl_div(input, target, size_average, reduce, reduction, log_target)
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    elif reduction == "mean" and not torch.compiler.is_compiling():
        warnings.warn(MEAN_WARNING, stacklevel=2)
    check_tensor(input, "input", backend)
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
    if target.dtype != input.dtype:
        raise TypeError(f"target must have input's dtype ({input.dtype}) for the {backend} backend, got {target.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    check_device(target, "target", input, "input")
    try:
        shape = torch.broadcast_shapes(input.shape, target.shape)
    except RuntimeError:
        raise ValueError(
            f"input {list(input.shape)} and target {list(target.shape)} must be broadcastable to one shape"
        ) from None
    # A broadcast operand is expanded into a copy (autograd sums its gradient back); contiguous ones pass as is.
    x = input.expand(shape).contiguous()
    t = target.expand(shape).contiguous()
    numel = math.prod(shape)
    if reduction == "mean":
        divisor = numel  # 0: NaN, torch's mean of nothing
    elif reduction == "batchmean" and input.dim() != 0:
        divisor = input.shape[0]
    else:
        divisor = 1
    grad_on = torch.is_grad_enabled()
    fp16 = fp16_unscaled(x, grad_on and (input.requires_grad or target.requires_grad))
    if fp16 and log_target:
        loss = _Fp16LogTarget.apply(x, t, 0 if reduction == "none" else 1, divisor, backend)
        return loss.to(loss_dtype(input))
    # fp16: gradients stored unscaled (-t: exact), the divisor applied to the fp32 sum (cross_entropy.fp16_unscaled)
    unscaled = reduction != "none" and fp16
    loss, _, _ = call(
        KL_DIV_FWD[backend],
        x,
        t,
        bool(log_target),
        0 if reduction == "none" else 1,
        1 if unscaled else divisor,
        grad_on and input.requires_grad,
        grad_on and target.requires_grad,
    )
    if unscaled and divisor != 1:
        loss = loss / divisor  # 0: NaN (0 / 0), torch's mean of nothing
    return loss.to(loss_dtype(input))  # float32 under autocast, as torch's kl_div (on its fp32 list)
