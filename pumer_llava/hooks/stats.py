"""``last_stats`` of a prefill: tokens per layer, kept patches, FLOPs, selection time."""

from __future__ import annotations

import torch

from ..reduce import decoder_flops
from .state import ReductionStats


def _dims(state) -> tuple[int, int]:
    tc = state.text_config
    return tc.hidden_size, tc.intermediate_size


def stats_unreduced(state, pre) -> ReductionStats:
    n_layers = state.depth
    valid_n = pre.mask.sum(1).tolist()
    d, m = _dims(state)
    flops = sum(decoder_flops([n] * n_layers, d, m) for n in valid_n)
    return ReductionStats(
        visual_tokens_total=list(pre.totals),
        visual_tokens_per_layer=[list(pre.totals) for _ in range(n_layers)],
        tokens_per_layer=[list(valid_n) for _ in range(n_layers)],
        kept_positions={},
        kept_patches={},
        flops=flops,
        flops_unreduced=flops,
        select_seconds=0.0,
        reducing_layers=[],
    )


def stats_reduced(state, pre) -> ReductionStats:
    # layers before the first reducing one see the unreduced sequence
    n_layers = state.depth
    valid = pre.mask
    full_tokens = valid.sum(1)
    full_vis = (pre.images.group >= 0).logical_and(valid).sum(1)
    per_tok, per_vis, cur_t, cur_v = [], [], full_tokens, full_vis
    for i in range(n_layers):  # a count holds from its reducing layer to the next one
        cur_t, cur_v = pre.tokens_per_layer.get(i, cur_t), pre.vis_per_layer.get(i, cur_v)
        per_tok.append(cur_t)
        per_vis.append(cur_v)
    tokens = torch.stack(per_tok).tolist()  # (L, B)
    vis = torch.stack(per_vis).tolist()
    d, m = _dims(state)
    bsz = valid.shape[0]
    valid_n = full_tokens.tolist()
    flops = sum(decoder_flops([tokens[layer][b] for layer in range(n_layers)], d, m) for b in range(bsz))
    flops_full = sum(decoder_flops([valid_n[b]] * n_layers, d, m) for b in range(bsz))
    kept, patches = {}, {}
    for key, (pos, is_vis) in pre.kept.items():
        rows = [pos[b][is_vis[b]] for b in range(bsz)]
        kept[key] = [r.tolist() for r in rows]
        patches[key] = [(r - pre.vis_start[b]).tolist() for b, r in enumerate(rows)]
    return ReductionStats(
        visual_tokens_total=list(pre.totals),
        visual_tokens_per_layer=vis,
        tokens_per_layer=tokens,
        kept_positions=kept,
        kept_patches=patches,
        flops=flops + pre.score_flops,
        flops_unreduced=flops_full,
        select_seconds=pre.select_seconds,
        reducing_layers=list(state.layers),
    )
