"""VisPruner's second step: from the tokens not kept for importance, remove near-duplicates.

The reference implementation splits the pool alternately and drops the most similar half
again and again; it crashes when the pool has odd length, and two exact duplicates that
fall on the same side of the split never see each other. Here each round scores every
token by its highest cosine similarity to an *earlier* remaining token and drops the top
ones (at most half the pool per round, so chains of near-duplicates are re-scored):

- a token's earlier twin always stays, so a group of duplicates keeps one member;
- exact duplicates (similarity 1) go first;
- the count is exact for any pool length, odd or even, and no token is dropped twice.
"""

from __future__ import annotations

import torch


def remove_duplicates(feats: torch.Tensor, target: int) -> torch.Tensor:
    """Local indices (B, target), ascending, of the tokens kept from a pool.

    feats: (B, n, c) features the similarity is measured on; target: how many to keep.
    """
    bsz, n, _ = feats.shape
    if not 0 <= target <= n:
        raise ValueError(f"target must be in [0, {n}], got {target}")
    f = feats.float()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    sim = f @ f.transpose(1, 2)  # (B, n, n)
    earlier = torch.ones(n, n, dtype=torch.bool, device=feats.device).tril(-1)  # j < i
    alive = torch.ones(bsz, n, dtype=torch.bool, device=feats.device)
    neg = torch.finfo(sim.dtype).min
    remaining = n
    while remaining > target:
        r = min(remaining - target, max(1, remaining // 2))
        pair_ok = earlier[None] & alive[:, None, :]  # (B, n, n): j earlier and alive
        score = sim.masked_fill(~pair_ok, neg).amax(-1)  # (B, n) similarity to an earlier survivor
        score = score.masked_fill(~alive, float("-inf"))  # the dead are never picked again
        drop = score.topk(r, dim=1).indices
        alive.scatter_(1, drop, False)
        remaining -= r
    ar = torch.arange(n, device=feats.device)
    return torch.where(alive, ar, n).sort(1).values[:, :target]  # ascending, no wait for the device
