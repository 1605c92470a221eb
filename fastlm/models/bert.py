"""A BERT encoder on fastlm's kernels only: post-norm blocks whose ``LN(x + sublayer(x))`` is one fused
``add_layer_norm``, flash attention with the padding mask read tile by tile, a masked-LM head whose loss is the fused
linear cross-entropy over the tied word embeddings, an optional next-sentence head, and a sequence-classification
head for fine-tuning.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import fastlm
import fastlm.functional as F

PAD, CLS, SEP, MASK = 0, 1, 2, 3  # special ids shared with fastlm.data's tokenizers


@dataclass
class BERTConfig:
    vocab_size: int = 30522
    max_position: int = 512
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.1
    num_labels: int = 2  # classification head
    backend: str = "auto"


class EncoderBlock(nn.Module):
    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-12)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        a = self.drop(self.proj(a.transpose(1, 2).reshape(B, T, C)))
        x, _ = F.add_layer_norm(a, x, (C,), self.ln_1.weight, self.ln_1.bias, self.ln_1.eps)  # LN(x + attn)
        x, _ = F.add_layer_norm(self.mlp(x), x, (C,), self.ln_2.weight, self.ln_2.bias, self.ln_2.eps)
        return x


class BERT(nn.Module):
    """Encoder plus heads. ``forward`` returns a dict with ``hidden`` (B, T, C) and, when their labels are given,
    ``mlm_loss`` (labels -100 where not masked), ``nsp_loss`` and ``cls_loss`` / ``logits`` of the classifier."""

    def __init__(self, cfg: BERTConfig, nsp_head: bool = False):
        super().__init__()
        self.config = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd, padding_idx=PAD)
        self.pos = nn.Embedding(cfg.max_position, cfg.n_embd)
        self.seg = nn.Embedding(2, cfg.n_embd)
        self.ln_emb = nn.LayerNorm(cfg.n_embd, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer))
        self.mlm_dense = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.mlm_ln = nn.LayerNorm(cfg.n_embd, eps=1e-12)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.pooler = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.nsp = nn.Linear(cfg.n_embd, 2) if nsp_head else None
        self.classifier = nn.Linear(cfg.n_embd, cfg.num_labels)
        self.apply(lambda m: nn.init.normal_(m.weight, 0.0, 0.02) if isinstance(m, (nn.Linear, nn.Embedding)) else None)

    def encode(self, ids: Tensor, attention_mask: Tensor | None = None, segments: Tensor | None = None) -> Tensor:
        """ids (B, T); attention_mask (B, T), 1 = token, 0 = padding -> hidden states (B, T, C)."""
        B, T = ids.shape
        x = self.tok(ids) + self.pos.weight[:T] + self.seg(segments if segments is not None else torch.zeros_like(ids))
        x = self.drop(F.layer_norm(x, x.shape[-1:], self.ln_emb.weight, self.ln_emb.bias, self.ln_emb.eps))
        mask = attention_mask.bool().view(B, 1, 1, T) if attention_mask is not None else None  # True = attend
        for block in self.blocks:
            x = block(x, mask)
        return x

    def forward(self, ids, attention_mask=None, segments=None, mlm_labels=None, nsp_labels=None, labels=None):
        out = {}
        with fastlm.backend(self.config.backend):
            h = self.encode(ids, attention_mask, segments)
            out["hidden"] = h
            if mlm_labels is not None:
                t = F.layer_norm(
                    torch.nn.functional.gelu(self.mlm_dense(h)),
                    h.shape[-1:],
                    self.mlm_ln.weight,
                    self.mlm_ln.bias,
                    self.mlm_ln.eps,
                )
                sel = mlm_labels != -100  # only the masked positions go through the vocabulary projection
                out["mlm_loss"] = F.linear_cross_entropy(
                    t[sel], self.tok.weight, mlm_labels[sel], linear_bias=self.mlm_bias
                )
            pooled = torch.tanh(self.pooler(h[:, 0]))  # the [CLS] token
            if nsp_labels is not None and self.nsp is not None:
                out["nsp_loss"] = F.cross_entropy(self.nsp(pooled), nsp_labels)
            out["logits"] = self.classifier(self.drop(pooled))
            if labels is not None:
                out["cls_loss"] = F.cross_entropy(out["logits"], labels)
        return out


def mask_tokens(
    ids: Tensor,
    vocab_size: int,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
    special: tuple[int, ...] = (PAD, CLS, SEP, MASK),
) -> tuple[Tensor, Tensor]:
    """BERT's masking: ``prob`` of the (non-special) tokens become targets; of those 80% -> [MASK], 10% -> a random
    token, 10% unchanged. Returns (inputs, labels) with labels -100 where there is no target."""
    ids = ids.clone()
    rand = lambda: torch.rand(ids.shape, generator=generator, device=ids.device)  # noqa: E731
    eligible = torch.ones_like(ids, dtype=torch.bool)
    for s in special:
        eligible &= ids != s
    target = eligible & (rand() < prob)
    labels = ids.masked_fill(~target, -100)
    r = rand()
    ids[target & (r < 0.8)] = MASK
    swap = target & (r >= 0.8) & (r < 0.9)
    ids[swap] = torch.randint(len(special), vocab_size, (int(swap.sum()),), generator=generator, device=ids.device)
    return ids, labels
