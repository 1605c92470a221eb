"""Backend choice: ``triton``, ``cuda``, ``cpu``, ``torch`` or ``auto``.

``with fastlm.backend("triton"): ...`` or the environment variable ``FASTLM_BACKEND`` (read at import) select the
kernels for every fastlm op. ``auto`` (the default) picks, per op family and device, the backend in ``AUTO``:
the fastest one known to be correct there. A backend that was asked for by name and cannot run raises
``BackendUnavailableError`` saying what is missing; nothing falls back silently.

The choice is a module global rather than a context variable so that torch.compile reads it as a constant (and
guards on it) instead of breaking the graph; it is therefore per process, not per thread.
"""

import contextlib
import importlib.util
import os

import torch

from fastlm import extension

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# auto: (op family, device type) -> backend, the fastest one known to be correct there (measurements:
# benchmarks/results/). On CUDA the Triton kernels until the CUDA C++ kernels have been measured and verified on a GPU;
# on CPU the C++ kernels of csrc/cpu/.
AUTO = {
    ("norms", "cuda"): "triton",
    ("norms", "cpu"): "cpu",
    ("softmax", "cuda"): "triton",  # softmax, log_softmax, scaled_masked_softmax, cross-entropy
    ("softmax", "cpu"): "cpu",
    ("linear_ce", "cuda"): "triton",  # cuBLAS matmuls around the Triton cross-entropy kernel
    ("linear_ce", "cpu"): "cpu",  # torch's matmuls around the CPU cross-entropy kernel
    ("attention", "cuda"): "triton",
    ("attention", "cpu"): "cpu",
    ("rope", "cuda"): "triton",  # rotary position embedding (fastlm/ops/rope.py)
    ("rope", "cpu"): "cpu",
    ("gated_mlp", "cuda"): "triton",  # swiglu, geglu (fastlm/ops/gated_mlp.py)
    ("gated_mlp", "cpu"): "cpu",
    ("distill", "cuda"): "triton",  # kl_div, distillation_loss (fastlm/ops/distillation.py)
    ("distill", "cpu"): "cpu",
    ("linear_distill", "cuda"): "triton",  # cuBLAS matmuls around the Triton distillation kernel
    ("linear_distill", "cpu"): "cpu",
}

# Cases a compiled backend's kernels lack, per (family, backend): a call's feature -> how to name it. Under auto a
# call with such a feature runs torch's ops; a backend asked for by name raises UnsupportedCaseError naming it and
# the backend that has it on the same tensors (ALTERNATIVE).
LACKS = {
    ("softmax", "cuda"): {"soft_target": "class-probability (soft) targets"},
    ("attention", "cpu"): {"varlen": "varlen (packed) sequences"},
    ("attention", "cuda"): {
        "varlen": "varlen (packed) sequences",
        "mask": "an attn_mask",
        "dropout": "dropout",
        "window": "a sliding window",
        "softcap": "logit soft-capping",
        "sinks": "attention sinks",
        "alibi": "ALiBi slopes",
        "mask_grad": "the gradient of an additive attn_mask",
    },
}

ALTERNATIVE = {"cpu": "torch", "cuda": "triton"}

# Which op families each compiled backend implements.
IMPLEMENTED = {
    "triton": {"norms", "softmax", "linear_ce", "attention", "rope", "gated_mlp", "distill", "linear_distill"},
    "cuda": {"norms", "softmax", "attention"},
    # csrc/cpu/: attention forward only (its backward: torch ops)
    "cpu": {"norms", "softmax", "linear_ce", "attention", "rope", "gated_mlp", "distill", "linear_distill"},
}


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run the op on these inputs."""


class UnsupportedCaseError(BackendUnavailableError):
    """The backend exists but does not implement this case (e.g. a head dim the CUDA kernels lack); the message
    names the case. ``auto`` never picks a backend for a case it does not support."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_current = _check_name(os.environ.get("FASTLM_BACKEND", "auto"))
_TRITON_FOUND = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def current_backend() -> str:
    """The backend name in force (may be ``auto``)."""
    return _current


