"""Benchmark cases of attention: TFLOP/s of forward, backward and both.

FLOPs per call: forward 4 * B * H * Sq * Sk * D (two matmuls of 2 * Sq * Sk * D each), halved for causal;
backward 2.5x the forward (five matmuls, as FlashAttention counts). Batch x sequence = 16k tokens, head dims
64 / 128 / 256 (hidden 2048 -> H = hidden / D), causal and not, a padding mask (bool (B, 1, 1, S), half the batch
padded to 3/4 of S), and GQA (8 query heads per key/value head).

Providers: fastlm-triton and fastlm-cuda; torch SDPA with each backend it has (flash, efficient, cudnn, and math
at small sizes); FlexAttention under torch.compile. On CPU: fastlm-cpu against torch's CPU SDPA (its own flash
kernel), at the shapes of ``CPU_CASES``.

Variants (kernel "sdpa_mod", causal, fwd and fwd+bwd): a sliding window ``window=(W - 1, 0)`` (Mistral's W keys per
query) at several W beside full causal at the same S, whose time must fall with W (FLOPs: the pairs in the band,
4 * B * H * D * (W (W + 1) / 2 + (S - W) W)); soft-capping (Gemma 2's 50), ALiBi slopes and attention sinks at full
causal FLOPs. Baselines: FlexAttention (mask_mod / score_mod; no sinks) and torch SDPA with the window as a bool
mask or ALiBi as a materialised bias.
"""

import contextlib

import torch
import torch.nn.functional as TF

import fastlm.functional as F
from fastlm.bench.core import Case, SkipCase, fastlm_providers, timed_call, with_backend

TOKENS = 16384
SEQS_GPU = (512, 1024, 2048, 4096, 8192, 16384)
SEQS_GPU_QUICK = (1024, 8192)
HEAD_DIMS = (64, 128, 256)
HIDDEN = 2048
MATH_MAX_SEQ = 2048  # torch's math backend materialises (B, H, S, S): only at small sizes
# CPU (csrc/cpu/attention.cpp and attention_bwd.cpp): BERT-base inference with and without a padding mask, a longer
# encoder sequence causal and not (with its training step), LLaMA-style GQA inference, a 2048-token causal training
# step and a small Llama-style model's training step (GQA 4:1).
CPU_CASES = (
    ((8, 12, 12, 128, 64, False, "none"), ("fwd",)),
    ((8, 12, 12, 128, 64, False, "padding"), ("fwd",)),
    ((2, 12, 12, 512, 64, False, "none"), ("fwd", "fwd+bwd")),
    ((2, 12, 12, 512, 64, True, "none"), ("fwd",)),
    ((1, 32, 8, 1024, 128, True, "gqa"), ("fwd",)),
    ((2, 12, 12, 2048, 64, True, "none"), ("fwd", "fwd+bwd")),
    ((4, 8, 2, 512, 64, True, "gqa"), ("fwd+bwd",)),
)


# Variants: (B, H, S, D, variant, modes); variant "w<W>" = window (W - 1, 0), "full" = causal without a window.
MOD_CPU = tuple(((1, 8, 2048, 64, v), ("fwd",)) for v in ("w128", "w512", "full"))
MOD_GPU = (
    *(((1, 16, 32768, 128, v), ("fwd", "fwd+bwd")) for v in ("w1024", "w4096", "full")),
    *(((2, 16, 4096, 128, v), ("fwd+bwd",)) for v in ("softcap", "alibi", "sinks")),
)
MOD_GPU_QUICK = (((1, 16, 32768, 128, "w4096"), ("fwd",)), ((1, 16, 32768, 128, "full"), ("fwd",)))
SOFTCAP = 50.0


def _band_pairs(S: int, variant: str) -> int:
    """(query, key) pairs a causal call with this variant computes."""
    if not variant.startswith("w"):
        return S * (S + 1) // 2
    W = min(int(variant[1:]), S)
    return W * (W + 1) // 2 + (S - W) * W


