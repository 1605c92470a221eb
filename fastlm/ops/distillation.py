"""Distillation losses between student and teacher logits: registered ops, fake impl, autograd, the public function,
and the row helper that the linear distillation (linear_distillation.py) shares.

Ops (for <backend> in {triton, cpu}; kernels in kernels/distillation.py and csrc/cpu/distillation.cpp):
    fastlm::distillation_fwd_<backend>(student, teacher, target?, kind, beta, temperature, ignore_index, reduction,
                                       compute_grad) -> (loss, grad)
``student`` and ``teacher`` are (N, V) of one dtype with a unit class stride (any row strides); ``target`` (N,)
int64; kind 0 KL(p_t || p_s), 1 KL(p_s || p_t), 2 generalised JSD (0 < beta < 1); reduction 0 none / 1 batchmean
(sum over the counted rows / their number) / 2 sum. ``loss`` is fp32: (N,) for "none" (0 for ignored rows), a
scalar otherwise; ``grad`` is d loss / d student for an incoming gradient of 1 (student's shape and dtype), written
in the same pass as the loss, or (0,) when not asked for. The backward only scales it. The teacher gets no
gradient (the public function refuses a teacher that requires one).
"""

import torch
from torch import Tensor

from fastlm import reference
from fastlm.dispatch import resolve
from fastlm.ops.cross_entropy import (
    first_backward,
    fp16_unscaled,
    loss_dtype,
    mean_denominator,
    reduce_losses,
    scale_saved_grad,
)
from fastlm.ops.registry import call, check_device, check_tensor, register

KINDS = {"kl": 0, "reverse_kl": 1, "jsd": 2}
REDUCTIONS = {"none": 0, "batchmean": 1, "sum": 2}


def kernel_kind(kind: str, beta: float) -> int:
    """The kernels' KIND flag: the JSD's end points are the limits of JSD(beta) / beta (beta -> 0: forward KL) and
    JSD(beta) / (1 - beta) (beta -> 1: reverse KL), the convention of Liger-Kernel and TRL's GKD."""
    if kind == "jsd" and beta == 0.0:
        return KINDS["kl"]
    if kind == "jsd" and beta == 1.0:
        return KINDS["reverse_kl"]
    return KINDS[kind]


def counted_rows(target: Tensor | None, n_rows: int, ignore_index: int, device) -> Tensor:
    """The batchmean's denominator as a (1,) fp32 device tensor (no sync): the rows not ignored, or all rows."""
    if target is None:
        return torch.full((1,), float(n_rows), dtype=torch.float32, device=device)
    return mean_denominator(target, None, ignore_index, 1)


def _rows_fake(student, teacher, target, kind, beta, temperature, ignore_index, grad_scale, grad):
    return student.new_empty((student.shape[0],), dtype=torch.float32)


# fastlm::distillation_rows_cpu (schema and contract in csrc/ops.cpp): the linear distillation's chunk kernel on the
# cpu backend
DISTILLATION_ROWS = register("distillation_rows", _rows_fake, backends=("cpu",))


def distill_rows(
    s, t, target, kind: int, beta: float, temperature: float, ignore_index: int, scale, backend: str, grad
):
    """Per-row losses (fp32) and, with ``scale`` ((1,) fp32 device tensor), the gradient w.r.t. ``s`` times
    ``scale``, for a chunk of (N, V) logits (the linear distillation's). ``scale`` None: losses only (grad None).
    ``grad``: where the gradient goes, s or t themselves (both kernels read each logit before they overwrite it, so
    a chunk's logits buffer becomes its gradient), or None for a new tensor."""
    write_grad = scale is not None
    if write_grad and grad is None:
        grad = torch.empty_like(s)
    if backend == "triton":
        from fastlm.kernels import distillation as k

        return k.distillation_rows(s, t, target, kind, beta, temperature, ignore_index, scale, write_grad, grad)
    if backend != "cpu":
        raise ValueError(f"backend must be 'triton' or 'cpu' (the backends with a distillation loss), got {backend!r}")
    losses = DISTILLATION_ROWS["cpu"](
        s, t, target, kind, beta, temperature, ignore_index, scale if write_grad else None, grad if write_grad else None
    )
    return losses, (grad if write_grad else None)


