"""VisPruner: reduction before the first decoder layer from the vision tower's cues."""

import pytest
import torch

from pumer_llava import apply_pumer, remove_pumer
from pumer_llava.reduce.diversity import remove_duplicates
from tiny import N_VIS, alone, assert_cached_equals_recomputed, make_inputs, tiny_llava

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
    with pytest.raises(ValueError, match="important_ratio applies to vispruner only"):
        apply_pumer(model, method="pumer", important_ratio=0.5)
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        apply_pumer(model, method="vispruner")
    assert not hasattr(model, "pumer")
