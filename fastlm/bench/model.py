"""Benchmark cases of whole models: the headline table of ``fastlm bench``. A kernel that wins alone and loses in
the model is not done, so these are what a user sees. Throughput is tokens/s (unit "tok/s": the tokens a step
trains on, the prompt tokens of a prefill, or the new tokens of a decode, over the batch); peak memory is recorded
per provider (GPU: ``max_memory_allocated`` over the timing; CPU: the resident memory one step adds, in a fresh
process, for the cases in ``MEMORY_KERNELS``).

Providers: ``fastlm-auto`` (the model ``fastlm.patch``-ed: norms, RoPE, gated MLP, attention ``"fastlm"``, the
fused causal-LM loss; fastlm's ``auto`` backend), ``torch-eager`` (the same model unpatched, HF's SDPA attention),
``torch-compile`` (the unpatched model under ``torch.compile``; training only, and not in ``--quick``: its compile
takes minutes on a CPU and a large part of the device check's bench budget on a GPU), ``liger`` (Liger-Kernel's
``apply_liger_kernel_to_llama`` on the unpatched model; GPU, where liger_kernel is importable).

Cases (Hugging Face ``LlamaForCausalLM`` / ``BertModel`` built from a config with random weights, seeded):
- ``llama_train_step``: forward with labels, loss, backward, AdamW step. CPU: hidden 512, 4 layers, 8 / 2 heads,
  intermediate 1408, vocabulary 32000, batch 4 x 512 tokens, fp32. GPU: Llama-3-8B's layer shape (hidden 4096,
  32 / 8 heads, intermediate 14336, vocabulary 128256), bf16 autocast over fp32 parameters, batch 1 x 4096 tokens,
  ``GPU_LAYERS`` layers (as many as fit the eager baseline: parameters, gradients and AdamW state take 16 bytes per
  parameter, ~3.5 GB per layer and ~17 GB for the untied embedding and head).
- ``llama_prefill``: one inference forward over the prompt (``logits_to_keep=1``, as ``generate`` does).
- ``llama_decode``: greedy ``generate`` with HF's dynamic cache, a fixed number of new tokens.
- ``bert-base_infer`` (CPU): BERT-base forward, batch 8 x 128, a padding mask on half the batch.
- ``gpt-tiny_train_step`` / ``gpt2-124m_train_step``: fastlm's own GPT (fastlm.models) on its kernels (fastlm-auto)
  against the same model on the torch backend (eager and compiled).
"""

import contextlib

import torch

import fastlm
from fastlm.bench.core import Case, SkipCase
from fastlm.bench.peers import LIGER, liger_providers
from fastlm.models import GPT, GPTConfig

GPT2_124M = dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
TINY = dict(vocab_size=260, block_size=128, n_layer=2, n_head=2, n_embd=64)
LLAMA_CPU = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
)
LLAMA3_8B_LAYER = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    rope_theta=500000.0,
)
GPU_LAYERS = 4  # 4 x 3.5 GB + 17 GB of parameters and optimizer state, plus activations: fits an 80 GB H100 eagerly
BERT_BATCH, BERT_SEQ = 8, 128
# (batch, tokens) of each Llama case, per device type; decode: (batch, prompt, new tokens)
SIZES = {
    "cpu": {"train": (4, 512), "prefill": (4, 512), "decode": (4, 128, 32)},
    "cuda": {"train": (1, 4096), "prefill": (1, 4096), "decode": (1, 512, 128)},
}
MEMORY_KERNELS = ("llama_train_step",)


def cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    gpu = device.type == "cuda"
    sizes = SIZES[device.type]
    cfg = dict(LLAMA3_8B_LAYER, num_hidden_layers=GPU_LAYERS) if gpu else LLAMA_CPU
    name = f"llama3-8b-{GPU_LAYERS}L" if gpu else "llama-512h4L"
    cfg_items = tuple(sorted(cfg.items()))
    B, T = sizes["train"]
    train = ("train", cfg_items, B, T, quick)
    out = [Case("llama_train_step", f"{name} B{B} T{T}", dtype, "fwd+bwd", B * T, "tok/s", train)]
    Bd, P, N = sizes["decode"]
    decode = ("decode", cfg_items, Bd, P, N)
    out.append(Case("llama_decode", f"{name} B{Bd} P{P} N{N}", dtype, "fwd", Bd * N, "tok/s", decode))
    if not quick:
        Bp, Tp = sizes["prefill"]
        prefill = ("prefill", cfg_items, Bp, Tp)
        out.append(Case("llama_prefill", f"{name} B{Bp} T{Tp}", dtype, "fwd", Bp * Tp, "tok/s", prefill))
    if not gpu:
        out.append(Case("bert-base_infer", f"B{BERT_BATCH} T{BERT_SEQ}", dtype, "fwd", BERT_BATCH * BERT_SEQ, "tok/s"))
    if not quick:
        batch, gcfg = (8, GPT2_124M) if gpu else (4, TINY)
        gname = "gpt2-124m" if gpu else "gpt-tiny"
        tokens = batch * gcfg["block_size"]
        out.append(
            Case(
                f"{gname}_train_step",
                f"B{batch} T{gcfg['block_size']}",
                dtype,
                "fwd+bwd",
                tokens,
                "tok/s",
                ("gpt", batch, tuple(sorted(gcfg.items()))),
            )
        )
    return out


