"""VisPruner: reduction before the first decoder layer from the vision tower's cues."""

import pytest
import torch

from pumer_llava import apply_pumer, remove_pumer
from pumer_llava.reduce.diversity import remove_duplicates
from tiny import (
    IMAGE_SIZE,
    N_VIS,
    PATCH,
    alone,
    assert_cached_equals_recomputed,
    make_inputs,
    make_next_inputs,
    make_onevision_inputs,
    make_video_inputs,
    tiny_llava,
    tiny_llava_next,
    tiny_onevision,
)

GEN = dict(do_sample=False, max_new_tokens=5)
BACKBONES = ["llama", "qwen2"]


@pytest.mark.parametrize("kind", BACKBONES)
def test_ratio_one_equals_unpatched(kind):
    model = tiny_llava(kind)
    inp = make_inputs((3, 6), (5, 4))
    with torch.no_grad():
        ref, ref_gen = model(**inp).logits, model.generate(**inp, **GEN)
        apply_pumer(model, method="vispruner", ratio=1.0)
        assert (model(**inp).logits - ref).abs().max().item() <= 1e-5
        assert torch.equal(model.generate(**inp, **GEN), ref_gen)
        apply_pumer(model, method="vispruner", ratio=0.25)
        assert (model(**inp).logits[:, -1] - ref[:, -1]).abs().max().item() > 1e-3
        remove_pumer(model)
        assert (model(**inp).logits - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("layers", [None, [2, 4]], ids=["vispruner", "hybrid"])
@pytest.mark.parametrize("kind", BACKBONES)
def test_cached_decoding_equals_recomputation_and_counts(kind, layers):
    """VisPruner decides from the image alone, so recomputing makes the same decisions."""
    model = tiny_llava(kind)
    inp = make_inputs((3, 6), (5, 4))
    n_layers = len(model.model.language_model.layers)
    # hybrid: VisPruner before the LLM, then merge-only PuMer stages (also independent of the text)
    apply_pumer(model, method="vispruner", ratio=0.25, layers=layers, merge_share=1.0 if layers else None)
    cached, stats = assert_cached_equals_recomputed(model, inp, **GEN)
    expect = [4] * n_layers if layers is None else [10, 10, 6, 6, 4, 4]  # 16 -> 10 -> 6 -> 4
    assert stats.visual_tokens_per_layer == [[v, v] for v in expect]
    assert -1 in stats.kept_patches and all(len(p) == expect[0] for p in stats.kept_patches[-1])
    total = inp["input_ids"].shape[1] + GEN["max_new_tokens"] - 1
    assert [layer.keys.shape[-2] for layer in cached.past_key_values.layers] == [total - (N_VIS - v) for v in expect]


@pytest.mark.parametrize("kind", BACKBONES)
def test_padded_batch_equals_single_samples(kind):
    model = tiny_llava(kind)
    inp = make_inputs((2, 7, 4), (6, 2, 3), seed=3)
    apply_pumer(model, method="vispruner", ratio=0.25)
    with torch.no_grad():
        batch = model.generate(**inp, **GEN)[:, -GEN["max_new_tokens"] :]
        kept = model.pumer.last_stats.kept_patches[-1]
        for i in range(3):
            one = model.generate(**alone(inp, i), **GEN)[:, -GEN["max_new_tokens"] :]
            assert torch.equal(batch[i], one[0])
            assert model.pumer.last_stats.kept_patches[-1][0] == kept[i]


def test_cls_score_equals_eager_vision_attention():
    model = tiny_llava("llama")
    model.model.vision_tower.set_attn_implementation("eager")
    inp = make_inputs((3, 6), (5, 4))
    apply_pumer(model, method="vispruner", ratio=0.25)
    with torch.no_grad():
        model(**inp)
        got = model.pumer.importance  # (n_img, P)
        out = model.model.vision_tower(inp["pixel_values"], output_attentions=True)
    # vision_feature_layer=-2 selects hidden_states[-2], the output of encoder layer -2
    want = out.attentions[-2][:, :, 0, 1:].mean(1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_importance_picks_the_top_cls_tokens():
    model = tiny_llava("llama")
    inp = make_inputs((3,), (5,))
    apply_pumer(model, method="vispruner", keep_tokens=4, important_ratio=1.0)
    with torch.no_grad():
        model(**inp)
    top = model.pumer.importance[0].topk(4).indices.sort().values.tolist()
    assert model.pumer.last_stats.kept_patches[-1] == [top]


def test_diversity_removes_exact_duplicates_first():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 8, generator=g)
    # duplicates at same-parity positions (the reference's alternating split never pairs them)
    x[:, 6], x[:, 9], x[:, 10] = x[:, 2], x[:, 3], x[:, 3]
    keep = remove_duplicates(x, 8)
    assert keep.tolist() == [[0, 1, 2, 3, 4, 5, 7, 8]] * 2


@pytest.mark.parametrize("n", [1, 2, 7, 8, 13, 64])
def test_diversity_count_is_exact_for_odd_and_even(n):
    x = torch.randn(3, n, 6, generator=torch.Generator().manual_seed(n))
    for target in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        target = max(0, min(n, target))
        keep = remove_duplicates(x, target)
        assert keep.shape == (3, target)
        for row in keep.tolist():
            assert len(set(row)) == target and row == sorted(row) and all(0 <= i < n for i in row)
    with pytest.raises(ValueError, match="target must be in"):
        remove_duplicates(x, n + 1)


def test_bad_vispruner_arguments():
    model = tiny_llava("llama")
    with pytest.raises(ValueError, match=r"important_ratio must be in \[0, 1\]"):
        apply_pumer(model, method="vispruner", important_ratio=1.5)
    with pytest.raises(ValueError, match="method 'pumer' takes the options merge_share, merge_rule, prop_attn, merge_window, merge_threshold, merge_metric, merge_text; got unknown 'important_ratio'"):
        apply_pumer(model, method="pumer", important_ratio=0.5)
    model.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match="single vision_feature_layer"):
        apply_pumer(model, method="vispruner")
    assert not hasattr(model, "pumer")


