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


def max_min_diverse(feats: torch.Tensor, n_keep: int, pad: torch.Tensor | None = None,
                    keep_pad: torch.Tensor | None = None) -> torch.Tensor:
    """DivPrune's greedy max-min choice (Alvar et al., CVPR 2025, arXiv 2503.02175).

    Distance is ``1 - cosine``. The first token is the most isolated one (the largest distance
    to its nearest *other* token); each next is the unselected token farthest from the selected
    set (its smallest distance to them). Ties: the lower index.

    feats: (G, m, c) per-image rows; pad: (G, m) True at padding (never chosen, never anyone's
    neighbour); n_keep: the most any image keeps; keep_pad: (G, n_keep) True past what an image
    keeps. Returns (G, n_keep) local indices, ascending, entries past an image's budget ``m - 1``.
    One step per kept token, every image at once; nothing reads the device.
    """
    g, m, _ = feats.shape
    dev = feats.device
    inf = float("inf")
    if n_keep == 0:
        return torch.empty(g, 0, dtype=torch.long, device=dev)
    f = feats.float()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dist = 1.0 - f @ f.transpose(1, 2)  # (G, m, m)
    valid = torch.ones(g, m, dtype=torch.bool, device=dev) if pad is None else ~pad.to(dev)
    other = valid[:, :, None] & valid[:, None, :] & ~torch.eye(m, dtype=torch.bool, device=dev)
    nearest = dist.masked_fill(~other, inf).amin(1)  # (G, m); a lone token: inf
    score = nearest.masked_fill(~valid, -inf)
    rows = torch.arange(g, device=dev)
    picks = []
    for _ in range(n_keep):
        pick = score.argmax(1)  # first maximum: the lower index on ties
        picks.append(pick)
        if len(picks) == 1:
            score = dist[rows, pick].masked_fill(~valid, -inf)  # distance to the selected set
        else:
            score = torch.minimum(score, dist[rows, pick])
        score = score.scatter(1, pick[:, None], -inf)  # the selected are never chosen again
    sel = torch.stack(picks, 1)
    if keep_pad is not None:
        sel = sel.masked_fill(keep_pad.to(dev), m - 1)
    return sel.sort(1).values