def providers(device: torch.device) -> dict[str, str | None]:
    """Provider -> the fastlm backend its model runs on (fastlm's GPT) ; the HF cases patch or not by name."""
    return {"fastlm-auto": "auto", "torch-eager": "torch", "torch-compile": "torch"} | liger_providers(device)


# Rounds of the interleaved CPU timing (run.py): a model step takes seconds, so a few rounds after one warm-up.
TIMING = {"warmup": 1, "min_rounds": 3, "rep_ms": 0}


def _hf_llama(cfg: dict, device: torch.device, provider: str, training: bool, dtype: torch.dtype):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise SkipCase(f"transformers cannot be imported: {exc}") from exc
    torch.manual_seed(0)
    config = LlamaConfig(**cfg, max_position_embeddings=8192, attn_implementation="sdpa")
    gpu = device.type == "cuda"
    # training keeps fp32 parameters (autocast on GPU); inference runs in the case's dtype
    model = LlamaForCausalLM(config).to(device, torch.float32 if training else dtype)
    model.train(training)
    if provider == "fastlm-auto":
        fastlm.patch(model)
    elif provider == LIGER:
        if not gpu:
            raise SkipCase("Liger-Kernel's Triton kernels need a GPU")
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model)
    return model


def _llama_runner(case: Case, provider: str, device: torch.device):
    kind, cfg_items = case.params[0], dict(case.params[1])
    gpu = device.type == "cuda"
    if provider == "torch-compile" and kind != "train":
        raise SkipCase("torch.compile is timed on the training step only")

    def setup():
        if kind == "train":
            B, T, quick = case.params[2:]
            if provider == "torch-compile" and quick:
                raise SkipCase("torch.compile of the Llama step is not timed in --quick (a minute or more of compile)")
            model = _hf_llama(cfg_items, device, provider, True, case.dtype)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=gpu)
            fwd = torch.compile(model) if provider == "torch-compile" else model
            ids = torch.randint(0, cfg_items["vocab_size"], (B, T), device=device)
            amp = torch.autocast("cuda", case.dtype) if gpu else contextlib.nullcontext()

            def step():
                with amp:
                    loss = fwd(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            return step
        model = _hf_llama(cfg_items, device, provider, False, case.dtype)
        if kind == "prefill":
            B, T = case.params[2:]
            ids = torch.randint(0, cfg_items["vocab_size"], (B, T), device=device)

            def prefill():
                with torch.inference_mode():
                    return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits

            return prefill
        B, P, N = case.params[2:]
        ids = torch.randint(3, cfg_items["vocab_size"], (B, P), device=device)

        def decode():
            with torch.inference_mode():
                out = model.generate(
                    ids, max_new_tokens=N, min_new_tokens=N, do_sample=False, use_cache=True, pad_token_id=0
                )
            assert out.shape[1] == P + N, f"generate stopped early: {out.shape[1] - P} of {N} new tokens"
            return out

        return decode

    return setup


def _bert_runner(case: Case, provider: str, device: torch.device):
    if provider == "torch-compile":
        raise SkipCase("torch.compile of BERT-base is not timed on CPU (minutes of compilation)")
    if provider == LIGER:
        raise SkipCase("Liger-Kernel has no BERT patch")
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


def _gpt_runner(case: Case, provider: str, device: torch.device):
    if provider == LIGER:
        raise SkipCase("Liger-Kernel has no patch for fastlm's GPT")
    _, batch, cfg_items = case.params
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


def runner(case: Case, provider: str, device: torch.device):
    if case.kernel == "bert-base_infer":
        return _bert_runner(case, provider, device)
    if case.kernel.startswith("llama_"):
        return _llama_runner(case, provider, device)
    return _gpt_runner(case, provider, device)
