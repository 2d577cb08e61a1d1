"""The pure math of reduce/, on random tensors."""

import pytest
import torch

from pumer_llava.reduce import bipartite_merge, decoder_flops, plan_stages
from pumer_llava.reduce.match import match_rows
from pumer_llava.reduce.ragged import ragged_nonzero
from pumer_llava.reduce.scoring import (
    apply_rope,
    mean_over_rows,
    mean_over_rows_after,
    mean_received_attention,
    query_row_attention,
)


@pytest.mark.parametrize("n,r", [(9, 3), (10, 5), (7, 3), (2, 1), (1, 1), (8, 0)])
def test_merge_preserves_weighted_sum_and_size(n, r):
    g = torch.Generator().manual_seed(n * 10 + r)
    x = torch.randn(3, n, 5, generator=g, dtype=torch.float64)
    size = torch.rand(3, n, generator=g, dtype=torch.float64) + 0.5
    res = bipartite_merge(x, x, size, r)
    r_eff = min(r, n // 2)
    assert res.keep.shape == (3, n - r_eff)
    xk, sk = res.x.gather(1, res.keep[..., None].expand(-1, -1, 5)), res.size.gather(1, res.keep)
    torch.testing.assert_close((xk * sk[..., None]).sum(1), (x * size[..., None]).sum(1))
    torch.testing.assert_close(sk.sum(1), size.sum(1))
    # src and dst are disjoint from each other; survivors are exactly "not a source"
    for b in range(3):
        src = set(res.src[b][res.src_ok[b]].tolist())
        assert src.isdisjoint(res.keep[b].tolist()) and set(res.dst[b].tolist()) <= set(res.keep[b].tolist())
        assert len(src) == r_eff


def test_merge_joins_the_most_similar_pair():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [1.0, 0.01]]])  # tokens 0 and 3 are near-identical
    res = bipartite_merge(x, x, torch.ones(1, 4), 1)
    assert res.src.tolist() == [[0]] and res.dst.tolist() == [[3]]
    torch.testing.assert_close(res.x[0, 3], torch.tensor([1.0, 0.005]))
    assert res.keep.tolist() == [[1, 2, 3]] and res.size[0, res.keep[0]].tolist() == [1.0, 1.0, 2.0]


