"""Several images in one prompt: each image is scored and budgeted on its own."""

import pytest
import torch

from pumer_llava import apply_pumer, remove_pumer
from pumer_llava.reduce import plan_stages
from pumer_llava.hooks.layout import PromptLayout
from tiny import IMAGE_SIZE, IMAGE_TOKEN, N_VIS, TEXT_BLIND, VOCAB, _left_pad, alone, assert_cached_equals_recomputed, tiny_llava

GEN = dict(do_sample=False, max_new_tokens=5)


def _multi_image_inputs(layouts=(("t3", "i", "t3", "i", "i", "t5"), ("t2", "i", "t6")), seed=0):
    """Left-padded batch; "i" is one image (N_VIS tokens), "tK" K text tokens. Two "i" in a row are
    adjacent images with nothing between them. Returns the inputs and each image's positions."""
    g = torch.Generator().manual_seed(seed)
    seqs, spans = [], []
    for layout in layouts:
        parts, pos, mine = [], 0, []
        for item in layout:
            n = N_VIS if item == "i" else int(item[1:])
            parts.append(torch.full((n,), IMAGE_TOKEN) if item == "i" else torch.randint(5, VOCAB, (n,), generator=g))
            if item == "i":
                mine.append(list(range(pos, pos + n)))
            pos += n
        seqs.append(torch.cat(parts))
        spans.append(mine)
    ids, mask = _left_pad(seqs)
    pad = [ids.shape[1] - len(s) for s in seqs]
    spans = [[[p + pad[b] for p in img] for img in imgs] for b, imgs in enumerate(spans)]
    n_img = sum(len(s) for s in spans)
    pixel = torch.randn(n_img, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel}, spans


def _kept_per_image(positions, spans):
    return [[len(set(img) & set(positions[b])) for img in imgs] for b, imgs in enumerate(spans)]


def test_the_layout_cuts_adjacent_fixed_size_images_and_modalities():
    imgs = PromptLayout([[9, 3, 3, 3, 3, 9, 3, 3, 4, 4, 9]], {3, 4}, per_image=2)
    assert imgs.code == [[-1, 0, 0, 1, 1, -1, 2, 2, 3, 3, -1]]  # text is -1, visual tokens their image
    assert [im.end for im in imgs.images] == [2, 4, 7, 9] and imgs.counts == [2, 2, 2, 2]
    assert [im.sample for im in imgs.images] == [0] * 4


@pytest.mark.parametrize("method", ["pumer", "fastv", "random", "vispruner"])
def test_every_image_keeps_its_own_budget_at_every_stage(method):
    model = tiny_llava("qwen2")
    inp, spans = _multi_image_inputs()
    with torch.no_grad():
        ref = model(**inp).logits
        apply_pumer(model, ratio=1.0, method=method)
        assert (model(**inp).logits - ref).abs().max().item() <= 1e-5
    apply_pumer(model, ratio=0.25, method=method, **(TEXT_BLIND if method == "pumer" else {}))
    if method in ("pumer", "vispruner"):  # merge-only / before the LLM: independent of the generated text
        cached, stats = assert_cached_equals_recomputed(model, inp, **GEN)
    else:
        with torch.no_grad():
            cached = model.generate(**inp, **GEN, return_dict_in_generate=True)
        stats = model.pumer.last_stats
    layers = model.pumer.layers
    n_stages = len(layers) + (1 if method == "vispruner" else 0)
    plans = plan_stages(N_VIS, round(N_VIS * 0.25), n_stages, model.pumer.merge_share)
    keys = ([-1] if method == "vispruner" else []) + list(layers)
    assert sorted(stats.kept_positions) == sorted(keys)
    for s, key in enumerate(keys):
        want = plans[s].n_out if method != "vispruner" or s else plans[0].n_in - plans[0].prune - plans[0].merge
        assert _kept_per_image(stats.kept_positions[key], spans) == [[want] * len(imgs) for imgs in spans]
    assert stats.visual_tokens_final == [round(N_VIS * 0.25) * len(imgs) for imgs in spans]
    with torch.no_grad():
        for i in range(len(spans)):
            one = model.generate(**_alone(inp, spans, i), **GEN)
            assert torch.equal(cached.sequences[i, -GEN["max_new_tokens"] :], one[0, -GEN["max_new_tokens"] :])
    remove_pumer(model)
    with torch.no_grad():
        assert (model(**inp).logits - ref).abs().max().item() <= 1e-5


def _alone(inp, spans, i):
    out = alone({k: v for k, v in inp.items() if k != "pixel_values"}, i)
    start = sum(len(s) for s in spans[:i])
    out["pixel_values"] = inp["pixel_values"][start : start + len(spans[i])]
    return out


def test_each_image_is_scored_by_the_text_after_it():
    """PuMer's pruning at its first layer equals, per image, the top of the eager attention that
    the text after *that* image gives it (heads and rows averaged)."""
    model = tiny_llava("llama", attn="eager")
    inp, spans = _multi_image_inputs(layouts=(("t3", "i", "t4", "i", "t2", "i", "t5"),))
    layer, keep = 2, 5
    with torch.no_grad():
        att = model(**inp, output_attentions=True).attentions[layer][0].mean(0)  # (N, N): query x key
    ids = inp["input_ids"][0]
    text = (ids != IMAGE_TOKEN).nonzero()[:, 0]
    want = []
    for img in spans[0]:
        rows = text[text > img[-1]]
        score = att[rows][:, img].mean(0)
        want += sorted(img[j] for j in score.topk(keep).indices.tolist())
    apply_pumer(model, keep_tokens=keep, layers=[layer], merge_share=0.0)
    with torch.no_grad():
        model(**inp)
    assert model.pumer.last_stats.kept_positions[layer] == [want]


@pytest.mark.parametrize("layouts, lean_per_sample", [
    # the text before each sample's first image counts for no visual token: 3 + 5 rows and 6, padded to 8
    ((("t3", "i", "t3", "i", "i", "t5"), ("t2", "i", "t6")), 8),
    # sample 0 ends with an image, which all its text reads: its 5 rows; sample 1's 3 after its image
    ((("t3", "i", "t2", "i"), ("t4", "i", "t3")), 5),
])
def test_pumer_projects_only_the_query_rows_that_score_an_image(monkeypatch, layouts, lean_per_sample):
    """The text before a sample's first image counts for no visual token: PuMer's scoring skips
    those rows (fewer q projections and scores) and chooses exactly what all the rows choose."""
    from pumer_llava.hooks.prefill import Prefill

    model = tiny_llava("qwen2")
    inp, _ = _multi_image_inputs(layouts)
    apply_pumer(model, ratio=0.25, method="pumer")
    orig, rows = Prefill._query_rows, []

    def run(trim: bool):
        def spy(self, slots, kind, scoring_only=False):
            q = orig(self, slots, kind, scoring_only and trim)
            rows.append(q.flat.numel())
            return q

        monkeypatch.setattr(Prefill, "_query_rows", spy)
        rows.clear()
        with torch.no_grad():
            logits = model(**inp).logits
        return logits, model.pumer.last_stats.kept_positions, list(rows)

    lean, kept, lean_rows = run(True)
    full, kept_full, full_rows = run(False)
    assert kept == kept_full
    assert (lean - full).abs().max().item() <= 1e-6
    assert len(lean_rows) == len(model.pumer.layers) == 3
    text = [sum(1 for item in lay if item != "i" for _ in range(int(item[1:]))) for lay in layouts]
    assert full_rows == [len(layouts) * max(text)] * 3
    assert lean_rows == [len(layouts) * lean_per_sample] * 3
