"""Equivalence properties of the patched model, one body over several text backbones.

Every test runs on tiny LLaVA models built from a config (tests/tiny.py), no download.
"""

import pytest
import torch

from pumer_llava import Method, apply_pumer, disabled, remove_pumer
from pumer_llava.methods import visual_scorer
from pumer_llava.reduce import plan_stages
from tiny import IMAGE_TOKEN, TEXT_BLIND, N_VIS, alone, alone_mixed, assert_cached_equals_recomputed, make_inputs, make_mixed_inputs, tiny_llava

BACKBONES = ["llama", "qwen2"]  # qwen2: grouped-query attention, q/k/v biases
ATTN = ["sdpa", "eager"]
GEN = dict(do_sample=False, max_new_tokens=6)


def _count_layer_inputs(model):
    seen, handles = {}, []
    for i, layer in enumerate(model.model.language_model.layers):
        def pre(mod, args, kwargs, i=i):
            seen.setdefault(i, args[0].shape[1])  # the prefill
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("kind", BACKBONES)
def test_ratio_one_and_remove_equal_unpatched(kind, attn):
    model = tiny_llava(kind, attn)
    inp = make_inputs((3, 6), (5, 2))
    with torch.no_grad():
        ref = model(**inp).logits
        ref_gen = model.generate(**inp, **GEN)
        apply_pumer(model, ratio=1.0)
        out = model(**inp).logits
        assert (out - ref).abs().max().item() <= 1e-5
        assert torch.equal(model.generate(**inp, **GEN), ref_gen)
        assert model.pumer.last_stats.visual_tokens_per_layer[-1] == [N_VIS, N_VIS]

        apply_pumer(model, ratio=0.25)
        reduced = model(**inp).logits
        assert (reduced[:, -1] - ref[:, -1]).abs().max().item() > 1e-3  # reduction changes the answer
        remove_pumer(model)
        assert not hasattr(model, "pumer")
        assert (model(**inp).logits - ref).abs().max().item() <= 1e-5
        assert torch.equal(model.generate(**inp, **GEN), ref_gen)


@pytest.mark.parametrize("method", ["pumer", "fastv", "random"])
@pytest.mark.parametrize("kind", BACKBONES)
def test_every_layer_holds_the_scheduled_count(kind, method):
    model = tiny_llava(kind)
    inp = make_inputs((3, 6), (5, 2))
    apply_pumer(model, ratio=0.25, method=method)
    layers = model.pumer.layers
    plans = plan_stages(N_VIS, 4, len(layers), model.pumer.merge_share)
    seen, handles = _count_layer_inputs(model)
    with torch.no_grad():
        model(**inp)
    for h in handles:
        h.remove()
    stats = model.pumer.last_stats
    n_text = inp["input_ids"].shape[1] - N_VIS  # padded length minus the visual span
    expect_vis, stage = [], -1
    for i in range(len(seen)):
        if i in layers:
            stage = layers.index(i)
        expect_vis.append(N_VIS if stage < 0 else plans[stage].n_out)
    # the hidden states each layer really received (measured independently of last_stats)
    assert [seen[i] for i in range(len(seen))] == [n_text + v for v in expect_vis]
    assert stats.visual_tokens_per_layer == [[v, v] for v in expect_vis]
    assert stats.visual_tokens_final == [4, 4]
    valid = inp["attention_mask"].sum(1).tolist()
    assert stats.tokens_per_layer[-1] == [n - (N_VIS - 4) for n in valid]
    assert 0 < stats.flops_ratio < 1 and stats.select_seconds > 0
    final_layer = layers[-1]
    assert all(len(p) == 4 for p in stats.kept_patches[final_layer])
    assert all(0 <= x < N_VIS for p in stats.kept_patches[final_layer] for x in p)


@pytest.mark.parametrize("kind", BACKBONES)
def test_keep_tokens_is_an_absolute_budget(kind):
    model = tiny_llava(kind)
    apply_pumer(model, keep_tokens=5)
    with torch.no_grad():
        model(**make_inputs())
    assert model.pumer.last_stats.visual_tokens_final == [5]


