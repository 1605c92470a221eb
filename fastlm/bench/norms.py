"""Benchmark cases of the norms: LayerNorm / RMSNorm with and without the fused residual add.

Bytes counted per call (e = element size of x, p = bytes of one weight/bias vector of N elements):
    fwd:      read x (+ residual), write y (+ h)           -> (2 + 2*add) * M * N * e + n_params * p
    bwd:      read x, dy (+ dh), write dx                  -> (3 + add) * M * N * e + 2 * n_params * p
    fwd+bwd:  the sum of both.
The (G, N) fp32 partials of the dW/dB reduction are not counted: they are overhead the kernel must hide.
"""

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as TF

import fastlm
import fastlm.functional as F
from fastlm import reference

KERNELS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
MODES = ("fwd", "bwd", "fwd+bwd")
# Hidden sizes of real models: GPT-2 / BERT-base 768, GPT-2-medium 1024, LLaMA-3-8B 4096, LLaMA-3-70B 8192, and the
# wide end up to 65536.
HIDDEN_GPU = (768, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
# --quick: the two plain norms over the range, the fused residual variant at LLaMA-3-8B's width.
QUICK_GPU = {"layer_norm": (1024, 4096, 16384, 65536), "rms_norm": (1024, 4096, 16384, 65536), "add_rms_norm": (4096,)}
HIDDEN_CPU = (768, 4096)
INPUT_BYTES_GPU = 64 << 20  # rows x hidden of at least 64 MB of input (the performance targets' size)
INPUT_BYTES_CPU = 4 << 20


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str
    rows: int
    hidden: int
    dtype: torch.dtype
    mode: str

    @property
    def shape(self) -> str:
        return f"{self.rows}x{self.hidden}"

    def bytes(self) -> int:
        add = self.kernel.startswith("add")
        n_params = 1 if "rms" in self.kernel else 2
        e = torch.finfo(self.dtype).bits // 8
        mn = self.rows * self.hidden
        fwd = (2 + 2 * add) * mn * e + n_params * self.hidden * e
        bwd = (3 + add) * mn * e + 2 * n_params * self.hidden * e
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[self.mode]


def cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    """The benchmark grid for ``device``: real-model hidden sizes, rows so that the input is >= 64 MB on GPU."""
    if device.type == "cuda":
        grid = QUICK_GPU if quick else dict.fromkeys(KERNELS, HIDDEN_GPU)
        size = INPUT_BYTES_GPU
    else:
        grid, size = dict.fromkeys(KERNELS, HIDDEN_CPU), INPUT_BYTES_CPU
    e = torch.finfo(dtype).bits // 8
    return [Case(k, max(1, size // (n * e)), n, dtype, mode) for k, ns in grid.items() for n in ns for mode in MODES]


def _fn(kernel: str) -> Callable:
    """The fastlm function for ``kernel``; its torch reference has the same signature."""
    return getattr(F, kernel)


def _ref(kernel: str) -> Callable:
    return {
        "layer_norm": TF.layer_norm,
        "rms_norm": TF.rms_norm,
        "add_layer_norm": reference.add_layer_norm,
        "add_rms_norm": reference.add_rms_norm,
    }[kernel]


def make_inputs(case: Case, device: torch.device, requires_grad: bool):
    M, N = case.rows, case.hidden
    x = torch.randn(M, N, device=device, dtype=case.dtype, requires_grad=requires_grad)
    args = [x]
    if case.kernel.startswith("add"):
        args.append(torch.randn(M, N, device=device, dtype=case.dtype, requires_grad=requires_grad))
    args.append((N,))
    args.append(torch.randn(N, device=device, dtype=case.dtype, requires_grad=requires_grad))
    if "layer" in case.kernel:
        args.append(torch.randn(N, device=device, dtype=case.dtype, requires_grad=requires_grad))
    return args


def providers(device: torch.device) -> dict[str, str | None]:
    """Provider name -> fastlm backend to use (None for the torch baselines)."""
    names = {"torch-eager": None, "torch-compile": None}
    if device.type == "cuda":
        names = {"fastlm-triton": "triton", "fastlm-cuda": "cuda", **names}
    return names


def runner(case: Case, provider: str, device: torch.device) -> Callable[[], Callable[[], object]]:
    """A factory for the timed callable of ``case`` under ``provider`` (inputs made once, graph kept for bwd)."""
    backend = providers(device)[provider]
    fn = _ref(case.kernel) if backend is None else _fn(case.kernel)
    if provider == "torch-compile":
        # The bwd timing replays one graph's backward (retain_graph=True), which donated buffers forbid.
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        # One compiled function serves every shape of the grid: raise dynamo's recompile limit so that no case
        # silently falls back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        fn = torch.compile(fn, fullgraph=True)

    def call(*args):
        if backend is None:
            return fn(*args)
        with fastlm.backend(backend):
            return fn(*args)

    def setup():
        args = make_inputs(case, device, requires_grad=case.mode != "fwd")
        if case.mode == "fwd":
            return lambda: call(*args)
        leaves = [a for a in args if isinstance(a, torch.Tensor)]
        outs = call(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = [torch.randn_like(o) for o in outs]
        if case.mode == "bwd":
            return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)

        def step():
            o = call(*args)
            return torch.autograd.grad(o if isinstance(o, tuple) else (o,), leaves, grads)

        return step

    return setup
