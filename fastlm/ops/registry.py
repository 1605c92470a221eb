"""How every op family meets its backends: one registration path, one naming of the op tables, the shared input
checks.

An op exists once per backend: ``fastlm::<op>_triton`` is a Python ``custom_op`` in the family's module (its launch
lives in ``fastlm.kernels``), ``fastlm::<op>_cuda`` and ``fastlm::<op>_cpu`` are C++ ops whose schemas
``csrc/ops.cpp`` defines in every build of fastlm._C (calling one whose kernels were not compiled raises).
``register(op, fake, ...)`` gives every backend's op the same fake impl (torch.compile, opcheck) and the same
autograd formula, and returns the op's table ``{backend: OpOverload}``; a family names it after the op in
capitals (``NORM_FWD``, ``SOFTMAX_FWD``, ``CROSS_ENTROPY_FWD``, ``ATTENTION_FWD``, ...). Which backend runs a call
is ``fastlm.dispatch.resolve``'s decision, never the family's.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from fastlm import extension
from fastlm.dispatch import FUSED_DTYPES


def op_backends() -> tuple[str, ...]:
    """The backends whose ops exist in this process: triton always, cuda and cpu when fastlm._C is loaded."""
    return ("triton", "cuda", "cpu") if extension.lib is not None else ("triton",)


def register(
    op: str,
    fake: Callable,
    backward: Callable[[str], Callable] | None = None,
    setup_context: Callable | None = None,
    backends: tuple[str, ...] = ("triton", "cuda", "cpu"),
) -> dict:
    """Register the fake impl (and, with ``backward``, the autograd formula) of ``fastlm::<op>_<backend>`` for every
    backend of ``backends`` in ``op_backends()``; returns ``{backend: OpOverload}``.

    Args:
        op: the op's name without the backend suffix, e.g. ``"norm_fwd"``.
        fake: the shape/dtype-only implementation, shared by every backend.
        backward: ``backward(backend)`` returns the autograd backward of that backend's op (its formula calls the
            same backend's backward op).
        setup_context: what the forward saves for the backward (torch.library's ``setup_context``).
        backends: the backends that have this op (a family without CUDA C++ kernels: ``("triton", "cpu")``; its
            ``_cpu`` schema is defined in csrc/ops.cpp all the same).
    """
    table = {}
    for backend in (b for b in op_backends() if b in backends):
        name = f"fastlm::{op}_{backend}"
        torch.library.register_fake(name)(fake)
        if backward is not None:
            torch.library.register_autograd(name, backward(backend), setup_context=setup_context)
        table[backend] = getattr(torch.ops.fastlm, f"{op}_{backend}").default
    return table


# ---------------------------------------------------------------------------------------------------------------
# Input checks shared by the families: each raises a clear error naming the argument and what was expected


def check_tensor(t, name: str, backend: str, dtypes=FUSED_DTYPES) -> None:
    """``t`` is a Tensor of one of ``dtypes`` (the fused kernels' float32 / float16 / bfloat16 by default)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        allowed = " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]
        raise TypeError(
            f"{name} must be {allowed} for the {backend} backend, got {t.dtype} "
            "(use fastlm.backend('torch') for other dtypes)"
        )


def check_device(t: Tensor | None, name: str, ref: Tensor, ref_name: str) -> None:
    """``t`` (when given) is on ``ref``'s device."""
    if t is not None and t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The autocast dtype in force for ``t``'s device type (None outside autocast). Ops whose implementation runs
    matmuls (the LM-head losses) take their floating inputs cast to it, as ``F.linear`` would, and run with autocast
    off inside: autocast does not reach into a custom op consistently (its matmuls would be cast, its fp32 outputs
    not)."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
