"""``fastlm train | finetune | eval``: pre-training (causal or masked LM), fine-tuning, distillation and evaluation
of the models in fastlm.models, on fastlm's kernels.

- Data: the standard library's docstrings (default) or ``--data`` text files; byte tokenizer or ``--tokenizer bpe``.
- AdamW, linear warm-up + cosine decay, gradient clipping, bf16 autocast on GPU, validation perplexity every
  ``--val-every`` steps, a progress line with loss and tokens/s, checkpoints with exact resume (model, optimizer,
  schedule, step; the batches are a function of (seed, step)).
- Multi-GPU / multi-node: launch with ``torchrun`` (DDP; FSDP2 with ``--fsdp``); on CPU, gloo.
- ``--teacher ckpt``: distillation, ``alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE`` at temperature T,
  with the fused ``linear_distillation_loss`` (both LM heads and the loss in token chunks: neither model's logits are
  materialised).
"""

import argparse
import contextlib
import csv
import json
import math
import os
import time

import torch
import torch.distributed as dist

import fastlm.functional as F
from fastlm import data, dispatch
from fastlm.models import BERT, GPT, BERTConfig, GPTConfig, mask_tokens
from fastlm.models.bert import CLS, PAD, SEP

SIZES = {  # (n_layer, n_head, n_embd)
    "tiny": (2, 2, 64),
    "small": (4, 4, 128),
    "gpt2": (12, 12, 768),
}


# ---------------------------------------------------------------------------------------------------------------
# set-up


