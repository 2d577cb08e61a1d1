"""The control every method must beat: a seeded random choice of the same budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reduce.host import upload
from .base import Method, MethodOptions, single_layer


@dataclass(frozen=True)
class RandomOptions(MethodOptions):
    """seed: the generator's seed (mixed with each sample's own ids)."""

    seed: int = 0


def random_scores(seed: int, ids: list[list[int]], vis_slots: list[list[int]], width: int, device) -> torch.Tensor:
    """(B, width) random scores of the visual slots (0 elsewhere), seeded by each sample's own
    (unpadded) ids: the same prompt gets the same choice in any batch, so beams and padded
    batches agree with single samples. ids: the host's rows (-1 at padding); vis_slots: each
    row's visual slots in order (its j-th visual token gets the generator's j-th draw)."""
    out = torch.zeros(len(ids), width)
    for b, row in enumerate(ids):
        own = tuple(t for t in row if t >= 0)
        g = torch.Generator().manual_seed(hash((seed, len(own), own)) & (2**62 - 1))
        slots = vis_slots[b]
        if slots:
            out[b, slots] = torch.rand(len(slots), generator=g)
    return upload(out, device)  # the host does not wait for the device's queue


def score(ctx) -> torch.Tensor:
    n_prompt = ctx.input_ids.shape[1]
    vis_slots = [[s for s, c in enumerate(row) if c >= 0] for row in ctx.slots.code]
    ids = [row[:n_prompt] for row in ctx.layout.ids]
    return random_scores(ctx.options.seed, ids, vis_slots, ctx.slots.width, ctx.tokens.pos.device)


METHOD = Method(
    name="random",
    description="seeded random choice of the same budget (baseline)",
    options=RandomOptions,
    score=score,
    default_layers=single_layer(2),
)
