"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): before the language model, keep the
most diverse set of each image's projected visual tokens.

The paper: on the projected (LLM-input) visual tokens, with distance ``1 - cosine``, a greedy
max-min selection: first the token farthest from its nearest neighbour, then, again and
again, the token farthest from everything selected so far; the kept tokens stay in their
order and the rest are dropped. Text-agnostic; no options beyond the budget.

Here the same selection (``reduce.diversity.max_min_diverse``), per image with its own exact
budget, every image of a batch at once. Deviations:

- The authors' code handles one image of batch element 0 (the same indices for the whole
  batch) at a hard-coded offset; here every image of every sample is chosen on its own.
- Each kept token keeps its original position (RoPE ids); the paper's shortened sequence is
  re-indexed.
- The distance is computed in float32 (the paper: the model's fp16/bf16), and a selected
  token is masked out explicitly (the paper relies on its self-distance being ~0).
"""

from __future__ import annotations

import torch

from ..reduce.diversity import max_min_diverse
from .base import Choice, Method


def before_llm(ctx) -> Choice:
    if ctx.out == ctx.counts:  # every image keeps all it has
        every = torch.arange(ctx.width, device=ctx.image_slots.device).expand(ctx.n_images, -1)
        return Choice(keep=ctx.ascending(every[:, : ctx.out_max], ctx.out_pad))
    emb = ctx.per_image(ctx.hidden)  # (G, m, d) the projected visual tokens
    g, m, d = emb.shape
    ctx.add_flops(g * m * m * d + g * ctx.out_max * m)
    keep = max_min_diverse(emb, ctx.out_max, ctx.image_pad, ctx.out_pad)
    return Choice(keep=ctx.ascending(keep, ctx.out_pad))


METHOD = Method(
    name="divprune",
    description="before the LLM: keep the most diverse projected visual tokens, greedy max-min of the cosine "
    "distance (DivPrune)",
    before_llm=before_llm,
    needs=frozenset(),
    paper="Alvar et al., DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models, CVPR 2025",
)
