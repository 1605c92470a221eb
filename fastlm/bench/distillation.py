"""Benchmark cases of the distillation losses: distillation_loss (logits in) and the LM-head linear distillation.

distillation_loss, bytes per call (N rows of V logits, e = element size); the same count for every provider (the
least traffic the op needs), so the GB/s compare times:
    fwd+bwd:  read the student's and the teacher's logits, write the student's gradient -> 3 * N * V * e
The unfused baseline is torch's composition: log_softmax of both, ``kl_div(log_target=True)`` (JSD: the mixture by
logsumexp, as TRL's GKD), times T^2, in eager mode and under torch.compile; Liger's JSD (on log-probabilities) where
it can run.
linear_distillation_loss: TFLOP/s of the matmuls of forward + backward (student: logits, grad_hidden,
grad_weight; teacher: logits), 2 * T * V * (3 * Hs + Ht), and the peak memory beside the time (the headline: neither
model's logits are materialised). The unfused baseline materialises both models' logits and runs torch's losses.
"""

import math

import torch
import torch.nn.functional as TF

import fastlm.functional as F
from fastlm.bench.core import Case, SkipCase, kernel_providers, provider_fn, timed_call
from fastlm.bench.peers import LIGER

TEMPERATURE, BETA = 2.0, 0.5
ROWS_GPU = ((4096, 128256),)  # tokens x vocabulary (Llama-3's)
ROWS_GPU_QUICK = ((2048, 128256),)
ROWS_CPU = ((64, 32000), (16, 128256))
LINEAR_GPU = (4096, 128256, 4096, 4096)  # tokens x vocab x student hidden x teacher hidden
LINEAR_CPU = (1024, 32000, 512, 512)
MEMORY_KERNELS = ("linear_distillation_loss",)  # fastlm.bench.core.cpu_peak_mb: measured in a child process on CPU


def torch_distillation(s, t, kind: str = "kl", beta: float = BETA, temperature: float = TEMPERATURE):
    """The unfused torch composition a user writes (batchmean over every row)."""
    lps = TF.log_softmax(s.float() / temperature, dim=-1)
    lpt = TF.log_softmax(t.float() / temperature, dim=-1)
    if kind == "kl":
        loss = TF.kl_div(lps, lpt, reduction="batchmean", log_target=True)
    elif kind == "reverse_kl":
        loss = TF.kl_div(lpt, lps, reduction="batchmean", log_target=True)
    else:
        lm = torch.logsumexp(torch.stack([lpt + math.log(beta), lps + math.log(1 - beta)]), dim=0)
        loss = beta * TF.kl_div(lm, lpt, reduction="batchmean", log_target=True) + (1 - beta) * TF.kl_div(
            lm, lps, reduction="batchmean", log_target=True
        )
    return (loss * temperature**2).to(s.dtype)


def torch_linear_distillation(x, w, xt, wt, kind: str = "kl"):
    """Both models' logits materialised, then the torch losses."""
    with torch.no_grad():
        t = xt @ wt.T
    return torch_distillation(x @ w.T, t, kind)


def _liger_jsd(s, t):
    from liger_kernel.transformers.functional import liger_jsd

    lps = TF.log_softmax(s.float() / TEMPERATURE, dim=-1)
    lpt = TF.log_softmax(t.float() / TEMPERATURE, dim=-1)
    return liger_jsd(lps, lpt, beta=BETA) * TEMPERATURE**2


def cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    gpu = device.type == "cuda"
    rows = (ROWS_GPU_QUICK if quick else ROWS_GPU) if gpu else ROWS_CPU
    e = torch.finfo(dtype).bits // 8
    out = []
    for n, v in rows:
        for kind in ("kl", "jsd"):
            work = 3 * n * v * e
            out.append(Case("distillation_loss", f"{n}x{v} {kind}", dtype, "fwd+bwd", work, "GB/s", (n, v, kind)))
    t, v, hs, ht = LINEAR_GPU if gpu else LINEAR_CPU
    flops = 2 * t * v * (3 * hs + ht)
    out.append(
        Case("linear_distillation_loss", f"{t}x{v}x{hs}x{ht}", dtype, "fwd+bwd", flops, "TFLOP/s", (t, v, hs, ht))
    )
    return out


providers = kernel_providers


def runner(case: Case, provider: str, device: torch.device):
    backend = providers(device)[provider]

    def setup():
        if case.kernel == "linear_distillation_loss":
            if provider == LIGER:
                raise SkipCase("Liger's fused linear JSD is not wired into this suite")
            t, v, hs, ht = case.params
            fn = provider_fn(
                case.kernel,
                provider,
                backend,
                lambda x, w, xt, wt: F.linear_distillation_loss(x, w, xt, wt, temperature=TEMPERATURE),
                torch_linear_distillation,
            )
            x = torch.randn(t, hs, device=device, dtype=case.dtype, requires_grad=True)
            w = (torch.randn(v, hs, device=device) * hs**-0.5).to(case.dtype).requires_grad_()
            xt = torch.randn(t, ht, device=device, dtype=case.dtype)
            wt = (torch.randn(v, ht, device=device) * ht**-0.5).to(case.dtype)
            return timed_call(fn, [x, w, xt, wt], case.mode, [x, w])
        n, v, kind = case.params
        if provider == LIGER:
            if kind != "jsd":
                raise SkipCase("Liger's counterpart here is its JSD")
            fn = _liger_jsd
        else:
            fn = provider_fn(
                case.kernel,
                provider,
                backend,
                lambda s, t: F.distillation_loss(s, t, kind=kind, beta=BETA, temperature=TEMPERATURE),
                lambda s, t: torch_distillation(s, t, kind),
            )
        s = torch.randn(n, v, device=device, dtype=case.dtype, requires_grad=True)
        t = torch.randn(n, v, device=device, dtype=case.dtype)
        return timed_call(fn, [s, t], case.mode, [s])

    return setup
