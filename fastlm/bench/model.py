"""Benchmark case of a whole model: one GPT-2-124M training step (bf16 autocast, sequence 1024) on GPU, a tiny GPT
on CPU. Throughput is tokens/s (reported in the unit "tok/s"); peak memory is recorded per provider.

Providers: fastlm-auto (the model's kernels from fastlm's auto backend), torch-eager (the same model on the torch
backend: torch's own ops) and torch-compile (the torch-backend model under torch.compile).
"""

import contextlib

import torch

from fastlm.bench.core import Case
from fastlm.models import GPT, GPTConfig

GPT2_124M = dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
TINY = dict(vocab_size=260, block_size=128, n_layer=2, n_head=2, n_embd=64)


def cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    if device.type == "cuda":
        batch, cfg = 8, GPT2_124M
    else:
        batch, cfg = 4, TINY
    tokens = batch * cfg["block_size"]
    name = "gpt2-124m" if device.type == "cuda" else "gpt-tiny"
    return [
        Case(
            f"{name}_train_step",
            f"B{batch} T{cfg['block_size']}",
            dtype,
            "fwd+bwd",
            tokens,
            "tok/s",
            (batch, tuple(sorted(cfg.items()))),
        )
    ]


def providers(device: torch.device) -> dict[str, str]:
    return {"fastlm-auto": "auto", "torch-eager": "torch", "torch-compile": "torch"}


def runner(case: Case, provider: str, device: torch.device):
    batch, cfg_items = case.params
    cfg = dict(cfg_items)

    def setup():
        torch.manual_seed(0)
        model = GPT(GPTConfig(**cfg, backend=providers(device)[provider])).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        step_model = torch.compile(model) if provider == "torch-compile" else model
        x = torch.randint(0, cfg["vocab_size"], (batch, cfg["block_size"] + 1), device=device)
        amp = torch.autocast("cuda", case.dtype) if device.type == "cuda" else contextlib.nullcontext()

        def step():
            with amp:
                _, loss = step_model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    return setup
