"""CDPruner: a DPP over each image's tokens, conditioned on the instruction, before the LLM."""

import pytest
import torch

from pumer_llava import apply_pumer
from pumer_llava.reduce.dpp import dpp_kernel, greedy_map, relevance
from tiny import IMAGE_TOKEN, make_inputs, make_mixed_inputs, make_next_inputs, tiny_llava, tiny_llava_next


def _brute_greedy(L: torch.Tensor, steps: int) -> list[int]:
    """Greedy MAP by definition: each step adds the item that maximises log det L[Y + i]."""
    L = L.double()
    chosen: list[int] = []
    for _ in range(steps):
        best, best_val = None, -float("inf")
        for i in range(L.shape[0]):
            if i in chosen:
                continue
            y = chosen + [i]
            sign, logdet = torch.linalg.slogdet(L[y][:, y])
            val = logdet.item() if sign > 0 else -float("inf")
            if best is None or val > best_val:
                best, best_val = i, val
        chosen.append(best)
    return chosen


def _ragged(counts, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = max(counts)
    feats = torch.randn(len(counts), m, d, generator=g)
    pad = torch.arange(m)[None] >= torch.tensor(counts)[:, None]
    feats = feats.masked_fill(pad[..., None], 0.0) + pad[..., None] * 5.0  # padding: garbage, large
    return feats, pad


@pytest.mark.parametrize("seed", range(4))
def test_greedy_map_equals_brute_force_on_random_kernels(seed):
    counts = [9, 12, 5, 12]
    g = torch.Generator().manual_seed(100 + seed)
    m = max(counts)
    a = torch.randn(len(counts), m, 16, generator=g)
    kernel = a @ a.transpose(1, 2) / 16 + 0.05 * torch.eye(m)  # PSD, well conditioned
    pad = torch.arange(m)[None] >= torch.tensor(counts)[:, None]
    steps = 5
    picks = greedy_map(kernel, steps, pad)
    assert picks.shape == (len(counts), steps)
    for i, c in enumerate(counts):
        n = min(steps, c)
        assert picks[i, :n].tolist() == _brute_greedy(kernel[i, :c, :c], n)


@pytest.mark.parametrize("negate", [False, True])
def test_conditional_kernel_greedy_equals_brute_force(negate):
    """The whole core: relevance from the text rows, L = diag(r) S diag(r), greedy MAP, ragged images."""
    counts = [10, 7, 10]
    feats, pad = _ragged(counts, seed=1)
    g = torch.Generator().manual_seed(2)
    text = torch.randn(3, 4, feats.shape[-1], generator=g)
    text_valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]).bool()
    rel = relevance(feats, text, text_valid, pad, negate=negate)
    kernel = dpp_kernel(feats, rel)
    picks = greedy_map(kernel, 7, pad)
    for i, c in enumerate(counts):
        f = feats[i, :c].double()
        f = f / f.norm(dim=-1, keepdim=True)
        t = text[i, text_valid[i]].double()
        t = t / t.norm(dim=-1, keepdim=True)
        r = (f @ t.T).mean(1) * (-1 if negate else 1)
        r = (r - r.min()) / (r.max() - r.min() + 1e-6)
        torch.testing.assert_close(rel[i, :c].double(), r, atol=1e-5, rtol=0)
        assert (rel[i, c:] == 0).all()
        L = r[:, None] * (f @ f.T) * r[None, :]
        assert picks[i, : min(7, c)].tolist() == _brute_greedy(L, min(7, c))


def test_greedy_map_never_repeats_nor_picks_padding_on_a_rank_deficient_kernel():
    """More tokens than feature dimensions (a small hidden size): the gains run out, the picks stay distinct."""
    counts = [20, 13]
    feats, pad = _ragged(counts, d=4, seed=3)
    rel = relevance(feats, feats[:, :2], torch.ones(2, 2, dtype=torch.bool), pad)
    picks = greedy_map(dpp_kernel(feats, rel), 13, pad)
    for i, c in enumerate(counts):
        row = picks[i, : min(13, c)].tolist()
        assert len(set(row)) == len(row) and all(0 <= j < c for j in row)


def test_greedy_map_reads_nan_as_zero_and_stays_distinct():
    """A token whose features overflowed (NaN in its kernel row) neither poisons the others'
    gains nor repeats: the picks are those of the kernel with that row and column at 0."""
    feats, pad = _ragged([12, 9], d=6, seed=4)
    kernel = dpp_kernel(feats, relevance(feats, feats[:, :2], torch.ones(2, 2, dtype=torch.bool), pad))
    poisoned = kernel.clone()
    poisoned[:, 3, :] = float("nan")
    poisoned[:, :, 3] = float("nan")
    zeroed = poisoned.nan_to_num(nan=0.0)
    picks = greedy_map(poisoned, 9, pad)
    assert torch.equal(picks, greedy_map(zeroed, 9, pad))
    for i, c in enumerate([12, 9]):
        row = picks[i, :c].tolist()
        assert len(set(row)) == len(row) and all(0 <= j < c for j in row)


