"""Cross-entropy over class indices or class probabilities: registered ops, fake impls, autograd, the public
function, and the input checks and helpers that the linear cross-entropy (linear_cross_entropy.py) shares.

Ops (for <backend> in {triton, cuda, cpu}):
    fastlm::cross_entropy_fwd_<backend>(input, target, weight?, ignore_index, label_smoothing, reduction,
                                        compute_grad) -> (loss, grad)
``input`` is (N, C) with a unit class stride or contiguous (N, C, D); ``target`` is (N*D,) int64; ``weight`` (C,)
fp32. ``loss`` is fp32: (N*D,) for reduction "none", a scalar otherwise; ``grad`` is d loss / d input for an
incoming gradient of 1 (input's dtype and shape), written in the same pass as the loss, or (0,) when not asked for.
The backward only scales it by the incoming gradient.

Class-probability (soft) targets, for <backend> in {triton, cpu} (the CUDA C++ kernels have none):
    fastlm::soft_cross_entropy_fwd_<backend>(input, target, weight?, label_smoothing, reduction, compute_grad,
                                             compute_target_grad) -> (loss, grad, target_grad)
``target`` has input's shape and dtype ((N, C): unit class stride; (N, C, D): contiguous). Per row, with
t' = (1 - eps) * t + eps / C (torch's smoothing of probabilities): loss = -sum_c w_c t'_c log_softmax(x)_c,
d loss / d x_c = p_c * sum_k w_k t'_k - w_c t'_c, d loss / d t_c = -(1 - eps) * w_c * log_softmax(x)_c. As torch:
targets need not sum to 1, there is no ignore_index, and the mean divides by the number of rows N * D (not by a
sum of weights). ``target_grad`` (when the target requires grad) is written in the forward's gradient sweep, so
the backward scales both saved gradients and reads nothing else. Bytes: reads x and t twice (statistics, then
gradients), writes each gradient once.
"""

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastlm.dispatch import host_readable, resolve
from fastlm.ops import vocab_parallel
from fastlm.ops.registry import call, check_device, check_tensor, register

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def mean_denominator(target: Tensor, weight: Tensor | None, ignore_index: int, C: int) -> Tensor:
    """The mean's denominator as a (1,) fp32 device tensor: sum of w[target] over the rows not ignored (no sync)."""
    keep = target != ignore_index
    if weight is None:
        return keep.sum(dtype=torch.float32).reshape(1)
    return (weight[target.clamp(0, C - 1)] * keep).sum(dtype=torch.float32).reshape(1)


def reduce_losses(losses: Tensor, reduction: int, denom: Tensor | None) -> Tensor:
    if reduction == 0:
        return losses
    total = losses.sum()
    return total / denom[0] if reduction == 1 else total


