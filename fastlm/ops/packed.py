"""The row layout of a post-training batch: padded ``(B, T)`` rows, or a packed (padding-free) batch of ``B``
sequences concatenated into ``N`` tokens, given by ``cu_seqlens`` (``(B + 1,)`` int offsets, flash-attention's) or
``position_ids`` (``(N,)`` or ``(1, N)``, restarting at 0 where each sequence starts: TRL's padding-free batches).

The losses (fastlm/ops/preference.py, fastlm/ops/grpo.py) compute on the flat tokens (the matmuls see no padding)
and do their O(rows) math on per-token values scattered into a ``(B, T_max)`` grid (:meth:`RowLayout.pad`): a
per-token scalar each, never the hidden states.
"""

import torch
from torch import Tensor


class RowLayout:
    """Where each of the batch's ``N`` flat tokens sits in the ``(B, T)`` grid of rows (``T`` the longest row)."""

    def __init__(
        self, B: int, T: int, index: Tensor | None, starts: Tensor | None = None, lengths: Tensor | None = None
    ):
        self.B, self.T = B, T
        self.index = index  # (N,) int64 flat grid positions (row * T + column); None: the identity (padded rows)
        self.starts, self.lengths = starts, lengths  # per row (packed only): first token, token count (host ints)

    @property
    def packed(self) -> bool:
        return self.index is not None

    def pad(self, flat: Tensor, fill) -> Tensor:
        """``(N, *rest)`` per-token values -> ``(B, T, *rest)`` (``fill`` where a row is shorter); differentiable."""
        if not self.packed:
            return flat.reshape(self.B, self.T, *flat.shape[1:])
        out = flat.new_full((self.B * self.T, *flat.shape[1:]), fill)
        return out.index_put((self.index,), flat).view(self.B, self.T, *flat.shape[1:])

    def tokens(self, rows: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """The flat tokens of ``rows`` (a CPU index tensor of k rows) in order, and their positions in a ``(k, T)``
        grid of those rows: built on the host, then copied to ``device`` (no device sync)."""
        if not self.packed:
            toks = (rows[:, None] * self.T + torch.arange(self.T)).reshape(-1)
            local = torch.arange(rows.numel() * self.T)
        else:
            r = rows.tolist()
            toks = torch.cat([torch.arange(self.starts[i], self.starts[i] + self.lengths[i]) for i in r])
            local = torch.cat([j * self.T + torch.arange(self.lengths[i]) for j, i in enumerate(r)])
        return toks.to(device, non_blocking=True), local.to(device, non_blocking=True)


def row_layout(name: str, hidden: Tensor, target: Tensor, cu_seqlens: Tensor | None, position_ids: Tensor | None):
    """``(hidden (N, H), target (N,), layout)`` of a loss's batch: ``hidden`` ``(B, T, H)`` and ``target`` ``(B,
    T)`` as they are (flattened), or packed ``hidden`` ``(1, N, H)`` / ``(N, H)`` and ``target`` ``(1, N)`` /
    ``(N,)`` with ``cu_seqlens`` or ``position_ids`` (not both)."""
    if cu_seqlens is None and position_ids is None:
        if hidden.dim() != 3 or target.shape != hidden.shape[:2]:
            raise ValueError(f"{name}: hidden must be (B, T, H) and target (B, T) (or pass cu_seqlens / position_ids "
                             f"for a packed batch), got {list(hidden.shape)} and {list(target.shape)}")  # fmt: skip
        B, T, H = hidden.shape
        return hidden.reshape(B * T, H), target.reshape(B * T), RowLayout(B, T, None)
    if cu_seqlens is not None and position_ids is not None:
        raise ValueError(f"{name}: pass cu_seqlens or position_ids for a packed batch, not both")
    if hidden.dim() == 3 and hidden.shape[0] == 1:
        hidden = hidden[0]
    if target.dim() == 2 and target.shape[0] == 1:
        target = target[0]
    if hidden.dim() != 2 or target.dim() != 1 or target.shape[0] != hidden.shape[0]:
        raise ValueError(f"{name}: a packed batch takes hidden (1, N, H) or (N, H) and target (1, N) or (N,), got "
                         f"{list(hidden.shape)} and {list(target.shape)}")  # fmt: skip
    N = target.shape[0]
    if position_ids is not None:
        pos = position_ids.reshape(-1)
        if pos.shape != (N,):
            raise ValueError(f"{name}: position_ids must hold one position per token ({N}), got "
                             f"{list(position_ids.shape)}")  # fmt: skip
        if N and pos[0].item() != 0:
            raise ValueError(f"{name}: position_ids must start at 0 (the first sequence's first token)")
        starts = (pos == 0).nonzero().reshape(-1).tolist()
        cu = starts + [N]
    else:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"{name}: cu_seqlens must be (B + 1,) offsets, got {list(cu_seqlens.shape)}")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != N or any(b < a for a, b in zip(cu, cu[1:], strict=False)):
            raise ValueError(f"{name}: cu_seqlens must rise from 0 to the token count {N}, got {cu}")
    starts, lengths = cu[:-1], [b - a for a, b in zip(cu, cu[1:], strict=False)]
    B, T = len(lengths), max(lengths, default=0)
    dev = target.device
    seq = torch.repeat_interleave(torch.arange(B, device=dev), torch.tensor(lengths, device=dev))
    col = torch.arange(N, device=dev) - torch.tensor(starts, device=dev)[seq]
    return hidden, target, RowLayout(B, T, seq * T + col, starts, lengths)