# ----------------------------------------------------------------------------- end to end on tiny models

def language_model_inputs(model, inp):
    """The unpatched model's input embeddings of the language model (B, N, d)."""
    got = {}

    def grab(mod, args, kwargs):
        got["emb"] = kwargs["inputs_embeds"]

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inp)
    hook.remove()
    return got["emb"]


def images_of(inp):
    """Per image, in order: (row, its input positions, the prompt's text positions after it, or all of its row's)."""
    ids, mask = inp["input_ids"], inp["attention_mask"].bool()
    out = []
    for b in range(ids.shape[0]):
        vis = [p for p in range(ids.shape[1]) if ids[b, p] == IMAGE_TOKEN]
        text = [p for p in range(ids.shape[1]) if mask[b, p] and ids[b, p] != IMAGE_TOKEN]
        runs = []
        for p in vis:
            if runs and p == runs[-1][-1] + 1:
                runs[-1].append(p)
            else:
                runs.append([p])
        for run in runs:
            out.append((b, run, [p for p in text if p > run[-1]] or text))
    return out


def reference_keep(emb, b, vis, text, n_keep, negate):
    feats, txt = emb[b, vis][None], emb[b, text][None]
    rel = relevance(feats, txt, torch.ones(1, len(text), dtype=torch.bool), negate=negate)
    picks = greedy_map(dpp_kernel(feats, rel), n_keep)[0]
    return sorted(vis[j] for j in picks.tolist())


def _batches():
    yield "llava", tiny_llava("llama"), make_inputs((3, 6), (5, 2)), None
    yield "llava-qwen2", tiny_llava("qwen2"), make_inputs((2, 7, 4), (6, 2, 3), seed=3), None
    inp, _ = make_mixed_inputs()
    yield "multi-image", tiny_llava("llama"), inp, None
    model = tiny_llava_next()
    inp, counts = make_next_inputs(model)
    yield "next", model, inp, counts


@pytest.mark.parametrize("negate", [False, True])
def test_kept_tokens_are_the_cores_choice(negate):
    """Each image keeps exactly its budget, and the tokens the core picks from the language model's input."""
    for name, model, inp, _ in _batches():
        emb = language_model_inputs(model, inp)
        apply_pumer(model, method="cdpruner", ratio=0.5, negate_relevance=negate)
        with torch.no_grad():
            model(**inp)
        stats = model.pumer.last_stats
        images = images_of(inp)
        budgets = [round(len(vis) * 0.5) for _, vis, _ in images]
        rows = range(len(inp["input_ids"]))
        per_sample = [sum(k for (b, _, _), k in zip(images, budgets) if b == row) for row in rows]
        assert stats.visual_tokens_per_layer == [per_sample] * len(model.model.language_model.layers), name
        want = [[] for _ in per_sample]
        for (b, vis, text), k in zip(images, budgets):
            want[b] += reference_keep(emb, b, vis, text, k, negate)
        assert stats.kept_positions[-1] == want, name


def test_negated_relevance_changes_the_choice():
    model = tiny_llava("llama")
    inp = make_inputs((3, 6), (5, 4))
    kept = []
    for negate in (False, True):
        apply_pumer(model, method="cdpruner", ratio=0.25, negate_relevance=negate)
        with torch.no_grad():
            model(**inp)
        kept.append(model.pumer.last_stats.kept_positions[-1])
    assert kept[0] != kept[1]


def test_bad_cdpruner_arguments():
    model = tiny_llava("llama")
    with pytest.raises(ValueError, match="negate_relevance must be True or False"):
        apply_pumer(model, method="cdpruner", negate_relevance=1)
    with pytest.raises(ValueError, match="takes the options negate_relevance"):
        apply_pumer(model, method="cdpruner", theta=0.5)
    assert not hasattr(model, "pumer")


def test_unpadded_and_unit_row_paths_equal_the_general_one():
    """No padding (pad None) and features already unit rows (``unit_feats=True``, what the
    method passes) take shortcuts; they must give the general path's numbers."""
    from pumer_llava.reduce.merge import unit

    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 9, 6, generator=g)
    text = torch.randn(2, 3, 6, generator=g)
    text_valid = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    no_pad = torch.zeros(2, 9, dtype=torch.bool)
    rel = relevance(feats, text, text_valid, no_pad)
    torch.testing.assert_close(relevance(feats, text, text_valid), rel, rtol=0, atol=0)
    torch.testing.assert_close(relevance(unit(feats), text, text_valid, unit_feats=True), rel, rtol=0, atol=0)
    kernel = dpp_kernel(feats, rel)
    torch.testing.assert_close(dpp_kernel(unit(feats), rel, unit_feats=True), kernel, rtol=0, atol=0)
    assert torch.equal(greedy_map(kernel, 5), greedy_map(kernel, 5, no_pad))
    assert greedy_map(kernel, 0).shape == (2, 0)
