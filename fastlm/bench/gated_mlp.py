"""Benchmark cases of the gated MLP activations: SwiGLU (``silu(gate) * up``) and GeGLU (tanh ``gelu(gate) * up``).

Bytes counted per call (n = M * I elements of gate, e = element size), the least traffic the op needs:
    fwd:      read gate, up, write y                       -> 3 * n * e
    bwd:      read dy, gate, up, write dgate, dup          -> 5 * n * e
    fwd+bwd:  the sum, 8 * n * e
(torch eager moves more: it writes silu(gate) and reads it back, and its backward runs three kernels.)
Shapes: Llama-3-8B's MLP (I = 14336) at 4096..16384 tokens on GPU; scaled down on CPU. Peers: torch eager
(``fastlm.reference``: ``F.silu(g) * u``), torch.compile of it, and Liger-Kernel's ``LigerSiLUMulFunction`` /
``LigerGELUMulFunction`` where it is importable (CUDA). Liger's backward writes its gradients into the saved inputs
(in place): the timed bwd replays it on those values, which changes no timing.
"""

import torch

import fastlm.functional as F
from fastlm import reference
from fastlm.bench.core import Case, kernel_providers, provider_fn, timed_call
from fastlm.bench.peers import LIGER

KERNELS = ("swiglu", "geglu")
MODES = ("fwd", "bwd", "fwd+bwd")
INTERMEDIATE = 14336  # Llama-3-8B's MLP width I
TOKENS_GPU = (4096, 8192, 16384)
QUICK_GPU = {"swiglu": (4096, 16384)}
SHAPES_CPU = ((512, 14336), (2048, 4096))  # (tokens, I)
WORDS = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}  # elements moved per element of gate (see above)
FUNCS = {"swiglu": (F.swiglu, reference.swiglu), "geglu": (F.geglu, reference.geglu)}


def cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    if device.type == "cuda":
        grid = QUICK_GPU if quick else dict.fromkeys(KERNELS, TOKENS_GPU)
        shapes = {k: [(t, INTERMEDIATE) for t in tokens] for k, tokens in grid.items()}
    else:
        shapes = dict.fromkeys(KERNELS, SHAPES_CPU)
    e = torch.finfo(dtype).bits // 8
    return [
        Case(k, f"{m}x{i}", dtype, mode, WORDS[mode] * m * i * e, "GB/s", (m, i))
        for k, ms in shapes.items()
        for m, i in ms
        for mode in MODES
    ]


providers = kernel_providers


def liger_fn(kernel: str):
    """Liger-Kernel's fused activation for ``kernel`` (its GeGLU is the tanh form, as the case's)."""
    if kernel == "swiglu":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply
    from liger_kernel.ops.geglu import LigerGELUMulFunction

    return LigerGELUMulFunction.apply


def runner(case: Case, provider: str, device: torch.device):
    """A factory for the timed callable (inputs made once, graph kept for bwd)."""
    if provider == LIGER:
        fn = liger_fn(case.kernel)
    else:
        fn = provider_fn(case.kernel, provider, providers(device)[provider], *FUNCS[case.kernel])

    def setup():
        M, I = case.params
        req = case.mode != "fwd"
        gate, up = (torch.randn(M, I, device=device, dtype=case.dtype, requires_grad=req) for _ in range(2))
        return timed_call(fn, [gate, up], case.mode)

    return setup
