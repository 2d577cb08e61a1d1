"""Every registered method through one equivalence body, on every adapter row where it applies;
the registry, options and refusals."""

from dataclasses import dataclass

import pytest
import torch

from pumer_llava import Choice, Method, MethodOptions, apply_pumer, list_methods, methods_for, register_method, remove_pumer
from pumer_llava.api import missing_inputs
from pumer_llava.methods import METHODS, get_method, keep_top
from pumer_llava.reduce import plan_stages
from test_architectures import BUILDERS, _hooks
from tiny import alone, assert_cached_equals_recomputed, make_inputs, tiny_llava

GEN = dict(do_sample=False, max_new_tokens=4)
RATIO = 0.25


def test_the_field_s_ten_methods_are_registered():
    assert set(list_methods()) >= {"pumer", "vispruner", "fastv", "random", "visionzip", "divprune", "cdpruner",
                                   "dart", "pyramiddrop", "sparsevlm"}
    for name in list_methods():
        m = get_method(name)
        assert m.name == name and m.description and m.description != "(being written)"


def _expected_per_layer(model, total: int) -> list[int]:
    """Each layer's visual count for one image of ``total`` tokens, from the host plan."""
    state = model.pumer
    stage_layers = ([0] if state.method.before_llm is not None else []) + list(state.layers)
    plans = plan_stages(total, round(total * RATIO), len(stage_layers), state.merge_share)
    want, cur = [], total
    for i in range(state.depth):
        for s, layer in enumerate(stage_layers):
            if layer == i:
                cur = plans[s].n_out
        want.append(cur)
    return want


@pytest.mark.parametrize("method", list_methods())
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_method_equivalence_body(arch, method):
    """ratio 1.0 == unpatched; exact budget per image and per layer; cached == uncached generation;
    a padded batch == each sample alone; reducing at the first layer it accepts still generates
    the same with and without the cache; remove gives the unpatched model back. Where the model
    lacks the method's inputs: refused with the reason and the methods that work there."""
    model, inp, counts = BUILDERS[arch]()
    m = get_method(method)
    why = missing_inputs(m, model)
    if why is not None:
        before = _hooks(model)
        with pytest.raises(ValueError) as e:
            apply_pumer(model, ratio=RATIO, method=method)
        msg = str(e.value)
        assert f"method {method!r} cannot run on" in msg and why in msg
        assert "Methods that work here: " + ", ".join(methods_for(model)) in msg
        assert not hasattr(model, "pumer") and _hooks(model) == before
        return
    with torch.no_grad():
        ref = model(**inp).logits
        ref_gen = model.generate(**inp, **GEN)
        apply_pumer(model, ratio=1.0, method=method)
        assert (model(**inp).logits - ref).abs().max().item() <= 1e-5
        assert torch.equal(model.generate(**inp, **GEN), ref_gen)

    apply_pumer(model, ratio=RATIO, method=method)
    cached, stats = assert_cached_equals_recomputed(model, inp, **GEN)
    per_sample = [[v[b] for v in stats.visual_tokens_per_layer] for b in range(len(counts))]
    assert per_sample == [_expected_per_layer(model, c) for c in counts]
    assert stats.visual_tokens_final == [round(c * RATIO) for c in counts]
    n = GEN["max_new_tokens"]
    with torch.no_grad():
        for i in range(len(counts)):
            one = model.generate(**alone(inp, i), **GEN)
            assert torch.equal(cached.sequences[i, -n:], one[0, -n:]), f"sample {i} alone differs"

    if m.in_llm:
        first = max(m.min_layer, -m.score_offset)
        apply_pumer(model, ratio=RATIO, method=method, layers=[first])
        _, stats = assert_cached_equals_recomputed(model, inp, do_sample=False, max_new_tokens=6)
        assert stats.visual_tokens_per_layer[first] == [round(c * RATIO) for c in counts]

    remove_pumer(model)
    with torch.no_grad():
        assert (model(**inp).logits - ref).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------- registry and options


@dataclass(frozen=True)
class EveryOther(MethodOptions):
    """offset: keep every other visual token starting here (0 or 1)."""

    offset: int = 0

    def validate(self):
        if self.offset not in (0, 1):
            raise ValueError(f"offset must be 0 or 1, got {self.offset}")


def _every_other(ctx):
    """Scores that rank the tokens of the chosen parity first, each image on its own."""
    parity = (ctx.tokens.pos % 2 == ctx.options.offset).float()
    return parity - ctx.tokens.pos.float() * 1e-3  # ties: the earlier token


