"""DART: pivots by key norm, then the image tokens least like them, at decoder layer 2."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pumer_llava import apply_pumer
from pumer_llava.reduce.duplication import duplication_keep, duplication_plan
from tiny import IMAGE_TOKEN, make_inputs, make_mixed_inputs, make_next_inputs, tiny_llava, tiny_llava_next


def _reference(img_norm, img_feat, txt_norm, txt_feat, n_txt, count, out, p_img, p_txt):
    """DART for one image, written from the description: a Python loop over the pivots."""
    cos = torch.nn.functional.cosine_similarity
    order = sorted(range(count), key=lambda j: -img_norm[j].item())
    img_piv = order[: min(p_img, count)]
    if out <= len(img_piv):
        return sorted(img_piv[:out])
    txt_piv = sorted(range(n_txt), key=lambda j: -txt_norm[j].item())[:p_txt]
    pivots = [img_feat[j] for j in img_piv] + [txt_feat[j] for j in txt_piv]
    picks = out - len(img_piv)
    kept, pool = list(img_piv), [j for j in range(count) if j not in img_piv]
    for i, ref in enumerate(pivots):
        per = picks // len(pivots) + (1 if i < picks % len(pivots) else 0)
        sims = {j: cos(ref.double(), img_feat[j].double(), dim=0).item() for j in pool}
        take = sorted(pool, key=lambda j: sims[j])[:per]
        kept += take
        pool = [j for j in pool if j not in take]
    return sorted(kept)


CASES = [  # counts, text after each image, budgets
    ([16, 11, 16], [6, 2, 0], [7, 5, 16]),
    ([16, 11, 16], [6, 2, 9], [3, 11, 4]),
    ([12, 3, 12], [1, 8, 5], [12, 2, 9]),
]


@pytest.mark.parametrize("p_img,p_txt", [(4, 4), (2, 3), (1, 0)])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_core_equals_a_loop_over_the_pivots(case, p_img, p_txt):
    counts, n_text, out = CASES[case]
    g = torch.Generator().manual_seed(case)
    n_img, m, r, d = len(counts), max(counts), max(n_text) or 1, 8
    img_norm, txt_norm = torch.rand(n_img, m, generator=g), torch.rand(n_img, r, generator=g)
    img_feat, txt_feat = torch.randn(n_img, m, d, generator=g), torch.randn(n_img, r, d, generator=g)
    pad = torch.arange(m)[None] >= torch.tensor(counts)[:, None]
    img_norm = img_norm.masked_fill(pad, 9.0)  # padding with the largest norms: never a pivot
    txt_valid = torch.arange(r)[None] < torch.tensor(n_text)[:, None]
    txt_norm = txt_norm.masked_fill(~txt_valid, 9.0)
    plan_host = duplication_plan(counts, out, n_text, p_img, p_txt)
    keep = duplication_keep(img_norm, img_feat, txt_norm, txt_feat, txt_valid, torch.tensor(plan_host),
                            plan_host, p_img, pad)
    for i in range(n_img):
        want = _reference(img_norm[i], img_feat[i], txt_norm[i], txt_feat[i], n_text[i], counts[i], out[i],
                          p_img, p_txt)
        assert len(want) == out[i]
        assert keep[i].nonzero()[:, 0].tolist() == want


def test_plan_lands_on_the_budget():
    plan = duplication_plan([16, 16, 16, 3], [16, 9, 2, 3], [5, 1, 0, 4], 4, 4)
    assert plan == [[4, 2, 2, 2, 2, 1, 1, 1, 1], [4, 1, 1, 1, 1, 1, 0, 0, 0], [2, 0, 0, 0, 0, 0, 0, 0, 0],
                    [3, 0, 0, 0, 0, 0, 0, 0, 0]]


# ----------------------------------------------------------------------------- end to end on tiny models

def images_of(inp):
    """Per image, in order: (row, its input positions): the runs of image placeholders."""
    out = []
    for b, row in enumerate(inp["input_ids"].tolist()):
        for p, t in enumerate(row):
            if t == IMAGE_TOKEN and out and out[-1][0] == b and out[-1][1][-1] == p - 1:
                out[-1][1].append(p)
            elif t == IMAGE_TOKEN:
                out.append((b, [p]))
    return out


def layer_inputs(model, inp, layers):
    """The unpatched model's (hidden states, position embeddings) entering the given decoder layers."""
    got, hooks = {}, []
    for i in layers:
        def grab(mod, args, kwargs, i=i):
            got[i] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])
        hooks.append(model.model.language_model.layers[i].register_forward_pre_hook(grab, with_kwargs=True))
    with torch.no_grad():
        model(**inp)
    for h in hooks:
        h.remove()
    return got


