"""``fastlm train | finetune | eval``: pre-training (causal or masked LM), fine-tuning, distillation and evaluation
of the models in fastlm.models, on fastlm's kernels.

- Data: the standard library's docstrings (default) or ``--data`` text files; byte tokenizer or ``--tokenizer bpe``.
- AdamW, linear warm-up + cosine decay, gradient clipping, bf16 autocast on GPU, validation perplexity every
  ``--val-every`` steps, a progress line with loss and tokens/s.
- Crash-safe checkpoints (fastlm/checkpoint.py): atomic folders of torch.distributed.checkpoint files with a
  manifest of sizes and hashes, the previous one kept until the next is complete; ``--resume`` takes the newest
  intact one (a truncated or corrupt one is refused with a message, and the previous used) and continues bit for bit
  (model, optimizer, step, every rank's RNG states; the batches are a function of (seed, step), so the data position
  is the step). SIGTERM / SIGINT stop the run at the next step boundary on every rank, with a checkpoint.
- Multi-GPU / multi-node: launch with ``torchrun`` (DDP; FSDP2 with ``--fsdp``; ``--tp N``: tensor parallel GPT on a
  (dp, tp) mesh, the LM head split on the vocabulary with the vocab-parallel fused loss); on CPU, gloo. Checkpoints
  reshard: a run saved on 2 ranks resumes on 1 and the reverse (same global batch: ``--batch`` x data-parallel size).
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
from fastlm import checkpoint, data, dispatch
from fastlm.models import BERT, GPT, BERTConfig, GPTConfig, mask_tokens
from fastlm.models.bert import CLS, PAD, SEP
from fastlm.models.gpt import qkv_heads_major, tensor_parallel
from fastlm.ops.vocab_parallel import is_dtensor

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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _mesh(args, world: int, device: torch.device):
    """(data-parallel rank, data-parallel size, the tensor-parallel mesh or None, the data-parallel group)."""
    tp = getattr(args, "tp", 1)
    if tp == 1:
        return (dist.get_rank() if world > 1 else 0), world, None, None
    if world % tp:
        raise ValueError(f"--tp {tp} must divide the number of processes ({world})")
    if args.objective != "clm" or args.teacher or args.fsdp:
        raise ValueError(
            "--tp N supports the causal LM (GPT) with DDP-style data parallelism: no --objective mlm, "
            "--teacher or --fsdp"
        )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    return mesh["dp"].get_local_rank(), world // tp, mesh["tp"], mesh["dp"].get_group()


def _all_reduce_grads(params: list, group, size: int) -> None:
    """Average the gradients over the data-parallel group (the tensor-parallel run's DDP): one flat all-reduce of
    every rank-local gradient shard."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _clip_grad_norm_tp(params: list, max_norm: float, tp_group) -> None:
    """clip_grad_norm_ for a tensor-parallel model (torch's refuses a mix of DTensor and plain gradients): the
    squares of the split gradients' local shards summed over the tensor-parallel ranks, the replicated ones once."""
    split = torch.zeros((), dtype=torch.float32, device=params[0].device)
    whole = torch.zeros_like(split)
    grads = []
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
        local = _local(g)
        grads.append(local)
        sq = local.float().pow(2).sum()
        if is_dtensor(g) and any(pl.is_shard() for pl in g.placements):
            split += sq
        else:
            whole += sq
    dist.all_reduce(split, group=tp_group)
    coef = (max_norm / ((split + whole).sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))


def _run_meta(args, tok, model, world: int, dp: int, tp: int) -> dict:
    return {
        "config": vars(getattr(model, "module", model).config),
        "objective": args.objective,
        "tokenizer": args.tokenizer,
        "vocab_size": tok.vocab_size,
        "seed": args.seed,
        "global_batch": args.batch * dp,
        "world": world,
        "tp": tp,
        "fsdp": bool(args.fsdp),
    }


def _check_resumable(meta: dict, args, tok, dp: int) -> None:
    """A resumed run must see the data the interrupted one would have seen next: same seed and global batch."""
    for key, have in (("seed", args.seed), ("global_batch", args.batch * dp), ("vocab_size", tok.vocab_size)):
        if key in meta and meta[key] != have:
            raise ValueError(
                f"the checkpoint was written with {key} = {meta[key]}, this run has {have}: resuming would change the "
                "data order or the model (the global batch is --batch times the data-parallel size)"
            )


def train(args, on_step=None) -> dict:
    """Pre-train per ``args`` (the ``fastlm train`` flags); returns the history (``loss``: this rank's loss per step,
    ``val_ppl``, ``step0``: the step the run started at, and ``stopped``: the signal that stopped it, if one did).
    ``on_step(step)`` is called after each optimiser step (tests use it to send a signal mid-run)."""
    rank, world, device = _dist()
    dp_rank, dp, tp_mesh, dp_group = _mesh(args, world, device)
    tp = tp_mesh.size() if tp_mesh is not None else 1
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
    if tp_mesh is not None:
        tensor_parallel(model, tp_mesh)
    elif world > 1:
        if args.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)  # replaces the parameters with sharded ones: the optimizer is made after this
        else:
            model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    step0 = 0
    if args.resume and args.out:
        step0 = _resume(args, model, opt, tok, dp, rank, device)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    history = {"loss": [], "val_ppl": [], "step0": step0}
    meta = _run_meta(args, tok, model, world, dp, tp)
    stop = checkpoint.StopSignal()
    try:
        t0, tokens = time.time(), 0
        for step in range(step0, args.steps):
            lr = lr_at(step, args.lr, args.warmup, args.steps)
            for group in opt.param_groups:
                group["lr"] = lr
            xy = data.batch(train_ids, args.batch, args.seq, args.seed, step, dp_rank, dp).to(device)
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
            if tp_mesh is not None:
                if dp > 1:
                    _all_reduce_grads(params, dp_group, dp)
                _clip_grad_norm_tp(params, args.grad_clip, tp_mesh.get_group())
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            loss = _local(loss)
            history["loss"].append(loss.item())
            tokens += xy.numel() * dp
            if on_step is not None:
                on_step(step)
            if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
                rate = tokens / max(time.time() - t0, 1e-9)
                print(
                    f"step {step + 1}/{args.steps}  loss {loss.item():.4f}  lr {lr:.2e}  {rate:,.0f} tok/s", flush=True
                )
            if args.val_every and ((step + 1) % args.val_every == 0 or step == args.steps - 1):
                ppl = evaluate_ppl(getattr(model, "module", model), args.objective, val_ids, args, device)
                history["val_ppl"].append((step + 1, ppl))
                if rank == 0:
                    print(f"step {step + 1}: validation perplexity {ppl:.2f}", flush=True)
            stopping = stop.requested(device)  # the same answer on every rank (all-reduced)
            if args.out and (stopping or (step + 1) % args.save_every == 0 or step == args.steps - 1):
                folder = checkpoint.save(args.out, step + 1, model, opt, meta, device)
            if stopping:
                history["stopped"] = stop.name
                if rank == 0:
                    where = f"checkpoint {folder}; continue with --resume" if args.out else "nothing saved (no --out)"
                    print(f"stopped by {stop.name} after step {step + 1}: {where}", flush=True)
                break
    finally:
        stop.restore()
    return history


