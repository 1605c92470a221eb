"""Flash attention in Triton: forward (forward.py), backward (backward.py), launch configs and the rules that pick
them (configs.py), and the tile-level building blocks both kernels share (tiles.py).

    attn_fwd(q, k, v, mask, scale, causal, dropout_p, seed, offset, cu_q, cu_k, max_q, max_k,
             *, window, softcap, sinks, alibi) -> (o, lse)
    attn_bwd(do, q, k, v, o, lse, mask, scale, causal, dropout_p, seed, offset, cu_q, cu_k, max_q, max_k,
             *, window, softcap, sinks, alibi, mask_grad) -> (dq, dk, dv, dmask, dsinks)

Validation, GQA head counts, layouts and the backend choice live in fastlm/ops/attention.py.
"""

from fastlm.kernels.attention.backward import attn_bwd
from fastlm.kernels.attention.forward import attn_fwd

__all__ = ["attn_bwd", "attn_fwd"]