def _dist() -> tuple[int, int, torch.device]:
    """(rank, world, device); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if torch.cuda.is_available()
        else (torch.device("cpu"))
    )
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def build_model(objective: str, size: str, vocab: int, seq: int, backend: str, dropout: float = 0.0):
    n_layer, n_head, n_embd = SIZES[size]
    common = dict(vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout, backend=backend)
    if objective == "clm":
        return GPT(GPTConfig(block_size=seq, **common))
    return BERT(BERTConfig(max_position=seq, **common))


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def loss_of(
    model, objective: str, xy: torch.Tensor, vocab: int, seed: int, step: int, teacher=None, kd=(0.5, 2.0)
) -> torch.Tensor:
    """The training loss of one (B, T + 1) batch."""
    inner = getattr(model, "module", model)
    if objective == "clm":
        x, y = xy[:, :-1], xy[:, 1:]
        if teacher is None:
            return model(x, y)[1]
        alpha, temp = kd
        h = inner.hidden_states(x)  # (B, T, C)
        with torch.no_grad():
            t_h = teacher.hidden_states(x)  # (B, T, C_teacher)
        return F.linear_distillation_loss(
            h.reshape(-1, h.shape[-1]),
            inner.wte.weight,
            t_h.reshape(-1, t_h.shape[-1]),
            teacher.wte.weight.detach(),  # the teacher is frozen: no gradient
            target=y.reshape(-1),
            kind="kl",
            temperature=temp,
            hard_weight=1.0 - alpha,
        )
    x = xy[:, :-1]
    g = torch.Generator(device="cpu").manual_seed(seed * 7919 + step)
    inputs, labels = mask_tokens(x.cpu(), vocab, generator=g)
    return model(inputs.to(x.device), mlm_labels=labels.to(x.device))["mlm_loss"]


# ---------------------------------------------------------------------------------------------------------------
# train


def train(args) -> dict:
    rank, world, device = _dist()
    torch.manual_seed(args.seed)
    text = data.load_text(args.data)
    tok = data.BPETokenizer(text, args.bpe_vocab) if args.tokenizer == "bpe" else data.ByteTokenizer()
    train_ids, val_ids = data.split_tokens(tok.encode(text))
    model = build_model(
        args.objective, args.size, tok.vocab_size, args.seq + (args.objective == "mlm"), args.backend, args.dropout
    ).to(device)
    teacher = None
    if args.teacher:
        teacher = load_checkpoint(args.teacher, device)[0].eval()
    step0 = 0
    ckpt_path = os.path.join(args.out, "checkpoint.pt") if args.out else None
    state = None
    if args.resume and ckpt_path and os.path.exists(ckpt_path):
        if args.fsdp:
            raise ValueError("--resume with --fsdp is not supported yet (its optimizer state is sharded); use DDP")
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        step0 = state["step"]
        torch.set_rng_state(state["rng"])
    if world > 1:
        if args.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)  # replaces the parameters with sharded ones: the optimizer is made after this
        else:
            model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    history = {"loss": [], "val_ppl": []}
    t0, tokens = time.time(), 0
    for step in range(step0, args.steps):
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        xy = data.batch(train_ids, args.batch, args.seq, args.seed, step, rank, world).to(device)
        with autocast:
            loss = loss_of(
                model,
                args.objective,
                xy,
                tok.vocab_size,
                args.seed,
                step,
                teacher,
                (args.kd_alpha, args.kd_temperature),
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        history["loss"].append(loss.item())
        tokens += xy.numel() * world
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            rate = tokens / max(time.time() - t0, 1e-9)
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}  lr {lr:.2e}  {rate:,.0f} tok/s", flush=True)
        if args.val_every and ((step + 1) % args.val_every == 0 or step == args.steps - 1):
            ppl = evaluate_ppl(getattr(model, "module", model), args.objective, val_ids, args, device)
            history["val_ppl"].append((step + 1, ppl))
            if rank == 0:
                print(f"step {step + 1}: validation perplexity {ppl:.2f}", flush=True)
        if ckpt_path and ((step + 1) % args.save_every == 0 or step == args.steps - 1):
            save_checkpoint(ckpt_path, getattr(model, "module", model), opt, step + 1, args, tok, rank, args.fsdp)
    return history


@torch.no_grad()
def evaluate_ppl(model, objective: str, val_ids: torch.Tensor, args, device, batches: int = 4) -> float:
    model.eval()
    losses = [
        loss_of(
            model,
            objective,
            data.batch(val_ids, args.batch, min(args.seq, len(val_ids) - 2), 12345, i).to(device),
            model.config.vocab_size,
            12345,
            i,
        ).item()
        for i in range(batches)
    ]
    model.train()
    return math.exp(sum(losses) / len(losses))


def save_checkpoint(path: str, model, opt, step: int, args, tok, rank: int = 0, fsdp: bool = False) -> None:
    """Rank 0 writes model, optimizer, step and RNG state. With FSDP2 every rank joins the gathering of the full
    model state and the (sharded) optimizer state is not saved."""
    if fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        optim = None
    else:
        weights, optim = model.state_dict(), opt.state_dict()
    if rank != 0:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    state = {
        "model": weights,
        "optimizer": optim,
        "step": step,
        "rng": torch.get_rng_state(),
        "config": vars(model.config),
        "objective": args.objective,
        "tokenizer": args.tokenizer,
        "vocab_size": tok.vocab_size,
    }
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash never leaves a torn checkpoint


def load_checkpoint(path: str, device):
    state = torch.load(path, map_location=device, weights_only=False)
    cfg = state["config"]
    model = (GPT(GPTConfig(**cfg)) if state["objective"] == "clm" else BERT(BERTConfig(**cfg))).to(device)
    model.load_state_dict(state["model"], strict=False)
    return model, state


# ---------------------------------------------------------------------------------------------------------------
# fine-tuning and evaluation


def read_labelled(path: str, text_col: str, label_col: str) -> tuple[list[str], list[str]]:
    if path.endswith(".jsonl"):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    return [str(r[text_col]) for r in rows], [str(r[label_col]) for r in rows]


def classification_metrics(pred: list[int], gold: list[int], n: int) -> dict:
    """Accuracy and macro-F1 (mean over classes of 2PR / (P + R), 0 for a class never predicted nor present)."""
    acc = sum(p == g for p, g in zip(pred, gold, strict=True)) / max(1, len(gold))
    f1s = []
    for c in range(n):
        tp = sum(p == c and g == c for p, g in zip(pred, gold, strict=True))
        fp = sum(p == c and g != c for p, g in zip(pred, gold, strict=True))
        fn = sum(p != c and g == c for p, g in zip(pred, gold, strict=True))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": sum(f1s) / n}


def _encode_batch(tok, texts: list[str], seq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [[CLS, *tok.encode(t)[: seq - 2], SEP] for t in texts]
    ids = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids.to(device), (ids != PAD).long().to(device)


def finetune(args) -> dict:
    _, _, device = _dist()
    torch.manual_seed(args.seed)
    model, state = load_checkpoint(args.ckpt, device) if args.ckpt else (None, None)
    texts, labels = read_labelled(args.data[0], args.text_column, args.label_column)
    names = sorted(set(labels))
    y = torch.tensor([names.index(lab) for lab in labels])
    tok = data.ByteTokenizer()
    if model is None or not isinstance(model, BERT) or model.config.num_labels != len(names):
        base = model
        n_layer, n_head, n_embd = SIZES[args.size]
        model = BERT(
            BERTConfig(
                vocab_size=tok.vocab_size,
                max_position=args.seq,
                n_layer=n_layer,
                n_head=n_head,
                n_embd=n_embd,
                num_labels=len(names),
                dropout=0.0,
                backend=args.backend,
            )
        ).to(device)
        if isinstance(base, BERT):  # keep the pre-trained encoder, new classifier
            model.load_state_dict(
                {k: v for k, v in base.state_dict().items() if not k.startswith("classifier")}, strict=False
            )
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_test = max(1, len(perm) // 5)
    test, train_idx = perm[:n_test], perm[n_test:]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for epoch in range(args.epochs):
        for i in range(0, len(train_idx), args.batch):
            idx = train_idx[i : i + args.batch]
            ids, mask = _encode_batch(tok, [texts[j] for j in idx], args.seq, device)
            loss = model(ids, mask, labels=y[idx].to(device))["cls_loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        ids, mask = _encode_batch(tok, [texts[j] for j in test], args.seq, device)
        pred = model(ids, mask)["logits"].argmax(-1).tolist()
    metrics = classification_metrics(pred, y[test].tolist(), len(names))
    print(f"test accuracy {metrics['accuracy']:.3f}  macro-F1 {metrics['macro_f1']:.3f}  ({len(test)} examples)")
    return metrics


@torch.no_grad()
def zero_shot(model: GPT, tok, texts: list[str], label_words: list[str], device) -> list[int]:
    """Classify each text by the LM likelihood of ``text + " " + label word`` (summed over the word's tokens)."""
    model.eval()
    preds = []
    for t in texts:
        scores = []
        for w in label_words:
            prompt, cont = tok.encode(t + " "), tok.encode(w)
            ids = torch.tensor([prompt + cont], device=device)[:, -model.config.block_size :]
            h = model.hidden_states(ids[:, :-1])
            logp = F.log_softmax((h[:, -len(cont) :] @ model.wte.weight.T).float(), -1)
            scores.append(logp[0].gather(-1, ids[0, -len(cont) :, None]).sum().item())
        preds.append(max(range(len(scores)), key=scores.__getitem__))
    return preds


def evaluate(args) -> dict:
    _, _, device = _dist()
    model, state = load_checkpoint(args.ckpt, device)
    tok = data.ByteTokenizer()
    if args.zero_shot:
        texts, labels = read_labelled(args.data[0], args.text_column, args.label_column)
        words = args.labels.split(",")
        pred = zero_shot(model, tok, texts, words, device)
        metrics = classification_metrics(pred, [words.index(lab) for lab in labels], len(words))
        print(f"zero-shot accuracy {metrics['accuracy']:.3f}  macro-F1 {metrics['macro_f1']:.3f}")
        return metrics
    _, val_ids = data.split_tokens(tok.encode(data.load_text(args.data)))
    ppl = evaluate_ppl(model, state["objective"], val_ids, args, device)
    print(f"validation perplexity {ppl:.2f}")
    return {"perplexity": ppl}


def add_arguments(sub) -> None:
    """The ``train``, ``finetune`` and ``eval`` sub-commands of ``fastlm`` (every flag with its help and default)."""
    fmt = dict(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", nargs="*", help="text files (default: the standard library's docstrings)")
    common.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="tiny",
        help="model size: tiny 2x64, small 4x128, gpt2 12x768 (layers x width)",
    )
    common.add_argument(
        "--backend", default="auto", choices=list(dispatch.BACKENDS), help="fastlm backend of every kernel"
    )
    common.add_argument("--seq", type=int, default=128, help="sequence length in tokens")
    common.add_argument("--batch", type=int, default=16, help="sequences per step (per process under torchrun)")
    common.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    common.add_argument("--seed", type=int, default=0, help="seed of the weights, the data order and the masking")
    t = sub.add_parser("train", parents=[common], help="pre-train a GPT (clm) or BERT (mlm)", **fmt)
    t.add_argument("--objective", choices=["clm", "mlm"], default="clm", help="causal LM (GPT) or masked LM (BERT)")
    t.add_argument("--steps", type=int, default=200, help="optimiser steps")
    t.add_argument("--warmup", type=int, default=20, help="linear warm-up steps before the cosine decay")
    t.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip")
    t.add_argument("--dropout", type=float, default=0.0, help="dropout probability in the model")
    t.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte", help="bytes, or a BPE trained on --data")
    t.add_argument("--bpe-vocab", type=int, default=2048, help="vocabulary size of the BPE tokenizer")
    t.add_argument("--val-every", type=int, default=50, help="steps between validation perplexities (0: never)")
    t.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    t.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (with --out)")
    t.add_argument("--out", default=None, help="checkpoint folder")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP under torchrun")
    t.add_argument("--teacher", default=None, help="checkpoint of a teacher to distil from")
    t.add_argument("--kd-alpha", type=float, default=0.5, help="weight of the distillation term (1 - it: the labels')")
    t.add_argument("--kd-temperature", type=float, default=2.0, help="distillation temperature T (loss scaled by T^2)")
    f = sub.add_parser("finetune", parents=[common], help="fine-tune a BERT classifier on a CSV/JSONL file", **fmt)
    f.add_argument("--ckpt", default=None, help="pre-trained BERT checkpoint (default: a fresh model)")
    f.add_argument("--epochs", type=int, default=3, help="passes over the training split")
    f.add_argument("--text-column", default="text", help="column of the text in --data")
    f.add_argument("--label-column", default="label", help="column of the class label in --data")
    e = sub.add_parser("eval", parents=[common], help="validation perplexity, or --zero-shot classification", **fmt)
    e.add_argument("--ckpt", required=True, help="checkpoint to evaluate")
    e.add_argument("--zero-shot", action="store_true", help="classify --data by the label words' likelihood")
    e.add_argument("--labels", default="negative,positive", help="label words for --zero-shot")
    e.add_argument("--text-column", default="text", help="column of the text in --data")
    e.add_argument("--label-column", default="label", help="column of the class label in --data")


def main(args) -> int:
    {"train": train, "finetune": finetune, "eval": evaluate}[args.cmd](args)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


__all__ = ["add_arguments", "main"]
