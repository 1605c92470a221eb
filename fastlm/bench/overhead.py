"""Host overhead per call: each fused family at a tiny shape, where the kernel costs nothing and what is timed is the
Python and dispatcher path in front of it (validation, backend choice, the registered op, autograd), against torch's
own op on the same inputs. This is what decides decode and small-batch speed on a GPU and the per-layer cost of a
patched model in eager mode.

Each timed call runs the op ``REPS`` times (throughput unit "call/s"): ``fwd`` under ``torch.no_grad()`` (inference),
``fwd+bwd`` a forward with inputs that require grad and its backward (``torch.autograd.grad``). Providers: each
fastlm backend that runs here (fastlm.functional under it: the fused kernel's host path), ``fastlm-auto`` (the
default: at these sizes auto runs torch's op where the measured table says so, so this is the user's cost) and
``torch-eager`` (torch.nn.functional). On CPU the
clock is the calling thread's CPU time (``time.thread_time``), with one intra-op thread for both providers: these
calls are host work on one thread, and a loaded machine then does not inflate them. Targets (issue 25): fastlm's
fwd at most 3x torch's, fwd+bwd at most 1.5x.
"""

import contextlib

import torch
import torch.nn.functional as TF

import fastlm
import fastlm.functional as F
from fastlm.bench.core import Case, fastlm_providers

REPS = 100
MODES = ("fwd", "fwd+bwd")


def _rows(dev, dtype, grad):
    return (torch.randn(4, 64, device=dev, dtype=dtype, requires_grad=grad),)


def _norm(dev, dtype, grad):
    return (*_rows(dev, dtype, grad), torch.randn(64, device=dev, dtype=dtype, requires_grad=grad))


def _ce(dev, dtype, grad):
    return (*_rows(dev, dtype, grad), torch.randint(0, 64, (4,), device=dev))


def _qkv(dev, dtype, grad):
    return tuple(torch.randn(1, 2, 16, 64, device=dev, dtype=dtype, requires_grad=grad) for _ in range(3))


def _rope(dev, dtype, grad):
    q, k = (torch.randn(1, 2, 16, 64, device=dev, dtype=dtype, requires_grad=grad) for _ in range(2))
    ang = torch.randn(1, 16, 64, device=dev, dtype=dtype)
    return q, k, ang.cos(), ang.sin()


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_ref(q, k, cos, sin):  # Hugging Face Llama's apply_rotary_pos_emb: the op fastlm's replaces in a model
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# kernel -> (fastlm's call, torch's call, inputs); outputs are a tensor or a tuple of tensors
SPEC = {
    "layer_norm": (lambda x, w: F.layer_norm(x, (64,), w), lambda x, w: TF.layer_norm(x, (64,), w), _norm),
    "rms_norm": (lambda x, w: F.rms_norm(x, (64,), w), lambda x, w: TF.rms_norm(x, (64,), w), _norm),
    "softmax": (lambda x: F.softmax(x, -1), lambda x: TF.softmax(x, -1), _rows),
    "log_softmax": (lambda x: F.log_softmax(x, -1), lambda x: TF.log_softmax(x, -1), _rows),
    "cross_entropy": (F.cross_entropy, TF.cross_entropy, _ce),
    "sdpa": (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True),
        _qkv,
    ),
    "rope": (F.apply_rotary_pos_emb, _rope_ref, _rope),
    "swiglu": (F.swiglu, lambda x: TF.silu(x[..., :32]) * x[..., 32:], _rows),
}
TIMING = {"clock": "thread"}


@contextlib.contextmanager
def _threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    return [Case(f"call_{k}", "tiny", dtype, mode, REPS, "call/s", (k,)) for k in SPEC for mode in MODES]


def providers(device: torch.device) -> dict[str, str | None]:
    """fastlm's backends that run on this device (cpu on CPU; triton and cuda on a GPU), ``fastlm-auto`` (what a
    user's call runs: the backend auto picks at this size, torch's op included, behind fastlm's function) and torch's
    own op; not torch.compile (a compiled call's host path is another question)."""
    names = {p: b for p, b in fastlm_providers(device).items() if p != "torch-compile"}
    return {"fastlm-auto": "auto", **names}


def runner(case: Case, provider: str, device: torch.device):
    ours, ref, make = SPEC[case.params[0]]
    backend = providers(device)[provider]
    fn = ref if backend is None else ours

    def setup():
        torch.manual_seed(0)
        train = case.mode == "fwd+bwd"
        inputs = make(device, case.dtype, train)

        def scope():
            """The backend (set once around the REPS calls: its context costs nothing per call) and one intra-op
            thread: host work is single-threaded, and a parallel region's barrier would spin on a busy machine
            (measured: torch's 4 x 64 LayerNorm at 3 us per call, but 3 ms in batches where a worker thread was
            descheduled)."""
            stack = contextlib.ExitStack()
            if backend is not None:
                stack.enter_context(fastlm.backend(backend))
            stack.enter_context(_threads(1))
            return stack

        if not train:

            def calls():
                with scope(), torch.no_grad():
                    for _ in range(REPS):
                        fn(*inputs)

            return calls
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        with scope():
            out = fn(*inputs)  # a case the backend does not implement raises here
        grads = [torch.randn_like(o) for o in (out if isinstance(out, tuple) else (out,))]

        def calls():
            with scope():
                for _ in range(REPS):
                    o = fn(*inputs)
                    torch.autograd.grad(o if isinstance(o, tuple) else (o,), leaves, grads)

        return calls

    return setup
