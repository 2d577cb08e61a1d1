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
    """Three decoder layers, so every route's layer (``route_heads(0)``) exists."""
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


def test_every_turn_of_a_packed_conversation_equals_the_chat_template_path(small):
    """A conversation packed after the image prefix: turn j's answer logits equal what
    ``model(**processor(apply_chat_template(...)))`` gives for the conversation up to turn j
    with the earlier right answers, and each turn sees its conversation only."""
    tok, proc, model, packer = small
    scene, questions = task.make_conversation("val", 0, 3, turns=4)
    assert len({q.type for q in questions}) == 4
    batch = packer.pack([(scene, [questions[:1], questions])])  # a one-turn and a four-turn conversation
    assert batch["turns"] == [1, 1, 2, 3, 4]
    with torch.no_grad():
        logits, _, _, _ = tp.packed_forward(model, batch)
        for j, q in enumerate(questions):
            history = [(p.question, p.answer) for p in questions[:j]]
            text = proc.apply_chat_template(task.conversation_messages(history, q.question), add_generation_prompt=True)
            assert text.endswith(f"{q.question} ASSISTANT:") and text.count("</s>") == j
            enc = proc(images=[task.render(scene)], text=[text], return_tensors="pt")
            ref = model(**enc).logits[0, -1]
            assert (ref - logits[1 + j]).abs().max().item() < 1e-4, j
            # the position predicting turn j's answer sees the prefix and turns 1..j of its own conversation
            seen = batch["input_ids"][0][batch["mask"][0, 0, batch["targets"][1 + j, 1]]].tolist()
            assert seen == enc["input_ids"][0].tolist()
    assert torch.equal(batch["targets"][:, 2], torch.tensor([packer.answer_id(q.answer) for q in questions[:1] + questions]))


def test_split_conversations_keeps_every_question_in_order():
    import random

    qs = list(range(17))
    for seed in range(5):
        convs = tp.split_conversations(qs, 4, random.Random(seed))
        assert [q for c in convs for q in c] == qs
        assert all(1 <= len(c) <= 4 for c in convs)
    assert tp.split_conversations(qs, 1, random.Random(0)) == [[q] for q in qs]


def test_accuracy_per_turn_only_when_there_are_turns():
    acc = tp.per_type_accuracy(["count", "count", "rare", "rare"], [1, 0, 1, 1], [1, 2, 1, 2])
    assert acc == {"count": 0.5, "rare": 1.0, "overall": 0.75, "turn1": 1.0, "turn2": 0.5}
    assert "turn1" not in tp.per_type_accuracy(["count"], [1], [1])


def test_route_heads_read_the_image_from_the_read_layer():
    heads = tp.route_heads(2)
    assert heads["prev"][0] == heads["direction"][0] == 0  # text to text
    assert heads["content"][0] == 2 and heads["conj"][0] == 3
    assert tp.relay_layers(2) == (3, 4)
    with pytest.raises(SystemExit, match="--read-layer 5: .* must be 0..4 for 8 text layers"):
        tp.main(["--read-layer", "5", "--untrained", "--out", "/nonexistent"])


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
    holding the word (<s> when none does), conj at the cells with both attributes, a
    relation's direction hop at its direction word."""
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
            assert keys[0] == "<s>" and sorted(keys[1:]) == want  # <s> counts only without cells (mass)
        elif name == "prev":
            assert keys == [tok.convert_ids_to_tokens(int(ids[b, p - 1]))]
        elif name == "direction":
            assert keys[0] in ("left", "right", "above", "below")
        elif name == "conj":
            color = tok.convert_ids_to_tokens(int(ids[b, p - 1]))
            want = sorted(o.cell for o in scene.objects if o.color == color and o.shape == word)
            assert keys[0] == "<s>" and sorted(keys[1:]) == want
    # a relation's hops end at its reference, whose token then holds the reference cell (the
    # relay target of its lookup or conj): that cell's neighbour fact in the asked direction is
    # the answer
    starts = {}
    for (b, ans_pos, answer_id, _), q in zip(batch["targets"].tolist(), [q for _, qs in examples for q in qs]):
        starts.setdefault(b, []).append((ans_pos, q))
    classes = tp.fact_classes(tp.cell_facts(examples))
    relay = {}
    for b, p, cell, layer in batch["relay"].tolist():
        relay.setdefault((b, p), []).append((cell, layer))
    n_rel = 0
    for name, b, p, word, keys in table:
        if name == "direction":
            q = next(q for ans_pos, q in starts[b] if ans_pos > p)
            assert q.type == "relation"
            ((cell, layer),) = relay[(b, p)]
            assert layer == (1 if word in {task.cell_name(r, c) for r in range(8) for c in range(8)} else 2)
            direction = keys[0] + (" of" if keys[0] in ("left", "right") else "")
            slot = tp.FACT_DIRECTIONS.index(direction)
            assert list(task.COLORS)[int(classes[b, cell, slot])] == q.answer == task.answer_from_scene(
                examples[b][0], q.question)
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
        got = tp.route_supervision(model, batch, batch["route_heads"])
    assert set(got) == set(tp.ROUTES)
    r, keys = batch["routes"], batch["route_keys"]
    for name, loss in got.items():
        layer, head = packer.route_heads[name]
        sel = r[:, 0] == tp.ROUTES.index(name)
        per = []
        for (_, b, p), k in zip(r[sel].tolist(), keys[sel].tolist()):
            k = [x for x in k if x >= 0]
            per.append(-grabbed[layer][b, head, p, k].log().mean())
        assert torch.allclose(loss, torch.stack(per).mean(), atol=1e-4), name


