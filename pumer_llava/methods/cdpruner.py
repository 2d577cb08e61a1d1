"""CDPruner (Zhang et al., arXiv 2506.10967, NeurIPS 2025): before the language model, keep the
visual tokens that are most diverse *given the instruction*, by greedy MAP inference on a
determinantal point process whose kernel weighs each token's similarity by its relevance.

The paper, on LLaVA-1.5: S is the cosine of the projected visual tokens; relevance r_i is the
cosine of each token (CLIP's penultimate features through CLIP's own final norm and image
projection) to the instruction's CLIP text embedding, min-max normalised; L = diag(r) S diag(r);
exactly T tokens are kept by the fast greedy MAP of Chen et al. (2018), in their original
order. We do the same per image (``reduce.dpp``), batched over the batch's images, with these
differences:

- relevance: LLaVA checkpoints ship no CLIP text tower, so the instruction is read in the
  language model's own input space: r_i is the mean cosine of the projected token i to the
  input embeddings of the instruction's text (``ctx.text()``: the prompt's text after the
  image, or all of its sample's text when none follows; the chat template's words included,
  where the authors pass the bare question). Both sides are then in one space, the one the
  language model reads.
- sign: the authors negate the cosine (their repository's discussions: with CLIP's penultimate features
  the raw cosine is inverted relative to relevance, a CLIP-specific finding). That inversion
  is a property of those CLIP features, not of the LLM's input space, and the paper's formula
  is the plain cosine, so ``negate_relevance`` defaults to False; True gives the authors' sign.
- min-max: per image over its real tokens, ``(r - min) / (max - min + 1e-6)``; the authors
  take min/max over all crops of a batch together (the same for LLaVA-1.5's single image) and
  put the 1e-6 in the numerator (their least relevant token keeps a tiny weight; ours gets 0,
  so it is picked only once every gain is spent).
- no theta: the authors' optional exp(alpha r) reweighting is off by default in their code and
  is not offered.
- guard: a picked or padded token is never picked again and the Cholesky divisor is clamped,
  so a kernel of lower rank than the budget (more tokens than hidden dimensions, tiny models)
  still gives distinct tokens (the authors have no guard).
- positions: the kept tokens keep their ORIGINAL positions (RoPE ids, gaps where tokens
  went), where the authors rebuild a shorter contiguous sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reduce.dpp import dpp_kernel, greedy_map, greedy_map_flops, relevance
from ..reduce.merge import unit
from .base import Choice, Method, MethodOptions


@dataclass(frozen=True)
class CDPrunerOptions(MethodOptions):
    """negate_relevance: score relevance by the negative cosine to the instruction (the
    authors' sign for CLIP features; off: the paper's plain cosine, see the module doc)."""

    negate_relevance: bool = False


def before_llm(ctx) -> Choice:
    hs = ctx.hidden
    d = hs.shape[-1]
    feats = unit(ctx.per_image(hs))  # (G, m, d) the projected visual tokens, unit rows
    slots, valid = ctx.text()  # (G, R) the instruction's slots
    text = hs.reshape(-1, d)[slots.to(hs.device)]  # (G, R, d) their input embeddings
    pad = ctx.image_pad
    rel = relevance(feats, text, valid.to(hs.device), pad, negate=ctx.options.negate_relevance, unit_feats=True)
    picks = greedy_map(dpp_kernel(feats, rel, unit_feats=True), ctx.out_max, pad)  # (G, out_max) in pick order
    g, m = ctx.n_images, ctx.width
    ctx.add_flops(g * m * (m + slots.shape[1]) * d + greedy_map_flops(g, m, ctx.out_max))
    return Choice(keep=ctx.ascending(picks, ctx.out_pad))


METHOD = Method(
    name="cdpruner",
    description="before the LLM: greedy MAP of a DPP over each image's projected tokens, the kernel weighted "
    "by each token's relevance to the instruction (CDPruner)",
    options=CDPrunerOptions,
    before_llm=before_llm,
    needs=frozenset(),
    paper="Zhang et al., Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning "
    "in MLLMs (CDPruner), arXiv 2506.10967, NeurIPS 2025",
)
