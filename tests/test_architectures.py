"""One equivalence body over every adapter row (DESIGN.md, STYLE.md item 8)."""

import pytest
import torch

from pumer_llava import apply_pumer, list_methods, remove_pumer
from pumer_llava.hooks.adapters import ADAPTERS
from pumer_llava.reduce import plan_stages
from tiny import (
    alone,
    assert_cached_equals_recomputed,
    make_inputs,
    make_next_inputs,
    make_qwen_vl_inputs,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen_vl,
)

GEN = dict(do_sample=False, max_new_tokens=5)


def _llava(kind):
    def build():
        model = tiny_llava(kind)
        inp = make_inputs((3, 6), (5, 2))
        return model, inp, [16, 16]
    return build


def _llava_next():
    model = tiny_llava_next()
    inp, counts = make_next_inputs(model)
    return model, inp, counts


def _qwen_vl(version):
    def build():  # an image; an image and a video (M-RoPE time rows differ): 16 and 20 tokens
        model = tiny_qwen_vl(version)
        inp, counts = make_qwen_vl_inputs(model)
        return model, inp, counts
    return build


BUILDERS = {
    "llava-llama": _llava("llama"),
    "llava-qwen2": _llava("qwen2"),
    "llava_next": _llava_next,
    "qwen2_vl": _qwen_vl("2"),
    "qwen2_5_vl": _qwen_vl("2.5"),
}


def test_every_adapter_row_is_covered():
    types = {b()[0].config.model_type for b in BUILDERS.values()}
    assert types == set(ADAPTERS)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_ratio_one_equals_unpatched_and_remove_restores(arch):
    model, inp, _ = BUILDERS[arch]()
    with torch.no_grad():
        ref, ref_gen = model(**inp).logits, model.generate(**inp, **GEN)
        apply_pumer(model, ratio=1.0)
        assert (model(**inp).logits - ref).abs().max().item() <= 1e-5
        assert torch.equal(model.generate(**inp, **GEN), ref_gen)
        apply_pumer(model, ratio=0.25)
        model(**inp)
        remove_pumer(model)
        assert (model(**inp).logits - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_exact_counts_cache_and_padding(arch):
    """Per-sample schedules; cached decoding equals recomputation; a padded batch equals each sample."""
    model, inp, counts = BUILDERS[arch]()
    apply_pumer(model, ratio=0.25, merge_share=1.0)  # merge-only: decisions independent of the text
    layers, share = model.pumer.layers, model.pumer.merge_share
    cached, stats = assert_cached_equals_recomputed(model, inp, **GEN)
    with torch.no_grad():
        for b, total in enumerate(counts):
            plans = plan_stages(total, round(total * 0.25), len(layers), share)
            stage, want = -1, []
            for i in range(len(stats.visual_tokens_per_layer)):
                stage = layers.index(i) if i in layers else stage
                want.append(total if stage < 0 else plans[stage].n_out)
            assert [v[b] for v in stats.visual_tokens_per_layer] == want
        for i in range(len(counts)):
            one = model.generate(**alone(inp, i), **GEN)
            assert torch.equal(cached.sequences[i, -GEN["max_new_tokens"] :], one[0, -GEN["max_new_tokens"] :])


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_every_method_runs_or_refuses_clearly(arch):
    model, inp, counts = BUILDERS[arch]()
    for method in list_methods():
        try:
            apply_pumer(model, ratio=0.25, method=method)
        except ValueError as e:  # refused at apply time, saying why
            assert method in str(e) and not hasattr(model, "pumer")
            continue
        with torch.no_grad():
            model.generate(**inp, **GEN)
        assert model.pumer.last_stats.visual_tokens_final == [round(c * 0.25) for c in counts]
        remove_pumer(model)
