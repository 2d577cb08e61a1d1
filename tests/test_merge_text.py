"""PuMer's modality-aware text merging (``merge_text``): text merges only with text of its own
run, never the first token or the last prompt token, counts exact, and generate() agrees
with itself in every mode."""

from __future__ import annotations

import pytest
import torch

from pumer_llava import apply_pumer
from pumer_llava.hooks import prefill
from pumer_llava.hooks.layout import PromptLayout, Segment, text_segments
from pumer_llava.reduce import plan_stages
from tiny import (
    IMAGE_TOKEN,
    N_VIS,
    alone_mixed,
    assert_cached_equals_recomputed,
    make_inputs,
    make_mixed_inputs,
    tiny_llava,
)

GEN = dict(max_new_tokens=5, do_sample=False)


def last_prefill(monkeypatch) -> list:
    """The prefills of the forwards that follow (the runtime clears its own reference)."""
    seen = []
    finish = prefill.Prefill.finish

    def spy(self, output):
        seen.append(self)
        return finish(self, output)

    monkeypatch.setattr(prefill.Prefill, "finish", spy)
    return seen


def test_text_runs_stop_at_images_padding_and_the_prompt_ends():
    img = IMAGE_TOKEN
    ids = [
        [-1, -1, 1, 5, 6, img, img, 7, 8, 9, 10],  # left padded: BOS, run, image, run, last token
        [1, 5, img, img, 6, 7, img, img, 8, 9, -1],  # two images, right padded
        [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],  # no image: never merged
    ]
    layout = PromptLayout(ids, {img}, None)
    assert text_segments(layout, 11) == [Segment(0, 3, 4), Segment(0, 7, 9), Segment(1, 4, 5)]
    # a shorter prompt (the rest are a speculative decoder's candidates): its last token ends the run
    assert text_segments(layout, 9) == [Segment(0, 3, 4), Segment(1, 4, 5)]