def _fixed_scores(kept_by_stage):
    """A recipe whose scores reproduce recorded pruning decisions (for recomputation tests)."""

    def scorer(ctx):
        want = torch.tensor(kept_by_stage[ctx.stage])  # (B, keep) positions
        return (ctx.positions[:, :, None] == want[:, None, :]).any(-1).float()

    return scorer


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("kind", BACKBONES)
def test_cached_decoding_equals_recomputation(kind, attn):
    model = tiny_llava(kind, attn)
    inp = make_inputs((3, 6), (5, 2))
    n_layers = len(model.model.language_model.layers)
    with torch.no_grad():
        # 1) PuMer's pruning decisions, replayed by a fixed scorer so recomputation makes the same ones
        apply_pumer(model, ratio=0.25, merge_share=0.0)
        model(**inp)
        kept = model.pumer.last_stats.kept_positions
        replay = Method(name="replay", score=visual_scorer(_fixed_scores([kept[l] for l in sorted(kept)])),
                        default_layers=lambda d: tuple(sorted(kept)))
        # 2) merge-only PuMer: merging reads only visual tokens, which later text cannot change
        for kwargs in (dict(method=replay, ratio=0.25), dict(method="pumer", ratio=0.25, **TEXT_BLIND)):
            apply_pumer(model, **kwargs)
            cached = model.generate(**inp, **GEN, output_scores=True, return_dict_in_generate=True)
            layers = model.pumer.layers
            plans = plan_stages(N_VIS, 4, len(layers), model.pumer.merge_share)
            # each layer's cache holds the scheduled tokens + the decoded ones
            total = inp["input_ids"].shape[1] + GEN["max_new_tokens"] - 1
            stage = -1
            for i in range(n_layers):
                if i in layers:
                    stage = layers.index(i)
                removed = 0 if stage < 0 else N_VIS - plans[stage].n_out
                assert cached.past_key_values.layers[i].keys.shape[-2] == total - removed
            recomputed = model.generate(**inp, **GEN, output_scores=True, return_dict_in_generate=True, use_cache=False)
            assert torch.equal(cached.sequences, recomputed.sequences)
            for a, b in zip(cached.scores, recomputed.scores):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["pumer", "fastv", "random"])
@pytest.mark.parametrize("kind", BACKBONES)
def test_padded_batch_equals_single_samples(kind, method):
    model = tiny_llava(kind)
    inp = make_inputs((2, 7, 4), (6, 2, 3), seed=3)
    apply_pumer(model, ratio=0.25, method=method)
    with torch.no_grad():
        batch = model.generate(**inp, **GEN)[:, -GEN["max_new_tokens"] :]
        batch_kept = model.pumer.last_stats.kept_patches
        for i in range(3):
            one = model.generate(**alone(inp, i), **GEN)[:, -GEN["max_new_tokens"] :]
            assert torch.equal(batch[i], one[0]), (i, batch[i], one[0])
            for layer, per_sample in model.pumer.last_stats.kept_patches.items():
                assert batch_kept[layer][i] == per_sample[0]


@pytest.mark.parametrize("kind", BACKBONES)
def test_proportional_attention_matters_only_with_sizes(kind):
    model = tiny_llava(kind, "eager")
    inp = make_inputs((3, 6), (5, 2))
    with torch.no_grad():
        outs = {}
        for share in (0.0, 1.0):
            for prop in (False, True):
                apply_pumer(model, ratio=0.25, merge_share=share, prop_attn=prop)
                outs[share, prop] = model(**inp).logits[:, -1]
    torch.testing.assert_close(outs[0.0, False], outs[0.0, True], atol=0, rtol=0)  # prune only: sizes all 1
    assert (outs[1.0, False] - outs[1.0, True]).abs().max().item() > 1e-4