@torch.library.custom_op("fastlm::distillation_fwd_triton", mutates_args=())
def distillation_fwd_triton(
    student: Tensor,
    teacher: Tensor,
    target: Tensor | None,
    kind: int,
    beta: float,
    temperature: float,
    ignore_index: int,
    reduction: int,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    from fastlm.kernels import distillation as k

    if kind == KINDS["jsd"] and not 0.0 < beta < 1.0:
        raise ValueError(f"the jsd kind needs 0 < beta < 1 (the public function maps the end points), got {beta}")
    if student.shape[1] > 1 and (student.stride(1) != 1 or teacher.stride(1) != 1):
        raise ValueError("student and teacher must have unit stride along the classes")
    denom = counted_rows(target, student.shape[0], ignore_index, student.device) if reduction == 1 else None
    scale = 1.0 / denom if denom is not None else None
    losses, grad = k.distillation_rows(
        student, teacher, target, kind, beta, temperature, ignore_index, scale, compute_grad
    )
    if grad is None:
        grad = student.new_empty((0,))
    return reduce_losses(losses, reduction, denom), grad


def _fake(student, teacher, target, kind, beta, temperature, ignore_index, reduction, compute_grad):
    loss = student.new_empty((student.shape[0],) if reduction == 0 else (), dtype=torch.float32)
    return loss, student.new_empty(student.shape if compute_grad else (0,))


def _setup(ctx, inputs, output):
    ctx.reduction = inputs[7]
    ctx.save_for_backward(output[1])
    ctx.set_materialize_grads(False)  # the `grad` output is never differentiated: no zero-filled incoming gradient


def _backward(ctx, dloss, _dgrad):
    nones = (None,) * 8
    if dloss is None:
        return (None, *nones)
    (grad,) = ctx.saved_tensors
    return (scale_saved_grad(grad, dloss, ctx.reduction, first_backward(ctx)), *nones)


DISTILLATION_FWD = register("distillation_fwd", _fake, lambda backend: _backward, _setup, backends=("triton", "cpu"))


class _Fp16Distillation(torch.autograd.Function):
    """fp16: the forward computes the losses only (the row kernel without its gradient sweep), the backward runs the
    row kernel again with the incoming gradient (a GradScaler's factor, times 1 / the counted rows for batchmean)
    as its gradient scale, folded into its fp32 gradient sweep before the one rounding to fp16: torch's unfused
    path's rounding (its loss in fp32 under autocast). Stored in the forward, the gradient would be 1/N-scaled
    (underflow below 2^-25 * N, cross_entropy.fp16_unscaled) or unscaled, and the distillation's gradients
    T * (p_s - p_t) (forward KL) ... p_s * (log p_s - log p_t - L) (reverse KL) have no bound that would admit a
    power-of-two prescale as the cross-entropy's (cross_entropy.fp16_prescale). Bytes: the backward reads both rows
    again (the statistics and the gradient sweep) where the stored gradient would be read once: one more read of
    s and t per call. The cpu row kernel takes per-row scales (reduction "none"); Triton's one scale, so per-row
    incoming gradients multiply its unscaled gradient afterwards (in fp32)."""

    @staticmethod
    def forward(ctx, s, t, tgt, kind, beta, temperature, ignore_index, reduction, backend):
        losses, _ = distill_rows(s, t, tgt, kind, beta, temperature, ignore_index, None, backend, None)
        ctx.save_for_backward(s, t, tgt)
        ctx.args = (kind, beta, temperature, ignore_index, reduction, backend)
        if reduction == 0:
            return losses
        total = losses.sum()
        return total / counted_rows(tgt, s.shape[0], ignore_index, s.device)[0] if reduction == 1 else total

    @staticmethod
    def backward(ctx, dloss):
        s, t, tgt = ctx.saved_tensors
        kind, beta, temperature, ignore_index, reduction, backend = ctx.args
        scale = dloss.float().reshape(-1).contiguous()  # (N,) for reduction "none", else (1,)
        if reduction == 1:
            scale = scale / counted_rows(tgt, s.shape[0], ignore_index, s.device)
        per_row = reduction == 0 and backend == "triton" and scale.shape[0] > 1
        one = torch.ones(1, dtype=torch.float32, device=s.device) if per_row else scale
        _, grad = distill_rows(s, t, tgt, kind, beta, temperature, ignore_index, one, backend, None)
        if per_row:
            grad.mul_(scale[:, None])  # in fp32 (scale's dtype), stored in the gradient's
        return grad, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Validation shared by distillation_loss and linear_distillation_loss


def check_options(kind: str, beta: float, temperature: float, reduction: str | None = None) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if reduction is not None and reduction not in REDUCTIONS:
        hint = (
            ": 'mean' would average over every element (rows x classes), which is not a KL divergence per sample "
            "(torch's kl_div warns about it); use 'batchmean'"
            if reduction == "mean"
            else ""
        )
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}{hint}")


def check_no_teacher_grad(*tensors_and_names) -> None:
    for t, name in tensors_and_names:
        if torch.is_grad_enabled() and t.requires_grad:
            raise ValueError(
                f"{name} requires grad, but the distillation loss gives the teacher no gradient: detach the teacher "
                f"({name}.detach()) or compute it under torch.no_grad()"
            )