def test_merge_with_rows_of_different_lengths():
    """Per-row r and padding: each row equals merging that row alone."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 9, 4, generator=g, dtype=torch.float64)
    size = torch.rand(3, 9, generator=g, dtype=torch.float64) + 0.5
    lengths, r = torch.tensor([9, 6, 3]), torch.tensor([3, 2, 0])
    valid = torch.arange(9)[None] < lengths[:, None]
    res = bipartite_merge(x, x, size, r, valid=valid)
    for b in range(3):
        n = int(lengths[b])
        alone = bipartite_merge(x[b : b + 1, :n], x[b : b + 1, :n], size[b : b + 1, :n], int(r[b]))
        assert res.survive[b, n:].sum() == 0
        assert res.survive[b, :n].nonzero()[:, 0].tolist() == alone.keep[0].tolist()
        torch.testing.assert_close(res.x[b, alone.keep[0]], alone.x[0, alone.keep[0]])
        torch.testing.assert_close(res.size[b, alone.keep[0]], alone.size[0, alone.keep[0]])


@pytest.mark.parametrize("total,keep,stages,share", [(576, 64, 3, 0.5), (576, 144, 3, 0.0), (16, 4, 3, 1.0), (64, 7, 2, 0.5), (10, 10, 2, 0.5), (5, 1, 4, 0.5)])
def test_plan_lands_on_budget(total, keep, stages, share):
    plans = plan_stages(total, keep, stages, share)
    assert len(plans) == stages and plans[0].n_in == total and plans[-1].n_out == keep
    for a, b in zip(plans, plans[1:]):
        assert a.n_out == b.n_in
    for p in plans:
        assert p.prune >= 0 and 0 <= p.merge <= p.n_out
    if share == 0.0:
        assert all(p.merge == 0 for p in plans)


def test_plan_rejects_bad_budget():
    with pytest.raises(ValueError, match="keep must be in"):
        plan_stages(10, 11, 1, 0.5)
    with pytest.raises(ValueError, match="merge_share"):
        plan_stages(10, 5, 1, 1.5)


def test_query_row_attention_matches_full_softmax():
    g = torch.Generator().manual_seed(0)
    b, h, hkv, n, hd = 2, 4, 2, 7, 8
    q_all = torch.randn(b, h, n, hd, generator=g)
    k = torch.randn(b, hkv, n, hd, generator=g)
    full = (q_all @ k.repeat_interleave(2, 1).transpose(-1, -2)) * hd**-0.5
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    full = full.masked_fill(~causal, float("-inf")).softmax(-1)
    rows = torch.tensor([[4, 6], [5, 6]])
    q = torch.stack([q_all[i, :, rows[i]] for i in range(b)])
    allowed = torch.arange(n)[None, None, :] <= rows[:, :, None]
    probs = query_row_attention(q, k, allowed, hd**-0.5)
    want = torch.stack([full[i, :, rows[i]] for i in range(b)])
    torch.testing.assert_close(probs, want)
    valid = torch.tensor([[True, False], [True, True]])
    torch.testing.assert_close(mean_over_rows(probs, valid)[0], want[0, :, 0].mean(0))


def test_rope_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)
    cos, sin = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    q2, k2 = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), q2)
    torch.testing.assert_close(apply_rope(k, cos, sin), k2)


def test_flops_formula():
    assert decoder_flops([10], 4, 8) == 4 * 10 * 16 + 2 * 100 * 4 + 2 * 10 * 4 * 8
    assert decoder_flops([10, 5], 4, 8) == decoder_flops([10], 4, 8) + decoder_flops([5], 4, 8)


def test_ragged_helpers():
    m = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0]]).bool()
    idx, ok = ragged_nonzero(m)
    assert idx.tolist() == [[0, 2, 3], [2, 0, 0]] and ok.tolist() == [[True] * 3, [True, False, False]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_match_rows_finds_exact_copies_only(dtype):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(10, 6, generator=g).to(dtype)
    src = torch.tensor([3, 3, 0, 9, 5])
    x = torch.cat([y[src], torch.randn(2, 6, generator=g).to(dtype), (y[4:5] + 1e-2).to(dtype)])
    assert match_rows(x, y).tolist() == src.tolist() + [-1, -1, -1]
    assert match_rows(x[:0], y).shape == (0,)


def test_mean_received_attention_chunks_agree():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    want = (q @ k.transpose(-1, -2) * 0.5).softmax(-1).mean(1).mean(1)  # (n, N): heads, then queries
    for budget in (1, 40, 1 << 24):
        torch.testing.assert_close(mean_received_attention(q, k, 0.5, budget=budget), want)


def test_mean_over_rows_after_uses_each_keys_own_followers():
    probs = torch.rand(1, 2, 3, 4, generator=torch.Generator().manual_seed(2))  # (B, H, R, N)
    row_pos = torch.tensor([[5, 9, 12]])
    key_end = torch.tensor([[4, 8, 11, 20]])  # key 3's image ends after every row: all rows
    got = mean_over_rows_after(probs, row_pos, torch.ones(1, 3, dtype=torch.bool), key_end)
    per_row = probs.mean(1)[0]
    want = [per_row[:, 0].mean(), per_row[1:, 1].mean(), per_row[2:, 2].mean(), per_row[:, 3].mean()]
    torch.testing.assert_close(got[0], torch.stack(want))


# ------------------------------------------------------------------ the runtime's lean pieces


def test_match_pairs_decides_what_bipartite_merge_merges():
    from pumer_llava.reduce.merge import match_pairs

    g = torch.Generator().manual_seed(3)
    metric = torch.randn(3, 10, 6, generator=g)
    counts, r = [10, 8, 7], [3, 2, 3]
    invalid = torch.arange(10)[None, :] >= torch.tensor(counts)[:, None]
    pairs = match_pairs(metric, counts, r, invalid)
    for b in range(3):
        n = counts[b]
        ref = bipartite_merge(metric[b : b + 1, :n], metric[b : b + 1, :n], torch.ones(1, n), r[b])
        assert pairs.src[b, : r[b]].tolist() == ref.src[0].tolist()
        assert pairs.dst[b, : r[b]].tolist() == ref.dst[0].tolist()
        assert pairs.keep[b, : n - r[b]].tolist() == ref.survive[0].nonzero()[:, 0].tolist()


def test_merge_pairs_conserves_size_weighted_sums():
    from pumer_llava.reduce.merge import merge_pairs

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 5, generator=g)
    size = torch.rand(2, 6, generator=g) + 0.5
    src = torch.tensor([0, 2, 7, 9])  # flat (B*N) indices: row 0 slots 0, 2; row 1 slots 1, 3
    dst = torch.tensor([1, 1, 10, 8])
    out, new = merge_pairs(x, size, src, dst)
    gone = torch.zeros(12, dtype=torch.bool)
    gone[src] = True
    keep = ~gone.view(2, 6)
    for b in range(2):
        before = (size[b, :, None] * x[b]).sum(0)
        after = (new[b, keep[b], None] * out[b, keep[b]]).sum(0)
        torch.testing.assert_close(after, before)
        torch.testing.assert_close(new[b, keep[b]].sum(), size[b].sum())
    untouched = keep.clone()
    untouched.view(-1)[dst] = False
    torch.testing.assert_close(out[untouched], x[untouched])
    ones, count = merge_pairs(x, None, src, dst)  # sizes all one: the plain mean
    torch.testing.assert_close(ones[0, 1], x[0, [0, 1, 2]].mean(0))
    assert count[0, 1] == 3 and count[1, 2] == 2


def test_recycle_targets_are_the_most_similar_kept_tokens():
    from pumer_llava.reduce.merge import recycle_targets

    g = torch.Generator().manual_seed(5)
    kept, removed = torch.randn(2, 5, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    invalid = torch.tensor([[False] * 5, [False, False, False, True, True]])
    got = recycle_targets(kept, removed, invalid)
    for b in range(2):
        for j in range(3):
            sims = [float(torch.nn.functional.cosine_similarity(removed[b, j], kept[b, i], dim=0))
                    if not invalid[b, i] else -2.0 for i in range(5)]
            assert got[b, j] == max(range(5), key=sims.__getitem__)


def test_scores_from_rows_equals_masked_attention_then_row_mean():
    from pumer_llava.reduce.scoring import scores_from_rows

    g = torch.Generator().manual_seed(6)
    b, h, hkv, r, n, hd = 2, 4, 2, 3, 7, 8
    q, k = torch.randn(b, h, r, hd, generator=g), torch.randn(b, hkv, n, hd, generator=g)
    key_pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 9, 9, 9]])  # row 1: three padding keys
    row_pos = torch.tensor([[4, 5, 6], [2, 3, -2]])  # row 1: one padding query row
    key_end = torch.tensor([[-1, 3, 3, 3, -1, -1, -1], [-1, -1, -1, -1, -1, -1, -1]])
    allowed = key_pos[:, None, :] <= row_pos[:, :, None]
    probs = query_row_attention(q, k, allowed, hd**-0.5)  # (B, H, R, N)
    want = mean_over_rows_after(probs, row_pos, row_pos >= 0, key_end)
    w = (row_pos[:, :, None] > key_end[:, None, :]) & (row_pos >= 0)[:, :, None]
    count = h * w.sum(1).clamp_min(1)
    torch.testing.assert_close(scores_from_rows(q, k, hd**-0.5, key_pos, row_pos, key_end, count), want)


def test_a_zero_weight_pair_drops_its_source_without_merging():
    from pumer_llava.reduce.merge import merge_pairs

    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    size = torch.tensor([[1.0, 2.0, 1.0, 1.0, 3.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    src, dst = torch.tensor([0, 2, 6]), torch.tensor([1, 3, 8])
    out, new = merge_pairs(x, size, src, dst, torch.tensor([1.0, 0.0, 1.0]))
    flat_x, flat_s = x.reshape(10, 3), size.reshape(10)
    want1 = (flat_x[1] * 2 + flat_x[0]) / 3
    torch.testing.assert_close(out.reshape(10, 3)[1], want1)
    torch.testing.assert_close(out.reshape(10, 3)[3], flat_x[3])  # its pair had weight 0
    torch.testing.assert_close(out.reshape(10, 3)[8], (flat_x[8] + flat_x[6]) / 2)
    assert new.reshape(10)[[1, 3, 8]].tolist() == [3.0, 1.0, 2.0]


def test_grid_distance_and_allowed_recycle_targets():
    from pumer_llava.reduce.merge import grid_distance, recycle_targets

    a = torch.tensor([[0, 5]])  # on a 4-wide grid: (0, 0) and (1, 1)
    b = torch.tensor([[1, 10, 15]])  # (0, 1), (2, 2), (3, 3)
    d = grid_distance(a, b, torch.tensor([4]))
    assert d.tolist() == [[[1, 2, 3], [1, 1, 2]]]
    kept = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    removed = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    target, best = recycle_targets(kept, removed, None, d <= 1, with_similarity=True)
    # the first may only reach kept 0 (cosine 0); the second kept 0 or 1: 1 is identical
    assert target.tolist() == [[0, 1]] and best[0, 0].item() == 0.0 and abs(best[0, 1].item() - 1.0) < 1e-6


def test_pairs_within_rows_are_flat_slots_of_real_pairs_with_their_cosine():
    """Rows of different lengths and merge counts: every pair lies in one row (A: an even token
    of it, B: an odd one), only the real pairs come back, ``sim`` is their cosine, ``keep`` the
    row's other tokens; the flat slots are the row's own."""
    from pumer_llava.reduce.merge import pair_within_rows

    g = torch.Generator().manual_seed(0)
    counts, r = [6, 5, 4], [2, 1, 0]
    metric = torch.randn(3, 6, 8, generator=g)
    flat = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 24], [30, 31, 32, 33, 33, 33]])
    invalid = torch.tensor([[j >= c for j in range(6)] for c in counts])
    pair_sel = torch.tensor([row * 2 + j for row, n in enumerate(r) for j in range(n)])
    out = pair_within_rows(metric, flat, counts, r, invalid, pair_sel, o_max=4)
    assert out.src.shape == out.dst.shape == out.sim.shape == (sum(r),)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    for s, d, c in zip(out.src.tolist(), out.dst.tolist(), out.sim.tolist()):
        row = s // 10 - 1
        assert d // 10 - 1 == row  # never across rows
        i, j = flat[row].tolist().index(s), flat[row].tolist().index(d)
        assert i % 2 == 0 and j % 2 == 1 and i < counts[row] and j < counts[row]
        assert c == pytest.approx(float(unit[row, i] @ unit[row, j]), abs=1e-5)
    for row in range(3):  # the survivors: every valid token that is not a source, ascending
        gone = {flat[row].tolist().index(s) for s in out.src.tolist() if s // 10 - 1 == row}
        want = [j for j in range(counts[row]) if j not in gone]
        assert out.keep[row, : len(want)].tolist() == want
