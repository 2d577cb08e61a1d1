"""SparseVLM: text-rated pruning in the LLM, the best of the pruned recycled into DPC-kNN clusters."""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pumer_llava import apply_pumer
from pumer_llava.methods.sparsevlm import sparse_layers
from pumer_llava.reduce import plan_stages
from pumer_llava.reduce.cluster import dpc_knn, recycle_plan, select_raters
from tiny import capture_layers, N_VIS, alone, make_inputs, make_next_inputs, tiny_llava, tiny_llava_next

BACKBONES = ["llama", "qwen2"]


# ----------------------------------------------------------------------------- references (plain loops)


def raters_loop(vis: torch.Tensor, text: torch.Tensor) -> list[int]:
    """The paper's raters of one image: vis (m, d), text (R, d) input embeddings."""
    rel = torch.softmax(vis.double() @ text.double().T, dim=1)  # each visual token over the text
    r = rel.mean(0)
    chosen = [j for j in range(text.shape[0]) if r[j] > r.mean()]
    return chosen or list(range(text.shape[0]))


def dpc_loop(x: torch.Tensor, c: int) -> tuple[list[int], list[int]]:
    """DPC-kNN of one image's candidates x (M, d) into c clusters: (centers by rank, assignment)."""
    n, d = x.shape
    dist = [[float(torch.norm(x[i].double() - x[j].double())) / math.sqrt(d) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(v * v for v in sorted(row)[:c]) / c) for row in dist]

    def denser(j, i):
        return density[j] > density[i] or (density[j] == density[i] and j < i)

    d_max = max(max(row) for row in dist)
    delta = []
    for i in range(n):
        above = [dist[i][j] for j in range(n) if j != i and denser(j, i)]
        delta.append(min(above) if above else d_max)
    score = [density[i] * delta[i] for i in range(n)]
    centers = sorted(range(n), key=lambda i: (-score[i], i))[:c]
    assign = [i if i in centers else min(centers, key=lambda j: (dist[i][j], j)) for i in range(n)]
    return centers, assign


# ----------------------------------------------------------------------------- the pure core


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_raters_equal_the_loop_on_ragged_images(seed):
    g = torch.Generator().manual_seed(seed)
    n_vis, n_text = [5, 8, 3, 8], [4, 2, 6, 1]
    m, r, d = max(n_vis), max(n_text), 12
    vis = torch.randn(len(n_vis), m, d, generator=g)
    text = torch.randn(len(n_vis), r, d, generator=g)
    vis_pad = torch.arange(m)[None] >= torch.tensor(n_vis)[:, None]
    text_ok = torch.arange(r)[None] < torch.tensor(n_text)[:, None]
    got = select_raters(vis, text, text_ok, vis_pad)
    for i, (nv, nt) in enumerate(zip(n_vis, n_text)):
        want = raters_loop(vis[i, :nv], text[i, :nt])
        assert [j for j in range(r) if got[i, j]] == want, i
    assert got[3].tolist() == [True] + [False] * (r - 1)  # a single text token: flat r, it rates alone


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpc_knn_equals_the_loop_on_ragged_rows(seed):
    g = torch.Generator().manual_seed(seed)
    n_valid, n_clusters = [9, 6, 3, 7, 0], [2, 3, 1, 7, 0]
    m, d = max(n_valid), 10
    x = torch.randn(len(n_valid), m, d, generator=g)
    valid = torch.arange(m)[None] < torch.tensor(n_valid)[:, None]
    rank, is_center, assign = dpc_knn(x, torch.tensor(n_clusters), valid)
    for i, (n, c) in enumerate(zip(n_valid, n_clusters)):
        if c == 0:
            continue
        centers, want = dpc_loop(x[i, :n], c)
        assert rank[i, :c].tolist() == centers, i
        assert [j for j in range(n) if is_center[i, j]] == sorted(centers)
        assert assign[i, :n].tolist() == want, i
    # every token real: no mask (valid None) gives what an all-true mask gives
    full = torch.tensor([c or 1 for c in n_clusters])
    unmasked = dpc_knn(x, full)
    masked = dpc_knn(x, full, torch.ones(len(n_valid), m, dtype=torch.bool))
    assert all(torch.equal(a, b) for a, b in zip(unmasked, masked))
    # one count for every row (an int) gives what the same count per row gives
    for c in (1, 3):
        as_int = dpc_knn(x, c, valid)
        as_rows = dpc_knn(x, torch.full((len(n_valid),), c), valid)
        assert all(torch.equal(a, b) for a, b in zip(as_int, as_rows)), c


