"""SparseVLM (Zhang et al., arXiv 2410.04417, ICML 2025): text-guided pruning inside the language
model, rated by the text tokens relevant to the image, with the best of the pruned tokens
recycled into a few cluster tokens.

The paper (its v1.5 / ICML code): before the first layer it picks the text raters from the
input embeddings: for each visual token a softmax over the text after the image of their dot
products, averaged over the visual tokens; the text tokens above the mean rate. Layers 2, 6
and 15 (0-based, of 32) run on the unpruned sequence and prune their OUTPUT: a visual token's
score is the layer's own attention (heads averaged) from the rater rows, averaged over them;
the top-k stay. Of the pruned, the ``int(0.3 * pruned) + 1`` best-scored are recycled:
clustered by DPC-kNN on their hidden states into ``int(m / 10) + 1`` tokens, each the average
of its members, which count as visual tokens from then on.

Here: the scoring reads layer L-1's input (``score_offset=-1``, its norm, q/k and RoPE: layer
L-1's own attention), the reducing layers are L = 3, 7, 16 of 32 (relative for other depths),
so layer L-1's output is what is pruned. Raters come from the input embeddings
(``reduce.cluster.select_raters``) over the rows ``ctx.row_attention("text")`` gives each
image (the prompt's text after it), chosen once at the first stage from every visual token (as
the paper does; kept in ``ctx.memo`` for the later stages); the score is the mean of the
raters' rows. Each stage keeps
``ctx.out[g]`` tokens per image in all: ``out - c`` by score plus ``c`` cluster tokens from the
``m`` best-scored pruned ones (``reduce.cluster.recycle_plan``, the small fixed point between
c and m). DPC-kNN (``reduce.cluster.dpc_knn``) runs on the candidates' hidden states at the
reducing layer's input; a cluster becomes its center token, the others merged into it.

Deviations:
- budget: ``ratio`` / ``keep_tokens`` is the FINAL per-image count (clusters included), reached
  exactly after the last stage; the runtime splits the removal geometrically over the stages.
  The paper fixes per-stage counts (e.g. 66 / 30 / 17 for "64"), and its "64 / 128 / 192
  tokens" are the AVERAGE over the 32 layers, not the final count.
- a cluster token is its center, at the center's ORIGINAL position; the paper appends the
  cluster tokens after the kept visual tokens. All kept tokens keep their original position
  ids (RoPE); the paper re-indexes the shortened sequence contiguously.
- the runtime's merge is size-weighted: a plain average while every member stands for one
  token (the first stage), weighted by size when a member is an earlier cluster (the paper
  averages with equal weights).
- no noise in the density: ties go to the lower index. With one cluster (k = 1 neighbour, the
  token itself) every density ties, so the authors' noise picks the center at random; here it
  is the best-scored candidate. The densest token's distance to a denser one is the largest
  distance between any two candidates (as in TCFormer's DPC-kNN, which SparseVLM reuses).
- batches: each image keeps its own budget, rated by the text after it (the authors' code runs
  batch size 1 with one image).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reduce.cluster import dpc_knn, recycle_plan, select_raters
from .base import Choice, Method, MethodOptions, in_range, keep_top


@dataclass(frozen=True)
class SparseVLMOptions(MethodOptions):
    """recycle: recycle the best of the pruned tokens into cluster tokens (False: prune only).
    recycle_share: share of each stage's pruned tokens that are recycled, in [0, 1] (0.3).
    cluster_share: clusters per recycled token, in [0, 1] (0.1: one per ten, plus one).
    """

    recycle: bool = True
    recycle_share: float = 0.3
    cluster_share: float = 0.1

    def validate(self) -> None:
        in_range("recycle_share", self.recycle_share, 0.0, 1.0)
        in_range("cluster_share", self.cluster_share, 0.0, 1.0)


def sparse_layers(depth: int) -> tuple[int, ...]:
    """3, 7 and 16 of 32 (the paper prunes the output of layers 2, 6 and 15), relative for other
    depths: distinct, at least 1 and below ``depth``."""
    if depth <= 1:
        return (0,)
    return tuple(sorted({min(max(1, round(depth * k / 32)), depth - 1) for k in (3, 7, 16)}))


def rater_attention(ctx) -> torch.Tensor:
    """(B, N) the mean attention each visual token gets from its image's raters (heads averaged)."""
    probs, row_slot, counts = ctx.row_attention("text")  # (B, R, N), (B, R), (B, R, N)
    bsz, r, n = probs.shape
    dev = probs.device
    weights = ctx.memo.get("sparsevlm_rater_weights")  # (G, R) each image's raters, weighted 1 / their number
    if weights is None:  # chosen once, at the first stage, from every visual token (the paper's)
        first = ctx.flat_slots[:, 0].to(dev)  # (G,) each image's first slot
        rows_ok = counts.transpose(1, 2).reshape(bsz * n, r)[first]  # (G, R) the rows that read each image
        emb = ctx.input_embeddings().to(dev)
        d = emb.shape[-1]
        text = emb.reshape(bsz * n, d)[row_slot.to(dev)[first // n]]  # (G, R, d)
        vis = ctx.per_image(emb)  # (G, m, d)
        pad = None if ctx.image_pad is None else ctx.image_pad.to(dev)
        raters = select_raters(vis, text, rows_ok, pad).float()
        weights = ctx.memo["sparsevlm_rater_weights"] = raters / raters.sum(-1, keepdim=True).clamp_min(1.0)
        ctx.add_flops(ctx.n_images * ctx.width * r * d)
    w = weights[ctx.tokens.code.to(dev).clamp_min(0)]  # (B, N, R) the raters of each slot's image
    return (probs.float() * w.transpose(1, 2)).sum(1)


def prune_and_recycle(ctx) -> Choice:
    """Each image keeps ``out - c`` tokens by score and ``c`` cluster centers of the ``m``
    best-scored of the rest, the other candidates merged into their center."""
    opts = ctx.options
    plans = [recycle_plan(n, o, opts.recycle_share, opts.cluster_share) if opts.recycle else (0, 0)
             for n, o in zip(ctx.counts, ctx.out)]
    if not any(c for c, _ in plans):
        return keep_top(ctx)
    g, width = ctx.n_images, ctx.width
    c_max, m_max = max(c for c, _ in plans), max(m for _, m in plans)
    kept = [o - c for o, (c, _) in zip(ctx.out, plans)]  # kept by score
    tag = f"sparsevlm:{opts.recycle_share}:{opts.cluster_share}"
    img = ctx.per_image(ctx.scores.float())
    if ctx.image_pad is not None:
        img = img.masked_fill(ctx.image_pad.to(img.device), float("-inf"))
    order = img.argsort(dim=1, descending=True, stable=True)  # (G, m) local indices by score
    dev = order.device
    # the candidates: ranks k .. k + m - 1 of each image (padded with its last one)
    cand_rank = ctx.host_tensor(tag + ":cand", lambda: [
        [min(k + min(j, max(m - 1, 0)), width - 1) for j in range(m_max)] for k, (_, m) in zip(kept, plans)]).to(dev)
    every_real = all(m == m_max for _, m in plans)  # then no candidate is padding
    cand_ok = None if every_real else ctx.host_tensor(
        tag + ":ok", lambda: [[int(j < m) for j in range(m_max)] for _, m in plans]).to(dev).bool()
    if all(c == c_max for c, _ in plans):
        n_clusters = c_max
    else:
        n_clusters = ctx.host_tensor(tag + ":c", lambda: [c for c, _ in plans]).to(dev)
    cand = order.gather(1, cand_rank)  # (G, M) local
    flat = ctx.flat_slots.to(dev)
    cand_flat = flat.gather(1, cand)
    hs = ctx.hidden
    x = hs.reshape(-1, hs.shape[-1])[cand_flat.to(hs.device)]  # (G, M, d)
    rank, is_center, assign = dpc_knn(x, n_clusters, cand_ok)
    rank, is_center, assign = rank.to(dev), is_center.to(dev), assign.to(dev)
    ctx.add_flops(g * m_max * m_max * hs.shape[-1])
    centers = cand.gather(1, rank[:, :c_max])  # (G, C) local
    # keep: the first out - c by score, then the c centers (entries past out: padding)
    pick = ctx.host_tensor(tag + ":keep", lambda: [
        [j if j < k else ctx.out_max + min(j - k, max(c - 1, 0)) for j in range(ctx.out_max)]
        for k, (c, _) in zip(kept, plans)]).to(dev)
    keep = torch.cat([order[:, : ctx.out_max], centers], 1).gather(1, pick)
    keep = ctx.ascending(keep, ctx.out_pad)
    # merges: every candidate that is no center into its center (non-centers sorted first)
    n_pairs = [m - c for c, m in plans]
    p_max = max(n_pairs)
    if p_max == 0:
        return Choice(keep=keep)
    not_merged = is_center if cand_ok is None else is_center | ~cand_ok
    first = not_merged.int().argsort(dim=1, stable=True)[:, :p_max]  # (G, P)
    src = cand_flat.gather(1, first).reshape(-1)
    dst = cand_flat.gather(1, assign.gather(1, first)).reshape(-1)
    if min(n_pairs) != p_max:  # images with fewer merges: only the real pairs
        sel = ctx.host_tensor(tag + ":pairs", lambda: [i * p_max + j for i, p in enumerate(n_pairs) for j in range(p)])
        src, dst = src[sel.to(dev)], dst[sel.to(dev)]
    return Choice(keep=keep, merge=(src, dst))


METHOD = Method(
    name="sparsevlm",
    description="text-rated pruning in the LLM (raters: the text most relevant to the image), the best of the "
    "pruned recycled into cluster tokens by DPC-kNN (SparseVLM)",
    options=SparseVLMOptions,
    score=rater_attention,
    select=prune_and_recycle,
    default_layers=sparse_layers,
    score_offset=-1,
    min_layer=1,
    paper="Zhang et al., SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model "
    "Inference, ICML 2025",
)
