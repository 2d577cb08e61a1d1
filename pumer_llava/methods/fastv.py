"""FastV (Chen et al., ECCV 2024): after layer K-1, drop the visual tokens the last prompt token
attends to least (K = 2 on LLaVA-1.5-7B)."""

from __future__ import annotations

from .base import Method, single_layer


def last_token_attention(ctx):
    return ctx.attention("last")


METHOD = Method(
    name="fastv",
    description="attention from the last prompt token at layer K-1, drop at K (FastV)",
    score=last_token_attention,
    default_layers=single_layer(2),
    score_offset=-1,
    min_layer=1,
    paper="Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024",
)
