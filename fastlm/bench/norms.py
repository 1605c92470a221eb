"""Benchmark cases of the norms: LayerNorm / RMSNorm with and without the fused residual add.

Bytes counted per call (e = element size of x, p = bytes of one weight/bias vector of N elements):
    fwd:      read x (+ residual), write y (+ h)           -> (2 + 2*add) * M * N * e + n_params * p
    bwd:      read x, dy (+ dh), write dx                  -> (3 + add) * M * N * e + 2 * n_params * p
    fwd+bwd:  the sum of both.
The (G, N) fp32 partials of the dW/dB reduction are not counted: they are overhead the kernel must hide.
"""

import torch
import torch.nn.functional as TF

import fastlm.functional as F
from fastlm import reference
from fastlm.bench.core import MODELS, Case, kernel_providers, provider_fn, timed_call

KERNELS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
MODES = ("fwd", "bwd", "fwd+bwd")
# Hidden sizes of the real models in core.MODELS (768, 4096, 8192) plus the range up to 65536 the targets cover.
HIDDEN_GPU = tuple(sorted({m["hidden"] for m in MODELS.values()} | {1024, 2048, 16384, 32768, 65536}))
# --quick: the two plain norms over the range, the fused residual variant at LLaMA-3-8B's width.
QUICK_GPU = {"layer_norm": (1024, 4096, 16384, 65536), "rms_norm": (1024, 4096, 16384, 65536), "add_rms_norm": (4096,)}
HIDDEN_CPU = (768, 4096)
INPUT_BYTES_GPU = 64 << 20  # rows x hidden of at least 64 MB of input (the performance targets' size): beyond L2
INPUT_BYTES_CPU = 4 << 20
REF = {
    "layer_norm": TF.layer_norm,
    "rms_norm": TF.rms_norm,
    "add_layer_norm": reference.add_layer_norm,
    "add_rms_norm": reference.add_rms_norm,
}


def norm_bytes(kernel: str, M: int, N: int, dtype: torch.dtype, mode: str) -> int:
    add = kernel.startswith("add")
    n_params = 1 if "rms" in kernel else 2
    e = torch.finfo(dtype).bits // 8
    fwd = (2 + 2 * add) * M * N * e + n_params * N * e
    bwd = (3 + add) * M * N * e + 2 * n_params * N * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    """Real-model hidden sizes; rows so that the input is >= 64 MB on GPU."""
    if device.type == "cuda":
        grid = QUICK_GPU if quick else dict.fromkeys(KERNELS, HIDDEN_GPU)
        size = INPUT_BYTES_GPU
    else:
        grid, size = dict.fromkeys(KERNELS, HIDDEN_CPU), INPUT_BYTES_CPU
    e = torch.finfo(dtype).bits // 8
    out = []
    for k, ns in grid.items():
        for n in ns:
            m = max(1, size // (n * e))
            for mode in MODES:
                out.append(Case(k, f"{m}x{n}", dtype, mode, norm_bytes(k, m, n, dtype, mode), "GB/s", (m, n)))
    return out


providers = kernel_providers


def runner(case: Case, provider: str, device: torch.device):
    """A factory for the timed callable (inputs made once, graph kept for bwd)."""
    fn = provider_fn(case.kernel, provider, providers(device)[provider], getattr(F, case.kernel), REF[case.kernel])

    def setup():
        M, N = case.params
        req = case.mode != "fwd"
        mk = lambda *s: torch.randn(*s, device=device, dtype=case.dtype, requires_grad=req)  # noqa: E731
        args = [mk(M, N)] + ([mk(M, N)] if case.kernel.startswith("add") else []) + [(N,), mk(N)]
        if "layer" in case.kernel:
            args.append(mk(N))
        return timed_call(fn, args, case.mode)

    return setup
