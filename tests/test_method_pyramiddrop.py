"""PyramidDrop: staged pruning in the LLM by the last prompt token's attention at each boundary."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pumer_llava import apply_pumer
from pumer_llava.methods.pyramiddrop import quarter_layers
from pumer_llava.reduce import plan_stages
from tiny import capture_layers, N_VIS, make_inputs, make_next_inputs, tiny_llava, tiny_llava_next

BACKBONES = ["llama", "qwen2"]


def test_default_layers_are_the_quarter_boundaries():
    assert quarter_layers(32) == (8, 16, 24)
    assert quarter_layers(40) == (10, 20, 30)
    assert quarter_layers(6) == (1, 3, 4)
    assert quarter_layers(3) == (1, 2)
    assert quarter_layers(2) == (1,)
    assert quarter_layers(1) == (0,)


def last_row_attention(layer, h, pe, n_pad):
    """(B, N) the last slot's attention over every slot, heads averaged, from the layer's own norm,
    q/k projections and RoPE, softmax over the real slots (the last slot sees them all)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    bsz, n, _ = x.shape
    q = attn.q_proj(x).view(bsz, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(bsz, n, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *pe)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention
    logits = q[:, :, -1:] @ k.transpose(-1, -2) * attn.scaling  # (B, H, 1, N)
    pad = torch.arange(n)[None] < torch.tensor(n_pad)[:, None]  # left padding
    logits = logits.masked_fill(pad[:, None, None], float("-inf"))
    return logits.softmax(-1).mean(1)[:, 0]


@pytest.mark.parametrize("kind", BACKBONES)
def test_each_stage_keeps_the_top_of_the_last_token_attention(kind):
    """At every reducing layer L the kept tokens are each image's top-k of the attention the last prompt
    token gives them, recomputed here from L's input (layer L-1's output) with L's own weights."""
    model = tiny_llava(kind)
    pre, suf = (3, 6), (5, 2)
    inp = make_inputs(pre, suf)
    apply_pumer(model, method="pyramiddrop", ratio=0.25)
    layers = model.pumer.layers
    assert layers == (1, 3, 4)
    seen, handles = capture_layers(model)
    with torch.no_grad():
        model(**inp)
    for h in handles:
        h.remove()
    stats = model.pumer.last_stats
    plans = plan_stages(N_VIS, 4, len(layers), 0.0)
    n0 = inp["input_ids"].shape[1]
    n_pad = [n0 - p - N_VIS - s for p, s in zip(pre, suf)]
    # positions of the visual tokens entering the first stage
    current = [[n_pad[b] + pre[b] + j for j in range(N_VIS)] for b in range(2)]
    expect_vis, stage = [], -1
    for i in range(len(seen)):
        stage = layers.index(i) if i in layers else stage
        expect_vis.append(N_VIS if stage < 0 else plans[stage].n_out)
    assert stats.visual_tokens_per_layer == [[v, v] for v in expect_vis]
    layer_mods = model.model.language_model.layers
    with torch.no_grad():
        for s, layer in enumerate(layers):
            h, kw, out = seen[layer - 1]  # L's input before the stage: L-1's output, at L-1's slots
            score = last_row_attention(layer_mods[layer], out, kw["position_embeddings"], n_pad)
            keep = plans[s].n_out
            for b in range(2):
                first = n_pad[b] + pre[b]
                vis = score[b, first : first + len(current[b])]
                top = vis.topk(keep).indices.sort().values.tolist()
                want = [current[b][j] for j in top]
                assert stats.kept_positions[layer][b] == want, (s, b)
                current[b] = want
    assert stats.visual_tokens_final == [4, 4]


def test_counts_are_exact_on_images_of_different_sizes():
    """LLaVA-NeXT: two anyres images of different counts in one batch, each with its own budget."""
    model = tiny_llava_next()
    inp, counts = make_next_inputs(model)
    apply_pumer(model, method="pyramiddrop", keep_tokens=5)
    with torch.no_grad():
        model(**inp)
    stats = model.pumer.last_stats
    layers = model.pumer.layers
    per_image = [plan_stages(n, 5, len(layers), 0.0) for n in counts]
    stage = -1
    for i, got in enumerate(stats.visual_tokens_per_layer):
        stage = layers.index(i) if i in layers else stage
        assert got == [n if stage < 0 else p[stage].n_out for n, p in zip(counts, per_image)]
    assert stats.visual_tokens_final == [5, 5]
    for b, pos in enumerate(stats.kept_positions[layers[-1]]):
        assert all(inp["input_ids"][b, p] == model.config.image_token_id for p in pos)


def test_pyramiddrop_takes_no_options():
    model = tiny_llava("llama")
    with pytest.raises(ValueError, match="takes no options"):
        apply_pumer(model, method="pyramiddrop", merge_share=0.5)


def test_no_host_sync_beyond_the_runtimes():
    """A 32-layer model at the default layers (8, 16, 24), rows of different lengths and images per
    row: the method waits for the device no more than FastV does (the runtime's one read of the ids)."""
    from pumer_llava import remove_pumer
    from pumer_llava.counting import OpCounter
    from tiny import make_mixed_inputs

    model = tiny_llava(layers=32)
    inp, _ = make_mixed_inputs()
    syncs = {}
    for method in ("fastv", "pyramiddrop"):
        apply_pumer(model, ratio=0.25, method=method)
        with torch.no_grad(), OpCounter() as c:
            model(**inp, use_cache=True)
        syncs[method] = c.syncs
        assert "nonzero" not in c.sync_ops
        assert model.pumer.last_stats.visual_tokens_final == [4, 8, 0]
        if method == "pyramiddrop":
            assert model.pumer.layers == (8, 16, 24)
        remove_pumer(model)
    assert syncs["pyramiddrop"] <= syncs["fastv"], syncs