def test_dpc_knn_breaks_ties_by_the_lower_index():
    # 1-D points 0, 1, 10, 11 with k = 2: every density ties, so the lower index counts as denser:
    # token 0 is the densest (delta = the largest distance, 11), token 2 is 9 away from its
    # nearest denser token, tokens 1 and 3 only 1: the centers are 0 and 2
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])[None]
    rank, is_center, assign = dpc_knn(x, torch.tensor([2]))
    assert rank[0, :2].tolist() == [0, 2] and is_center[0].tolist() == [True, False, True, False]
    assert assign[0].tolist() == [0, 0, 2, 2]
    # one cluster: k = 1 (the token itself), so every density ties and the first token is the center
    rank, _, assign = dpc_knn(torch.randn(1, 5, 3), torch.tensor([1]))
    assert rank[0, 0] == 0 and assign[0].tolist() == [0] * 5


def test_recycle_plan_is_the_fixed_point_and_lands_the_budget():
    # the paper's "192" schedule: keep 300 / 200 / 110 by score from 576 / 309 / 204, plus 9 / 4 / 3 clusters
    assert recycle_plan(576, 309) == (9, 83)
    assert recycle_plan(309, 204) == (4, 33)
    assert recycle_plan(204, 113) == (3, 29)
    assert recycle_plan(16, 8) == (1, 3)
    for n in range(1, 60):
        for out in range(1, n + 1):
            for rs, cs in ((0.3, 0.1), (0.5, 0.4), (1.0, 1.0), (0.0, 0.0)):
                c, m = recycle_plan(n, out, rs, cs)
                if out == n or out < 2:
                    assert (c, m) == (0, 0)
                    continue
                pruned = n - (out - c)
                assert 1 <= c <= m <= pruned and out - c >= 1
                fixed = [k for k in range(1, n) if int(cs * (int(rs * (n - out + k)) + 1)) + 1 == k]
                if fixed and fixed[0] <= out - 1 and int(rs * (n - out + fixed[0])) + 1 <= n - out + fixed[0]:
                    assert c == fixed[0] and m == int(rs * pruned) + 1  # unclamped: the least fixed point


def test_default_layers():
    assert sparse_layers(32) == (3, 7, 16)
    assert sparse_layers(40) == (4, 9, 20)
    assert sparse_layers(6) == (1, 3)
    assert sparse_layers(2) == (1,)
    assert sparse_layers(1) == (0,)


def test_bad_options():
    model = tiny_llava("llama")
    with pytest.raises(ValueError, match=r"recycle_share must be in \[0, 1\]"):
        apply_pumer(model, method="sparsevlm", recycle_share=1.5)
    with pytest.raises(ValueError, match=r"cluster_share must be in \[0, 1\]"):
        apply_pumer(model, method="sparsevlm", cluster_share=-0.1)
    with pytest.raises(ValueError, match="recycle must be True or False"):
        apply_pumer(model, method="sparsevlm", recycle=1)


# ----------------------------------------------------------------------------- end to end


