"""``last_stats`` of a prefill: tokens per layer, kept patches, FLOPs, selection time.

Counts per layer come from the host plan (every stage keeps a known number of tokens per
image); only the kept positions are device data. Both are turned into lists when the
statistics are first read (:class:`.state.ReductionStats` is lazy), not after every forward.
"""

from __future__ import annotations

import torch

from ..reduce import decoder_flops
from .state import ReductionStats


def _dims(state) -> tuple[int, int]:
    tc = state.text_config
    return tc.hidden_size, tc.intermediate_size


def merged_per_sample(dec, bsz: int) -> list[int]:
    """Per sample, how many of a stage's visual merge pairs really merged (weight 1, not dropped)."""
    src, _, *weight = dec.merge
    n_vis = src.shape[0] - dec.text_pairs
    src, weight = src[:n_vis], [w[:n_vis] for w in weight]
    w = weight[0] if weight else torch.ones(src.shape, device=src.device)
    out = torch.zeros(bsz, device=w.device).index_add_(0, (src // dec.n_in).to(w.device), w.float())
    return [round(v) for v in out.tolist()]


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
            merged_per_layer={},
        )

    return ReductionStats(builder=build)


def stats_reduced(state, pre) -> ReductionStats:
    n_layers, layout = state.depth, pre.layout
    d, m = _dims(state)
    counts_at, text_at = {}, {}  # layer -> each image's (text run's) count from that layer on
    for stage in pre.stages:
        counts_at[stage.layer] = pre.counts[stage.index + 1]
        text_at[stage.layer] = pre.text_counts[stage.index + 1]
    segments = pre.segments
    kept = dict(pre.kept)
    reducing = list(state.layers)
    timer, score_flops, totals = pre.timer, pre.score_flops, list(pre.totals)
    merges = [(st.key, dec) for st, dec in zip(pre.stages, pre.decisions) if dec.merge is not None]

    def build():
        # layers before the first reducing one see the unreduced sequence
        text_n = [v - t for v, t in zip(layout.valid_n, layout.visual_n)]
        cur, cur_t = layout.counts, tuple(sg.count for sg in segments)
        tokens, vis = [], []
        for i in range(n_layers):  # a count holds from its reducing layer to the next one
            cur, cur_t = counts_at.get(i, cur), text_at.get(i, cur_t)
            v = layout.per_sample(cur)
            merged_text = [0] * layout.bsz
            for sg, c in zip(segments, cur_t):
                merged_text[sg.sample] += sg.count - c
            vis.append(v)
            tokens.append([t + x - m for t, x, m in zip(text_n, v, merged_text)])
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
            merged_per_layer={key: merged_per_sample(dec, layout.bsz) for key, dec in merges},
        )

    return ReductionStats(builder=build)
