"""Benchmark cases of cross-entropy and the LM-head linear cross-entropy.

cross_entropy, bytes per call (N rows of C logits, e = element size); the same count for every provider (the
least traffic the op needs), so the GB/s compare times:
    fwd (loss only, no grad):   read the logits          -> N * C * e
    fwd+bwd:                    + read them again (or the softmax) and write the gradient -> 3 * N * C * e
cross_entropy_soft (class-probability targets of the logits' shape; the target needs no gradient):
    fwd:      read the logits and the target                                   -> 2 * N * C * e
    fwd+bwd:  + read both again and write the gradient                         -> 5 * N * C * e
linear_cross_entropy: TFLOP/s of the three matmuls of forward + backward, 6 * T * V * H, and the peak memory
(the headline number: the full logits are never materialised; on CPU measured per provider in a child process,
fastlm.bench.core.cpu_peak_mb). CPU cases: a small head, and a Llama-style training step's (4 x 512 tokens,
hidden 512, vocabulary 32000).
"""

import torch
import torch.nn.functional as TF

import fastlm.functional as F
from fastlm.bench.core import MODELS, Case, kernel_providers, provider_fn, timed_call

VOCABS_GPU = tuple(sorted({m["vocab"] for m in MODELS.values()} | {256, 4096, 262144}))  # BERT, GPT-2, LLaMA-3
VOCABS_GPU_QUICK = (4096, 131072)
VOCABS_CPU = (1024, 32768)
INPUT_BYTES_GPU, INPUT_BYTES_CPU = 256 << 20, 4 << 20
SOFT_GPU, SOFT_GPU_QUICK, SOFT_CPU = ((8192, 32000), (4096, 128256)), ((4096, 128256),), ((512, 32000),)
LCE_GPU = (8192, 131072, 4096)  # tokens x vocab x hidden (LLaMA-3-8B's head)
LCE_CPU = ((256, 8192, 256), (2048, 32000, 512))
MEMORY_KERNELS = ("linear_cross_entropy",)  # fastlm.bench.core.cpu_peak_mb: measured in a child process on CPU


def _lce_ref(x, w, t):
    return TF.cross_entropy(TF.linear(x, w), t)


FUNCS = {
    "cross_entropy": (lambda x, t: F.cross_entropy(x, t), lambda x, t: TF.cross_entropy(x, t)),
    "cross_entropy_soft": (lambda x, t: F.cross_entropy(x, t), lambda x, t: TF.cross_entropy(x, t)),
    "linear_cross_entropy": (lambda x, w, t: F.linear_cross_entropy(x, w, t), _lce_ref),
}


def cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    gpu = device.type == "cuda"
    vocabs = (VOCABS_GPU_QUICK if quick else VOCABS_GPU) if gpu else VOCABS_CPU
    size = INPUT_BYTES_GPU if gpu else INPUT_BYTES_CPU
    e = torch.finfo(dtype).bits // 8
    out = []
    for c in vocabs:
        n = max(1, size // (c * e))
        for mode in ("fwd", "fwd+bwd"):
            out.append(
                Case("cross_entropy", f"{n}x{c}", dtype, mode, (1 if mode == "fwd" else 3) * n * c * e, "GB/s", (n, c))
            )
    for n, c in (SOFT_GPU_QUICK if quick else SOFT_GPU) if gpu else SOFT_CPU:
        for mode in ("fwd", "fwd+bwd"):
            work = (2 if mode == "fwd" else 5) * n * c * e
            out.append(Case("cross_entropy_soft", f"{n}x{c}", dtype, mode, work, "GB/s", (n, c)))
    for t, v, h in (LCE_GPU,) if gpu else LCE_CPU:
        work = 6 * t * v * h
        out.append(Case("linear_cross_entropy", f"{t}x{v}x{h}", dtype, "fwd+bwd", work, "TFLOP/s", (t, v, h)))
    return out


providers = kernel_providers


def runner(case: Case, provider: str, device: torch.device):
    fn = provider_fn(case.kernel, provider, providers(device)[provider], *FUNCS[case.kernel])

    def setup():
        req = case.mode != "fwd"
        if case.kernel == "linear_cross_entropy":
            t, v, h = case.params
            x = torch.randn(t, h, device=device, dtype=case.dtype, requires_grad=True)
            w = (torch.randn(v, h, device=device) * h**-0.5).to(case.dtype).requires_grad_()
            tgt = torch.randint(0, v, (t,), device=device)
            return timed_call(fn, [x, w, tgt], case.mode, [x, w])
        n, c = case.params
        x = torch.randn(n, c, device=device, dtype=case.dtype, requires_grad=req)
        if case.kernel == "cross_entropy_soft":
            tgt = torch.randn(n, c, device=device).softmax(-1).to(case.dtype)
            return timed_call(fn, [x, tgt], case.mode, [x] if req else None)
        tgt = torch.randint(0, c, (n,), device=device)
        return timed_call(fn, [x, tgt], case.mode, [x] if req else None)

    return setup
