"""What the reduction costs per prefill and per decode step: operators, kernels, host syncs.

Counted with :class:`pumer_llava.counting.OpCounter` on a 32-layer tiny LLaVA (ratio 0.25,
each method at its default layers). These are counts, not timings: they pin what a GPU pays
in launches and stalls, so a change that adds a sync or a per-layer op fails here.
"""

from __future__ import annotations

import pytest
import torch

from pumer_llava import apply_pumer, remove_pumer
from pumer_llava.counting import OpCounter
from pumer_llava.methods import get_method
from pumer_llava.hooks import layout as layout_mod
from pumer_llava.hooks.layout import FILLER, PAD, TEXT, PromptLayout
from tiny import IMAGE_TOKEN, N_VIS, make_inputs, make_mixed_inputs, tiny_llava

# prefill ops (all dispatched operators) of a reducing prefill over the unpatched one, at most
PREFILL_OPS = {"pumer": 1.15, "fastv": 1.04, "random": 1.03, "vispruner": 1.07, "visionzip": 1.08, "divprune": 1.05,
               "cdpruner": 1.07, "dart": 1.07, "pyramiddrop": 1.08, "sparsevlm": 1.23}


def test_every_method_has_its_counts_pinned():
    from pumer_llava import list_methods

    assert sorted(PREFILL_OPS) == list_methods()
DECODE_OPS = 1.02  # every method, prop-attn on for PuMer


@pytest.fixture(scope="module")
def deep():
    return tiny_llava(layers=32).eval()


def _counts(model, inp):
    """(prefill counter, decode-step counter) of one forward and one step after it."""
    with torch.no_grad():
        with OpCounter() as pre:
            out = model(**inp, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inp["attention_mask"], torch.ones_like(nxt)], 1)
        with OpCounter() as dec:
            model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    return pre, dec


@pytest.fixture(scope="module")
def baseline(deep):
    inp = make_inputs(prefix_lens=(3, 5), suffix_lens=(6, 4))
    _counts(deep, inp)  # warm: lazy imports and caches of transformers itself
    return inp, _counts(deep, inp)


@pytest.mark.parametrize("method", sorted(PREFILL_OPS))
def test_prefill_and_decode_counts(deep, baseline, method):
    inp, (pre0, dec0) = baseline
    apply_pumer(deep, ratio=0.25, method=method)
    try:
        layout_mod._PLANS.clear()
        cold, _ = _counts(deep, inp)  # a prompt shape never seen: its plans are built and copied
        pre, dec = _counts(deep, inp)  # seen before: its plans are reused
        stages = len(deep.pumer.layers) + int(deep.pumer.method.before_llm is not None)
        assert deep.pumer.last_stats.visual_tokens_final == [4, 4]
    finally:
        remove_pumer(deep)
    # one read of the ids before the first layer; nothing else waits for the device
    assert cold.syncs <= pre0.syncs + 2 and pre.syncs <= pre0.syncs + 2, (cold.sync_ops, pre.sync_ops)
    assert cold.sync_ops.get("tolist") == 1 and "nonzero" not in cold.sync_ops
    assert pre.ops <= PREFILL_OPS[method] * pre0.ops, (method, pre.ops / pre0.ops)
    assert pre.kernels <= PREFILL_OPS[method] * pre0.kernels, (method, pre.kernels / pre0.kernels)
    # building plans costs Python, a copy per stage (and the views of its parts), the query rows'
    # masks computed once from their positions, no sync
    assert cold.kernels <= pre.kernels + 10 * stages, (cold.kernels, pre.kernels)
    # nothing to upload from the host once the plans exist (on a GPU each host tensor is a copy),
    # but the random control's seeded scores (made on the host per sample, uploaded non-blocking)
    assert pre.host_tensors == pre0.host_tensors + (inp["input_ids"].shape[0] if method == "random" else 0)
    # a decode step: a few ops per stage (positions and sizes appended), none per layer
    assert dec.syncs == dec0.syncs and dec.host_tensors == dec0.host_tensors
    assert dec.ops <= DECODE_OPS * dec0.ops, (method, dec.ops / dec0.ops)
    assert dec.kernels <= DECODE_OPS * dec0.kernels, (method, dec.kernels / dec0.kernels)


def test_pumer_prop_attn_decode_is_per_stage(deep, baseline):
    inp, (_, dec0) = baseline
    apply_pumer(deep, ratio=0.25, method="pumer", prop_attn=True)
    try:
        assert deep.pumer.prop_attn
        stages = len(deep.pumer.layers)
        _, dec = _counts(deep, inp)
    finally:
        remove_pumer(deep)
    assert stages == 3 and dec.kernels - dec0.kernels <= 4 * stages, dec.kernels - dec0.kernels