# ----------------------------------------------------------------------------- towers without a [CLS]


def _full_strategy_llava():
    model = tiny_llava("llama")
    model.config.vision_feature_select_strategy = "full"  # the [CLS] is one more visual token
    return model, -2


def _onevision():
    return tiny_onevision(), -1  # SigLIP: no [CLS]; OneVision reads the last layer


@pytest.mark.parametrize("build", [_onevision, _full_strategy_llava], ids=["siglip", "clip-full"])
def test_mean_received_attention_equals_eager_vision_attention(build):
    """Without a [CLS] query, importance is the attention each token receives, mean over heads and queries."""
    model, layer = build()
    model.model.vision_tower.set_attn_implementation("eager")
    apply_pumer(model, method="vispruner", ratio=0.25)
    assert not model.pumer.adapter.vision_parts(model).has_cls
    pixel = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.model.vision_tower(pixel, output_attentions=True)  # the hook scores this call too
    want = out.attentions[layer].mean(1).mean(1)  # (n_img, N): heads, then queries
    assert model.pumer.importance.shape == want.shape  # every token the projector reads, [CLS] included
    torch.testing.assert_close(model.pumer.importance, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(want.sum(-1), torch.ones(3))


ANYRES = {"llava_next": (tiny_llava_next, make_next_inputs), "llava_onevision": (tiny_onevision, make_onevision_inputs)}


@pytest.mark.parametrize("arch", list(ANYRES))
def test_vispruner_on_anyres_batch(arch):
    """Two anyres images (base view + crops, unpadded, newline tokens) of different counts in one
    batch: each crop's own attention, mapped onto the packed tokens."""
    build, make = ANYRES[arch]
    model = build()
    inp, counts = make(model)
    n_layers = len(model.model.language_model.layers)
    with torch.no_grad():
        ref = model(**inp).logits
        apply_pumer(model, method="vispruner", ratio=1.0)
        assert (model(**inp).logits - ref).abs().max().item() <= 1e-5
    apply_pumer(model, method="vispruner", ratio=0.25)
    cached, stats = assert_cached_equals_recomputed(model, inp, **GEN)
    keep = [round(c * 0.25) for c in counts]
    assert stats.visual_tokens_total == counts and stats.visual_tokens_per_layer == [keep] * n_layers
    assert [len(p) for p in stats.kept_positions[-1]] == keep
    for b, pos in enumerate(stats.kept_positions[-1]):
        assert all(inp["input_ids"][b, p] == model.config.image_token_id for p in pos)
    with torch.no_grad():
        for i in range(len(counts)):
            one = model.generate(**alone(inp, i), **GEN)
            assert torch.equal(cached.sequences[i, -GEN["max_new_tokens"] :], one[0, -GEN["max_new_tokens"] :])


def test_vispruner_keeps_the_most_attended_onevision_patches():
    """importance_ratio=1: the kept tokens are the top of the tower's mean received attention, mapped
    through OneVision's packing (base view first, then the crop grid with a newline per row)."""
    model = tiny_onevision()
    inp, counts = make_onevision_inputs(model, sizes=((IMAGE_SIZE, IMAGE_SIZE),), prefix_lens=(3,), suffix_lens=(4,))
    apply_pumer(model, method="vispruner", keep_tokens=6, important_ratio=1.0)
    with torch.no_grad():
        model(**inp)
    imp = model.pumer.importance  # (2 views, 16 patches): base view, one crop
    side = IMAGE_SIZE // PATCH
    crop = torch.cat([imp[1].view(side, side), torch.full((side, 1), float("-inf"))], 1).flatten()  # newline per row
    per_token = torch.cat([imp[0], crop])  # the order OneVision packs them in
    assert per_token.shape[0] == counts[0]
    want = per_token.topk(6).indices.sort().values.tolist()
    assert model.pumer.last_stats.kept_patches[-1] == [want]


def test_vispruner_refuses_interpolated_tokens_clearly():
    """OneVision downscales large crop grids (anyres_max) and pools video frames: no patch -> token map."""
    model = tiny_onevision(aspect="anyres_max_1")  # a 64x64 image's 8x8 grid is downscaled to 4x4
    inp, _ = make_onevision_inputs(model, sizes=((2 * IMAGE_SIZE, 2 * IMAGE_SIZE),), prefix_lens=(3,), suffix_lens=(4,))
    apply_pumer(model, method="vispruner", ratio=0.25)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="vispruner: .* interpolated"):
        model(**inp)
    model = tiny_onevision()
    apply_pumer(model, method="vispruner", ratio=0.25)
    video, _ = make_video_inputs()
    with torch.no_grad(), pytest.raises(NotImplementedError, match="pools video frames"):
        model(**video)


