"""``fastlm.nn.MultiheadAttention``: torch's module (same constructor, parameters, state_dict keys and forward
signature) with fastlm's fused attention."""

import warnings

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastlm.ops import attention


def _to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """torch MHA masks (bool: True = do NOT attend; float: added) as an SDPA mask (bool True = attend, or float)."""
    return ~mask if mask.dtype == torch.bool else mask.to(dtype)


def _merge(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    fa = a if a.dtype != torch.bool else torch.zeros_like(a, dtype=b.dtype).masked_fill(~a, float("-inf"))
    fb = b if b.dtype != torch.bool else torch.zeros_like(b, dtype=a.dtype).masked_fill(~b, float("-inf"))
    return fa + fb


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for :class:`torch.nn.MultiheadAttention` whose attention is fastlm's fused kernel.

    Shapes as torch: query ``(L, N, E)`` (``(N, L, E)`` with ``batch_first``, or unbatched ``(L, E)``), key/value
    ``(S, N, kdim/vdim)``; ``key_padding_mask`` ``(N, S)`` and ``attn_mask`` ``(L, S)`` or ``(N * num_heads, L, S)``
    with torch's conventions (bool True = not allowed, or additive float). Returns ``(attn_output, None)``.

    ``need_weights=True`` (torch's default) must materialise the attention weights, so it runs torch's own unfused
    implementation and returns them; pass ``need_weights=False`` for the fused kernel. ``add_bias_kv`` and
    ``add_zero_attn`` also run torch's implementation (with a warning once).
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if need_weights or self.bias_k is not None or self.add_zero_attn:
            if not need_weights and not getattr(self, "_fastlm_warned", False):
                warnings.warn(
                    "fastlm.nn.MultiheadAttention: add_bias_kv / add_zero_attn run torch's unfused implementation",
                    stacklevel=2,
                )
                self._fastlm_warned = True
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        if self.batch_first:  # (N, L, E)
            q_in, k_in, v_in = query, key, value
        else:  # (L, N, E) -> (N, L, E) views
            q_in, k_in, v_in = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, E = q_in.shape
        S = k_in.shape[1]
        H, Dh = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = TF.linear(q_in, w_q, b_q).view(N, L, H, Dh).transpose(1, 2)  # (N, H, L, Dh), strided: no copy
        k = TF.linear(k_in, w_k, b_k).view(N, S, H, Dh).transpose(1, 2)
        v = TF.linear(v_in, w_v, b_v).view(N, S, H, Dh).transpose(1, 2)
        mask = None
        if key_padding_mask is not None:
            mask = _to_additive(key_padding_mask, q.dtype).view(N, 1, 1, S)
        if attn_mask is not None:
            am = _to_additive(attn_mask, q.dtype)
            am = am.view(N, H, L, S) if am.dim() == 3 else am
            mask = _merge(mask, am)
        out = attention.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )  # (N, H, L, Dh)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, E))  # (N, L, E)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return (out.squeeze(1) if unbatched else out), None
