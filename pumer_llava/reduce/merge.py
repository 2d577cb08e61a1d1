"""Bipartite soft matching with size-weighted averages (ToMe, Bolya et al. 2023).

PuMer's modality-aware merging applies it to the visual tokens only: text tokens are
never passed in, so they can never be merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MergeResult:
    x: torch.Tensor  # (B, n - r, d) survivors, merged values, in original order
    size: torch.Tensor  # (B, n - r) tokens each survivor stands for
    keep: torch.Tensor  # (B, n - r) local indices of the survivors, ascending
    src: torch.Tensor  # (B, r) local indices of merged-away tokens
    dst: torch.Tensor  # (B, r) local index each src was merged into


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int) -> MergeResult:
    """Merge the ``r`` most similar tokens of set A into their best match in set B.

    x: (B, n, d) token values; metric: (B, n, c) what similarity is measured on (PuMer:
    head-averaged keys); size: (B, n) how many original tokens each one already stands for.
    Tokens alternate A, B, A, B... in the given order, so a token only merges into a
    neighbour-ish partner and the result keeps the order. A merged value is the
    size-weighted mean, so ``sum(size * x)`` and ``sum(size)`` are preserved.
    ``r`` is clamped to ``n // 2`` (every source needs a distinct B side to land in; B has
    ``n // 2`` members).
    """
    bsz, n, d = x.shape
    r = max(0, min(r, n // 2))
    arange = torch.arange(n, device=x.device)
    if r == 0:
        empty = torch.empty(bsz, 0, dtype=torch.long, device=x.device)
        return MergeResult(x, size, arange.expand(bsz, n), empty, empty)

    a_idx, b_idx = arange[0::2], arange[1::2]  # (na,), (nb,)
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    sim = m[:, a_idx] @ m[:, b_idx].transpose(1, 2)  # (B, na, nb) cosine similarity
    node_max, node_idx = sim.max(dim=-1)  # best B partner of every A token
    order = node_max.argsort(dim=-1, descending=True)  # (B, na)
    src_a, unm_a = order[:, :r], order[:, r:]  # indices into A
    dst_b = node_idx.gather(1, src_a)  # (B, r) indices into B

    acc = torch.promote_types(x.dtype, torch.float32)  # half inputs are averaged in float32
    xf, sf = x.to(acc), size.to(acc)
    xs = xf * sf[..., None]  # (B, n, d) size-weighted values
    xb = xs[:, b_idx].clone()  # (B, nb, d)
    sb = sf[:, b_idx].clone()  # (B, nb)
    src_x = xs[:, a_idx].gather(1, src_a[..., None].expand(-1, -1, d))
    xb.scatter_add_(1, dst_b[..., None].expand(-1, -1, d), src_x)
    sb.scatter_add_(1, dst_b, sf[:, a_idx].gather(1, src_a))

    x_new = xf.clone()
    size_new = sf.clone()
    x_new[:, b_idx] = xb / sb[..., None]
    size_new[:, b_idx] = sb
    keep = torch.cat([a_idx[unm_a], b_idx.expand(bsz, -1)], dim=1).sort(dim=1).values  # (B, n - r)
    return MergeResult(
        x=x_new.gather(1, keep[..., None].expand(-1, -1, d)).to(x.dtype),
        size=size_new.gather(1, keep).to(size.dtype),
        keep=keep,
        src=a_idx[src_a],
        dst=b_idx[dst_b],
    )
