"""A GPT (decoder-only causal LM) on fastlm's kernels only: fused add + LayerNorm between sublayers, flash attention,
and the fused linear cross-entropy on the tied LM head (the (tokens, vocab) logits are never materialised).

Pre-norm blocks with the residual carried beside the hidden state, so every norm is a fused ``add_layer_norm``::

    normed, residual = add_layer_norm(hidden, residual)     # residual += hidden; normed = LN(residual)
    hidden = attn(normed)
    normed, residual = add_layer_norm(hidden, residual)
    hidden = mlp(normed)

Tensor parallelism (``tensor_parallel``, ``fastlm train --tp N``): Megatron's layout through
torch.distributed.tensor.parallel on a 1-D mesh. The tied embedding / LM head is split on the vocabulary (a
vocab-parallel embedding, and the vocab-parallel fused linear cross-entropy on the same (V, C) shard), each block's
qkv and first MLP projection by columns and its output projections by rows. The qkv projection's output is laid out
head by head, (n_head, 3, head_dim), so that a column split hands each rank whole heads with their q, k and v.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import fastlm
import fastlm.functional as F
from fastlm.ops.vocab_parallel import is_dtensor


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024  # maximum sequence length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    positions: str = "learned"  # "learned", "sinusoidal" (added to the embeddings) or "rope" (rotary, in attention)
    mlp: str = "gelu"  # "gelu" (4C, tanh GELU) or "swiglu" (Llama's gated MLP, hidden 8C/3 rounded up to 64)
    backend: str = "auto"  # fastlm backend for every kernel of the model


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be a multiple of n_head"
        self.head_dim, self.dropout = cfg.n_embd // cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # output (n_head, 3, head_dim): head-major
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, T, _ = x.shape
        # (B, T, nh, 3, hs) -> (B, T, nh, hs) each; nh is this rank's heads under tensor parallelism
        q, k, v = self.qkv(x).view(B, T, -1, 3, self.head_dim).unbind(3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs): strided views, no copy
        if rotary is not None:  # cos, sin: (1, T, hs), broadcast over batch and heads
            q, k = F.apply_rotary_pos_emb(q, k, *rotary)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, nh * hs) -> (B, T, C)


class GatedMLP(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)), gate and up as one merged projection split in the fused kernel."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = -(-8 * cfg.n_embd // 3 // 64) * 64  # 8C/3 (the parameters of a 4C MLP), rounded up to 64
        self.gate_up = nn.Linear(cfg.n_embd, 2 * hidden)
        self.down = nn.Linear(hidden, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down(F.swiglu(self.gate_up(x))))  # (B, T, 2H) -> (B, T, H) -> (B, T, C)


def rotary_tables(block_size: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin (block_size, head_dim) of the rotary embedding in Hugging Face's (rotate-half) layout."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(block_size, dtype=torch.float32), inv)  # (T, hs / 2)
    emb = torch.cat([freqs, freqs], -1)  # (T, hs)
    return emb.cos(), emb.sin()


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        if cfg.mlp == "swiglu":
            self.mlp = GatedMLP(cfg)
        elif cfg.mlp == "gelu":
            self.mlp = nn.Sequential(
                nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
                nn.GELU(approximate="tanh"),
                nn.Linear(4 * cfg.n_embd, cfg.n_embd),
                nn.Dropout(cfg.dropout),
            )
        else:
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {cfg.mlp!r}")

    def forward(
        self, hidden: Tensor, residual: Tensor | None, rotary: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        normed, residual = _add_ln(hidden, residual, self.ln_1)
        hidden = self.attn(normed, rotary)
        normed, residual = _add_ln(hidden, residual, self.ln_2)
        return self.mlp(normed), residual


def _add_ln(hidden: Tensor, residual: Tensor | None, ln: nn.LayerNorm) -> tuple[Tensor, Tensor]:
    if residual is None:
        return F.layer_norm(hidden, ln.normalized_shape, ln.weight, ln.bias, ln.eps), hidden
    return F.add_layer_norm(hidden, residual, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def sinusoidal(block_size: int, dim: int) -> Tensor:
    pos = torch.arange(block_size)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = torch.zeros(block_size, dim)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * inv), torch.cos(pos * inv)
    return pe


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.positions == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        elif cfg.positions == "sinusoidal":
            self.register_buffer("pe", sinusoidal(cfg.block_size, cfg.n_embd), persistent=False)
        elif cfg.positions == "rope":
            cos, sin = rotary_tables(cfg.block_size, cfg.n_embd // cfg.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            raise ValueError(f"positions must be 'learned', 'sinusoidal' or 'rope', got {cfg.positions!r}")
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if name.endswith(("attn.proj.weight", "mlp.2.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def hidden_states(self, idx: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, C) final hidden states."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        hidden, residual, rotary = self.wte(idx), None, None  # (B, T, C)
        if self.config.positions == "rope":  # (1, T, hs) each, broadcast over batch and heads
            rotary = (self.rope_cos[None, :T].to(hidden.dtype), self.rope_sin[None, :T].to(hidden.dtype))
        else:
            hidden = hidden + (self.wpe.weight[:T] if self.config.positions == "learned" else self.pe[:T])
        hidden = self.drop(hidden)
        for block in self.blocks:
            hidden, residual = block(hidden, residual, rotary)
        normed, _ = _add_ln(hidden, residual, self.ln_f)
        return normed

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """Returns (logits, loss): with targets (B, T) the loss by the fused linear cross-entropy and no logits;
        without, the logits of the last position only (B, 1, vocab), for generation."""
        with fastlm.backend(self.config.backend):
            h = self.hidden_states(idx)
            if targets is not None:  # a vocab-parallel loss (a replicated DTensor) when the head is split
                return None, F.linear_cross_entropy(h, self.wte.weight, targets, ignore_index=-100)
            w = self.wte.weight
            if not is_dtensor(w):
                return h[:, -1:] @ w.T, None
            # tensor parallel: this rank's vocabulary slice of the last position's logits, gathered (B, 1, V)
            from torch.distributed.tensor import DTensor, Shard

            local = h[:, -1:] @ w.to_local().T
            shape = (h.shape[0], 1, w.shape[0])  # given: the split may be uneven
            stride = (w.shape[0], w.shape[0], 1)
            logits = DTensor.from_local(local, w.device_mesh, [Shard(2)], run_check=False, shape=shape, stride=stride)
            return logits.full_tensor(), None

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T); temperature 0 means greedy."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size :])
            logits = logits[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, -1), 1)
            idx = torch.cat([idx, nxt], 1)
        return idx


def tensor_parallel(model: GPT, mesh) -> GPT:
    """Split ``model`` over the 1-D device mesh ``mesh`` in place (Megatron's layout, with
    torch.distributed.tensor.parallel): the tied embedding / LM head on the vocabulary (``RowwiseParallel`` of the
    embedding: a (V / tp, C) shard per rank, whose output is all-reduced; the loss is then the vocab-parallel fused
    linear cross-entropy on the same shard), and in every block the qkv projection and the first GELU-MLP layer by
    columns (whole heads per rank: n_head must be a multiple of the mesh size), the attention and MLP output
    projections by rows. The LayerNorms stay replicated. A SwiGLU MLP (its gate and up halves are one merged
    projection, which a column split would cut across) stays replicated too. Activations between the blocks are
    replicated plain tensors; the parameters that are split become DTensors."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = mesh.size()
    if model.config.n_head % tp:
        raise ValueError(f"n_head = {model.config.n_head} must be a multiple of the tensor-parallel size {tp}")
    plan = {"wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())}
    for i, block in enumerate(model.blocks):
        plan[f"blocks.{i}.attn.qkv"] = ColwiseParallel()
        plan[f"blocks.{i}.attn.proj"] = RowwiseParallel()
        if isinstance(block.mlp, nn.Sequential):  # Linear(C, 4C), GELU, Linear(4C, C), Dropout
            plan[f"blocks.{i}.mlp.0"] = ColwiseParallel()
            plan[f"blocks.{i}.mlp.2"] = RowwiseParallel()
    return parallelize_module(model, mesh, plan)


def qkv_heads_major(state_dict: Mapping[str, Tensor], n_head: int) -> dict[str, Tensor]:
    """A GPT state dict from before the head-major qkv layout (rows ordered (3, n_head, head_dim)) in today's
    (n_head, 3, head_dim) order; every other entry as it is."""
    out = dict(state_dict)
    for name, t in state_dict.items():
        if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
            three_c = t.shape[0]
            out[name] = t.reshape(3, n_head, three_c // (3 * n_head), *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return out