def test_cell_facts_follow_the_scene():
    """Each occupied cell's facts are its neighbours' colours and how many objects share its
    colour and its shape; empty cells hold none; the probe classes decode the same facts."""
    examples = task.make_split("val", 6, seed=0)
    facts = tp.cell_facts(examples)
    classes = tp.fact_classes(facts)
    colors = list(task.COLORS)
    nd = len(tp.FACT_DIRECTIONS)
    assert facts.shape == (6, task.NUM_CELLS, tp.FACT_SLOTS)
    assert int(facts.max()) < tp.NUM_FACTS
    seen_neighbour = 0
    for b, (scene, _) in enumerate(examples):
        occupied = {o.cell: o for o in scene.objects}
        for cell in range(task.NUM_CELLS):
            if cell not in occupied:
                assert (facts[b, cell] == -1).all() and (classes[b, cell] == -100).all()
                continue
            o = occupied[cell]
            for slot, name in enumerate(tp.FACT_DIRECTIONS):
                dr, dc = task.DIRECTIONS[name]
                r, c = o.row + dr, o.col + dc
                nb = scene.at(r, c) if 0 <= r < task.GRID and 0 <= c < task.GRID else None
                if nb is None:
                    assert facts[b, cell, slot] == -1 and classes[b, cell, slot] == -100
                else:
                    assert classes[b, cell, slot] == colors.index(nb.color)
                    seen_neighbour += 1
            n_color = sum(p.color == o.color for p in scene.objects)
            n_shape = sum(p.shape == o.shape for p in scene.objects)
            assert classes[b, cell, nd] == min(n_color, tp.MAX_FACT_COUNT) - 1
            assert classes[b, cell, nd + 1] == min(n_shape, tp.MAX_FACT_COUNT) - 1
    assert seen_neighbour > 0
    # distinct facts have distinct rows, and the vectors are the sum of those rows
    table = tp.fact_table(16, 0.5, seed=0)
    sums = tp.fact_sums(table, facts)
    b, cell = 0, examples[0][0].objects[0].cell
    want = sum(table[i] for i in facts[b, cell].tolist() if i >= 0)
    assert torch.allclose(sums[b, cell], want)
    assert torch.equal(sums[~(facts >= 0).any(-1)], torch.zeros_like(sums[~(facts >= 0).any(-1)]))


def test_a_relation_answer_is_a_fact_of_its_reference_cell():
    """What a relation question asks is carried by the reference's own token: the neighbour
    fact in the asked direction decodes to the answer."""
    examples = task.make_split("val", 20, seed=0)
    classes = tp.fact_classes(tp.cell_facts(examples))
    n = 0
    for b, (scene, questions) in enumerate(examples):
        for q in questions:
            if q.type != "relation":
                continue
            words = q.question.split()
            direction = words[5] + (" of" if words[5] in ("left", "right") else "")
            dr, dc = task.DIRECTIONS[direction]
            # needed_cells is sorted: the reference is the one the direction leads away from
            (ref,) = [cell for cell in q.needed_cells
                      if 0 <= cell // task.GRID + dr < task.GRID and 0 <= cell % task.GRID + dc < task.GRID
                      and cell + dr * task.GRID + dc in q.needed_cells]
            slot = tp.FACT_DIRECTIONS.index(direction)
            assert list(task.COLORS)[int(classes[b, ref, slot])] == q.answer
            n += 1
    assert n == 20


