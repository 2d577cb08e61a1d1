"""The proxy trainer's packed batches (eval/train_proxy.py): what training sees is what the
public path computes, and every supervised position predicts the token that follows it."""

import sys
from pathlib import Path

import pytest
import torch

EVAL = Path(__file__).resolve().parent.parent / "eval"
sys.path.insert(0, str(EVAL))

tp = pytest.importorskip("train_proxy")
task = pytest.importorskip("proxy_task")


@pytest.fixture(scope="module")
def small():
    args = tp.parse_args(["--text-layers", "2", "--vision-layers", "2", "--text-hidden", "64", "--text-mlp", "128",
                          "--vision-hidden", "64"])
    tok = tp.build_tokenizer()
    model = tp.build_model(tok, args).eval()
    return tok, tp.build_processor(tok), model, tp.Packer(tok)


@pytest.fixture(scope="module")
def small_deep():
    """Three decoder layers, so every route's layer (ROUTE_HEADS) exists."""
    args = tp.parse_args(["--text-layers", "3", "--vision-layers", "2", "--text-hidden", "64", "--text-mlp", "128",
                          "--vision-hidden", "64"])
    tok = tp.build_tokenizer()
    return tok, tp.build_model(tok, args).eval(), tp.Packer(tok)


def test_every_packed_question_equals_the_processor_path(small):
    """Each question after the shared image prefix (and after caption segments) gets the logits
    that ``model(**processor(...))`` gives it alone."""
    tok, proc, model, packer = small
    examples = task.make_split("val", 2, seed=0)
    batch = packer.pack(examples, captions=2)
    with torch.no_grad():
        logits, _, _, _ = tp.packed_forward(model, batch)
        i = 0
        for scene, questions in examples:
            for q in questions:
                enc = proc(images=[task.render(scene)], text=[tp.prompt_text(q.question)], return_tensors="pt")
                ref = model(**enc).logits[0, -1]
                assert (ref - logits[i]).abs().max().item() < 1e-4
                i += 1
    assert i == len(batch["targets"])


def test_caption_targets_are_the_next_tokens(small):
    tok, _, _, packer = small
    examples = task.make_split("val", 2, seed=0)
    batch = packer.pack(examples, captions=3)
    cap, ids = batch["captions"], batch["input_ids"]
    assert len(cap) > 0
    assert torch.equal(ids[cap[:, 0], cap[:, 1] + 1], cap[:, 2])  # each position predicts its successor
    colors = {tok.convert_tokens_to_ids(c) for c in task.COLORS}
    assert {int(t) for t, k in zip(cap[:, 2], cap[:, 3]) if k == 2} <= colors
    shapes = {tok.convert_tokens_to_ids(s) for s in task.SHAPES}
    assert {int(t) for t, k in zip(cap[:, 2], cap[:, 3]) if k in (3, 6)} <= shapes
    # the first caption is in reading order (colour and shape); the second lists (cell, colour)
    # and the third (cell, shape) pairs of the same objects, each target at its cell name
    for b, (scene, _) in enumerate(examples):
        mine = cap[:, 0] == b
        n = len(scene.objects)
        assert int((mine & (cap[:, 3] == 2)).sum()) == 2 * n
        assert int((mine & (cap[:, 3] == 3)).sum()) == n
        assert int((mine & (cap[:, 3] == 6)).sum()) == n
        names = {task.cell_name(r, c) for r in range(task.GRID) for c in range(task.GRID)}
        for pos, kind in zip(cap[mine, 1].tolist(), cap[mine, 3].tolist()):
            if kind in (2, 6):  # a one-hop target is predicted at a cell name
                assert tok.convert_ids_to_tokens(int(ids[b, pos])) in names


def test_caption_weights_hold_back_the_two_hop_targets():
    early, late = tp.caption_weights(0.0), tp.caption_weights(1.0)
    assert early[1] == 0 and early[3] == 0 and early[2] > 0 and early[6] > 0
    assert late[1] > 0 and late[3] > 0


def test_attention_supervision_targets_point_at_the_needed_cells(small):
    tok, _, model, packer = small
    examples = task.make_split("val", 1, seed=0)
    batch = packer.pack(examples)
    image_start = packer.prefix.index(tok.convert_tokens_to_ids(tp.IMAGE_TOKEN))
    image_id = tok.convert_tokens_to_ids(tp.IMAGE_TOKEN)
    for (b, *_), need, q in zip(batch["targets"].tolist(), batch["needed"], examples[0][1]):
        cells = [c for c in need.tolist() if c >= 0]
        assert cells == (list(q.needed_cells) if q.type in tp.SUPERVISED_TYPES else [])
        assert all(batch["input_ids"][b, image_start + c] == image_id for c in cells)
    with torch.no_grad():
        tp.packed_forward(model, batch, capture_layers=[1])
        loss = tp.attention_supervision(model, batch, 1, 1, image_start)
    assert torch.isfinite(loss) and loss.item() > 0


