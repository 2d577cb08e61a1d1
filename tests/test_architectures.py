"""One equivalence body over every adapter row."""

import pytest
import torch

from pumer_llava import apply_pumer, list_methods, remove_pumer
from pumer_llava.hooks import prefill
from pumer_llava.hooks.adapters import ADAPTERS, get_adapter
from pumer_llava.reduce import plan_stages
from pumer_llava.hooks.layout import PromptLayout
from tiny import (
    TEXT_BLIND,
    alone,
    append_tokens,
    assert_cached_equals_recomputed,
    make_inputs,
    make_next_inputs,
    make_onevision_inputs,
    make_qwen_vl_inputs,
    tiny_llava,
    tiny_llava_next,
    tiny_onevision,
    tiny_qwen_vl,
)

GEN = dict(do_sample=False, max_new_tokens=5)


def _llava(kind):
    def build():
        model = tiny_llava(kind)
        inp = make_inputs((3, 6), (5, 2))
        return model, inp, [16, 16]
    return build


def _llava_next():
    model = tiny_llava_next()
    inp, counts = make_next_inputs(model)
    return model, inp, counts


def _llava_onevision():
    model = tiny_onevision()
    inp, counts = make_onevision_inputs(model)
    return model, inp, counts


def _qwen_vl(version):
    def build():  # an image; an image and a video (M-RoPE time rows differ): 16 and 20 tokens
        model = tiny_qwen_vl(version)
        inp, counts = make_qwen_vl_inputs(model)
        return model, inp, counts
    return build


BUILDERS = {
    "llava-llama": _llava("llama"),
    "llava-qwen2": _llava("qwen2"),
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen_vl("2"),
    "qwen2_5_vl": _qwen_vl("2.5"),
}