@pytest.mark.parametrize("arch", ["llava", *ANYRES])
def test_per_image_tower_reads_equal_the_per_image_rows_of_the_batch_view(arch):
    """``importance / tower_keys / tower_features(per_image=True)`` read the tower straight into
    per-image rows; they must equal ``ctx.per_image`` of the (B, N) view, loose anyres newlines
    (-inf importance, zero keys) and the padding of shorter images included; the features (one
    view per image only) on LLaVA."""
    from pumer_llava import Method, MethodOptions, register_method
    from pumer_llava.methods import METHODS
    from pumer_llava.methods.base import Choice

    seen = []
    features = arch == "llava"

    def before_llm(ctx):
        for read in (ctx.importance, ctx.tower_keys) + ((ctx.tower_features,) if features else ()):
            direct, via_batch = read(per_image=True), ctx.per_image(read())
            seen.append(direct.shape)
            valid = ~ctx.image_pad if ctx.image_pad is not None else torch.ones(direct.shape[:2], dtype=torch.bool)
            assert direct.shape == via_batch.shape
            assert torch.equal(direct[valid], via_batch[valid])
        return Choice(keep=torch.arange(ctx.out_max).expand(len(ctx.counts), -1))

    register_method(Method(name="tower_reads", description="test", options=MethodOptions, before_llm=before_llm,
                           needs=frozenset({"vision", "tower_features"} if features else {"vision"})))
    try:
        if arch == "llava":
            model, inp = tiny_llava("llama"), make_inputs((3, 6), (5, 4))
        else:
            build, make = ANYRES[arch]
            model = build()
            inp, _ = make(model)
        apply_pumer(model, method="tower_reads", ratio=0.5)
        with torch.no_grad():
            model(**inp)
        assert len(seen) == (3 if features else 2)
    finally:
        METHODS.pop("tower_reads", None)
        remove_pumer(model)