def test_lookup_supervision_is_minus_log_eager_attention_to_the_named_cell(small):
    """The loss equals -log of head 0's attention (eager weights of the real layer) from each
    one-hop caption target's cell name to that cell's visual token."""
    tok, _, model, packer = small
    examples = [(s, q[:1]) for s, q in task.make_split("val", 2, seed=0)]
    batch = packer.pack(examples, captions=3)
    image_start = packer.prefix.index(tok.convert_tokens_to_ids(tp.IMAGE_TOKEN))
    table = tp.cell_of_token(tok)
    assert int((table >= 0).sum()) == task.NUM_CELLS
    assert table[tok.convert_tokens_to_ids(task.cell_name(2, 3))] == 2 * task.GRID + 3
    grabbed = {}
    layer0 = model.model.language_model.layers[0].self_attn
    def grab(module, args, out):  # first forward only; returns None (keeps the output)
        grabbed.setdefault("w", out[1])

    handle = layer0.register_forward_hook(grab)
    impl = model.config.text_config._attn_implementation
    model.config.text_config._attn_implementation = "eager"
    # eager attention adds the mask to the scores: give it the additive form of the bool mask
    additive = torch.zeros(batch["mask"].shape).masked_fill(~batch["mask"], torch.finfo(torch.float32).min)
    try:
        with torch.no_grad():
            tp.packed_forward(model, {**batch, "mask": additive})
            tp.packed_forward(model, batch, capture_layers=[0])
            loss = tp.lookup_supervision(model, batch, 0, 1, image_start, table)
    finally:
        handle.remove()
        model.config.text_config._attn_implementation = impl
    c = batch["captions"]
    c = c[(c[:, 3] == 2) | (c[:, 3] == 6)]
    cells = table[batch["input_ids"][c[:, 0], c[:, 1]]]
    assert (cells >= 0).all()
    w = grabbed["w"][c[:, 0], 0, c[:, 1], image_start + cells]  # head 0
    assert torch.allclose(loss, -w.log().mean(), atol=1e-4)


def _route_table(tok, batch, image_start):
    """Per route entry: (name, row, query word, key cells or words)."""
    out = []
    for (r, b, p), keys in zip(batch["routes"].tolist(), batch["route_keys"].tolist()):
        ids = batch["input_ids"][b]
        keys = [k for k in keys if k >= 0]
        named = ["<s>" if k == tp.SINK else (k - image_start if k < len(tp.Packer(tok).prefix) else
                 tok.convert_ids_to_tokens(int(ids[k]))) for k in keys]
        out.append((tp.ROUTES[r], b, p, tok.convert_ids_to_tokens(int(ids[p])), named))
    return out


def test_route_targets_follow_the_scene(small):
    """Each supervised hop points where the answer is: content words at <s> and every cell
    holding the word, conj at <s> and the cells with both attributes, a relation's neighbour
    hop at the cell whose colour is the answer."""
    tok, _, _, packer = small
    examples = task.make_split("val", 12, seed=0)
    batch = packer.pack(examples)
    table = _route_table(tok, batch, packer.image_start)
    seen = {name for name, *_ in table}
    assert seen == set(tp.ROUTES)
    ids = batch["input_ids"]
    for name, b, p, word, keys in table:
        scene = examples[b][0]
        if name == "content":
            want = sorted(o.cell for o in scene.objects if word in (o.color, o.shape, task.SHAPE_PLURALS[o.shape]))
            assert keys[0] == "<s>" and sorted(keys[1:]) == want
        elif name == "prev":
            assert keys == [tok.convert_ids_to_tokens(int(ids[b, p - 1]))]
        elif name == "direction":
            assert keys[0] in ("left", "right", "above", "below")
        elif name == "conj":
            color = tok.convert_ids_to_tokens(int(ids[b, p - 1]))
            want = sorted(o.cell for o in scene.objects if o.color == color and o.shape == word)
            assert keys[0] == "<s>" and sorted(keys[1:]) == want
    # the neighbour hops land on the answer: the colour of the cell they point at
    starts = {}
    for (b, ans_pos, answer_id, _), q in zip(batch["targets"].tolist(), [q for _, qs in examples for q in qs]):
        starts.setdefault(b, []).append((ans_pos, q))
    n_rel = 0
    for name, b, p, word, keys in table:
        if name in ("neighbour", "neighbour2"):
            q = next(q for ans_pos, q in starts[b] if ans_pos > p)
            assert q.type == "relation"
            (cell,) = keys
            (o,) = [o for o in examples[b][0].objects if o.cell == cell]
            assert o.color == q.answer == task.answer_from_scene(examples[b][0], q.question)
            n_rel += 1
    assert n_rel == sum(q.type == "relation" for _, qs in examples for q in qs)


def test_route_supervision_is_cross_entropy_of_eager_attention(small_deep):
    """The loss of each route equals -mean log of the real layer's eager attention weights
    (its head, from its query position) on its keys."""
    tok, model, packer = small_deep
    examples = task.make_split("val", 6, seed=0)
    batch = packer.pack(examples, captions=1)
    grabbed = {}

    def grab(module, args, out, i):  # first forward only; returns None (keeps the output)
        grabbed.setdefault(i, out[1])

    hooks = [layer.self_attn.register_forward_hook(lambda m, a, out, i=i: grab(m, a, out, i))
             for i, layer in enumerate(model.model.language_model.layers)]
    impl = model.config.text_config._attn_implementation
    model.config.text_config._attn_implementation = "eager"
    additive = torch.zeros(batch["mask"].shape).masked_fill(~batch["mask"], torch.finfo(torch.float32).min)
    try:
        with torch.no_grad():
            tp.packed_forward(model, {**batch, "mask": additive})
    finally:
        for h in hooks:
            h.remove()
        model.config.text_config._attn_implementation = impl
    with torch.no_grad():  # the training path (sdpa, boolean mask); eager would add the bool mask as 0/1
        tp.packed_forward(model, batch, capture_layers=[0, 1, 2])
        got = tp.route_supervision(model, batch)
    assert set(got) == set(tp.ROUTES)
    r, keys = batch["routes"], batch["route_keys"]
    for name, loss in got.items():
        layer, head = tp.ROUTE_HEADS[name]
        sel = r[:, 0] == tp.ROUTES.index(name)
        per = []
        for (_, b, p), k in zip(r[sel].tolist(), keys[sel].tolist()):
            k = [x for x in k if x >= 0]
            per.append(-grabbed[layer][b, head, p, k].log().mean())
        assert torch.allclose(loss, torch.stack(per).mean(), atol=1e-4), name