def test_every_adapter_row_is_covered():
    types = {b()[0].config.model_type for b in BUILDERS.values()}
    assert types == set(ADAPTERS)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_ratio_one_equals_unpatched_and_remove_restores(arch):
    model, inp, _ = BUILDERS[arch]()
    with torch.no_grad():
        ref, ref_gen = model(**inp).logits, model.generate(**inp, **GEN)
        apply_pumer(model, ratio=1.0)
        assert (model(**inp).logits - ref).abs().max().item() <= 1e-5
        assert torch.equal(model.generate(**inp, **GEN), ref_gen)
        apply_pumer(model, ratio=0.25)
        model(**inp)
        remove_pumer(model)
        assert (model(**inp).logits - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_exact_counts_cache_and_padding(arch):
    """Per-sample schedules; cached decoding equals recomputation; a padded batch equals each sample."""
    model, inp, counts = BUILDERS[arch]()
    apply_pumer(model, ratio=0.25, **TEXT_BLIND)
    layers, share = model.pumer.layers, model.pumer.merge_share
    cached, stats = assert_cached_equals_recomputed(model, inp, **GEN)
    with torch.no_grad():
        for b, total in enumerate(counts):
            plans = plan_stages(total, round(total * 0.25), len(layers), share)
            stage, want = -1, []
            for i in range(len(stats.visual_tokens_per_layer)):
                stage = layers.index(i) if i in layers else stage
                want.append(total if stage < 0 else plans[stage].n_out)
            assert [v[b] for v in stats.visual_tokens_per_layer] == want
        for i in range(len(counts)):
            one = model.generate(**alone(inp, i), **GEN)
            assert torch.equal(cached.sequences[i, -GEN["max_new_tokens"] :], one[0, -GEN["max_new_tokens"] :])


def _hooks(model):
    return {(name, kind, key) for name, m in model.named_modules()
            for kind, hooks in (("pre", m._forward_pre_hooks), ("post", m._forward_hooks)) for key in hooks}


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_every_method_runs_or_refuses_clearly(arch):
    model, inp, counts = BUILDERS[arch]()
    for method in list_methods():
        before = _hooks(model)  # transformers adds its own output-capturing hooks on first use
        try:
            apply_pumer(model, ratio=0.25, method=method)
        except ValueError as e:  # refused at apply time, saying why, with nothing patched
            assert method in str(e) and not hasattr(model, "pumer")
            assert _hooks(model) == before
            continue
        with torch.no_grad():
            model.generate(**inp, **GEN)
        assert model.pumer.last_stats.visual_tokens_final == [round(c * 0.25) for c in counts]
        remove_pumer(model)


def _visual(model, ids):
    return torch.isin(ids, torch.tensor(get_adapter(model).visual_token_ids(model.config)))


def _capture_lm_inputs(model):
    """Record the kwargs every forward hands the language model (ahead of pumer's own hooks)."""
    seen = []
    lm = get_adapter(model).language_model(model)
    handle = lm.register_forward_pre_hook(lambda mod, args, kw: seen.append(dict(kw)), with_kwargs=True, prepend=True)
    return seen, handle


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_kept_tokens_keep_their_original_positions(arch):
    """Reducing before layer 0 equals the unpatched language model run on the kept tokens alone,
    at the positions the model gave them in the full sequence (every M-RoPE row): no repacking."""
    model, inp, counts = BUILDERS[arch]()
    lm = get_adapter(model).language_model(model)
    apply_pumer(model, ratio=0.25, method="random", layers=[0])
    for i in range(len(counts)):
        one = alone(inp, i)
        seen, handle = _capture_lm_inputs(model)
        with torch.no_grad():
            out = model(**one, use_cache=False)
        handle.remove()
        emb, pid = seen[0]["inputs_embeds"], seen[0]["position_ids"]  # (1, N, d); (1, N), (3, 1, N) or None
        n = emb.shape[1]
        if pid is None:
            pid = torch.arange(n)[None]
        kept_vis = model.pumer.last_stats.kept_positions[0][0]
        assert len(kept_vis) == round(counts[i] * 0.25)
        keep = ~_visual(model, one["input_ids"][0])
        keep[kept_vis] = True
        with torch.no_grad():
            hidden = lm(inputs_embeds=emb[:, keep], position_ids=pid[..., keep],
                        attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long), use_cache=False).last_hidden_state
            want = model.get_output_embeddings()(hidden)
        torch.testing.assert_close(out.logits[:, keep], want, atol=1e-5, rtol=1e-5)  # logits come back full length


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_decode_positions_equal_unpatched(arch):
    """After a reduced prefill, every decode step reaches the language model with the positions
    the unpatched model uses (generate's, or the model's own, e.g. Qwen2-VL's rope_deltas), and a
    hand-written decoding step on the returned cache equals recomputing the whole sequence."""
    model, inp, counts = BUILDERS[arch]()
    runs = []
    for ratio in (None, 0.25):
        if ratio:
            apply_pumer(model, ratio=ratio, **TEXT_BLIND)  # merge-only: a new token changes no decision
        seen, handle = _capture_lm_inputs(model)
        with torch.no_grad():
            model.generate(**inp, **GEN)
        handle.remove()
        runs.append([kw.get("position_ids") for kw in seen[1:]])  # the decode steps
    assert len(runs[0]) == len(runs[1]) == GEN["max_new_tokens"] - 1
    for ref, got in zip(*runs):
        assert (ref is None and got is None) or torch.equal(ref, got)
    # No position ids passed: the model derives them from the cache length (and rope_deltas).
    # One unpadded sample at a time: transformers 5.23's Qwen2-VL builds full-length positions
    # from an attention mask in this path, so the step runs without one, as a real loop would.
    for i in range(len(counts)):
        one = alone(inp, i)
        with torch.no_grad():
            out = model(**one)
            nxt = out.logits[:, -1:].argmax(-1)
            step = model(input_ids=nxt, past_key_values=out.past_key_values)
            again = model(**append_tokens(one, nxt), use_cache=False)
        torch.testing.assert_close(step.logits[:, -1], again.logits[:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_query_row_score_equals_eager_attention_weights(arch):
    """The recomputed attention the text after the image gives each visual token (the layer's own
    norm, q/k and RoPE, M-RoPE included) equals eager's attention weights."""
    model, inp, _ = BUILDERS[arch]()
    model.set_attn_implementation("eager")
    layer = 2
    ids, mask = inp["input_ids"], inp["attention_mask"].bool()
    vis = _visual(model, ids)
    with torch.no_grad():
        attn = model(**inp, output_attentions=True).attentions[layer]  # (B, H, N, N)
    # each image is scored by the text that follows it
    layout = PromptLayout(ids.masked_fill(~mask, -1).tolist(), set(ids[vis].tolist()), None)
    want = []
    for b in range(ids.shape[0]):
        cols = vis[b].nonzero()[:, 0]
        score = []
        for c in cols.tolist():
            end = layout.images[layout.code[b][c]].end
            rows = (torch.arange(ids.shape[1]) > end) & mask[b] & ~vis[b]
            score.append(attn[b][:, rows, c].mean())
        want.append(torch.stack(score))
    got = []
    orig = prefill.attention_scores

    def spy(state, tok, *rest, **kw):
        out = orig(state, tok, *rest, **kw)
        got.append([out[0][b][tok.is_vis[b]] for b in range(out[0].shape[0])])
        return out

    apply_pumer(model, ratio=0.5, layers=[layer], merge_share=0.0)
    prefill.attention_scores = spy
    try:
        with torch.no_grad():
            model(**inp)
    finally:
        prefill.attention_scores = orig
    assert len(got) == 1 and len(got[0]) == len(want)
    for g, w in zip(got[0], want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_text_merging_on_every_adapter_row(arch):
    """merge_text on every architecture: the text gets shorter by the planned count, visual
    budgets stay exact, and cached decoding equals recomputation (M-RoPE rows included)."""
    model, inp, counts = BUILDERS[arch]()
    apply_pumer(model, ratio=0.25)
    with torch.no_grad():
        model(**inp)
    plain = model.pumer.last_stats
    apply_pumer(model, ratio=0.25, merge_text=0.5)
    cached, stats = assert_cached_equals_recomputed(model, inp, **GEN)
    assert stats.visual_tokens_per_layer == plain.visual_tokens_per_layer
    last = [t - v for t, v in zip(stats.tokens_per_layer[-1], stats.visual_tokens_per_layer[-1])]
    before = [t - v for t, v in zip(plain.tokens_per_layer[-1], plain.visual_tokens_per_layer[-1])]
    assert all(a < b for a, b in zip(last, before)), (last, before)  # every row has text to merge
    assert stats.flops < plain.flops
