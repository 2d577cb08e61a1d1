"""PuMer (Cao, Paranjape, Hajishirzi, ACL 2023): text-informed pruning, then merging of similar
visual tokens, at several layers of the language model.

Score: the attention the text after each image gives its tokens (``ctx.attention("text")``).
Each stage keeps the best-scored tokens of every image, then spends ``merge_share`` of its
removal on merging (:data:`.base.MERGE_RULES`): only visual tokens are passed to the matching,
so image tokens merge with image tokens and text is never touched. Merged tokens carry their
size; with ``prop_attn`` a token standing for ``s`` gets ``log s`` on its attention logits.

Default merge: ``recycle`` with ``merge_threshold=0.85``. Every token the text score ranks in
the budget stays where it is; the tokens ranked right after them fold into their most similar
kept token when the keys' cosine is at least 0.85, else they are dropped. The paper's rule
(``merge_rule="bipartite"``: pair up the most similar of the *kept* tokens) averages look-alike
objects in different places into one token and loses where each was (docs/accuracy.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reduce.merge import grid_distance, pair_within_rows, recycle_targets, unit
from .base import Choice, MergeOptions, Method, keep_top


@dataclass(frozen=True)
class PumerOptions(MergeOptions):
    merge_share: float = 0.5
    prop_attn: bool = True


def cascade_layers(depth: int) -> tuple[int, ...]:
    """2, 8, 16 for a 32-layer LLM (the paper reduces at several cross-modal layers): the first
    stage early enough to save most compute, late enough that the text has read the image."""
    cand = [max(1, round(depth / 16)), max(1, round(depth / 4)), max(1, round(depth / 2))]
    return tuple(sorted({min(c, depth - 1) for c in cand if depth > 1})) or (0,)


def text_attention(ctx) -> torch.Tensor:
    return ctx.attention("text")


def prune_then_merge(ctx) -> Choice:
    """Keep each image's best-scored tokens, then merge by the options' rule."""
    if not ctx.merge_max:
        return keep_top(ctx)
    order = ctx.order(ctx.scores)  # (G, keep_max)
    if ctx.options.merge_rule == "recycle":
        return recycle(ctx, order)
    return bipartite(ctx, order)


def bipartite(ctx, order: torch.Tensor) -> Choice:
    """Merge the most similar of the kept tokens pairwise (bipartite soft matching on keys)."""
    local = order.sort(1).values  # (G, keep_max) ascending, padding last
    flat = ctx.flat_slots.gather(1, local)  # kept slots in the flat (B*N) layout
    metric = ctx.keys(flat, rotated=ctx.options.merge_metric == "rotated_keys")
    pad = None if ctx.keep_pad is None else ctx.keep_pad.to(metric.device)
    pairs = pair_within_rows(metric, flat, ctx.keep, ctx.merge, pad, ctx.pair_sel, ctx.out_max)
    weight = _weight(ctx.options, pairs.sim)
    keep = local.gather(1, pairs.keep.to(local.device))
    return Choice(keep=keep, merge=(pairs.src, pairs.dst) if weight is None else (pairs.src, pairs.dst, weight))


def _weight(opts, sim: torch.Tensor) -> torch.Tensor | None:
    """(P,) True for a pair similar enough to merge, False for one whose source is only dropped
    (``merge_threshold``; sim -inf: no allowed target), or None when every pair merges."""
    threshold = getattr(opts, "merge_threshold", None)
    if threshold is None:
        return None
    return (sim >= threshold - 1e-6).reshape(-1)  # bool: merge_pairs multiplies by it


def recycle(ctx, order: torch.Tensor) -> Choice:
    """Keep the ``out`` best-scored tokens of each image as they are; fold the ``merge`` ranked
    right after them into their most similar kept token (cosine of head-averaged keys)."""
    top = order[:, : ctx.out_max]
    local = ctx.ascending(top, ctx.out_pad)  # (G, out_max)
    # the merge_max tokens ranked right after each image's kept ones (clamped into what it keeps)
    o, r = local.shape[1], ctx.merge_max
    if all(out == o and k >= o + r for out, k in zip(ctx.out, ctx.keep)):
        ranked = order[:, o : o + r]  # every image alike: a slice
    else:
        rank = ctx.host_tensor("recycle", lambda: [[min(out + j, max(k - 1, 0)) for j in range(r)]
                                                    for out, k in zip(ctx.out, ctx.keep)])
        ranked = order.gather(1, rank.view(ctx.n_images, -1))
    slots = ctx.flat_slots.gather(1, torch.cat([local, ranked], 1))
    kept, src = slots[:, :o], slots[:, o:]  # (G, out_max), (G, merge_max) flat slots
    keys = unit(ctx.keys(slots, rotated=ctx.options.merge_metric == "rotated_keys"))  # one normalisation for both
    mk, ms = keys[:, :o], keys[:, o:]
    opts = ctx.options
    window, threshold = opts.merge_window, opts.merge_threshold
    allowed = None
    if window is not None:
        allowed = _near(ctx, kept, src, window).to(mk.device)
    pad = None if ctx.out_pad is None else ctx.out_pad.to(mk.device)
    target, best = recycle_targets(mk, ms, pad, allowed, with_similarity=True, normalized=True)
    dst = kept.gather(1, target.to(kept.device))
    weight = None
    if threshold is not None:
        weight = _weight(opts, best)
    elif window is not None:  # no kept token in the window: the source is only dropped
        weight = (best > -float("inf")).reshape(-1)
    src, dst = src.reshape(-1), dst.reshape(-1)
    if ctx.pair_sel is not None:
        src, dst = src[ctx.pair_sel], dst[ctx.pair_sel]
        weight = None if weight is None else weight[ctx.pair_sel.to(weight.device)]
    return Choice(keep=local, merge=(src, dst) if weight is None else (src, dst, weight))


def _near(ctx, kept: torch.Tensor, src: torch.Tensor, window: int) -> torch.Tensor:
    """(G, r, o) bool: which kept tokens are within ``window`` patches of each removed one on
    the image's grid (images whose token count is no square grid: every kept token)."""
    import math

    starts, widths = [], []
    for im in ctx.layout.images:
        w = math.isqrt(im.count)
        starts.append(im.start)
        widths.append(w if w * w == im.count else 0)
    start = ctx.host_tensor("grid_start", lambda: starts)
    width = ctx.host_tensor("grid_width", lambda: widths)
    pos = ctx.tokens.pos.reshape(-1)
    pa = pos[src.to(pos.device)] - start[:, None].to(pos.device)  # (G, r) patch index in the image
    pb = pos[kept.to(pos.device)] - start[:, None].to(pos.device)
    gridded = width > 0
    dist = grid_distance(pa, pb, width.clamp_min(1).to(pos.device))
    return (dist <= window) | ~gridded.to(pos.device)[:, None, None]


METHOD = Method(
    name="pumer",
    description="text-informed pruning + modality-aware merging, cascaded (PuMer, training-free)",
    options=PumerOptions,
    score=text_attention,
    select=prune_then_merge,
    default_layers=cascade_layers,
    paper="Cao et al., PuMer, ACL 2023",
)