def check_target(target: Tensor | None, leading: tuple, ref: Tensor, ref_name: str) -> None:
    if target is None:
        return
    if not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.int32):
        got = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise TypeError(f"target must hold class indices as int64 (or int32), got {got}")
    if tuple(target.shape) != tuple(leading):
        raise ValueError(
            f"target must have shape {list(leading)} (the leading dims of {ref_name}), got {list(target.shape)}"
        )
    check_device(target, "target", ref, ref_name)


# ---------------------------------------------------------------------------------------------------------------
# Public function


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    target: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> Tensor:
    """Knowledge-distillation loss between student and teacher logits, fused: one kernel per row computes both
    softmaxes (online over the vocabulary), the loss and the student's gradient.

    With p_s = softmax(student_logits / T), p_t = softmax(teacher_logits / T) per row:

    - ``"kl"``: forward KL(p_t || p_s) = sum p_t (log p_t - log p_s) (Hinton et al.'s distillation).
    - ``"reverse_kl"``: KL(p_s || p_t).
    - ``"jsd"``: generalised Jensen-Shannon divergence (GKD, Agarwal et al.), m = beta p_t + (1 - beta) p_s,
      loss = beta KL(p_t || m) + (1 - beta) KL(p_s || m): beta weighs the teacher end. As in Liger-Kernel's JSD and
      TRL's GKD, the end points give the limits of the normalised divergence instead of the formula's 0:
      beta = 0 is the forward KL(p_t || p_s), beta = 1 the reverse KL(p_s || p_t) (so beta -> 0 and beta = 0 differ).

    Each row's loss is multiplied by T^2 (Hinton et al.: keeps the gradient's size independent of T).

    Args:
        student_logits: ``(..., V)`` logits (float32 / float16 / bfloat16; unit stride along V, any row stride).
        teacher_logits: ``(..., V)``, student_logits' shape and dtype. It gets no gradient: one that requires grad
            raises (detach it).
        kind: ``"kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: the JSD's weight, in [0, 1] (only read for ``"jsd"``).
        temperature: T > 0.
        target: ``(...)`` class indices (the leading dims); rows equal to ``ignore_index`` are left out (loss 0,
            gradient 0, not counted by batchmean). None counts every row.
        reduction: ``"batchmean"`` (sum over the counted rows / their number; NaN when every row is ignored, as
            torch's mean cross-entropy), ``"sum"`` or ``"none"`` (per-row losses of shape ``(...)``, 0 for ignored
            rows). ``"mean"`` raises: torch's ``kl_div(reduction="mean")`` divides by rows x classes, which is
            not the divergence per sample (a known footgun).

    Returns:
        The loss in student_logits' dtype (computed in float32; float32 under autocast). The student's gradient is
        written in the forward pass; the backward only scales it (fp16: formed in the backward instead, with the
        batchmean's 1/rows and the incoming gradient folded into the kernel's fp32 gradient sweep; see
        :class:`_Fp16Distillation`).
    """
    check_options(kind, beta, temperature, reduction)
    for t, name in ((student_logits, "student_logits"), (teacher_logits, "teacher_logits")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    check_no_teacher_grad((teacher_logits, "teacher_logits"))
    if student_logits.dim() < 1 or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"student_logits (..., V) and teacher_logits must have the same shape, got {list(student_logits.shape)} "
            f"and {list(teacher_logits.shape)}"
        )
    check_device(teacher_logits, "teacher_logits", student_logits, "student_logits")
    if teacher_logits.dtype != student_logits.dtype:
        raise TypeError(
            f"teacher_logits must have student_logits' dtype ({student_logits.dtype}), got {teacher_logits.dtype} "
            "(cast the teacher's logits)"
        )
    check_target(target, student_logits.shape[:-1], student_logits, "student_logits")
    backend = resolve("distillation_loss", student_logits)
    if backend == "torch":
        return reference.distillation_loss(
            student_logits,
            teacher_logits,
            kind=kind,
            beta=beta,
            temperature=temperature,
            target=target,
            ignore_index=ignore_index,
            reduction=reduction,
        )
    check_tensor(student_logits, "student_logits", backend)
    V = student_logits.shape[-1]
    if V < 1:
        raise ValueError("student_logits must have at least one class (V >= 1)")
    s, t = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V)
    s = s if s.stride(-1) == 1 or V == 1 else s.contiguous()
    t = t if t.stride(-1) == 1 or V == 1 else t.contiguous()
    tgt = target.reshape(-1).to(torch.int64) if target is not None else None
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    args = (kernel_kind(kind, beta), float(beta), float(temperature), int(ignore_index), REDUCTIONS[reduction])
    if fp16_unscaled(s, compute_grad):  # the gradient formed in the backward, the incoming one folded in
        loss = _Fp16Distillation.apply(s, t, tgt, *args, backend)
    else:
        loss, _ = call(DISTILLATION_FWD[backend], s, t, tgt, *args, compute_grad)
    if reduction == "none":
        loss = loss.view(student_logits.shape[:-1])
    return loss.to(loss_dtype(student_logits))