def test_a_user_method_registers_in_one_call_and_runs_everywhere():
    method = Method(name="every_other", description="every other visual token", options=EveryOther,
                    score=_every_other, default_layers=lambda depth: (1,))
    register_method(method)
    try:
        assert "every_other" in list_methods()
        model = tiny_llava("llama")
        inp = make_inputs((3, 6), (5, 2))
        apply_pumer(model, keep_tokens=4, method="every_other", offset=1)
        with torch.no_grad():
            model(**inp)
        kept = model.pumer.last_stats.kept_positions[1]
        starts = [3, 6]  # the images follow prefixes of 3 and 6 tokens (both rows 24 long: no padding)
        for row, s in zip(kept, starts):
            assert row == [p for p in range(s, s + 16) if p % 2 == 1][:4]
        with pytest.raises(ValueError, match="method 'every_other' takes the options offset; got unknown 'merge_share'"):
            apply_pumer(model, method="every_other", merge_share=0.5)
        with pytest.raises(ValueError, match="offset must be 0 or 1, got 2"):
            apply_pumer(model, method="every_other", offset=2)
        with pytest.raises(ValueError, match="already registered"):
            register_method(Method(name="every_other", score=_every_other))
        register_method(Method(name="every_other", score=_every_other, select=keep_top), replace=True)
    finally:
        METHODS.pop("every_other", None)


def test_a_method_must_do_something_and_name_itself():
    with pytest.raises(ValueError, match="does nothing: give before_llm, score or select"):
        Method(name="idle")
    with pytest.raises(ValueError, match="needs a name"):
        Method(name="", score=_every_other)
    with pytest.raises(ValueError, match="names the unreduced model"):
        register_method(Method(name="none", score=_every_other))
    with pytest.raises(ValueError, match="needs unknown inputs"):
        Method(name="x", score=_every_other, needs={"depth_map"})


def test_a_choice_of_the_wrong_shape_says_what_was_expected():
    bad = Method(name="bad", select=lambda ctx: Choice(keep=torch.zeros(ctx.n_images, ctx.out_max + 1, dtype=torch.long)),
                 default_layers=lambda depth: (1,))
    model = tiny_llava("llama")
    apply_pumer(model, keep_tokens=4, method=bad)
    with torch.no_grad(), pytest.raises(ValueError, match=r"the choice keeps \(2, 5\) local indices, expected \(2, 4\)"):
        model(**make_inputs((3, 6), (5, 2)))


def test_options_reach_the_state_and_the_config():
    model = tiny_llava("llama")
    apply_pumer(model, ratio=0.25, method="vispruner", important_ratio=0.75)
    d = model.pumer.to_dict()
    assert d["important_ratio"] == 0.75 and d["method"] == "vispruner" and d["before_llm"] is True
    assert model.pumer.config.options.important_ratio == 0.75
    apply_pumer(model, ratio=0.25, method="random", seed=3)
    assert model.pumer.to_dict()["seed"] == 3


def test_the_documented_example_registers_and_runs():
    """docs/api.md's own-method example, executed as written on a tiny model."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    block = text.split("Registering your own takes one call:", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert len(block.strip().splitlines()) <= 22
    model = tiny_llava("llama")
    try:
        exec(compile(block, "docs/api.md", "exec"), {"model": model})
        inp = make_inputs((3, 6), (5, 2))
        with torch.no_grad():
            model(**inp)
        assert model.pumer.last_stats.visual_tokens_final == [4, 4]
        assert model.pumer.to_dict()["largest"] is True
    finally:
        METHODS.pop("hidden_norm", None)


def test_which_methods_each_adapter_row_runs():
    """The per-model table of docs/api.md: LLaVA-1.5 all ten, anyres rows all but visionzip,
    the Qwen-VL rows the methods that act inside the language model."""
    in_llm = {n for n in list_methods() if get_method(n).before_llm is None}
    want = {
        "llava-llama": set(list_methods()),
        "llava-qwen2": set(list_methods()),
        "llava_next": set(list_methods()) - {"visionzip"},
        "llava_onevision": set(list_methods()) - {"visionzip"},
        "qwen2_vl": in_llm,
        "qwen2_5_vl": in_llm,
    }
    for arch, build in BUILDERS.items():
        model, _, _ = build()
        assert set(methods_for(model)) == want[arch], arch