def _mod_cases(grid, dtype) -> list[Case]:
    out = []
    for (B, H, S, D, variant), modes in grid:
        for mode in modes:
            flops = 4 * B * H * D * _band_pairs(S, variant) * {"fwd": 1, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
            label = f"B{B} H{H} S{S} D{D} causal {variant}"
            out.append(Case("sdpa_mod", label, dtype, mode, flops, "TFLOP/s", (B, H, H, S, D, True, variant)))
    return out


def _label(B, H, Hkv, S, D, causal, variant) -> str:
    heads = f"H{H}" if Hkv == H else f"H{H}/{Hkv}"
    return f"B{B} {heads} S{S} D{D}{' causal' if causal else ''}{'' if variant == 'none' else ' ' + variant}"


def attn_flops(B, H, Sq, Sk, D, causal, mode) -> float:
    fwd = 4 * B * H * Sq * Sk * D / (2 if causal else 1)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    if device.type != "cuda":
        return _mod_cases(MOD_CPU, dtype) + [
            Case(
                "sdpa",
                _label(B, H, Hkv, S, D, causal, variant),
                dtype,
                mode,
                attn_flops(B, H, S, S, D, causal, mode),
                "TFLOP/s",
                (B, H, Hkv, S, D, causal, variant),
            )
            for (B, H, Hkv, S, D, causal, variant), modes in CPU_CASES
            for mode in modes
        ]
    out = []
    for S in SEQS_GPU_QUICK if quick else SEQS_GPU:
        for D in (128,) if quick else HEAD_DIMS:
            B, H = max(1, TOKENS // S), HIDDEN // D
            for causal in (False, True):
                for mode in ("fwd", "bwd", "fwd+bwd"):
                    out.append(
                        Case(
                            "sdpa",
                            f"B{B} H{H} S{S} D{D}{' causal' if causal else ''}",
                            dtype,
                            mode,
                            attn_flops(B, H, S, S, D, causal, mode),
                            "TFLOP/s",
                            (B, H, H, S, D, causal, "none"),
                        )
                    )
            if not quick or S == SEQS_GPU_QUICK[-1]:
                for variant, hkv in (("padding", H), ("gqa", max(1, H // 8))):
                    out.append(
                        Case(
                            "sdpa",
                            f"B{B} H{H}/{hkv} S{S} D{D} {variant}",
                            dtype,
                            "fwd+bwd",
                            attn_flops(B, H, S, S, D, False, "fwd+bwd"),
                            "TFLOP/s",
                            (B, H, hkv, S, D, False, variant),
                        )
                    )
    return out + _mod_cases(MOD_GPU_QUICK if quick else MOD_GPU, dtype)


def providers(device: torch.device) -> dict[str, object]:
    if device.type != "cuda":
        return {**{k: v for k, v in fastlm_providers(device).items() if v is not None}, "torch-sdpa": None}
    from torch.nn.attention import SDPBackend

    names = {"fastlm-triton": "triton", "fastlm-cuda": "cuda"}
    for name, b in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("math", SDPBackend.MATH),
    ):
        names[f"torch-sdpa-{name}"] = b
    names["flex-attention"] = "flex"
    return names


def _padding_mask(B, S, device):
    lens = torch.full((B,), S, device=device)
    lens[: B // 2] = 3 * S // 4
    return (torch.arange(S, device=device)[None, :] < lens[:, None]).view(B, 1, 1, S)


def _modifier(variant: str, H: int, S: int, device, dtype):
    """(fastlm keywords, FlexAttention (score_mod, mask_mod) or None, torch SDPA attn_mask or None) of a variant;
    None entries mean that baseline cannot express it."""
    causal_mod = lambda b, h, qi, ki: qi >= ki  # noqa: E731
    if variant.startswith("w"):
        W = int(variant[1:])
        pos = torch.arange(S, device=device)
        band = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - W)
        return dict(window=(W - 1, 0)), (None, lambda b, h, qi, ki: (qi >= ki) & (ki > qi - W)), band
    if variant == "softcap":
        return dict(softcap=SOFTCAP), (lambda s, b, h, qi, ki: SOFTCAP * torch.tanh(s / SOFTCAP), causal_mod), None
    if variant == "alibi":
        slopes = torch.exp2(-8.0 * torch.arange(1, H + 1, device=device) / H)
        pos = torch.arange(S, device=device)
        dist = (pos[:, None] - pos[None, :]).abs()
        bias = (-slopes[:, None, None] * dist).masked_fill(pos[None, :] > pos[:, None], float("-inf")).to(dtype)
        return (
            dict(alibi_slopes=slopes),
            (lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki).abs(), causal_mod),
            bias[None],
        )
    if variant == "sinks":
        return dict(sinks=torch.randn(H, device=device)), None, None
    return {}, (None, causal_mod), None  # "full": causal without a modifier


def runner(case: Case, provider: str, device: torch.device):
    B, H, Hkv, S, D, causal, variant = case.params
    backend = providers(device)[provider]
    modded = case.kernel == "sdpa_mod"

    def setup():
        req = case.mode != "fwd"
        mk = lambda h: torch.randn(B, h, S, D, device=device, dtype=case.dtype, requires_grad=req)  # noqa: E731
        q, k, v = mk(H), mk(Hkv), mk(Hkv)
        mask = _padding_mask(B, S, device) if variant == "padding" else None
        gqa = Hkv != H
        kw, flex_mods, dense = _modifier(variant, H, S, device, case.dtype) if modded else ({}, None, None)
        sdpa_causal = causal and dense is None
        if provider == "flex-attention":
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex = torch.compile(flex_attention)
            lens = mask.view(B, S).sum(-1) if mask is not None else None
            if modded and flex_mods is None:
                raise SkipCase(f"FlexAttention cannot express {variant}")
            score_mod, mod = flex_mods if modded else (None, None)
            if mod is None:

                def mod(b, h, qi, ki):
                    ok = qi >= ki if causal else qi >= 0
                    return ok & (ki < lens[b]) if lens is not None else ok

            block = create_block_mask(mod, B if lens is not None else None, None, S, S, device=device)
            fn = lambda q, k, v: flex(q, k, v, score_mod=score_mod, block_mask=block, enable_gqa=gqa)  # noqa: E731
        elif isinstance(backend, str):
            fn = with_backend(
                lambda q, k, v: F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa, **kw
                ),
                backend,
            )
        else:
            if backend is not None and "math" in provider and S > MATH_MAX_SEQ:
                raise SkipCase(f"the math backend materialises (B, H, S, S) at S = {S}")
            if modded and variant not in ("full",) and dense is None:
                raise SkipCase(f"torch SDPA cannot express {variant}")
            from torch.nn.attention import sdpa_kernel

            attn_mask = dense if dense is not None else mask

            def fn(q, k, v):
                with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                    return TF.scaled_dot_product_attention(
                        q, k, v, attn_mask=attn_mask, is_causal=sdpa_causal, enable_gqa=gqa
                    )

        return timed_call(fn, [q, k, v], case.mode)

    return setup
