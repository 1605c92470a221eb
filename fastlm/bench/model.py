"""Benchmark cases of whole models. Throughput is tokens/s (reported in the unit "tok/s"); peak memory is recorded
per provider on GPU.

- Training: one GPT-2-124M step (bf16 autocast, sequence 1024) on GPU, a tiny GPT on CPU. Providers: fastlm-auto
  (the model's kernels from fastlm's auto backend), torch-eager (the same model on the torch backend: torch's own
  ops) and torch-compile (the torch-backend model under torch.compile).
- Inference, CPU only: a Hugging Face BERT-base forward (batch 8, sequence 128, random weights from the bert-base
  config, a padding mask on half the batch), ``fastlm.patch``-ed (fastlm-auto) against the unpatched model with its
  SDPA attention (torch-eager). Needs transformers; torch.compile of the 110M-parameter model is not timed (minutes
  of compilation on a 2-core machine).
"""

import contextlib

import torch

import fastlm
from fastlm.bench.core import Case, SkipCase
from fastlm.models import GPT, GPTConfig

GPT2_124M = dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
TINY = dict(vocab_size=260, block_size=128, n_layer=2, n_head=2, n_embd=64)


BERT_BATCH, BERT_SEQ = 8, 128


def cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    if device.type == "cuda":
        batch, cfg = 8, GPT2_124M
    else:
        batch, cfg = 4, TINY
    tokens = batch * cfg["block_size"]
    name = "gpt2-124m" if device.type == "cuda" else "gpt-tiny"
    bert = []
    if device.type == "cpu":
        bert.append(Case("bert-base_infer", f"B{BERT_BATCH} T{BERT_SEQ}", dtype, "fwd", BERT_BATCH * BERT_SEQ, "tok/s"))
    return bert + [
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


def _bert_runner(case: Case, provider: str, device: torch.device):
    if provider == "torch-compile":
        raise SkipCase("torch.compile of BERT-base is not timed on CPU (minutes of compilation)")
    try:
        from transformers import BertConfig, BertModel
    except ImportError as exc:
        raise SkipCase("transformers is not installed") from exc

    def setup():
        torch.manual_seed(0)
        model = BertModel(BertConfig(), add_pooling_layer=False).to(device, case.dtype).eval()
        model.set_attn_implementation("sdpa")
        if provider == "fastlm-auto":
            fastlm.patch(model)
        ids = torch.randint(0, model.config.vocab_size, (BERT_BATCH, BERT_SEQ), device=device)
        mask = torch.ones(BERT_BATCH, BERT_SEQ, dtype=torch.long, device=device)
        mask[: BERT_BATCH // 2, 3 * BERT_SEQ // 4 :] = 0

        def forward():
            with torch.inference_mode():
                return model(input_ids=ids, attention_mask=mask).last_hidden_state

        return forward

    return setup


def runner(case: Case, provider: str, device: torch.device):
    if case.kernel == "bert-base_infer":
        return _bert_runner(case, provider, device)
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
