"""SparseVLM's pieces (Zhang et al., arXiv 2410.04417, ICML 2025): text raters, the recycling
plan and density-peak clustering (DPC-kNN), over per-image rows with padding.

- :func:`select_raters`: which text tokens rate an image's visual tokens. M = softmax over
  the text of the (unscaled) dot products of visual and text input embeddings, r = M averaged
  over the visual tokens; the raters are the text tokens with r above the mean of r.
- :func:`recycle_plan`: how many of a stage's pruned tokens are recycled (``m``, the best
  scored of them) and into how many clusters (``c``), so that the stage keeps its exact budget.
- :func:`dpc_knn`: density-peak clustering with a k-nearest-neighbour density (Du et al. 2016,
  as TCFormer and SparseVLM use it): the ``c`` tokens with the largest density x distance to a
  denser token are the centers; every token joins its nearest center.

Float32 math; ties are broken by the lower index (the authors add a tiny random noise to the
density instead).
"""

from __future__ import annotations

import torch


def select_raters(vis: torch.Tensor, text: torch.Tensor, text_ok: torch.Tensor,
                  vis_pad: torch.Tensor | None = None) -> torch.Tensor:
    """(G, R) bool, each image's raters among its text rows.

    vis: (G, m, d) input embeddings of each image's visual tokens; vis_pad: (G, m) bool,
    padding among them (None: none); text: (G, R) rows, (G, R, d) the input embeddings of the
    text that reads each image; text_ok: (G, R) bool, which rows are real. An image whose r is
    flat (no text token above the mean, e.g. a single one) is rated by all of its rows.
    """
    v, t = vis.float(), text.float()
    logits = v @ t.transpose(1, 2)  # (G, m, R)
    logits = logits.masked_fill(~text_ok[:, None, :], torch.finfo(logits.dtype).min)
    rel = logits.softmax(-1) * text_ok[:, None, :]  # each visual token's distribution over the text
    w = torch.ones(v.shape[:2], device=v.device) if vis_pad is None else (~vis_pad).float()
    r = (rel * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)  # (G, R)
    ok = text_ok.float()
    mean = (r * ok).sum(1, keepdim=True) / ok.sum(1, keepdim=True).clamp_min(1.0)
    raters = text_ok & (r > mean)
    return torch.where(raters.any(1, keepdim=True), raters, text_ok)


def recycle_plan(n: int, out: int, recycle_share: float = 0.3, cluster_share: float = 0.1) -> tuple[int, int]:
    """(c, m) for an image that holds ``n`` tokens and keeps ``out`` after the stage.

    The stage keeps ``out - c`` tokens by score and prunes ``p = n - (out - c)``; the ``m =
    int(recycle_share * p) + 1`` best-scored pruned tokens are clustered into ``c =
    int(cluster_share * m) + 1`` tokens (SparseVLM: 0.3 and 1/10), which count in the budget.
    c and m depend on each other: the smallest fixed point, then clamped so that at least one
    token is kept by score, m <= p and c <= m. (0, 0): no recycling (nothing pruned, or no
    room for a cluster).
    """
    if out >= n or out < 2:
        return 0, 0
    c = 1
    for _ in range(n):  # c -> f(c) is non-decreasing with slope < 1: it climbs to the least fixed point
        m = int(recycle_share * (n - out + c)) + 1
        nxt = int(cluster_share * m) + 1
        if nxt == c:
            break
        c = nxt
    c = min(c, out - 1)
    pruned = n - out + c
    m = min(int(recycle_share * pruned) + 1, pruned)
    return min(c, m), m


def dpc_knn(x: torch.Tensor, n_clusters: torch.Tensor | int, valid: torch.Tensor | None = None):
    """Density-peak clustering of each row's tokens into ``n_clusters[g]`` clusters.

    x: (G, M, d) token features; n_clusters: (G,) long, at most the row's valid tokens (0: no
    clusters, the outputs of that row are meaningless), or one int for every row; valid: (G, M)
    bool, the real tokens (None: all).

    distance D = L2 / sqrt(d); density = exp(-mean of D^2 over the k = c nearest tokens, self
    included); delta = D to the nearest denser token (for the densest: the largest D of the
    row); the centers are the c largest density * delta; every token goes to its nearest
    center, a center to itself. Ties: the lower index (as denser, as center, as nearest).

    Returns ``rank`` (G, M) the tokens by descending density * delta (its first c are the
    centers; padding last), ``is_center`` (G, M) bool and ``assign`` (G, M) the local index of
    each token's center.

    Written for few kernels (it runs inside the prefill): "denser" is a rank in the stable
    density order, so ties need no second comparison, and the densest token's delta is the row's
    largest distance because every other token's is at most that.
    """
    g, m, d = x.shape
    dev = x.device
    xf = x.float()
    sq = (xf * xf).sum(-1)
    d2 = torch.baddbmm(sq.unsqueeze(2) + sq.unsqueeze(1), xf, xf.transpose(1, 2), alpha=-2.0)
    d2 = d2.clamp_min_(0.0).div_(d)
    d2.diagonal(dim1=1, dim2=2).zero_()  # a token's distance to itself
    dist = d2.sqrt()
    inf = float("inf")
    pair = None if valid is None else valid.unsqueeze(1) & valid.unsqueeze(2)
    # density: the k = c nearest (self first), padding sorted last
    near = (d2 if valid is None else d2.masked_fill(~valid.unsqueeze(1), inf)).sort(-1).values
    if isinstance(n_clusters, int):
        k = max(n_clusters, 1)
        mean_near = near[..., :k].mean(-1)
        c = n_clusters
    else:
        c = n_clusters.to(dev).long()[:, None]  # (G, 1)
        first_c = torch.arange(m, device=dev) < c  # (G, M)
        mean_near = torch.where(first_c.unsqueeze(1), near, 0.0).sum(-1) / c.clamp_min(1)
    density = mean_near.neg_().exp_()  # (G, M)
    if valid is not None:
        density = density.masked_fill(~valid, -1.0)  # padding: below every real density
    # delta: distance to the nearest denser token (ties: the lower index is denser)
    place = density.argsort(dim=1, descending=True, stable=True).argsort(1)  # (G, M) 0: the densest
    not_denser = place.unsqueeze(1) >= place.unsqueeze(2)  # [g, i, j]: j is not denser than i
    to_denser = dist.masked_fill(not_denser, inf).amin(-1)  # inf for the densest
    d_max = (dist if pair is None else dist.masked_fill(~pair, 0.0)).amax(dim=(1, 2))  # (G,) the largest distance
    score = density * torch.minimum(to_denser, d_max.unsqueeze(1))
    if valid is not None:
        score = score.masked_fill(~valid, -inf)
    rank = score.argsort(dim=1, descending=True, stable=True)
    not_center = rank.argsort(1) >= c
    assign = dist.masked_fill(not_center.unsqueeze(1), inf).argmin(-1)
    is_center = ~not_center
    assign = torch.where(is_center, torch.arange(m, device=dev), assign)
    return rank, is_center, assign
