"""The public API: validation before patching, replace-not-stack, exact removal."""

import pytest
import torch
from transformers import LlamaForCausalLM

from pumer_llava import PumerConfig, apply_pumer, disabled, list_methods, remove_pumer
from tiny import N_VIS, make_inputs, text_config, tiny_llava


def _hook_counts(model):
    return [
        (len(m._forward_pre_hooks), len(m._forward_hooks), len(getattr(m, "_forward_pre_hooks_with_kwargs", {})))
        for m in model.modules()
    ]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(ratio=0.0), r"ratio must be in \(0, 1\]"),
        (dict(ratio=1.5), r"ratio must be in \(0, 1\]"),
        (dict(ratio=float("nan")), r"ratio must be in \(0, 1\]"),
        (dict(ratio="half"), "ratio must be a number"),
        (dict(keep_tokens=N_VIS + 1), rf"larger than the visual span of one image \({N_VIS} tokens\)"),
        (dict(keep_tokens=0), "keep_tokens must be a positive int"),
        (dict(ratio=0.5, keep_tokens=4), "not both"),
        (dict(layers=[9]), r"outside the model: .* accepts layers 0\.\.5"),
        (dict(layers=[3, 1]), "strictly increasing"),
        (dict(method="fastv", layers=[0]), r"accepts layers 1\.\.5"),
        (dict(method="tome"), "unknown method .tome.; known methods: cdpruner, dart, divprune, fastv, pumer, pyramiddrop, random, sparsevlm, visionzip, vispruner"),
        (dict(merge_share=2.0), r"merge_share must be in \[0, 1\]"),
        (dict(prop_attn="yes"), "prop_attn must be"),
        (dict(merge_rule="average"), "merge_rule must be one of bipartite, recycle"),
        (dict(method="fastv", merge_share=0.5), "method 'fastv' takes no options; got unknown 'merge_share'"),
        (dict(method="random", seed="x"), "seed must be an int"),
    ],
)
def test_bad_arguments_raise_before_touching_the_model(kwargs, match):
    model = tiny_llava("llama")
    before = _hook_counts(model)
    with pytest.raises(ValueError, match=match):
        apply_pumer(model, **kwargs)
    assert _hook_counts(model) == before and not hasattr(model, "pumer")


def test_a_failed_reapply_keeps_the_previous_setup():
    model = tiny_llava("llama")
    apply_pumer(model, ratio=0.5)
    before = _hook_counts(model)
    with pytest.raises(ValueError):
        apply_pumer(model, ratio=2.0)
    assert _hook_counts(model) == before and model.pumer.config.ratio == 0.5


def test_unsupported_model_lists_the_supported_ones():
    model = LlamaForCausalLM(text_config("llama", 2))
    with pytest.raises(ValueError, match=r"unsupported model LlamaForCausalLM .*supported: LlavaForConditionalGeneration"):
        apply_pumer(model)


def test_flex_attention_is_refused():
    model = tiny_llava("llama")
    model.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attention implementation 'flex_attention' is not supported; supported: eager, sdpa"):
        apply_pumer(model)


def test_caches_other_than_dynamic_and_static_are_refused_and_compile_is_left_as_it_was():
    from transformers import DynamicCache
    from transformers.cache_utils import StaticSlidingWindowLayer

    model = tiny_llava("llama")
    model.generation_config.cache_implementation = "offloaded_static"
    with pytest.raises(ValueError, match="cache_implementation='offloaded_static' is not supported"):
        apply_pumer(model)
    assert "pumer" not in model.__dict__
    model.generation_config.cache_implementation = None
    assert not model.generation_config.disable_compile
    apply_pumer(model, ratio=0.25)
    assert not model.generation_config.disable_compile  # generate() compiles a static-cache decode as it would
    cache = DynamicCache(config=model.config)
    cache.layers[0] = StaticSlidingWindowLayer(max_cache_len=64, sliding_window=8)
    with pytest.raises(ValueError, match="StaticSlidingWindowLayer layers"):
        model(**make_inputs(), past_key_values=cache)
    remove_pumer(model)
    assert not model.generation_config.disable_compile  # as the user had it


def test_apply_twice_replaces_and_remove_leaves_nothing():
    model = tiny_llava("llama")
    pristine = _hook_counts(model)
    attrs = set(model.__dict__)
    apply_pumer(model, ratio=0.5)
    once = _hook_counts(model)
    apply_pumer(model, ratio=0.25, method="fastv")
    assert _hook_counts(model) != pristine
    assert sum(map(sum, _hook_counts(model))) <= sum(map(sum, once))  # replaced, not stacked
    assert model.pumer.config.method == "fastv" and model.pumer.config.ratio == 0.25
    remove_pumer(model)
    assert _hook_counts(model) == pristine and set(model.__dict__) == attrs
    remove_pumer(model)  # removing twice is harmless


def test_config_round_trip_and_state_dict():
    model = tiny_llava("llama")
    apply_pumer(model, ratio=0.3, merge_share=0.25)
    d = model.pumer.config.to_dict()
    assert PumerConfig.from_dict(d) == model.pumer.config
    full = model.pumer.to_dict()
    assert full["layers"] == list(model.pumer.layers) and full["merge_share"] == 0.25 and full["prop_attn"] is True
    with pytest.raises(ValueError, match="method 'pumer' takes the options merge_share, merge_rule, prop_attn, merge_window, merge_threshold, merge_metric, merge_text; got unknown 'bogus'"):
        PumerConfig.from_dict({**d, "bogus": 1})
    # an option whose value may be None keeps it (no threshold), not the default 0.85
    assert d["merge_threshold"] == 0.85 and d["merge_rule"] == "recycle"
    off = PumerConfig.make("pumer", merge_threshold=None)
    assert off.options.merge_threshold is None and PumerConfig.from_dict(off.to_dict()) == off
    assert PumerConfig.make("pumer", merge_share=None).options.merge_share == 0.5  # None: the default
    assert {"fastv", "pumer", "random", "vispruner"} <= set(list_methods())


def test_disabled_needs_a_patched_model_and_restores():
    model = tiny_llava("llama")
    with pytest.raises(ValueError, match="needs a model patched"):
        with disabled(model):
            pass
    apply_pumer(model)
    with pytest.raises(RuntimeError):
        with disabled(model):
            raise RuntimeError("boom")
    assert model.pumer.enabled