def _plans(layers, counts, share):
    """Per text run, the merges of each stage (as ``plan_text`` makes them)."""
    out = []
    for n in counts:
        keep = n - min(round(n * share), n // 2)
        out.append([p.merge for p in plan_stages(n, keep, len(layers), 1.0)] if keep < n else [0] * len(layers))
    return out


@pytest.mark.parametrize("share", [0.25, 0.5])
def test_exact_counts_and_text_merges_only_within_its_run(share, monkeypatch):
    model = tiny_llava("llama")
    inp = make_inputs((3, 6), (5, 7))  # left padded rows of 3 + 16 + 5 and 6 + 16 + 7 tokens
    layers = [1, 2, 3]
    seen = []
    real = prefill.merge_pairs

    def spy(x, size, src, dst, weight=None):
        pos = model.pumer.call.tokens.pos.reshape(-1)  # during the forward
        seen.append((pos[src], pos[dst], src // x.shape[1]))
        return real(x, size, src, dst, weight)

    monkeypatch.setattr(prefill, "merge_pairs", spy)
    prefills = last_prefill(monkeypatch)
    apply_pumer(model, ratio=0.25, merge_text=share, layers=layers)
    with torch.no_grad():
        model(**inp)
    stats = model.pumer.last_stats
    pre = prefills[-1]
    ids = inp["input_ids"]
    # runs: after BOS up to the image; after the image up to (not including) the last token
    n0 = ids.shape[1]
    starts = [n0 - (3 + N_VIS + 5), n0 - (6 + N_VIS + 7)]
    want = [Segment(0, starts[0] + 1, starts[0] + 2), Segment(0, starts[0] + 3 + N_VIS, n0 - 2),
            Segment(1, 1, 5), Segment(1, 6 + N_VIS, n0 - 2)]
    assert list(pre.segments) == want
    text_plans = _plans(layers, [sg.count for sg in want], share)
    vis = plan_stages(N_VIS, 4, len(layers), model.pumer.merge_share)
    valid = inp["attention_mask"].sum(1).tolist()
    for i, per_sample in enumerate(stats.tokens_per_layer):
        s = sum(1 for l in layers if l <= i)  # stages done before layer i runs
        removed_vis = 0 if s == 0 else N_VIS - vis[s - 1].n_out
        removed_txt = [sum(sum(p[:s]) for sg, p in zip(want, text_plans) if sg.sample == b) for b in range(2)]
        assert per_sample == [valid[b] - removed_vis - removed_txt[b] for b in range(2)]
    assert stats.visual_tokens_final == [4, 4]
    # every text merge stays inside one run; the visual ones inside the image
    runs = {(sg.sample, p): j for j, sg in enumerate(want) for p in range(sg.start, sg.end + 1)}
    n_text = 0
    for ps, pd, rows in seen:
        for a, b, r in zip(ps.tolist(), pd.tolist(), rows.tolist()):
            if (r, a) in runs:
                assert runs.get((r, b)) == runs[(r, a)], (r, a, b)
                n_text += 1
            else:
                assert (r, b) not in runs
    assert n_text == sum(map(sum, text_plans))
    # FLOPs count the shorter text
    flops = stats.flops
    apply_pumer(model, ratio=0.25, layers=layers)
    with torch.no_grad():
        model(**inp)
    assert flops < model.pumer.last_stats.flops


def test_sizes_add_up_to_the_input_and_labels_at_merged_text_are_never_scored(monkeypatch):
    model = tiny_llava("llama")
    prefills = last_prefill(monkeypatch)
    inp = make_inputs((3, 6), (5, 7))
    apply_pumer(model, ratio=0.25, merge_text=0.5, merge_share=1.0, merge_rule="bipartite", merge_threshold=None,
                layers=[1, 2])
    labels = inp["input_ids"].masked_fill(inp["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**inp, labels=labels)
    pre = prefills[-1]
    tok = pre.tokens
    # merge only (every removed token merged somewhere): the sizes of what is left sum to the input
    assert tok.size[tok.valid].sum().item() == pytest.approx(float(inp["attention_mask"].sum()))
    present = pre.present()
    gone_text = [(sg.sample, p) for sg in pre.segments for p in range(sg.start, sg.end + 1)
                 if not bool(present[sg.sample, p])]
    assert gone_text  # some text merged away
    # a prediction made at a merged-away position is not the model's: the loss skips it
    masked = labels.clone()
    masked[:, 1:] = masked[:, 1:].masked_fill(~present[:, :-1], -100)
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), masked[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cached_decoding_equals_recomputation_and_batch_equals_one_by_one(kind):
    model = tiny_llava(kind)
    apply_pumer(model, ratio=0.25, merge_text=0.5)
    inp, images = make_mixed_inputs()
    cached, stats = assert_cached_equals_recomputed(model, inp, **GEN)
    batch = cached.sequences[:, -GEN["max_new_tokens"]:]
    for i in range(len(images)):
        with torch.no_grad():
            one = model.generate(**alone_mixed(inp, images, i), **GEN)[:, -GEN["max_new_tokens"]:]
        assert torch.equal(batch[i], one[0]), i
    # the sample without an image is left alone: all its tokens at every layer
    assert {row[2] for row in stats.tokens_per_layer} == {int(inp["attention_mask"][2].sum())}


def test_beams_and_sampling_with_cache_equal_without():
    model = tiny_llava("llama")
    inp = make_inputs((3, 6), (5, 2))
    apply_pumer(model, ratio=0.25, merge_text=0.5)
    with torch.no_grad():
        a = model.generate(**inp, num_beams=3, do_sample=False, max_new_tokens=5)
        b = model.generate(**inp, num_beams=3, do_sample=False, max_new_tokens=5, use_cache=False)
        torch.manual_seed(0)
        c = model.generate(**inp, do_sample=True, top_k=5, max_new_tokens=5)
        torch.manual_seed(0)
        d = model.generate(**inp, do_sample=True, top_k=5, max_new_tokens=5, use_cache=False)
    assert torch.equal(a, b) and torch.equal(c, d)


def test_merge_text_is_checked_before_the_model_is_touched():
    model = tiny_llava("llama")
    with pytest.raises(ValueError, match=r"merge_text must be in \[0, 0.5\]"):
        apply_pumer(model, merge_text=0.6)
    with pytest.raises(ValueError, match="merge_text merges the prompt's text inside the language model"):
        apply_pumer(model, method="vispruner", merge_text=0.25)
    with pytest.raises(ValueError, match="method 'fastv' takes no options; got unknown 'merge_text'"):
        apply_pumer(model, method="fastv", merge_text=0.25)
    assert not hasattr(model, "pumer")
    apply_pumer(model, method="vispruner", merge_text=0.25, layers=[2])  # with a stage inside the LLM
    assert model.pumer.to_dict()["merge_text"] == 0.25
