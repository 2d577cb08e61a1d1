"""VisionZip: dominant tokens by the tower's [CLS] attention, the rest folded into contextual tokens."""

import pytest
import torch

from pumer_llava import apply_pumer
from pumer_llava.methods.visionzip import VisionZipOptions
from pumer_llava.reduce.contextual import contextual_tokens
from tiny import image_runs as _image_runs, IMAGE_TOKEN, make_inputs, make_mixed_inputs, tiny_llava, tiny_llava_next, tiny_onevision


def reference(imp, keys, feats, n_dom, n_ctx):
    """The paper's steps on one image's tokens, written as plain loops: (kept, targets, values)."""
    n = imp.shape[0]
    dom = sorted(range(n), key=lambda i: (-float(imp[i]), i))[:n_dom]  # ties: the earlier token
    rest = [i for i in range(n) if i not in dom]  # original order
    if n_ctx == 0:
        return sorted(dom), [], []
    step = max(1, len(rest) // n_ctx)
    targets = [rest[t] for t in range(0, len(rest), step)][:n_ctx]
    kn = keys.float() / keys.float().norm(dim=-1, keepdim=True)
    members = {t: [] for t in targets}
    for i in rest:
        if i in targets:
            continue
        sims = [float(kn[i] @ kn[t]) for t in targets]
        members[targets[sims.index(max(sims))]].append(i)  # first maximum: the earlier target
    values = []
    for t in targets:
        v = feats[t].float().clone()
        if members[t]:
            v += torch.stack([feats[i].float() for i in members[t]]).mean(0)
        values.append(v)
    return sorted(dom + targets), targets, values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contextual_tokens_equal_reference_loop_on_ragged_images(seed):
    g = torch.Generator().manual_seed(seed)
    counts, dom, ctx = [14, 9, 14, 6, 14], [3, 4, 5, 2, 14], [2, 1, 4, 0, 0]
    n_img, m, hk, dv = len(counts), max(counts), 5, 7
    imp = torch.rand(n_img, m, generator=g)
    imp[0, 3] = imp[0, 8]  # a tie in importance
    keys = torch.randn(n_img, m, hk, generator=g)
    feats = torch.randn(n_img, m, dv, generator=g)
    pad = torch.arange(m)[None] >= torch.tensor(counts)[:, None]
    imp[pad] = 2.0  # padding is never dominant, whatever it holds
    out = [d + c for d, c in zip(dom, ctx)]
    keep, targets, values = contextual_tokens(imp, keys, feats, torch.tensor(dom), torch.tensor(ctx), max(out),
                                              max(ctx), pad)
    assert keep.shape == (n_img, max(out)) and targets.shape == (n_img, max(ctx))
    for i, n in enumerate(counts):
        want_keep, want_targets, want_values = reference(imp[i, :n], keys[i, :n], feats[i, :n], dom[i], ctx[i])
        assert keep[i, : out[i]].tolist() == want_keep
        assert targets[i, : ctx[i]].tolist() == want_targets
        if want_values:
            torch.testing.assert_close(values[i, : ctx[i]], torch.stack(want_values), atol=1e-5, rtol=1e-5)


def test_published_split_spacing():
    """576 tokens, 54 + 10: the remaining 522 are split every 52nd (0, 52, ... 468)."""
    n = 576
    imp = torch.zeros(1, n)
    imp[0, :54] = 1.0  # the first 54 dominant
    keys = torch.randn(1, n, 4, generator=torch.Generator().manual_seed(0))
    feats = torch.randn(1, n, 3)
    keep, targets, _ = contextual_tokens(imp, keys, feats, torch.tensor([54]), torch.tensor([10]), 64, 10)
    assert targets[0].tolist() == [54 + 52 * j for j in range(10)]
    assert keep[0].tolist() == list(range(54)) + targets[0].tolist()


# ----------------------------------------------------------------------------- end to end


def _tower_recorder(model):
    """Forward hook on the tower layer the projector reads: its input and output, per call."""
    tower = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    layer = tower.encoder.layers[len(tower.encoder.layers) + model.config.vision_feature_layer]
    seen = []

    def hook(mod, args, kwargs, out):
        h_in = args[0] if args else kwargs["hidden_states"]
        seen.append((h_in.detach(), (out[0] if isinstance(out, tuple) else out).detach()))

    return layer, seen, layer.register_forward_hook(hook, with_kwargs=True)


def _tower_inputs(layer, h_in, h_out):
    """From the recorded layer: the [CLS] attention (head mean), head-mean keys and features of the patches."""
    attn = layer.self_attn
    n, t, _ = h_in.shape
    x = layer.layer_norm1(h_in)
    q = attn.q_proj(x).view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)
    probs = ((q[:, :, :1] @ k.transpose(-1, -2)) * attn.head_dim**-0.5).softmax(-1)  # (n, H, 1, T)
    return probs.mean(1)[:, 0, 1:], k.mean(1)[:, 1:], h_out[:, 1:]


