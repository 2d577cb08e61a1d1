"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247): drop visual tokens in stages inside the
language model, ranked at each stage boundary by the attention the last prompt token gives them.

The paper splits the LLM into stages (LLaVA-1.5-7B: boundaries after layers 8, 16 and 24) and
at each boundary keeps a fixed share lambda of the visual tokens that survived the previous
one (lambda = 0.5: 576 -> 288 -> 144 -> 72). The rank is computed lightly at the boundary with
the NEXT layer's input norm, q/k projections and RoPE: the last token of the whole prompt
(the end of "ASSISTANT:") as the only query, softmax over every key, heads averaged, read at
the image's columns; the top-k stay in their original order.

Here: the reducing layers are the boundaries, (depth//4, depth//2, 3*depth//4), 8/16/24 of 32;
the score is ``ctx.attention("last")`` at the reducing layer's own input (its norm, q/k and
RoPE: what PyramidDrop computes at each boundary), and each image keeps its best-scored tokens.

Deviations:
- budget: ``ratio`` / ``keep_tokens`` is the FINAL per-image count, reached exactly after the
  last stage; the runtime splits the removal geometrically (every stage removes the same
  fraction), which is PyramidDrop's lambda schedule: ratio = lambda**3 (0.125) reproduces the
  paper's default 576 -> 288 -> 144 -> 72. Papers comparing with PyramidDrop at "192 / 128 / 64
  tokens" quote the AVERAGE over the 32 layers instead (with earlier boundaries, e.g. 2, 8, 16),
  not the final count: pass ``layers=`` and a ratio for such a setting.
- positions: kept tokens keep their ORIGINAL position ids (RoPE); the authors re-index the
  shortened sequence contiguously after every drop (and shift the decoded tokens' positions).
- batches: each image of a batch keeps its own budget (the authors' code runs batch size 1 at
  inference); samples without an image are untouched, as in the paper.
"""

from __future__ import annotations

from .base import Method


def quarter_layers(depth: int) -> tuple[int, ...]:
    """depth//4, depth//2, 3*depth//4 (8, 16, 24 of 32), distinct, at least 1 (layer 0 for a
    one-layer model)."""
    if depth <= 1:
        return (0,)
    return tuple(sorted({min(max(1, k), depth - 1) for k in (depth // 4, depth // 2, 3 * depth // 4)}))


def last_token_attention(ctx):
    return ctx.attention("last")


METHOD = Method(
    name="pyramiddrop",
    description="staged pruning in the LLM: at each stage, the visual tokens the last prompt token attends to "
    "least are dropped (PyramidDrop)",
    score=last_token_attention,
    default_layers=quarter_layers,
    paper="Xing et al., PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual "
    "Redundancy Reduction, CVPR 2025",
)
