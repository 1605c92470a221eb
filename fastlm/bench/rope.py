"""Benchmark cases of the rotary position embedding (fastlm.functional.apply_rotary_pos_emb) at Llama-3-8B's heads.

q (B, 32, S, 128) and k (B, 8, S, 128) as HF makes them (transposed views of the (B, S, H, D) projections), tables
(1, S, 128) of q's dtype, as HF's rotary module returns them. Bytes per call (T = B * S tokens, e = element size),
the least traffic the op needs, the same count for every provider:
    fwd:      read q, k, write q_out, k_out      -> 2 * T * (Hq + Hk) * D * e   + the tables, read once: 2 * S * D * e
    bwd:      read dq_out, dk_out, write dq, dk  -> 2 * T * (Hq + Hk) * D * e   + the tables
    fwd+bwd:  the sum.
Baselines: HF's formula (``x * cos + rotate_half(x) * sin``, fastlm.reference) in eager mode and under torch.compile,
and Liger-Kernel's ``liger_rope`` where it runs (CUDA; it rotates a contiguous (B, S, H, D) input in place).
"""

import torch

import fastlm.functional as F
from fastlm import reference
from fastlm.bench.core import MODELS, Case, kernel_providers, provider_fn, timed_call

LLAMA = MODELS["llama3-8b"]
HQ, HK, D = LLAMA["heads"], LLAMA["kv_heads"], LLAMA["head_dim"]
TOKENS_GPU = ((1, 4096), (8, 4096), (4, 16384))  # (B, S)
TOKENS_GPU_QUICK = ((8, 4096),)
TOKENS_CPU = ((1, 512),)
MODES = ("fwd", "bwd", "fwd+bwd")

FUNCS = {
    "rope": (
        lambda q, k, cos, sin: F.apply_rotary_pos_emb(q, k, cos, sin),
        lambda q, k, cos, sin: reference.apply_rotary_pos_emb(q, k, cos, sin),
    )
}


def cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    gpu = device.type == "cuda"
    tokens = (TOKENS_GPU_QUICK if quick else TOKENS_GPU) if gpu else TOKENS_CPU
    e = torch.finfo(dtype).bits // 8
    out = []
    for B, S in tokens:
        one_way = 2 * B * S * (HQ + HK) * D * e + 2 * S * D * e
        for mode in MODES:
            work = (2 if mode == "fwd+bwd" else 1) * one_way
            out.append(Case("rope", f"{B}x{S}x{HQ}/{HK}x{D}", dtype, mode, work, "GB/s", (B, S)))
    return out


providers = kernel_providers


def runner(case: Case, provider: str, device: torch.device):
    fn = provider_fn(case.kernel, provider, providers(device)[provider], *FUNCS[case.kernel])

    def setup():
        B, S = case.params
        req = case.mode != "fwd"
        q = torch.randn(B, S, HQ, D, device=device, dtype=case.dtype).transpose(1, 2).requires_grad_(req)
        k = torch.randn(B, S, HK, D, device=device, dtype=case.dtype).transpose(1, 2).requires_grad_(req)
        pos = torch.arange(S, device=device, dtype=torch.float32)
        freqs = pos[:, None] / 10000 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
        emb = torch.cat((freqs, freqs), dim=-1)[None]  # (1, S, D), as HF's LlamaRotaryEmbedding
        cos, sin = emb.cos().to(case.dtype), emb.sin().to(case.dtype)
        return timed_call(fn, [q, k, cos, sin], case.mode, [q, k])

    return setup
