"""VisPruner (Zhang et al., arXiv 2412.01818): before the language model, keep the patches the
vision tower's [CLS] attends to most, then the most diverse of the rest.

``important_ratio`` of each image's budget goes to importance: the [CLS] query's attention at
the layer the projector reads (towers without a [CLS], SigLIP, and LLaVA's "full" strategy:
the mean attention each patch receives). The rest removes near-duplicates among the other
patches by the similarity of their projected tokens (``reduce.diversity``). Optionally a
cascade of PuMer-style stages follows inside the language model (``layers=...``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reduce.diversity import remove_duplicates
from .base import Choice, MergeOptions, Method, in_range
from .pumer import prune_then_merge, text_attention


@dataclass(frozen=True)
class VisPrunerOptions(MergeOptions):
    """important_ratio: share of each image's budget kept by importance, in [0, 1]; the
    merge options apply to in-LLM stages after it (none by default)."""

    important_ratio: float = 0.5

    def validate(self) -> None:
        super().validate()
        in_range("important_ratio", self.important_ratio, 0.0, 1.0)


def before_llm(ctx) -> Choice:
    importance = ctx.importance(per_image=True)  # (G, m)
    emb = ctx.per_image(ctx.hidden)  # (G, m, d)
    ratio = ctx.options.important_ratio
    g, m = importance.shape
    if ctx.image_pad is None and len(set(ctx.out)) == 1:
        return Choice(keep=_keep(importance, emb, ctx.out[0], ratio, ctx))
    keep = torch.full((g, ctx.out_max), m - 1, dtype=torch.long, device=importance.device)
    for i, (t, n_keep) in enumerate(zip(ctx.counts, ctx.out)):  # images of different sizes: one at a time
        keep[i, :n_keep] = _keep(importance[i : i + 1, :t], emb[i : i + 1, :t], n_keep, ratio, ctx)[0]
    return Choice(keep=keep)


def _keep(importance: torch.Tensor, emb: torch.Tensor, n_keep: int, ratio: float, ctx) -> torch.Tensor:
    """(G, n_keep) local indices, ascending: ``round(n_keep * ratio)`` by importance, the rest by
    diversity among the others. Every image of the rows has ``t`` tokens."""
    g, t = importance.shape
    if n_keep >= t:
        return torch.arange(t, device=importance.device).expand(g, t)
    n_imp = round(n_keep * ratio)
    imp = importance.topk(n_imp, dim=1).indices  # (G, n_imp)
    free = torch.ones(g, t, dtype=torch.bool, device=importance.device).scatter(1, imp, False)
    ar = torch.arange(t, device=importance.device).expand(g, t)
    rest = ar.masked_fill(~free, t - 1).sort(1).values[:, : t - n_imp]  # (G, T - n_imp) ascending
    feats = emb.gather(1, rest[..., None].to(emb.device).expand(-1, -1, emb.shape[-1]))
    diverse = rest.gather(1, remove_duplicates(feats, n_keep - n_imp).to(rest.device))
    ctx.add_flops(g * (t - n_imp) ** 2 * emb.shape[-1])
    return torch.cat([imp, diverse], 1).sort(1).values


METHOD = Method(
    name="vispruner",
    description="before the LLM: keep tokens by the vision tower's [CLS] attention (without a [CLS]: the "
    "mean attention each patch receives), then the most diverse of the rest (VisPruner)",
    options=VisPrunerOptions,
    before_llm=before_llm,
    score=text_attention,
    select=prune_then_merge,
    needs=frozenset({"vision"}),
    paper="Zhang et al., Beyond Text-Visual Attention (VisPruner), arXiv 2412.01818",
)