@pytest.mark.parametrize("kind", BACKBONES)
def test_labels_give_a_loss_and_full_length_logits(kind):
    model = tiny_llava(kind)
    inp = make_inputs((3, 6), (5, 2))
    labels = inp["input_ids"].masked_fill(inp["input_ids"] == 3, -100).masked_fill(inp["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = model(**inp, labels=labels)
        apply_pumer(model, ratio=0.25)
        out = model(**inp, labels=labels)
    assert out.logits.shape == ref.logits.shape
    assert torch.isfinite(out.loss)
    # text after the image is kept, so its logits sit at the same positions as unreduced
    present = torch.zeros_like(labels, dtype=torch.bool)
    for b, pos in enumerate(model.pumer.last_stats.kept_positions[model.pumer.layers[-1]]):
        present[b, pos] = True
    present |= inp["input_ids"] != 3
    masked = labels.clone()
    masked[:, 1:] = masked[:, 1:].masked_fill(~present[:, :-1], -100)
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), masked[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    tail = inp["input_ids"].shape[1] - 2
    assert (out.logits[:, tail:] != 0).all()


@pytest.mark.parametrize("kind", BACKBONES)
def test_beam_search_with_cache_equals_without(kind):
    model = tiny_llava(kind)
    inp = make_inputs((3, 6), (5, 2))
    apply_pumer(model, ratio=0.25, **TEXT_BLIND)
    with torch.no_grad():
        a = model.generate(**inp, num_beams=3, do_sample=False, max_new_tokens=5)
        b = model.generate(**inp, num_beams=3, do_sample=False, max_new_tokens=5, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", BACKBONES)
def test_continuing_a_conversation_from_the_cache(kind):
    """Turn 2 on turn 1's reduced cache equals recomputing the whole conversation."""
    model = tiny_llava(kind)
    inp = make_inputs((3,), (5,))
    apply_pumer(model, ratio=0.25, **TEXT_BLIND)
    with torch.no_grad():
        t1 = model.generate(**inp, **GEN, return_dict_in_generate=True)
        follow = torch.tensor([[7, 8, 9, 10]])
        ids2 = torch.cat([t1.sequences, follow], dim=1)
        inp2 = {"input_ids": ids2, "attention_mask": torch.ones_like(ids2)}
        cont = model.generate(**inp2, past_key_values=t1.past_key_values, **GEN)
        fresh = model.generate(**inp2, pixel_values=inp["pixel_values"], **GEN)
    assert torch.equal(cont, fresh)


def test_manual_decoding_loop_uses_the_returned_cache():
    model = tiny_llava("llama")
    inp = make_inputs((3,), (5,))
    apply_pumer(model, ratio=0.25, **TEXT_BLIND)
    with torch.no_grad():
        out = model(**inp)
        nxt = out.logits[:, -1:].argmax(-1)
        step = model(input_ids=nxt, past_key_values=out.past_key_values)
        ids = torch.cat([inp["input_ids"], nxt], 1)
        full = model(input_ids=ids, pixel_values=inp["pixel_values"], use_cache=False)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-4, rtol=1e-4)


def test_disabled_context_runs_unreduced():
    model = tiny_llava("llama")
    inp = make_inputs((3,), (5,))
    with torch.no_grad():
        ref = model(**inp).logits
        apply_pumer(model, ratio=0.25)
        with disabled(model):
            assert torch.equal(model(**inp).logits, ref)
        assert not torch.equal(model(**inp).logits, ref)


@pytest.mark.parametrize("method", ["pumer", "fastv", "random", "vispruner"])
@pytest.mark.parametrize("kind", BACKBONES)
def test_mixed_visual_counts_batch_equals_single_samples(kind, method):
    """Samples with 1, 2 and 0 images in one padded batch: re-padded, never truncated."""
    model = tiny_llava(kind)
    inp, images = make_mixed_inputs()
    apply_pumer(model, ratio=0.25, method=method)
    seen, handles = _count_layer_inputs(model)
    with torch.no_grad():
        batch = model.generate(**inp, **GEN)[:, -GEN["max_new_tokens"] :]
    for h in handles:
        h.remove()
    stats = model.pumer.last_stats
    assert stats.visual_tokens_total == [N_VIS * n for n in images]
    assert stats.visual_tokens_final == [round(N_VIS * n * 0.25) for n in images]
    # each layer's tensor is as long as its longest sample: nothing truncated
    valid = inp["attention_mask"].sum(1)
    for layer, per_sample in enumerate(stats.tokens_per_layer):
        removed = [N_VIS * n - v for n, v in zip(images, stats.visual_tokens_per_layer[layer])]
        assert per_sample == [int(valid[b]) - removed[b] for b in range(3)]
        assert seen[layer] == inp["input_ids"].shape[1] - min(removed)
    for i in range(3):
        with torch.no_grad():
            one = model.generate(**alone_mixed(inp, images, i), **GEN)[:, -GEN["max_new_tokens"] :]
        assert torch.equal(batch[i], one[0]), (i, batch[i], one[0])
        if images[i]:
            assert model.pumer.last_stats.visual_tokens_per_layer == [[v[i]] for v in stats.visual_tokens_per_layer]


@pytest.mark.parametrize("attn", ATTN)
def test_mixed_visual_counts_cached_equals_recomputation(attn):
    model = tiny_llava("qwen2", attn)
    inp, _ = make_mixed_inputs()
    apply_pumer(model, ratio=0.25, **TEXT_BLIND)
    assert_cached_equals_recomputed(model, inp, **GEN)


def test_placeholder_id_without_an_image_is_a_plain_token():
    """A decoded token that carries the image id, with no image behind it, is only embedded (as unpatched)."""
    model = tiny_llava("llama")
    inp = make_inputs((3,), (5,))
    step = {"input_ids": torch.full((1, 1), IMAGE_TOKEN),
            "attention_mask": torch.cat([inp["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)}
    with torch.no_grad():
        ref = model(**step, past_key_values=model(**inp, use_cache=True).past_key_values).logits
        apply_pumer(model, ratio=1.0)
        got = model(**step, past_key_values=model(**inp, use_cache=True).past_key_values).logits
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("rule", ["bipartite", "recycle"])
def test_merge_rules_land_on_the_budget_and_generate_alike_cached_or_not(rule):
    from tiny import assert_cached_equals_recomputed, make_mixed_inputs

    model = tiny_llava("llama")
    apply_pumer(model, ratio=0.25, merge_rule=rule, merge_share=0.5, merge_threshold=None)
    assert model.pumer.to_dict()["merge_rule"] == rule
    inp, images = make_mixed_inputs()
    _, stats = assert_cached_equals_recomputed(model, inp, max_new_tokens=4, do_sample=False)
    assert stats.visual_tokens_final == [round(N_VIS * 0.25) * n for n in images]
    with torch.no_grad():  # merged tokens stand for the ones folded in: sizes reach the cache
        out = model(**inp, use_cache=True)
    logs = [layer.log_size for layer in out.past_key_values.layers if getattr(layer, "log_size", None) is not None]
    assert logs and all(float(ls.exp().max()) > 1.0 for ls in logs)
    with pytest.raises(ValueError, match="merge_rule must be one of bipartite, recycle"):
        apply_pumer(model, merge_rule="average")


def test_recycle_with_a_threshold_no_pair_reaches_is_prune_only():
    """merge_threshold=1: no removed token is similar enough to fold, so each is only dropped,
    and the model computes exactly what prune-only PuMer computes (the kept sets are the same)."""
    model = tiny_llava("llama")
    inp = make_inputs((3, 6), (5, 2))
    with torch.no_grad():
        apply_pumer(model, ratio=0.25, merge_share=0.0)
        ref = model(**inp).logits
        assert model.pumer.last_stats.merged_per_layer == {}
        apply_pumer(model, ratio=0.25, merge_rule="recycle", merge_share=0.5, merge_threshold=1.0)
        got = model(**inp).logits
        assert all(v == [0, 0] for v in model.pumer.last_stats.merged_per_layer.values())
        apply_pumer(model, ratio=0.25, merge_rule="recycle", merge_share=0.5, merge_threshold=None)
        merged = model(**inp).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (merged - ref).abs().max().item() > 1e-3  # without the threshold the merges change the output
    with pytest.raises(ValueError, match="merge_window applies to merge_rule='recycle'"):
        apply_pumer(model, merge_rule="bipartite", merge_window=2)
    with pytest.raises(ValueError, match="merge_window must be at least 1"):
        apply_pumer(model, merge_rule="recycle", merge_window=0)
    with pytest.raises(ValueError, match=r"merge_threshold must be in \[-1, 1\] \(a cosine similarity\)"):
        apply_pumer(model, merge_threshold=1.5)


@pytest.mark.parametrize("rule", ["bipartite", "recycle"])
def test_merges_counted_per_layer_and_the_threshold_decides_which_merge(rule, monkeypatch):
    """``merged_per_layer`` counts the pairs that really merged: every planned merge without a
    threshold, none at threshold 1 (sources only dropped, sizes stay 1), and in between exactly
    the pairs whose cosine reaches it (the default 0.85: some, on this model)."""
    from pumer_llava.hooks import prefill

    model = tiny_llava("llama")
    inp = make_inputs((3, 6), (5, 2))
    layers = [1, 2]
    plans = plan_stages(N_VIS, 4, len(layers), 0.5)
    counts = {}
    for t in (None, 1.0, -1.0):
        apply_pumer(model, ratio=0.25, merge_rule=rule, merge_threshold=t, layers=layers)
        with torch.no_grad():
            out = model(**inp, use_cache=True)
        counts[t] = model.pumer.last_stats.merged_per_layer
        if t == 1.0:  # nothing merged: every slot still stands for one token
            logs = [layer.log_size for layer in out.past_key_values.layers if getattr(layer, "log_size", None) is not None]
            assert all(float(ls.abs().max()) == 0.0 for ls in logs)
    assert counts[None] == counts[-1.0] == {l: [p.merge, p.merge] for l, p in zip(layers, plans)}
    assert counts[1.0] == {l: [0, 0] for l in layers}
    seen = []
    real = prefill.merge_pairs

    def spy(x, size, src, dst, weight=None):
        seen.append(weight)
        return real(x, size, src, dst, weight)

    monkeypatch.setattr(prefill, "merge_pairs", spy)
    apply_pumer(model, ratio=0.25, merge_rule=rule, layers=layers)  # the default threshold
    with torch.no_grad():
        model(**inp)
    got = model.pumer.last_stats.merged_per_layer
    assert [sum(v) for v in got.values()] == [int(w.sum()) for w in seen]
    assert all(set(w.tolist()) <= {0.0, 1.0} for w in seen)


def test_a_merge_window_folds_only_into_grid_neighbours(monkeypatch):
    """merge_window=1 on 4x4 patch grids: every pair that merges is at most one patch apart; a
    removed token with no kept neighbour is only dropped (weight 0)."""
    from pumer_llava.hooks import prefill

    model = tiny_llava("llama")
    inp = make_inputs((3, 6), (5, 2))
    seen = []
    real = prefill.merge_pairs

    def spy(x, size, src, dst, weight=None):
        pos = model.pumer.call.tokens.pos.reshape(-1)
        seen.append((pos[src], pos[dst], weight))
        return real(x, size, src, dst, weight)

    monkeypatch.setattr(prefill, "merge_pairs", spy)
    apply_pumer(model, ratio=0.25, merge_rule="recycle", merge_window=1, merge_threshold=None, layers=[1])
    with torch.no_grad():
        model(**inp)
    starts = torch.tensor([3, 6]).repeat_interleave(len(seen[0][0]) // 2)  # one image per sample
    (ps, pd, w), = seen
    a, b = ps - starts, pd - starts
    dist = torch.maximum((a // 4 - b // 4).abs(), (a % 4 - b % 4).abs())
    assert w is not None and bool((dist[w > 0] <= 1).all()) and int((w > 0).sum()) > 0


def test_rotated_keys_are_the_layers_keys_after_rope_with_or_without_the_attention():
    """``ctx.keys(flat, rotated=True)``: every kv head's key after RoPE, the same whether the
    attention at this layer computed them or the layer's own projection and cos / sin do;
    ``merge_metric="rotated_keys"`` merges on them and generates alike cached or not."""
    from pumer_llava import Method
    from pumer_llava.methods import keep_top

    seen = []

    def select(ctx):
        flat = ctx.flat_slots
        before = ctx.keys(flat, rotated=True)  # nothing computed at this layer yet
        ctx.attention("text")
        after = ctx.keys(flat, rotated=True)
        seen.append((before, after, ctx.keys(flat)))
        return keep_top(ctx)

    model = tiny_llava("qwen2")
    inp = make_inputs((3, 6), (5, 2))
    apply_pumer(model, ratio=0.25, method=Method(name="probe", score=lambda ctx: ctx.hidden.float().norm(dim=-1),
                                                 select=select, default_layers=lambda d: (2,)))
    with torch.no_grad():
        model(**inp)
    (before, after, mean), = seen
    parts = model.config.text_config
    assert before.shape == (*mean.shape[:2], parts.num_key_value_heads * (parts.hidden_size // parts.num_attention_heads))
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)
    apply_pumer(model, ratio=0.25, merge_metric="rotated_keys", merge_threshold=None)
    _, stats = assert_cached_equals_recomputed(model, inp, max_new_tokens=4, do_sample=False)
    assert all(sum(v) > 0 for v in stats.merged_per_layer.values())
    with pytest.raises(ValueError, match="merge_metric must be one of keys, rotated_keys"):
        apply_pumer(model, merge_metric="positions")