@torch.library.custom_op("fastlm::cross_entropy_fwd_triton", mutates_args=())
def cross_entropy_fwd_triton(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    from fastlm.kernels import cross_entropy as k

    denom = mean_denominator(target, weight, ignore_index, input.shape[1]) if reduction == 1 else None
    losses, grad = k.cross_entropy_rows(input, target, weight, denom, ignore_index, label_smoothing, compute_grad)
    if grad is None:
        grad = input.new_empty((0,))
    return reduce_losses(losses, reduction, denom), grad


def _ce_fake(input, target, weight, ignore_index, label_smoothing, reduction, compute_grad):
    loss = input.new_empty((target.shape[0],) if reduction == 0 else (), dtype=torch.float32)
    return loss, input.new_empty(input.shape if compute_grad else (0,))


def _ce_setup(ctx, inputs, output):
    ctx.reduction = inputs[5]
    ctx.save_for_backward(output[1])
    # The `grad` output is never differentiated: without this, autograd fills a zero tensor of the input's size as
    # its incoming gradient on every backward (a whole extra write pass).
    ctx.set_materialize_grads(False)


def loss_dtype(input: Tensor) -> torch.dtype:
    """The loss's dtype: the input's, as torch; float32 under autocast, where torch runs cross-entropy in float32 (so
    that a GradScaler's scaled loss does not overflow fp16)."""
    return torch.float32 if torch.is_autocast_enabled(input.device.type) else input.dtype


def fp16_unscaled(x: Tensor, compute_grad: bool) -> bool:
    """True when a fused loss on ``x`` must not store its gradient scaled by 1/N (fp16 with a gradient to write).

    The fused losses write their gradient in the forward, before the incoming gradient is known. In fp16 a gradient
    already divided by the mean's denominator N (or batchmean's rows, kl_div's divisor) underflows: a softmax
    probability p becomes p / N, 0 in fp16 for p / N < 2^-25 (N = 4096: p < 7e-6), and a GradScaler's factor
    arrives only in the backward, after the rounding (issue 26 measured 86% zero gradients at N = 4096, V = 2000).
    So in fp16 the forward stores the gradient without the 1/N (times a power of two where the op allows one, see
    :func:`fp16_prescale`), the loss is the op's sum divided by N in fp32 outside the op, and autograd brings 1/N
    times the incoming gradient (the GradScaler's factor included) to the op's backward as one fp32 scalar, which
    multiplies the stored gradient in fp32 before its one rounding to fp16 (:func:`scale_grad`). Same bytes as
    before (the backward's multiply is a pass over the gradient that a GPU made anyway: its incoming gradient is a
    device tensor). bf16 has fp32's range and keeps the 1/N folded in (no backward pass on CPU for loss.backward());
    fp32 likewise."""
    return compute_grad and x.dtype == torch.float16


FP16_PRESCALE_EXP = 14  # the cross-entropies' gradients are at most 1 per logit times the largest class weight


def fp16_prescale(weight: Tensor | None, C: int, device) -> tuple[Tensor, Tensor]:
    """Class weights that make a cross-entropy store its fp16 gradient times 2^k, and 2^k ((1,) fp32 device tensor).

    Unscaled, a gradient p - [c == t] keeps probabilities down to 2^-25 only (fp16's rounding threshold), where
    torch's unfused path (cross-entropy in fp32 under autocast, its gradient times a GradScaler's S / N rounded to
    fp16 once) keeps them down to 2^-25 * N / S: at N = 4096, S = 65536, 16 times smaller ones. Measured at
    N = 4096, V = 2000, logits of std 3: 3.8% zero gradients unscaled against torch's 0.37%. Loss and gradient are
    both linear in the class weights, so weights times 2^k (k = 14 - ceil(log2(max |w|)), k = 14 without class
    weights: every |gradient| <= 2^14 < 65504, label smoothing included) store the gradient times 2^k with no other
    rounding, and keep probabilities down to 2^-39: no zero that torch's path keeps, for any S / N <= 2^14. The loss
    is divided back by 2^k (exactly) and the backward's scalar by 2^k too (fp32). Computed on the device: no sync."""
    if weight is None:
        scale = torch.full((1,), 2.0**FP16_PRESCALE_EXP, dtype=torch.float32, device=device)
        return scale.expand(C), scale
    top = weight.abs().max().clamp(min=1.0).reshape(1)
    scale = torch.exp2(FP16_PRESCALE_EXP - torch.ceil(torch.log2(top)))
    return weight * scale, scale


def scale_grad(grad, g):
    """grad * g in grad's dtype. fp16: through fp32, since g may not fit fp16 (GradScaler's default scale is 65536,
    which is inf in fp16) while the product does."""
    if grad.dtype == torch.float16:
        return (grad.float() * g).to(torch.float16)
    return grad * g.to(grad.dtype)


def first_backward(ctx) -> bool:
    """True on the first backward through ``ctx``'s node (then marks it): see :func:`scale_saved_grad`."""
    first = not getattr(ctx, "_fastlm_backward_done", False)
    ctx._fastlm_backward_done = True
    return first


def scale_saved_grad(grad: Tensor, dloss: Tensor, reduction: int, first: bool) -> Tensor:
    """A gradient saved by a fused loss's forward (for an incoming gradient of 1) times the incoming gradient
    ``dloss``: per row for reduction 0 (rows are dim 0, and the trailing dims of (N, C, D)), else a scalar.

    loss.backward() of a mean / sum (``dloss`` 1 on the CPU, where the check costs no device sync) hands the saved
    tensor itself to the first backward (``first``, from :func:`first_backward`): the multiply would be a whole extra
    pass, and for the LM-head losses a copy of the weight gradient at the peak. Autograd may then make it a leaf's
    ``.grad`` (it does on CPU: the tensor is not copied), so a second backward through a retained graph gets a copy:
    two calls never return one storage, and a saved gradient changed in place in between (an accumulated or clipped
    ``.grad``) makes autograd raise its in-place modification error instead of a silently wrong result. Not while
    tracing: there the comparison is a data-dependent guard (torch 2.11 traces this backward with FunctionalTensors
    outside Dynamo, where torch.compiler.is_compiling() is False)."""
    if reduction == 0:
        g = dloss.view(grad.shape[0], 1, -1) if grad.dim() == 3 else dloss.view(-1, 1)
        return scale_grad(grad, g)
    if host_readable(grad, dloss) and bool(dloss == 1):
        return grad if first else grad.clone()
    return scale_grad(grad, dloss)


def _ce_backward(ctx, dloss, _dgrad):
    if dloss is None:
        return None, None, None, None, None, None, None
    (grad,) = ctx.saved_tensors
    return scale_saved_grad(grad, dloss, ctx.reduction, first_backward(ctx)), None, None, None, None, None, None


CROSS_ENTROPY_FWD = register("cross_entropy_fwd", _ce_fake, lambda backend: _ce_backward, _ce_setup)


def check_soft_layout(input: Tensor, target: Tensor) -> None:
    """The soft-target kernels' layout contract (the C++ op checks the same): target of input's shape and dtype; (N, C)
    with unit class strides, or contiguous (N, C, D)."""
    if target.shape != input.shape or target.dtype != input.dtype:
        raise ValueError(
            f"target must have input's shape and dtype {list(input.shape)} {input.dtype}, got "
            f"{list(target.shape)} {target.dtype}"
        )
    if input.dim() == 3:
        if not (input.is_contiguous() and target.is_contiguous()):
            raise ValueError("(N, C, D) input and target must be contiguous")
    elif input.dim() != 2 or (input.shape[1] > 1 and (input.stride(1) != 1 or target.stride(1) != 1)):
        raise ValueError(
            f"input and target must be (N, C) with unit class strides, got strides {list(input.stride())} and "
            f"{list(target.stride())}"
        )


@torch.library.custom_op("fastlm::soft_cross_entropy_fwd_triton", mutates_args=())
def soft_cross_entropy_fwd_triton(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    label_smoothing: float,
    reduction: int,
    compute_grad: bool,
    compute_target_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from fastlm.kernels import cross_entropy as k

    check_soft_layout(input, target)
    rows = input.shape[0] * (input.shape[2] if input.dim() == 3 else 1)
    denom = torch.full((1,), float(rows), dtype=torch.float32, device=input.device) if reduction == 1 else None
    losses, grad, tgrad = k.soft_cross_entropy_rows(
        input, target, weight, denom, label_smoothing, compute_grad, compute_target_grad
    )
    grad = grad if grad is not None else input.new_empty((0,))
    tgrad = tgrad if tgrad is not None else input.new_empty((0,))  # a second tensor: outputs must not alias
    return reduce_losses(losses, reduction, denom), grad, tgrad


def _soft_fake(input, target, weight, label_smoothing, reduction, compute_grad, compute_target_grad):
    rows = input.shape[0] * (input.shape[2] if input.dim() == 3 else 1)
    loss = input.new_empty((rows,) if reduction == 0 else (), dtype=torch.float32)
    grad = input.new_empty(input.shape if compute_grad else (0,))
    return loss, grad, input.new_empty(input.shape if compute_target_grad else (0,))


def _soft_setup(ctx, inputs, output):
    ctx.reduction, ctx.compute_grad, ctx.compute_target_grad = inputs[4], inputs[5], inputs[6]
    ctx.save_for_backward(output[1], output[2])
    ctx.set_materialize_grads(False)  # the gradient outputs are never differentiated (see _ce_setup)


def _soft_backward(ctx, dloss, _dgrad, _dtgrad):
    grad, tgrad = ctx.saved_tensors
    first = first_backward(ctx)
    dx = scale_saved_grad(grad, dloss, ctx.reduction, first) if ctx.compute_grad and dloss is not None else None
    dt = scale_saved_grad(tgrad, dloss, ctx.reduction, first) if ctx.compute_target_grad and dloss is not None else None
    return dx, dt, None, None, None, None, None


SOFT_CROSS_ENTROPY_FWD = register(
    "soft_cross_entropy_fwd", _soft_fake, lambda backend: _soft_backward, _soft_setup, backends=("triton", "cpu")
)


# ---------------------------------------------------------------------------------------------------------------
# Validation shared by cross_entropy and linear_cross_entropy


def check_inputs(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    reduction: str,
    label_smoothing: float,
    backend,
    soft: bool = False,
):
    """The checks shared by every cross-entropy: ``soft`` admits class-probability targets (cross_entropy's; the
    linear cross-entropy takes class indices only)."""
    check_tensor(input, "input", backend)
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
    if soft:
        if target.dtype != input.dtype:
            raise TypeError(
                f"a class-probability target must have input's dtype ({input.dtype}) for the {backend} backend, "
                f"got {target.dtype}"
            )
    elif target.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"target must hold class indices as int64 (or int32), got {target.dtype}; "
            "class-probability targets are not supported by the fused kernels"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    check_device(target, "target", input, "input")
    C = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if weight is not None:
        if weight.shape != (C,):
            raise ValueError(f"weight must have shape [{C}] (one per class), got {list(weight.shape)}")
        check_device(weight, "weight", input, "input")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got {weight.dtype}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "weight requires grad, but the fused cross-entropy gives the class weights no gradient (it would be "
                "silently dropped); detach it, or use fastlm.backend('torch') for trainable class weights"
            )


def check_target_range(target: Tensor, C: int, ignore_index: int) -> None:
    """On CPU the range check costs no device sync, so bad targets raise; on GPU, and inside torch.compile (where
    the check would be a data-dependent branch), they give NaN (documented). The cpu backend's kernel checks the
    range itself while it reads the targets (``target_range_error`` turns its error into this one)."""
    if target.numel() and host_readable(target):
        bad = (target != ignore_index) & ((target < 0) | (target >= C))
        if bool(bad.any()):
            raise ValueError(
                f"target has class indices outside [0, {C}) that are not ignore_index={ignore_index}: "
                f"{target[bad][:5].tolist()}"
            )


def target_range_error(exc: RuntimeError, C: int, ignore_index: int) -> Exception:
    """The cpu kernel's out-of-range target error (a RuntimeError from C++) as check_target_range's ValueError; any
    other error as it is."""
    if "is out of range" not in str(exc):
        return exc
    return ValueError(
        f"target has class indices outside [0, {C}) that are not ignore_index={ignore_index}: "
        f"{str(exc).splitlines()[0]}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Public functions


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy over class-index or class-probability targets; same signature and semantics as
    ``torch.nn.functional.cross_entropy`` (``size_average`` / ``reduce`` are torch's deprecated arguments and must
    be None).

    Args:
        input: ``(N, C)``, ``(C,)`` or ``(N, C, d1, ...)`` logits; vocabularies up to 262144 and beyond.
        target: class indices (int64): ``(N,)``, ``()`` or ``(N, d1, ...)``; a target outside ``[0, C)`` that is
            not ``ignore_index`` raises on CPU tensors and gives a NaN loss on GPU (no device sync to check it).
            Or class probabilities (floating point): input's shape and, on the fused backends, input's dtype; they
            need not sum to 1; with label smoothing t' = (1 - eps) * t + eps / C; ``ignore_index`` must be
            negative (unused), as torch. The target gets a gradient when it requires one.
        weight: ``(C,)`` class weights.
        reduction: ``"none"`` (shape of input without the class dim), ``"mean"`` (indices: weighted mean over the
            rows not ignored, NaN when every row is ignored; probabilities: sum / (N * d1 * ...), as torch) or
            ``"sum"``.

    Returns:
        The loss in input's dtype (computed in float32). The gradients are written in the forward pass; the
        backward only scales them. fp16: they are stored without the mean's 1/N (times 2^14, :func:`fp16_prescale`)
        and the 1/N and the incoming gradient (a GradScaler's factor) multiply them in fp32 in the backward, before
        their one rounding to fp16 (:func:`fp16_unscaled`).

    Vocab-parallel: ``input`` a DTensor of (N, C) logits sharded on the classes (``Shard(1)``) on a 1-D mesh, with
    global class ids as ``target``: the loss without gathering the vocabulary, returned as a replicated DTensor
    (fastlm/ops/vocab_parallel.py).
    """
    if vocab_parallel.is_dtensor(input) or vocab_parallel.is_dtensor(target):
        return vocab_parallel.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
    if size_average is not None or reduce is not None:
        raise ValueError("size_average and reduce are deprecated in torch; use reduction=")
    soft = isinstance(target, Tensor) and target.is_floating_point()
    backend = resolve("cross_entropy_soft" if soft else "cross_entropy", input, ("soft_target",) if soft else ())
    if backend == "torch":
        return TF.cross_entropy(
            input, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
        )
    check_inputs(input, target, weight, reduction, label_smoothing, backend, soft)
    if soft:
        return _soft_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, backend)
    if input.dim() == 1:  # unbatched (C,) with a () target
        return cross_entropy(
            input[None], target.reshape(1), weight, None, ignore_index, None, reduction, label_smoothing
        ).reshape(())
    if target.shape != (input.shape[0], *input.shape[2:]):
        raise ValueError(
            f"target must have shape {[input.shape[0], *input.shape[2:]]} for input {list(input.shape)}, "
            f"got {list(target.shape)}"
        )
    C = input.shape[1]
    if backend != "cpu":  # the cpu kernel checks the range as it reads the targets
        check_target_range(target, C, ignore_index)
    if input.dim() == 2:
        x = input if input.stride(1) == 1 else input.contiguous()
    else:
        x = input.reshape(input.shape[0], C, -1).contiguous()  # (N, C, D): classes strided by D, no transpose
    t = target if target.dim() == 1 else target.reshape(-1)
    t = t if t.dtype == torch.int64 else t.to(torch.int64)
    w = weight.float().contiguous() if weight is not None else None
    compute_grad = torch.is_grad_enabled() and input.requires_grad
    # fp16: the gradient stored times 2^k, without the 1/N; the loss's sum divided by both in fp32 (fp16_unscaled)
    prescale = fp16_prescale(w, C, x.device) if fp16_unscaled(x, compute_grad) else None
    try:
        loss, _ = call(
            CROSS_ENTROPY_FWD[backend],
            x,
            t,
            w if prescale is None else prescale[0].contiguous(),
            int(ignore_index),
            float(label_smoothing),
            REDUCTIONS["sum" if prescale is not None and reduction == "mean" else reduction],
            compute_grad,
        )
    except RuntimeError as exc:
        raise target_range_error(exc, C, ignore_index) from None
    if prescale is not None:
        loss = loss / prescale[1] if reduction == "none" else loss / prescale[1][0]
        if reduction == "mean":
            loss = loss / mean_denominator(t, w, ignore_index, C)[0]
    if reduction == "none":
        loss = loss.view(target.shape)
    dtype = loss_dtype(input)
    return loss if loss.dtype == dtype else loss.to(dtype)


def _soft_cross_entropy(
    input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str, label_smoothing, backend
) -> Tensor:
    """cross_entropy with class-probability targets (checked by check_inputs) on a fused backend."""
    if target.shape != input.shape:
        raise ValueError(
            f"a class-probability target must have input's shape {list(input.shape)}, got {list(target.shape)}"
        )
    if ignore_index >= 0:
        raise ValueError(f"ignore_index is not supported for class-probability targets, got {ignore_index}")
    if input.dim() == 1:  # unbatched (C,)
        loss = _soft_cross_entropy(input[None], target[None], weight, ignore_index, reduction, label_smoothing, backend)
        return loss.reshape(())
    C = input.shape[1]
    if input.dim() == 2:
        x = input if input.stride(1) == 1 else input.contiguous()
        t = target if target.stride(1) == 1 or C == 1 else target.contiguous()
    else:  # (N, C, D): classes strided by D, no transpose
        x = input.reshape(input.shape[0], C, -1).contiguous()
        t = target.reshape(input.shape[0], C, -1).contiguous()
    w = weight.float().contiguous() if weight is not None else None
    grad_on = torch.is_grad_enabled()
    compute_grad = grad_on and (input.requires_grad or target.requires_grad)
    # fp16: the gradients stored without the 1/rows (fp16_unscaled), the input's times 2^k when the target needs no
    # gradient (fp16_prescale; the target's, -(1 - eps) w (x - lse), is not bounded by 1: it is stored unscaled)
    unscaled = fp16_unscaled(x, compute_grad)
    prescale = fp16_prescale(w, C, x.device) if unscaled and not (grad_on and target.requires_grad) else None
    loss, _, _ = call(
        SOFT_CROSS_ENTROPY_FWD[backend],
        x,
        t,
        w if prescale is None else prescale[0].contiguous(),
        float(label_smoothing),
        REDUCTIONS["sum" if unscaled and reduction == "mean" else reduction],
        grad_on and input.requires_grad,
        grad_on and target.requires_grad,
    )
    if prescale is not None:
        loss = loss / prescale[1] if reduction == "none" else loss / prescale[1][0]
    if unscaled and reduction == "mean":
        loss = loss / (x.shape[0] * (x.shape[2] if x.dim() == 3 else 1))
    if reduction == "none":
        loss = loss.view(input.shape[0], *input.shape[2:])
    dtype = loss_dtype(input)
    return loss if loss.dtype == dtype else loss.to(dtype)