@pytest.mark.parametrize("method", ["pumer", "fastv", "vispruner"])
def test_ragged_batches_do_not_sync(deep, method):
    """Rows of different lengths and images per row (one, two, none): still one read of the ids."""
    inp, _ = make_mixed_inputs()
    with torch.no_grad(), OpCounter() as base:
        deep(**inp, use_cache=True)
    apply_pumer(deep, ratio=0.25, method=method)
    try:
        layout_mod._PLANS.clear()
        with torch.no_grad(), OpCounter() as c:
            deep(**inp, use_cache=True)
        stats = deep.pumer.last_stats
    finally:
        remove_pumer(deep)
    assert c.syncs <= base.syncs + 2, c.sync_ops
    assert stats.visual_tokens_final == [4, 8, 0]


def test_statistics_are_built_when_read(deep, baseline):
    inp, _ = baseline
    apply_pumer(deep, ratio=0.25, method="pumer")
    try:
        with torch.no_grad():
            deep(**inp, use_cache=True)
        stats = deep.pumer.last_stats
        assert "_builder" in stats.__dict__  # nothing read from the device yet
        with OpCounter() as c:
            kept = stats.kept_patches
        assert c.sync_ops.get("tolist", 0) >= 1  # reading them is when the device is waited for
        assert sorted(kept) == list(deep.pumer.layers) and all(len(p) == 4 for p in kept[deep.pumer.layers[-1]])
        assert stats.select_seconds > 0 and 0 < stats.flops_ratio < 1
    finally:
        remove_pumer(deep)


EARLIER = [m for m in sorted(PREFILL_OPS) if get_method(m).score_offset < 0]


def _k_proj_calls(model, layer: int, inp, **kw) -> tuple[int, torch.Tensor, list]:
    """How many times layer ``layer``'s k projection runs in one forward; its logits and the
    kept positions."""
    k_proj = model.model.language_model.layers[layer].self_attn.k_proj
    calls = []
    model.pumer.prompt = None  # choose anew (a forward without a cache would reuse the last prompt's choice)
    h = k_proj.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            out = model(**inp, use_cache=kw.get("use_cache", True))
    finally:
        h.remove()
    return len(calls), out.logits, model.pumer.last_stats.kept_positions


@pytest.mark.parametrize("method", EARLIER)
@pytest.mark.parametrize("use_cache", [True, False])
def test_a_method_scoring_at_an_earlier_layer_reads_that_layer_s_own_keys(deep, baseline, method, use_cache, monkeypatch):
    """FastV, DART, SparseVLM score at layer L-1 and prune at L: the keys of every slot are the
    ones layer L-1 projects anyway (its k projection runs once, not once more for the scoring),
    with or without a cache, and the choice is the one projecting them again gives."""
    from pumer_llava.hooks.prefill import Prefill

    inp, _ = baseline
    apply_pumer(deep, ratio=0.25, method=method)
    try:
        score_layer = deep.pumer.layers[0] - 1
        calls, logits, kept = _k_proj_calls(deep, score_layer, inp, use_cache=use_cache)
        assert calls == 1
        assert not deep.model.language_model.layers[score_layer].self_attn.k_proj._forward_hooks  # one-shot
        monkeypatch.setattr(Prefill, "_tap", lambda self, layer, module: None)  # project them again
        calls_again, logits_again, kept_again = _k_proj_calls(deep, score_layer, inp, use_cache=use_cache)
    finally:
        remove_pumer(deep)
    assert calls_again == 2 and kept_again == kept
    torch.testing.assert_close(logits, logits_again, rtol=1e-5, atol=1e-5)


def test_a_forward_that_raises_mid_prefill_leaves_no_hook(deep, baseline):
    """The tap is a hook that removes itself when the layer projects; a forward that raises
    before that point leaves it to the next call (or ``remove_pumer``) to remove."""
    inp, _ = baseline
    apply_pumer(deep, ratio=0.25, method="fastv")
    attn = deep.model.language_model.layers[deep.pumer.layers[0] - 1].self_attn

    def boom(*a):
        raise RuntimeError("stop")

    try:
        for finish in ("next forward", "remove_pumer"):
            h = attn.q_proj.register_forward_pre_hook(boom)  # Llama projects q before k
            with pytest.raises(RuntimeError, match="stop"), torch.no_grad():
                deep(**inp, use_cache=True)
            h.remove()
            assert len(attn.k_proj._forward_hooks) == 1  # the tap that never fired
            if finish == "next forward":
                with torch.no_grad():
                    deep(**inp, use_cache=True)
                assert deep.pumer.last_stats.visual_tokens_final == [4, 4]
            else:
                remove_pumer(deep)
            assert not attn.k_proj._forward_hooks
    finally:
        remove_pumer(deep)