def reference_keeps(model, inp, budgets, p_img, p_txt):
    """Per sample, the input positions DART keeps at layer 2: key norms of layer 1's keys, the final
    norm of layer 2's input, each image on its own through the core."""
    lm = model.model.language_model
    got = layer_inputs(model, inp, (1, 2))
    h1, (cos, sin) = got[1]
    attn, bsz, n = lm.layers[1].self_attn, h1.shape[0], h1.shape[1]
    with torch.no_grad():
        k = attn.k_proj(lm.layers[1].input_layernorm(h1)).view(bsz, n, -1, attn.head_dim).transpose(1, 2)
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        norms = k.abs().sum((1, 3))
        feats = lm.norm(got[2][0])
    mask = inp["attention_mask"].bool()
    want = [[] for _ in range(bsz)]
    for (b, vis), out in zip(images_of(inp), budgets):
        text = [p for p in range(vis[-1] + 1, n) if mask[b, p] and inp["input_ids"][b, p] != IMAGE_TOKEN]
        rows = text or [0]
        plan = duplication_plan([len(vis)], [out], [len(text)], p_img, p_txt)
        keep = duplication_keep(norms[b, vis][None], feats[b, vis][None], norms[b, rows][None], feats[b, rows][None],
                                torch.tensor([[bool(text)] * len(rows)]), torch.tensor(plan), plan, p_img)
        want[b] += [vis[j] for j in keep[0].nonzero()[:, 0].tolist()]
    return want


def _batches():
    yield "llava", tiny_llava("llama"), make_inputs((3, 6), (5, 2))
    yield "llava-qwen2", tiny_llava("qwen2"), make_inputs((2, 7, 4), (6, 2, 3), seed=3)
    yield "multi-image", tiny_llava("llama"), make_mixed_inputs()[0]
    model = tiny_llava_next()
    yield "next", model, make_next_inputs(model)[0]


@pytest.mark.parametrize("ratio,opts", [(0.75, {}), (0.5, {"pivot_image_tokens": 2, "pivot_text_tokens": 3}),
                                        (0.125, {}), (0.5, {"pivot_text_tokens": 0})])
def test_kept_tokens_are_the_cores_choice(ratio, opts):
    """Layers 0-1 see every token, layer 2 on exactly each image's budget: the tokens the core picks."""
    p_img, p_txt = opts.get("pivot_image_tokens", 4), opts.get("pivot_text_tokens", 4)
    for name, model, inp in _batches():
        images = images_of(inp)
        budgets = [round(len(vis) * ratio) for _, vis in images]
        want = reference_keeps(model, inp, budgets, p_img, p_txt)
        apply_pumer(model, method="dart", ratio=ratio, **opts)
        with torch.no_grad():
            model(**inp)
        stats = model.pumer.last_stats
        full = [sum(len(v) for b, v in images if b == row) for row in range(len(want))]
        kept = [sum(k for (b, _), k in zip(images, budgets) if b == row) for row in range(len(want))]
        n_layers = len(model.model.language_model.layers)
        assert stats.visual_tokens_per_layer == [full, full] + [kept] * (n_layers - 2), name
        assert stats.kept_positions[2] == want, name


def test_bad_dart_arguments():
    model = tiny_llava("llama")
    with pytest.raises(ValueError, match="pivot_image_tokens must be at least 1"):
        apply_pumer(model, method="dart", pivot_image_tokens=0)
    with pytest.raises(ValueError, match="pivot_text_tokens must be 0 or more"):
        apply_pumer(model, method="dart", pivot_text_tokens=-1)
    with pytest.raises(ValueError, match="pivot_text_tokens must be an int"):
        apply_pumer(model, method="dart", pivot_text_tokens=1.5)
    assert not hasattr(model, "pumer")
