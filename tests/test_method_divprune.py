"""DivPrune: greedy max-min diversity of the projected visual tokens, before the first decoder layer."""

import pytest
import torch

from pumer_llava import apply_pumer
from pumer_llava.reduce.diversity import max_min_diverse
from tiny import image_runs as _image_runs, IMAGE_TOKEN, make_mixed_inputs, make_onevision_inputs, tiny_llava, tiny_onevision


def reference(x: torch.Tensor, k: int) -> list[int]:
    """The paper's selection on one image's tokens (n, c), written as a plain loop."""
    f = x.float() / x.float().norm(dim=-1, keepdim=True)
    dist = 1.0 - f @ f.T
    n = x.shape[0]
    chosen: list[int] = []
    for step in range(k):
        best, best_score = None, float("-inf")
        for j in range(n):
            if j in chosen:
                continue
            if step == 0:  # distance to the nearest other token
                score = min((float(dist[i, j]) for i in range(n) if i != j), default=float("inf"))
            else:  # distance to the closest selected token
                score = min(float(dist[s, j]) for s in chosen)
            if score > best_score:  # strict: the lower index wins ties
                best, best_score = j, score
        chosen.append(best)
    return sorted(chosen)


def _ragged(counts, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = max(counts)
    x = torch.randn(len(counts), m, c, generator=g)
    pad = torch.arange(m)[None] >= torch.tensor(counts)[:, None]
    x[pad] = x[:, :1].expand(-1, m, -1)[pad]  # padding repeats the image's first token, as per_image does
    return x, pad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_max_min_equals_reference_loop_on_ragged_images(seed):
    counts, keep = [11, 7, 11, 1, 5], [4, 7, 9, 1, 2]
    x, pad = _ragged(counts, seed=seed)
    x[0, 5] = x[0, 2]  # an exact duplicate
    k_max = max(keep)
    k_pad = torch.arange(k_max)[None] >= torch.tensor(keep)[:, None]
    got = max_min_diverse(x, k_max, pad, k_pad)
    assert got.shape == (len(counts), k_max)
    for i, (n, k) in enumerate(zip(counts, keep)):
        assert got[i, :k].tolist() == reference(x[i, :n], k)
        assert got[i, k:].tolist() == [max(counts) - 1] * (k_max - k)


def test_ties_go_to_the_lower_index():
    e = torch.eye(4)
    x = torch.stack([e[0], e[1], e[0], e[2]])[None]  # tokens 0 and 2 coincide
    # nearest-other distances 0, 1, 0, 1: token 1 first; then 0, 2, 3 are all at 1: token 0;
    # then token 2 is at 0 from token 0, token 3 at 1
    assert max_min_diverse(x, 3).tolist() == [[0, 1, 3]]
    assert max_min_diverse(torch.eye(5)[None], 3).tolist() == [[0, 1, 2]]
    assert max_min_diverse(x, 4).tolist() == [[0, 1, 2, 3]]  # every token once, even at distance 0


def test_padding_is_never_chosen_nor_a_neighbour():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])  # the third entry is padding, a twin of the first
    pad = torch.tensor([[False, False, True]])
    # without the padding, token 0 has no twin: both tokens are equally isolated -> token 0 first
    assert max_min_diverse(x, 1, pad).tolist() == [[0]]
    assert max_min_diverse(x, 1).tolist() == [[1]]
    assert max_min_diverse(x, 2, pad).tolist() == [[0, 1]]


# ----------------------------------------------------------------------------- end to end


def _llava_mixed():
    return tiny_llava("llama"), make_mixed_inputs()[0]  # 1, 2 and 0 images per sample


def _onevision():
    model = tiny_onevision()
    return model, make_onevision_inputs(model)[0]  # anyres: 36 and 72 tokens (newlines included)


@pytest.mark.parametrize("build", [_llava_mixed, _onevision], ids=["llava-multi-image", "onevision-ragged"])
def test_divprune_keeps_the_reference_choice_of_the_llm_inputs(build):
    model, inp = build()
    lm_layers = model.model.language_model.layers
    entered = []  # registered before the runtime's hooks: the unreduced input of the first layer
    handle = lm_layers[0].register_forward_pre_hook(lambda m, a, kw: entered.append(a[0] if a else kw["hidden_states"]),
                                                    with_kwargs=True)
    apply_pumer(model, method="divprune", ratio=0.25)
    with torch.no_grad():
        model(**inp)
    handle.remove()
    stats = model.pumer.last_stats
    hs = entered[0]
    per_sample = []
    for b, runs in enumerate(_image_runs(inp["input_ids"])):
        want = []
        for pos in runs:
            k = round(len(pos) * 0.25)
            want += [pos[j] for j in reference(hs[b, pos], k)]
        assert stats.kept_positions[-1][b] == want
        per_sample.append(len(want))
    assert stats.visual_tokens_per_layer == [per_sample] * len(lm_layers)
    assert sum(per_sample) > 0


def test_divprune_takes_no_options():
    with pytest.raises(ValueError, match="method 'divprune' takes no options; got unknown 'dominant'"):
        apply_pumer(tiny_llava("llama"), method="divprune", dominant=3)