@contextlib.contextmanager
def backend(name: str):
    """Run the enclosed fastlm ops on backend ``name`` (one of ``auto``, ``triton``, ``cuda``, ``cpu``, ``torch``)."""
    global _current
    previous, _current = _current, _check_name(name)
    try:
        yield
    finally:
        _current = previous


def unavailable_reason(name: str, family: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run op family ``family`` on ``device`` (None when it can)."""
    if name == "torch":
        return None
    if family not in IMPLEMENTED[name]:
        return f"the {name} backend has no {family} kernels"
    if name == "triton":
        if not _TRITON_FOUND:
            return "triton is not installed"
        if device.type != "cuda" and not _INTERPRET:
            return f"Triton kernels need CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to interpret on CPU"
        return None
    if name == "cpu":
        if extension.lib is None:
            return extension.LOAD_ERROR
        if device.type != "cpu":
            return f"the cpu backend's kernels need CPU tensors (got {device.type})"
        return None
    reason = extension.cuda_unavailable_reason()
    if reason is None and device.type != "cuda":
        reason = f"the CUDA kernels need CUDA tensors (got {device.type})"
    return reason


def resolve(family: str, x: torch.Tensor, features=()) -> str:
    """The concrete backend (``triton``, ``cuda``, ``cpu`` or ``torch``) that runs op family ``family`` on tensor
    ``x``, for a call with ``features`` (names from ``LACKS``, e.g. ``("dropout",)``). Under ``auto``: ``AUTO``'s
    backend, or torch's ops for fp64 and for a feature that backend lacks. A backend asked for by name that cannot
    run raises BackendUnavailableError; one without this family or feature raises UnsupportedCaseError naming it."""
    name = _current
    auto = name == "auto"
    if auto:
        if x.dtype not in FUSED_DTYPES:
            return "torch"  # fp64 and friends: the fused kernels are fp32/fp16/bf16 only
        name = AUTO.get((family, x.device.type), "torch")
    if name != "torch" and family not in IMPLEMENTED[name]:
        raise UnsupportedCaseError(
            f"fastlm backend {name!r} cannot run {family}: the {name} backend has no {family} kernels"
        )
    reason = unavailable_reason(name, family, x.device)
    if reason is not None:
        raise BackendUnavailableError(f"fastlm backend {name!r} cannot run {family}: {reason}")
    lacking = [LACKS[(family, name)][f] for f in features if f in LACKS.get((family, name), {})]
    if lacking:
        if auto:
            return "torch"
        raise UnsupportedCaseError(
            f"the {name} backend's {family} does not support {lacking[0]}; "
            f"use fastlm.backend('{ALTERNATIVE[name]}') or 'auto'"
        )
    return name


def tracing() -> bool:
    """True while torch.compile traces: Dynamo, or AOTAutograd / make_fx with their dispatch modes active (where
    torch 2.11 traces a backward outside Dynamo, so ``torch.compiler.is_compiling()`` alone is False). Host reads of
    tensor values or addresses (``bool(t)``, ``t.data_ptr()``) fail or break the graph then."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def host_readable(*tensors: torch.Tensor) -> bool:
    """True when the values of ``tensors`` may be read on the host right now: CPU tensors (no device sync), in eager
    mode. False while torch.compile traces (Dynamo, and AOTAutograd's tracing of the backward, where the tensors are
    FunctionalTensor/FakeTensor subclasses under an active dispatch mode and ``bool()`` of a value is a
    data-dependent guard that fails a fullgraph compile) and for CUDA tensors (a sync, which also breaks CUDA-graph
    capture). Checks and shortcuts that read values are skipped then."""
    if tracing():
        return False
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" for t in tensors)


def call(op, *args):
    """``op(*args)`` for a registered fastlm op, skipping the Python autograd layer when no gradient can flow.

    ``register_autograd`` puts a Python function at the op's Autograd dispatch key, which costs ~10 us per call even
    when nothing requires grad: as much as a small CPU kernel (measured: a 4 x 64 LayerNorm through the cpu backend
    24 us with it, 4 us for torch's). With grad mode off or no input requiring grad, the call goes below autograd
    directly (what that layer itself would do); under torch.compile the op is traced as is.
    """
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
