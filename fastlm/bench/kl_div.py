"""Benchmark cases of kl_div (the distillation loss on log-probabilities over a vocabulary).

Bytes per call (n = rows * V elements, e = element size); the same count for every provider (the least traffic the
op needs), so the GB/s compare times:
    fwd (loss only, no grad):                    read input and target            -> 2 * n * e
    fwd+bwd (d input; the teacher's target has none): + write the input's gradient  -> 3 * n * e
reduction "batchmean" (the KL divergence), log_target False.
"""

import torch
import torch.nn.functional as TF

import fastlm.functional as F
from fastlm.bench.core import Case, kernel_providers, provider_fn, timed_call

SHAPES_GPU = ((8192, 32000), (4096, 128256))  # tokens x vocab: Llama-2 and Llama-3 vocabularies
SHAPES_GPU_QUICK = ((4096, 128256),)
SHAPES_CPU = ((512, 32000),)  # an LM shape scaled down

FUNCS = {
    "kl_div": (
        lambda x, t: F.kl_div(x, t, reduction="batchmean"),
        lambda x, t: TF.kl_div(x, t, reduction="batchmean"),
    ),
}


def cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    gpu = device.type == "cuda"
    shapes = (SHAPES_GPU_QUICK if quick else SHAPES_GPU) if gpu else SHAPES_CPU
    e = torch.finfo(dtype).bits // 8
    out = []
    for n, v in shapes:
        for mode in ("fwd", "fwd+bwd"):
            out.append(Case("kl_div", f"{n}x{v}", dtype, mode, (2 if mode == "fwd" else 3) * n * v * e, "GB/s", (n, v)))
    return out


providers = kernel_providers


def runner(case: Case, provider: str, device: torch.device):
    fn = provider_fn(case.kernel, provider, providers(device)[provider], *FUNCS[case.kernel])

    def setup():
        req = case.mode != "fwd"
        n, v = case.params
        x = torch.randn(n, v, device=device).log_softmax(-1).to(case.dtype).requires_grad_(req)
        t = torch.randn(n, v, device=device).softmax(-1).to(case.dtype)
        return timed_call(fn, [x, t], case.mode, [x] if req else None)

    return setup