def test_tower_routes_point_at_neighbours_and_equals(small):
    tok, _, model, packer = small
    examples = task.make_split("val", 3, seed=0)
    routes, keys = tp.tower_routes(examples)
    nd = len(tp.FACT_DIRECTIONS)
    for (slot, b, query), k in zip(routes.tolist(), keys.tolist()):
        k = [x for x in k if x >= 0]
        cell = query - 1
        r, c = divmod(cell, task.GRID)
        scene = examples[b][0]
        if slot < nd:
            dr, dc = task.DIRECTIONS[tp.FACT_DIRECTIONS[slot]]
            assert k == [1 + (r + dr) * task.GRID + (c + dc)]
        else:
            o = scene.at(r, c)
            attr = "color" if slot == nd else "shape"
            want = sorted(1 + p.cell for p in scene.objects if getattr(p, attr) == getattr(o, attr))
            assert k[0] == 0 and sorted(k[1:]) == want  # [CLS] first, then the equals, itself included
    # every cell with a neighbour in a direction has its route; every object its two counts
    for slot, name in enumerate(tp.FACT_DIRECTIONS):
        dr, dc = task.DIRECTIONS[name]
        on_grid = sum(0 <= r + dr < task.GRID and 0 <= c + dc < task.GRID
                      for r in range(task.GRID) for c in range(task.GRID))
        assert int((routes[:, 0] == slot).sum()) == 3 * on_grid
    n_objects = sum(len(s.objects) for s, _ in examples)
    assert int((routes[:, 0] == nd).sum()) == int((routes[:, 0] == nd + 1).sum()) == n_objects


def test_tower_supervision_is_cross_entropy_of_the_towers_eager_attention():
    """The loss equals -mean log of the real tower layers' eager attention weights, per
    supervised head, on its keys."""
    args = tp.parse_args(["--text-layers", "1", "--vision-layers", "3", "--text-hidden", "64", "--text-mlp", "128",
                          "--vision-hidden", "64"])
    model = tp.build_model(tp.build_tokenizer(), args).eval()
    examples = task.make_split("val", 2, seed=0)
    routes, keys = tp.tower_routes(examples)
    tower = model.model.vision_tower
    impl = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tower(tp.pixels([task.render(s) for s, _ in examples]), output_hidden_states=True,
                        output_attentions=True)
    finally:
        tower.config._attn_implementation = impl
    with torch.no_grad():
        got = tp.tower_supervision(model, out.hidden_states, routes, keys)
    per_slot = []
    for slot, (layer, head) in enumerate(tp.TOWER_HEADS):
        sel = routes[:, 0] == slot
        assert sel.any()
        vals = []
        for (_, b, q), k in zip(routes[sel].tolist(), keys[sel].tolist()):
            k = [x for x in k if x >= 0]
            vals.append(-out.attentions[layer][b, head, q, k].log().mean())
        per_slot.append(torch.stack(vals).mean())
    assert len(per_slot) == len(tp.TOWER_HEADS)
    assert torch.allclose(got, torch.stack(per_slot).mean(), atol=1e-4)


def test_tower_only_images_leave_the_language_model_rows_unchanged(small):
    """Extra images seen by the tower alone change nothing the language model computes."""
    tok, _, model, packer = small
    examples = task.make_split("val", 2, seed=0)
    batch = packer.pack(examples)
    with torch.no_grad():
        ans, eos, vis, emb = tp.packed_forward(model, dict(batch))
        extra = [s for s, _ in task.make_split("train", 3, seed=5)]
        ans2, eos2, vis2, emb2 = tp.packed_forward(model, {**batch, "extra_pixels": tp.pixels([task.render(s) for s in extra])})
    assert torch.allclose(ans, ans2, atol=1e-5) and torch.allclose(eos, eos2, atol=1e-5)
    assert emb2.shape[0] == 5 and torch.allclose(emb2[:2], emb, atol=1e-5)