def _resume(args, model, opt, tok, dp: int, rank: int, device) -> int:
    """Load the newest intact checkpoint of args.out into model and opt (any layout); returns its step (0 without
    one). The RNG states: this rank's, or rank 0's when the run has more ranks than the saved one."""
    folder = checkpoint.latest(args.out)
    legacy = os.path.join(args.out, "checkpoint.pt")
    if folder is None and os.path.exists(legacy):  # format 1: one file, rank 0's state, no FSDP
        if args.fsdp or getattr(args, "tp", 1) > 1:
            raise ValueError(f"{legacy} (an old single-file checkpoint) resumes only without --fsdp / --tp")
        state = torch.load(legacy, map_location=device, weights_only=False)
        getattr(model, "module", model).load_state_dict(qkv_heads_major(state["model"], state["config"]["n_head"]))
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        return state["step"]
    if folder is None:
        if rank == 0:
            print(f"no checkpoint in {args.out}: starting from step 0", flush=True)
        return 0
    meta = checkpoint.read_extra(folder)
    _check_resumable(meta, args, tok, dp)
    checkpoint.load(folder, model, opt)
    rngs = meta["rng"]
    checkpoint.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0], device)
    if rank == 0:
        print(f"resumed from {folder} (step {meta['step']})", flush=True)
    return meta["step"]


@torch.no_grad()
def evaluate_ppl(model, objective: str, val_ids: torch.Tensor, args, device, batches: int = 4) -> float:
    model.eval()
    losses = [
        _local(  # a replicated DTensor under tensor parallelism
            loss_of(
                model,
                objective,
                data.batch(val_ids, args.batch, min(args.seq, len(val_ids) - 2), 12345, i).to(device),
                model.config.vocab_size,
                12345,
                i,
            )
        ).item()
        for i in range(batches)
    ]
    model.train()
    return math.exp(sum(losses) / len(losses))


def load_checkpoint(path: str, device):
    """(model, metadata) of a checkpoint for evaluation or as a teacher: a run folder (its newest intact
    checkpoint), one ``step-*`` checkpoint folder, or an old single-file ``checkpoint.pt``."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, checkpoint.MANIFEST)):
        folder = checkpoint.latest(path)
        if folder is None:
            raise checkpoint.CheckpointError(f"{path} holds no checkpoint")
        path = folder
    if os.path.isdir(path):
        checkpoint.verify(path)
        state = checkpoint.read_extra(path)
    else:
        state = torch.load(path, map_location=device, weights_only=False)
    cfg = state["config"]
    model = (GPT(GPTConfig(**cfg)) if state["objective"] == "clm" else BERT(BERTConfig(**cfg))).to(device)
    if os.path.isdir(path):
        checkpoint.load(path, model)
    else:
        weights = qkv_heads_major(state["model"], cfg["n_head"]) if state["objective"] == "clm" else state["model"]
        model.load_state_dict(weights, strict=False)
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
    t.add_argument("--out", default=None, help="checkpoint folder (OUT/step-N: the latest two, written atomically)")
    t.add_argument(
        "--resume", action="store_true", help="continue from the newest intact checkpoint in OUT (same --seed)"
    )
    t.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP under torchrun")
    t.add_argument("--tp", type=int, default=1, help="tensor-parallel size: GPT split over (processes / tp, tp) ranks")
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