def test_copies_between_the_host_and_a_device_count_as_syncs():
    # "meta" stands in for a GPU on a machine without one: a copy to it crosses devices
    host = torch.arange(4)
    with OpCounter() as c:
        host.to("meta")  # blocking: waits for the device's queue
        host.to("meta", non_blocking=True)  # from pageable memory: the driver may wait too
        torch.empty(4, device="meta").copy_(host)
        host.to("cpu")  # no copy
        host.clone()
        torch.tensor([1, 2])  # made from Python data: uploaded, on a GPU
    assert c.syncs == 3 and c.sync_ops == {"_to_copy": 2, "copy_": 1} and c.host_tensors == 1


# ----------------------------------------------------------------------------- the host layout


def test_layout_of_a_padded_batch_with_adjacent_images():
    # row 0: pad, text, two images of 2 tokens each back to back, text; row 1: text, three images
    ids = [[-1, 5, 3, 3, 3, 3, 7, 8], [5, 6, 3, 3, 3, 3, 3, 3]]
    lay = PromptLayout(ids, {3}, per_image=2)
    assert [(im.sample, im.start, im.end, im.count) for im in lay.images] == [
        (0, 2, 3, 2), (0, 4, 5, 2), (1, 2, 3, 2), (1, 4, 5, 2), (1, 6, 7, 2)]
    assert lay.code[0] == [PAD, TEXT, 0, 0, 1, 1, TEXT, TEXT]
    assert lay.valid_n == [7, 8] and lay.visual_n == [4, 6] and lay.vis_start == [2, 2]
    slots = lay.stage([1, 2, 1, 1, 1])  # row 0 keeps 7 slots, row 1 five: two fillers lead row 1
    assert slots.width == 7 and slots.fillers == [0, 2] and slots.has_fillers
    assert slots.code[1] == [FILLER, FILLER, TEXT, TEXT, 2, 3, 4]
    assert slots.start == [2, 3, 4, 5, 6]
    idx, ok, pos = slots.text_rows(n_prompt=8)
    assert idx == [[1, 5, 6], [2, 3, 2]] and ok[1] == [True, True, False] and pos[0] == [1, 6, 7]


def test_an_image_run_is_cut_by_id_and_by_the_fixed_count():
    lay = PromptLayout([[IMAGE_TOKEN] * (2 * N_VIS) + [9, 4, 4]], {IMAGE_TOKEN, 4}, per_image=N_VIS)
    assert [im.count for im in lay.images] == [N_VIS, N_VIS, 2]
    assert lay.stage([1, 2, 1]).width == 1 + 2 + 1 + 1


def _layout_by_loop(ids, visual_ids, per_image):
    """Token by token, as the definition reads: an image is a run of one visual id, cut every
    ``per_image`` tokens; codes: image index, TEXT, PAD (id -1)."""
    images, code = [], []
    for b, row in enumerate(ids):
        codes, run_id, run_start = [], None, 0
        for i, t in enumerate(row):
            if t in visual_ids:
                if t != run_id:
                    run_start = i
                if t != run_id or (per_image and (i - run_start) % per_image == 0):
                    images.append([b, i, i, 0])
                images[-1][2:] = [i, images[-1][3] + 1]
                codes.append(len(images) - 1)
                run_id = t
            else:
                codes.append(PAD if t < 0 else TEXT)
                run_id = None
        code.append(codes)
    return [tuple(im) for im in images], code


@pytest.mark.parametrize("per_image", [None, 3])
def test_the_layout_is_the_token_by_token_definition(per_image):
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        bsz, n = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 30, (1,), generator=g))
        # ids 0..5, with 3 and 4 visual (two kinds side by side), -1 padding
        ids = (torch.randint(-1, 6, (bsz, n), generator=g)).tolist()
        lay = PromptLayout(ids, {3, 4}, per_image)
        images, code = _layout_by_loop(ids, {3, 4}, per_image)
        assert [(im.sample, im.start, im.end, im.count) for im in lay.images] == images
        assert lay.code == code and lay.ids == ids
        assert lay.valid_n == [sum(c != PAD for c in r) for r in code]
        assert lay.visual_n == [sum(c >= 0 for c in r) for r in code]
        assert lay.vis_start == [next((i for i, c in enumerate(r) if c >= 0), 0) for r in code]
    same = PromptLayout([[1, 3, 3, 2]], {3}, None)
    assert same.key == PromptLayout([[5, 3, 3, 0]], {3}, None).key != PromptLayout([[1, 3, 2, 2]], {3}, None).key


def test_host_data_goes_to_a_gpu_pinned_and_without_waiting(monkeypatch):
    from pumer_llava.reduce.host import upload

    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, dev, **kw: calls.append((str(dev), kw)) or self)
    t = torch.arange(3)
    assert upload(t, "cpu") is t and calls == []
    upload(t, "cuda:0")
    assert calls == ["pin", ("cuda:0", {"non_blocking": True})]