def test_neighbour_and_count_captions_state_what_the_scene_shows(small):
    """The extra caption segments: (cell, colour of its neighbour) pairs per direction, the same
    for objects named by a unique colour-shape pair, and every attribute with its count; their
    hops point at the prompt's direction word, the named object's cell, the counted cells."""
    tok, _, _, packer = small
    examples = task.make_split("val", 8, seed=0)
    names = {task.cell_name(r, c): (r, c) for r in range(task.GRID) for c in range(task.GRID)}
    n_targets = {k: 0 for k in tp.CAPTION_POOL}
    for scene, _ in examples:
        for seg in tp.CAPTION_POOL:
            ids, kinds = packer.caption_segment(scene, seg)
            words = tok.convert_ids_to_tokens(ids)
            hops = packer.caption_routes(scene, ids, kinds)
            prompt_end = words.index("assistant:")
            body = words[prompt_end + 1 : -1]
            assert words[-1] == "</s>" and kinds[-1] == 4
            if seg == "counts":
                pairs = list(zip(body[::2], body[1::2]))
                want = {c: sum(o.color == c for o in scene.objects) for c in task.COLORS}
                want.update({task.SHAPE_PLURALS[s]: sum(o.shape == s for o in scene.objects) for s in task.SHAPES})
                assert dict(pairs) == {w: task.NUMBER_WORDS[n] for w, n in want.items() if n <= task.MAX_COUNT}
                contents = [(i, k) for name, i, k, _ in hops if name == "content"]
                assert len(contents) == len(pairs)
                for i, keys in contents:
                    cells = packer.attribute_cells(scene, ids[i])
                    assert keys == [tp.SINK] + [packer.image_start + c for c in cells]
                    assert task.NUMBER_WORDS[len(cells)] == words[i + 1]
                n_targets[seg] += len(pairs)
                continue
            named = seg.startswith("named ")
            direction = seg[len("named "):] if named else seg
            dr, dc = task.DIRECTIONS[direction]
            step = 3 if named else 2
            items = [body[j : j + step] for j in range(0, len(body), step)]
            want = []
            for o in scene.objects:
                r, c = o.row + dr, o.col + dc
                nb = scene.at(r, c) if 0 <= r < task.GRID and 0 <= c < task.GRID else None
                if nb is None or (named and len(task.pair_cells(scene, o.color, o.shape)) != 1):
                    continue
                want.append(((o.color, o.shape) if named else task.cell_name(o.row, o.col), nb.color))
            got = [((it[0], it[1]) if named else it[0], it[-1]) for it in items]
            assert sorted(got) == sorted(want)
            assert [k for k in kinds if k == 7] == [7] * len(want)
            direction_word = words.index(direction.split()[0])
            by_query = {}
            for name, i, keys, word_keys in hops:
                by_query.setdefault(i, {})[name] = keys or word_keys
            assert len(by_query) == len(want)
            for i, routes in by_query.items():
                assert routes["direction"] == [direction_word]
                if named:
                    assert routes["prev"] == [i - 1]
                    (cell,) = task.pair_cells(scene, words[i - 1], words[i])
                    assert routes["conj"] == [tp.SINK, packer.image_start + cell]
                else:
                    assert set(routes) == {"direction"} and words[i] in names
            n_targets[seg] += len(want)
    assert all(n > 0 for n in n_targets.values()), n_targets


@pytest.mark.parametrize("read_layer", [0, 2])
def test_relay_targets_are_the_cells_their_tokens_found(small, read_layer):
    """Every relay target sits at a cell name (its cell, after the lookup's layer) or at a
    named object's shape word (the cell of that unique pair, after conj's layer); every count
    target at a colour or shape word, with how many objects have it; the layers follow the
    first layer that reads the image."""
    tok = small[0]
    packer = tp.Packer(tok, read_layer)
    assert packer.relay_layer == read_layer + 1
    examples = task.make_split("val", 6, seed=0)
    batch = packer.pack(examples, captions=[0, 1, "named left of", "below", "counts"])
    ids = batch["input_ids"]
    cell_of = tp.cell_of_token(tok)
    n_named = 0
    for b, p, cell, layer in batch["relay"].tolist():
        scene = examples[b][0]
        word = tok.convert_ids_to_tokens(int(ids[b, p]))
        if layer == packer.relay_layer:
            assert cell_of[ids[b, p]] == cell
        else:
            assert layer == packer.route_heads["conj"][0] + 1 == read_layer + 2
            color = tok.convert_ids_to_tokens(int(ids[b, p - 1]))
            assert task.pair_cells(scene, color, word) == [cell]
            n_named += 1
    assert n_named > 0
    plural = {v: k for k, v in task.SHAPE_PLURALS.items()}
    for b, p, count, layer in batch["relay_count"].tolist():
        scene = examples[b][0]
        word = tok.convert_ids_to_tokens(int(ids[b, p]))
        n = sum(word in (o.color, o.shape) or plural.get(word) == o.shape for o in scene.objects)
        assert count == min(n, tp.MAX_FACT_COUNT) and layer == packer.route_heads["content"][0] + 1 == read_layer + 1
    assert len(batch["relay_count"]) > 0
