"""``last_stats`` of a prefill: tokens per layer, kept patches, FLOPs, selection time.

Counts per layer come from the host plan (every stage keeps a known number of tokens per
image); only the kept positions are device data. Both are turned into lists when the
statistics are first read (:class:`.state.ReductionStats` is lazy), not after every forward.
"""

from __future__ import annotations

from ..reduce import decoder_flops
from .state import ReductionStats


def _dims(state) -> tuple[int, int]:
    tc = state.text_config
    return tc.hidden_size, tc.intermediate_size


def stats_unreduced(state, pre) -> ReductionStats:
    n_layers, layout = state.depth, pre.layout
    d, m = _dims(state)

    def build():
        valid_n = list(layout.valid_n)
        flops = sum(decoder_flops([n] * n_layers, d, m) for n in valid_n)
        return dict(
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

    return ReductionStats(builder=build)


def stats_reduced(state, pre) -> ReductionStats:
    n_layers, layout = state.depth, pre.layout
    d, m = _dims(state)
    counts_at = {}  # layer -> each image's count from that layer on (the last stage at a layer wins)
    for stage in pre.stages:
        counts_at[stage.layer] = pre.counts[stage.index + 1]
    kept = dict(pre.kept)
    reducing = list(state.layers)
    timer, score_flops, totals = pre.timer, pre.score_flops, list(pre.totals)

    def build():
        # layers before the first reducing one see the unreduced sequence
        text_n = [v - t for v, t in zip(layout.valid_n, layout.visual_n)]
        cur = layout.counts
        tokens, vis = [], []
        for i in range(n_layers):  # a count holds from its reducing layer to the next one
            cur = counts_at.get(i, cur)
            v = layout.per_sample(cur)
            vis.append(v)
            tokens.append([t + x for t, x in zip(text_n, v)])
        flops = sum(decoder_flops([tokens[layer][b] for layer in range(n_layers)], d, m) for b in range(layout.bsz))
        flops_full = sum(decoder_flops([n] * n_layers, d, m) for n in layout.valid_n)
        kept_pos, patches = {}, {}
        for key, (pos, code) in kept.items():
            pos_l, code_l = pos.tolist(), code.tolist()
            rows = [[p for p, c in zip(pr, cr) if c >= 0] for pr, cr in zip(pos_l, code_l)]
            kept_pos[key] = rows
            patches[key] = [[p - layout.vis_start[b] for p in r] for b, r in enumerate(rows)]
        return dict(
            visual_tokens_total=totals,
            visual_tokens_per_layer=vis,
            tokens_per_layer=tokens,
            kept_positions=kept_pos,
            kept_patches=patches,
            flops=flops + score_flops,
            flops_unreduced=flops_full,
            select_seconds=timer.total(),
            reducing_layers=reducing,
        )

    return ReductionStats(builder=build)
