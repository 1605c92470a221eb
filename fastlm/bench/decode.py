"""Benchmark cases of decoding: one query (or a few) per sequence against a long KV cache, Llama-3-8B's heads.

Sq = 1, H = 32 query heads over Hkv = 8 key/value heads, D = 128; Sk keys cached per sequence. Decoding is bound by
reading the cache, so the unit is GB/s of the least traffic a call needs (e = element size):
    K and V read once: 2 * B * Sk * Hkv * D * e;  q read and o written: 2 * B * Sq * H * D * e.
Kernels: "decode" is ``F.scaled_dot_product_attention`` with a (B, H, 1, D) query against (B, Hkv, Sk, D) keys (the
Triton backend takes its split-KV path there by itself); "kvcache" is ``F.attention_with_kvcache`` on a
(B, S_max, Hkv, D) cache holding Sk tokens per sequence, appending one new token (its traffic counted the same).
Providers: fastlm's backends; torch SDPA with each backend it has (GQA through ``enable_gqa``); FlexAttention under
torch.compile. On CPU: fastlm-cpu against torch's CPU SDPA.

"linear_rows" (CPU only): a decoding step's linear layers, ``fastlm.ops.linear_rows.linear`` (fastlm's kernel for a
few rows, inference) against ``F.linear`` (torch-eager: MKL's sgemm), (M rows, K in, N out). A pass over the weight:
bytes N * K * e + M * K * e + M * N * e. On a GPU there is no such case (F.linear's cuBLAS GEMMs are the kernel).
"""

import contextlib

import torch
import torch.nn.functional as TF

import fastlm.functional as F
from fastlm.bench.core import Case, SkipCase, with_backend

H, HKV, D = 32, 8, 128
GPU_GRID = tuple((B, Sk) for B in (1, 8, 64) for Sk in (1024, 8192, 32768) if B * Sk <= 64 * 8192)
GPU_QUICK = ((1, 32768), (64, 4096))
CPU_GRID = ((1, 4096), (8, 4096))
# (M, K, N): a Llama-3-8B projection at batch 1 and 8, a 32000-vocabulary head of a 512-wide model at batch 4
CPU_LINEAR = ((1, 4096, 4096), (8, 4096, 4096), (4, 512, 32000))


def decode_bytes(B: int, Sq: int, Sk: int, e: int) -> float:
    return 2 * B * Sk * HKV * D * e + 2 * B * Sq * H * D * e


def cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    gpu = device.type == "cuda"
    grid = (GPU_QUICK if quick else GPU_GRID) if gpu else CPU_GRID
    e = torch.finfo(dtype).bits // 8
    out = []
    for B, Sk in grid:
        for kernel in ("decode", "kvcache"):
            shape = f"B{B} H{H}/{HKV} Sq1 Sk{Sk} D{D}"
            out.append(Case(kernel, shape, dtype, "fwd", decode_bytes(B, 1, Sk, e), "GB/s", (B, Sk)))
    if not gpu:
        for M, K, N in CPU_LINEAR:
            nbytes = (N * K + M * K + M * N) * e
            out.append(Case("linear_rows", f"{M}x{K}->{N}", dtype, "fwd", nbytes, "GB/s", (M, K, N)))
    return out


def providers(device: torch.device) -> dict[str, object]:
    from fastlm import extension

    if device.type != "cuda":
        fastlm_cpu = {"fastlm-cpu": "cpu"} if extension.lib is not None else {}
        return {**fastlm_cpu, "torch-sdpa": None, "torch-eager": "eager"}
    from torch.nn.attention import SDPBackend

    names: dict[str, object] = {"fastlm-triton": "triton"}
    for name, b in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
    ):
        names[f"torch-sdpa-{name}"] = b
    names["flex-attention"] = "flex"
    return names


def _linear_rows_runner(case: Case, provider: str, device: torch.device):
    from fastlm.ops import linear_rows

    M, K, N = case.params
    if provider not in ("fastlm-cpu", "torch-eager"):
        raise SkipCase("linear_rows is timed against F.linear (torch-eager)")

    def setup():
        x = torch.randn(M, K, device=device, dtype=case.dtype)
        w = torch.randn(N, K, device=device, dtype=case.dtype) / K**0.5
        fn = linear_rows.linear if provider == "fastlm-cpu" else TF.linear
        if provider == "fastlm-cpu" and not linear_rows.uses_kernel(x, w):
            raise SkipCase("linear_rows would not run its kernel here")

        def call():
            with torch.inference_mode():
                return fn(x, w)

        return call

    return setup


def runner(case: Case, provider: str, device: torch.device):
    if case.kernel == "linear_rows":
        return _linear_rows_runner(case, provider, device)
    if provider == "torch-eager":
        raise SkipCase("the attention baseline is torch-sdpa")
    B, Sk = case.params
    backend = providers(device)[provider]

    def setup():
        dt = case.dtype
        q = torch.randn(B, H, 1, D, device=device, dtype=dt)
        if case.kernel == "kvcache":
            if not isinstance(backend, str) or backend == "flex":
                raise SkipCase("attention_with_kvcache is fastlm's (torch has no cache-appending attention)")
            k_cache = torch.randn(B, Sk + 1, HKV, D, device=device, dtype=dt)
            v_cache = torch.randn_like(k_cache)
            k_new = torch.randn(B, 1, HKV, D, device=device, dtype=dt)
            v_new = torch.randn_like(k_new)
            seqlens = torch.full((B,), Sk - 1, dtype=torch.int32, device=device)  # Sk keys after the append
            qt = q.transpose(1, 2).contiguous()  # (B, 1, H, D)
            fn = with_backend(
                lambda: F.attention_with_kvcache(qt, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens), backend
            )
            return fn
        k = torch.randn(B, HKV, Sk, D, device=device, dtype=dt)
        v = torch.randn_like(k)
        if backend == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            flex = torch.compile(flex_attention)
            return lambda: flex(q, k, v, enable_gqa=True)
        if isinstance(backend, str):
            fn = with_backend(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), backend)
            return fn
        from torch.nn.attention import sdpa_kernel

        def fn():
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                return TF.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        return fn

    return setup