@pytest.mark.parametrize(("keep", "dominant", "mixed"), [(8, 4, True), (13, None, False)],
                         ids=["dominant-4-of-8-multi-image", "published-split-13"])
def test_contextual_tokens_enter_the_llm(keep, dominant, mixed):
    """The kept set and the values at the contextual slots, rebuilt from the tower's own hidden states."""
    model = tiny_llava("llama")
    inp = make_mixed_inputs()[0] if mixed else make_inputs((3, 6), (5, 4))
    apply_pumer(model, method="visionzip", keep_tokens=keep, dominant=dominant)
    layer, seen, handle = _tower_recorder(model)
    entered = []
    lm_layer = model.model.language_model.layers[0]
    h2 = lm_layer.register_forward_pre_hook(lambda m, a, kw: entered.append(a[0] if a else kw["hidden_states"]),
                                            with_kwargs=True)
    with torch.no_grad():
        model(**inp)
        handle.remove(), h2.remove()
        assert len(seen) == 1 and len(entered) == 1
        imp, keys, feats = _tower_inputs(layer, *seen[0])
        proj = model.model.multi_modal_projector
        n_ctx = keep - dominant if dominant is not None else max(1, round(keep * 10 / 64))
        hs, stats = entered[0], model.pumer.last_stats
        image, rebuilt = 0, []
        for b, runs in enumerate(_image_runs(inp["input_ids"])):
            want_pos, want_vals = [], []
            for pos in runs:
                kept, targets, values = reference(imp[image], keys[image], feats[image], keep - n_ctx, n_ctx)
                assert len(kept) == keep and len(targets) == n_ctx
                ctx_of = dict(zip(targets, values))
                for j in kept:
                    want_pos.append(pos[j])
                    want_vals.append(proj(ctx_of[j] if j in ctx_of else feats[image, j]))
                    if j in ctx_of:  # a target with members differs from its own token
                        rebuilt.append(bool((want_vals[-1] - proj(feats[image, j])).abs().max() > 1e-3))
                image += 1
            assert stats.kept_positions[-1][b] == want_pos
            # each expected value is a row entering the first decoder layer, in the kept tokens' order
            rows = [int((hs[b] - v).norm(dim=-1).argmin()) for v in want_vals]
            assert rows == sorted(rows) and len(set(rows)) == len(rows)
            for r, v in zip(rows, want_vals):
                torch.testing.assert_close(hs[b, r], v, atol=1e-5, rtol=1e-5)
        assert image == feats.shape[0] and any(rebuilt)  # the test means something
        per_sample = [keep * len(r) for r in _image_runs(inp["input_ids"])]
        assert stats.visual_tokens_per_layer == [per_sample] * len(model.model.language_model.layers)


def test_dominant_past_the_budget_is_refused_before_the_model_is_touched():
    model = tiny_llava("llama")
    with pytest.raises(ValueError, match="dominant=5 exceeds the per-image budget of 4 tokens: give dominant <= 4"):
        apply_pumer(model, method="visionzip", keep_tokens=4, dominant=5)
    assert not hasattr(model, "pumer")
    with pytest.raises(ValueError, match="dominant=5 exceeds the per-image budget of 4 tokens"):
        apply_pumer(model, method="visionzip", ratio=0.25, dominant=5)  # 16 patches: a budget of 4
    apply_pumer(model, method="visionzip", keep_tokens=4, dominant=4)  # no contextual token: allowed
    with torch.no_grad():
        model(**make_inputs())
    assert model.pumer.last_stats.visual_tokens_final == [4]


def test_bad_visionzip_options():
    model = tiny_llava("llama")
    for bad in (0, -3):
        with pytest.raises(ValueError, match="dominant must be an int >= 1"):
            apply_pumer(model, method="visionzip", dominant=bad)
    with pytest.raises(ValueError, match="dominant must be an int"):
        apply_pumer(model, method="visionzip", dominant=2.5)
    # from a command line
    assert VisionZipOptions.parse("visionzip", {"dominant": "4"}).dominant == 4
    assert VisionZipOptions.parse("visionzip", {"dominant": "none"}).dominant is None
    with pytest.raises(ValueError, match="dominant must be an int, got '4.5'"):
        VisionZipOptions.parse("visionzip", {"dominant": "4.5"})


def test_visionzip_refuses_towers_without_a_cls_and_anyres():
    """SigLIP (OneVision) has no [CLS]; CLIP under the 'full' strategy feeds it to the LLM; LLaVA-NeXT
    packs several views per image, so there is no one tower feature per visual token."""
    with pytest.raises(ValueError, match=r"visionzip.*\[CLS\]"):
        apply_pumer(tiny_onevision(), method="visionzip", ratio=0.25)
    model = tiny_llava("llama")
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match=r"visionzip.*\[CLS\]"):
        apply_pumer(model, method="visionzip", ratio=0.25)
    with pytest.raises(ValueError, match=r"visionzip.*one view per image"):
        apply_pumer(tiny_llava_next(), method="visionzip", ratio=0.25)
