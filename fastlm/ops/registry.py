"""How every op family meets its backends: one registration path, one naming of the op tables, the shared input
checks.

An op exists once per backend: ``fastlm::<op>_triton`` is a Python ``custom_op`` in the family's module (its launch
lives in ``fastlm.kernels``), ``fastlm::<op>_cuda`` and ``fastlm::<op>_cpu`` are C++ ops whose schemas
``csrc/ops.cpp`` defines in every build of fastlm._C (calling one whose kernels were not compiled raises).
``register(op, fake, ...)`` gives every backend's op the same fake impl (torch.compile, opcheck) and the same
autograd formula, and returns the op's table ``{backend: OpOverload}``; a family names it after the op in
capitals (``NORM_FWD``, ``SOFTMAX_FWD``, ``CROSS_ENTROPY_FWD``, ``ATTENTION_FWD``, ...). Which backend runs a call
is ``fastlm.dispatch.resolve``'s decision, never the family's.

Two ways into an op, one result. ``call(op, *args)`` is how every family runs its op:
- while torch.compile (or any dispatch mode: FakeTensor, opcheck, make_fx) traces, it calls the registered op, whose
  ``register_autograd`` formula and fake impl are what the graph records;
- in eager mode it takes the lean path: with nothing requiring grad, the op below autograd; otherwise the op's
  lean ``torch.autograd.Function`` (``LEAN``), built here from the same ``setup_context`` and backward formula,
  whose forward runs the op below autograd (a Triton op's Python implementation directly). The registered
  autograd layer is a generated Python Function behind the dispatcher that fills defaults and redispatches on every
  call: measured on the 2-core development machine (torch 2.14.1, 4 x 64 fp32 softmax), the cpu op costs 3.2 us
  below autograd and 6.6 us through that layer with nothing requiring grad, and a LayerNorm fwd+bwd 197 us through
  it against torch's 55 us. vLLM and FlashAttention moved their autograd out of ``register_autograd`` for the same
  reason.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from fastlm import extension
from fastlm.dispatch import FUSED_DTYPES, tracing

# op (OpOverload) -> its lean autograd Function, for the ops registered with a backward formula
LEAN: dict = {}
# op (OpOverload) -> the Python function behind it, for the custom_ops (the Triton backend's)
PY_IMPL: dict = {}


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
        overload = getattr(torch.ops.fastlm, f"{op}_{backend}").default
        impl = python_impl(overload)
        if impl is not None:
            PY_IMPL[overload] = impl
        if backward is not None:
            formula = backward(backend)
            torch.library.register_autograd(name, formula, setup_context=setup_context)
            LEAN[overload] = lean_function(overload, setup_context, formula)
        table[backend] = overload
    return table


def python_impl(overload) -> Callable | None:
    """The Python function behind a ``torch.library.custom_op`` (the Triton ops), None for a C++ op."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(overload._schema.name)
    return opdef._init_fn if opdef is not None else None


def lean_function(overload, setup_context: Callable, formula: Callable) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` with the registered op's autograd formula whose forward runs the op below the
    autograd dispatch key (the eager path of ``call``).

    It is written in the classic ``forward(ctx, *args)`` style, calling ``setup_context`` itself: a Function that
    defines ``setup_context`` (the style ``register_autograd`` generates) takes functorch's path, which inspects the
    signature on every backward (measured: a trivial Function's fwd+bwd 121 us with ``setup_context``, 44 us
    without; torch's own ``x * 2`` 34 us)."""
    impl = python_impl(overload)

    def forward(ctx, *args):
        if impl is not None and plain(args):  # a custom_op: its implementation without the dispatcher's round trip
            output = impl(*args)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                output = overload(*args)
        setup_context(ctx, args, output)
        return output

    name = overload._schema.name.split("::")[-1]
    return type(
        f"{name}_lean",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(formula)},
    )


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain(args) -> bool:
    """No tensor subclass among ``args`` (a subclass, e.g. a DTensor or a wrapper subclass, needs the dispatcher)."""
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


def transformed() -> bool:
    """Forward-mode AD or a torch.func transform (grad, jvp, vmap, ...) in progress (see :func:`transformed_call`)."""
    return torch.autograd.forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None


def transformed_call(op, args):
    """``op(*args)`` through the dispatcher under a transform: the registered op and its register_autograd formula,
    which functorch's grad and vmap support (the lean path's classic autograd.Function is refused by them). Forward-mode
    AD raises: the fused ops have no forward formula, and torch would silently drop a dual tensor's tangent (a jvp of
    0, measured on torch 2.14), so a jvp / jacfwd / dual tensor through a fused op is an error naming the op."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    jvp = any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())
    if not jvp and torch.autograd.forward_ad._current_level >= 0:
        from torch.autograd import forward_ad

        jvp = any(isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args)
    if jvp:
        raise NotImplementedError(
            f"fastlm: forward-mode AD (torch.func.jvp / jacfwd, dual tensors) is not supported by the fused op "
            f"{op._schema.name}: it has no forward formula; run this call under fastlm.backend('torch')"
        )
    return op(*args)


def call(op, *args):
    """``op(*args)`` for a registered fastlm op (``op`` from a family's table), on the lean eager path when not
    tracing (see the module docstring). Outputs and gradients are those of the registered op. The backward formulas
    call their backward ops through it too (below autograd there, unless a double backward records a graph)."""
    if tracing():
        return op(*args)
    if transformed():
        return transformed_call(op, args)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        lean = LEAN.get(op)
        if lean is None:  # a backward op under create_graph=True: it has no derivative of its own
            raise RuntimeError(
                f"fastlm: {op._schema.name} has no derivative: a double backward (create_graph=True) through "
                "fastlm's fused ops is not supported (it would be silently wrong); use fastlm.backend('torch')"
            )
        return lean.apply(*args)
    impl = PY_IMPL.get(op)
    if impl is not None and plain(args):
        return impl(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


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
