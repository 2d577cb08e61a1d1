"""LLaVA-OneVision specifics: video tokens (the shared equivalence body is in test_architectures.py)."""

import torch

from pumer_llava import apply_pumer, remove_pumer
from tiny import TEXT_BLIND, VIDEO_TOKEN, assert_cached_equals_recomputed, make_video_inputs, tiny_onevision

GEN = dict(do_sample=False, max_new_tokens=5)


def test_video_tokens_are_reduced_and_counted():
    model = tiny_onevision()
    inp, n_vis = make_video_inputs(frames=3)
    with torch.no_grad():
        ref = model(**inp).logits
        apply_pumer(model, ratio=1.0)
        assert (model(**inp).logits - ref).abs().max().item() <= 1e-5
        apply_pumer(model, ratio=0.25, **TEXT_BLIND)
    _, stats = assert_cached_equals_recomputed(model, inp, **GEN)
    assert stats.visual_tokens_total == [n_vis] and stats.visual_tokens_final == [round(n_vis * 0.25)]
    video_pos = (inp["input_ids"][0] == VIDEO_TOKEN).nonzero()[:, 0].tolist()
    final = stats.kept_positions[max(stats.kept_positions)][0]
    assert len(final) == round(n_vis * 0.25) and set(final) <= set(video_pos)
    remove_pumer(model)
    with torch.no_grad():
        assert (model(**inp).logits - ref).abs().max().item() <= 1e-5
