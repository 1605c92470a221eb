"""Benchmark cases of the softmax family: softmax, log-softmax and the scaled-masked softmax of attention scores.

Bytes counted per call (e = element size, R rows of N):
    fwd:  read x, write y                    -> 2 * R * N * e   (+ the mask's own bytes, read once)
    bwd:  read y, dy, write dx               -> 3 * R * N * e
    fwd+bwd: the sum.
The unfused baseline of the scaled-masked softmax is torch's composition (scale, masked_fill, causal fill,
softmax) in eager mode and under torch.compile.
"""

import torch
import torch.nn.functional as TF

import fastlm.functional as F
from fastlm import reference
from fastlm.bench.core import Case, kernel_providers, provider_fn, timed_call

MODES = ("fwd", "bwd", "fwd+bwd")
WIDTHS_GPU = (256, 1024, 4096, 16384, 32768, 131072, 262144)
WIDTHS_GPU_QUICK = (1024, 4096, 32768, 262144)
WIDTHS_CPU = (256, 4096)
INPUT_BYTES_GPU, INPUT_BYTES_CPU = 64 << 20, 4 << 20
SEQS_GPU, SEQS_CPU = (1024, 4096), (256,)  # scaled-masked softmax: (B, H, S, S) scores, mask (B, 1, S, S)


def _masked_unfused(x, mask, scale, causal):
    return reference.scaled_masked_softmax(x, mask, scale, causal)


FUNCS = {
    "softmax": (lambda x: F.softmax(x, -1), lambda x: TF.softmax(x, -1)),
    "log_softmax": (lambda x: F.log_softmax(x, -1), lambda x: TF.log_softmax(x, -1)),
    "scaled_masked_softmax": (
        lambda x, m: F.scaled_masked_softmax(x, m, 0.125, True),
        lambda x, m: _masked_unfused(x, m, 0.125, True),
    ),
}


def cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    gpu = device.type == "cuda"
    widths = (WIDTHS_GPU_QUICK if quick else WIDTHS_GPU) if gpu else WIDTHS_CPU
    size = INPUT_BYTES_GPU if gpu else INPUT_BYTES_CPU
    e = torch.finfo(dtype).bits // 8
    kernels = ("softmax",) if quick else ("softmax", "log_softmax")
    out = []
    for k in kernels:
        for n in widths:
            r = max(1, size // (n * e))
            for mode in MODES:
                work = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * r * n * e
                out.append(Case(k, f"{r}x{n}", dtype, mode, work, "GB/s", (r, n)))
    for s in (SEQS_GPU[:1] if quick else SEQS_GPU) if gpu else SEQS_CPU:
        h = 16
        b = max(1, size // (h * s * s * e))
        for mode in MODES:
            n = b * h * s * s
            work = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * n * e + (b * s * s if mode != "bwd" else 0)
            out.append(Case("scaled_masked_softmax", f"{b}x{h}x{s}x{s}", dtype, mode, work, "GB/s", (b, h, s)))
    return out


providers = kernel_providers


def runner(case: Case, provider: str, device: torch.device):
    fn = provider_fn(case.kernel, provider, providers(device)[provider], *FUNCS[case.kernel])

    def setup():
        req = case.mode != "fwd"
        if case.kernel == "scaled_masked_softmax":
            b, h, s = case.params
            x = torch.randn(b, h, s, s, device=device, dtype=case.dtype, requires_grad=req)
            mask = torch.rand(b, 1, s, s, device=device) > 0.1
            return timed_call(fn, [x, mask], case.mode, [x])
        r, n = case.params
        x = torch.randn(r, n, device=device, dtype=case.dtype, requires_grad=req)
        return timed_call(fn, [x], case.mode)

    return setup