def layer_attention(layer, h, pe, n_pad):
    """(B, N, N) the layer's attention probabilities, heads averaged, from its own norm, q/k
    projections and RoPE: causal in slot order, left padding masked."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    bsz, n, _ = x.shape
    q = attn.q_proj(x).view(bsz, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(bsz, n, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *pe)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention
    logits = q @ k.transpose(-1, -2) * attn.scaling  # (B, H, N, N)
    slot = torch.arange(n)
    allowed = (slot[None, :] <= slot[:, None])[None] & (slot >= torch.tensor(n_pad)[:, None])[:, None, :]
    return logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).mean(1)


@pytest.mark.parametrize("shares", [None, (0.5, 0.4), "prune"], ids=["paper", "more-clusters", "no-recycling"])
@pytest.mark.parametrize("kind", BACKBONES)
def test_each_stage_keeps_the_raters_top_and_the_cluster_centers(kind, shares):
    """At every reducing layer L: the raters (from the input embeddings of every visual token,
    chosen once) and their attention at
    layer L-1, recomputed here from L-1's own input and weights; each image keeps the top
    ``out - c`` of that score and the DPC-kNN centers of the next ``m`` (on L-1's output), and a
    center enters layer L as the average of its cluster."""
    model = tiny_llava(kind)
    pre, suf = (3, 6), (5, 2)
    inp = make_inputs(pre, suf)
    opts = {} if shares is None else dict(recycle=False) if shares == "prune" else \
        dict(recycle_share=shares[0], cluster_share=shares[1])
    apply_pumer(model, method="sparsevlm", ratio=0.25, **opts)
    layers = model.pumer.layers
    assert layers == (1, 3)
    seen, handles = capture_layers(model)
    with torch.no_grad():
        model(**inp)
    for h in handles:
        h.remove()
    stats = model.pumer.last_stats
    rs, cs = (0.3, 0.1) if not isinstance(shares, tuple) else shares
    plans = plan_stages(N_VIS, 4, len(layers), 0.0)
    assert stats.visual_tokens_per_layer == [[16, 16], [8, 8], [8, 8], [4, 4], [4, 4], [4, 4]]
    n0 = inp["input_ids"].shape[1]
    n_pad = [n0 - p - N_VIS - s for p, s in zip(pre, suf)]
    emb0 = seen[0][0]  # the input embeddings (layer 0 does not reduce)
    current = [[n_pad[b] + pre[b] + j for j in range(N_VIS)] for b in range(2)]
    every = [list(c) for c in current]  # the raters are chosen once, from every visual token
    mods = model.model.language_model.layers
    merged_some = False
    with torch.no_grad():
        for s, layer in enumerate(layers):
            h, kw, out = seen[layer - 1]
            probs = layer_attention(mods[layer - 1], h, kw["position_embeddings"], n_pad)
            n_in, n_out = plans[s].n_in, plans[s].n_out
            c, m = (0, 0) if shares == "prune" else recycle_plan(n_in, n_out, rs, cs)
            h_next = seen[layer][0]  # layer L's input after the stage
            for b in range(2):
                first = n_pad[b] + pre[b]
                vis_slots = list(range(first, first + n_in))
                text_slots = list(range(first + n_in, first + n_in + suf[b]))
                text_pos = [n0 - suf[b] + i for i in range(suf[b])]
                raters = raters_loop(emb0[b, every[b]], emb0[b, text_pos])
                score = probs[b][[text_slots[j] for j in raters]][:, vis_slots].mean(0)
                order = score.argsort(descending=True).tolist()
                keep = order[: n_out - c]
                if c:
                    cand = order[n_out - c : n_out - c + m]
                    centers, assign = dpc_loop(out[b, [vis_slots[j] for j in cand]], c)
                    keep += [cand[j] for j in centers]
                want = sorted(current[b][j] for j in keep)
                assert stats.kept_positions[layer][b] == want, (s, b)
                if c and s == 0:  # every token stands for one: a center is the plain mean of its cluster
                    for j in centers:
                        members = [vis_slots[cand[i]] for i in range(m) if assign[i] == j]
                        merged_some |= len(members) > 1
                        slot = first + want.index(current[b][cand[j]])
                        torch.testing.assert_close(h_next[b, slot], out[b, members].mean(0), atol=1e-5, rtol=1e-5)
                current[b] = want
    assert merged_some == (shares != "prune")


def test_images_of_different_sizes_keep_their_own_budget_as_alone():
    """LLaVA-NeXT: two anyres images of different counts (different recycling plans, ragged
    candidates and merges) in one batch: exact counts, and the choice of each equals its sample alone."""
    model = tiny_llava_next()
    inp, counts = make_next_inputs(model)
    apply_pumer(model, method="sparsevlm", keep_tokens=6, recycle_share=0.5, cluster_share=0.4)
    with torch.no_grad():
        model(**inp)
    stats = model.pumer.last_stats
    layers = model.pumer.layers
    per_image = [plan_stages(n, 6, len(layers), 0.0) for n in counts]
    assert len({recycle_plan(p[0].n_in, p[0].n_out, 0.5, 0.4) for p in per_image}) == 2  # ragged plans
    stage = -1
    for i, got in enumerate(stats.visual_tokens_per_layer):
        stage = layers.index(i) if i in layers else stage
        assert got == [n if stage < 0 else p[stage].n_out for n, p in zip(counts, per_image)]
    batch = stats.kept_positions
    n0 = inp["input_ids"].shape[1]
    with torch.no_grad():
        for b in range(len(counts)):
            one = alone(inp, b)
            model(**one)
            shift = n0 - one["input_ids"].shape[1]  # the left padding the sample had in the batch
            for layer in layers:
                assert [p + shift for p in model.pumer.last_stats.kept_positions[layer][0]] == batch[layer][b]


@pytest.mark.parametrize("inputs", ["mixed", "anyres"])
def test_no_host_sync_beyond_the_runtimes(inputs):
    """Rows of different lengths and images per row (32 layers, default layers 3, 7, 16), and
    images of different sizes (ragged recycling plans): no more waits for the device than FastV."""
    from pumer_llava import remove_pumer
    from pumer_llava.counting import OpCounter
    from tiny import make_mixed_inputs

    if inputs == "mixed":
        model = tiny_llava(layers=32)
        inp, _ = make_mixed_inputs()
        budget = dict(ratio=0.25)
    else:
        model = tiny_llava_next()
        inp, _ = make_next_inputs(model)
        budget = dict(keep_tokens=6)
    syncs = {}
    for method, opts in (("fastv", {}), ("sparsevlm", dict(recycle_share=0.5, cluster_share=0.4))):
        apply_pumer(model, method=method, **budget, **opts)
        with torch.no_grad(), OpCounter() as c:
            model(**inp, use_cache=True)
        syncs[method] = c.syncs
        assert "nonzero" not in c.sync_ops
        if method == "sparsevlm" and inputs == "mixed":
            assert model.pumer.layers == (3, 7, 16)
            assert model.pumer.last_stats.visual_tokens_final == [4, 8, 0]
        remove_pumer(model)
    assert syncs["sparsevlm"] <= syncs["fastv"], syncs
