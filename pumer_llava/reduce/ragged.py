"""Per-row selections when rows keep different numbers of tokens.

Samples of a batch may carry different numbers of visual tokens (LLaVA-NeXT's anyres, a
text-only sample next to an image one), so every selection here takes per-row counts and
returns padded index tensors with an ``ok`` mask, or a boolean keep mask.
"""

from __future__ import annotations

import torch


def ragged_nonzero(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries of each row, ascending, padded with 0 at the end.

    mask: (B, N) bool. Returns idx (B, n_max) and ok (B, n_max).
    """
    count = mask.sum(1)
    n_max = int(count.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n_max]
    ok = torch.arange(n_max, device=mask.device)[None, :] < count[:, None]
    return order.masked_fill(~ok, 0), ok


def top_per_row(scores: torch.Tensor, ok: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k[b]`` highest-scoring valid entries of each row, as ascending local indices.

    scores, ok: (B, n); k: (B,) with k <= ok.sum(1). Returns sel (B, k_max), sel_ok (B, k_max).
    Ties go to the earlier entry.
    """
    n = scores.shape[1]
    k_max = int(k.max()) if k.numel() else 0
    s = scores.float().masked_fill(~ok, float("-inf"))
    order = torch.argsort(s, dim=1, descending=True, stable=True)[:, :k_max]
    sel_ok = torch.arange(k_max, device=scores.device)[None, :] < k[:, None]
    sel = torch.where(sel_ok, order, order.new_full((), n)).sort(dim=1).values  # invalid sorted last
    return sel.masked_fill(~sel_ok, 0), sel_ok


def left_pack(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept entries of each row, right-aligned (left padding), ascending.

    keep: (B, N) bool. Returns sel (B, N') with N' the largest count, and filler (B, N')
    True where a row is shorter: those slots hold indices of dropped entries (always valid
    to gather with) and must be masked out by the caller.
    """
    count = keep.sum(1)
    n_out = int(count.max())
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, keep.shape[1] - n_out :]
    filler = torch.arange(n_out, device=keep.device)[None, :] < (n_out - count)[:, None]
    return order, filler
