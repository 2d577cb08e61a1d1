"""Every mode of ``generate()`` with the reduction on, over every adapter row and method.

Properties taken from transformers' own generation tests, at the methods' default layers and
with the first decoder layer reducing (``layer0``): the reduced KV cache carries its positions,
so every cache operation transformers performs stays correct.
"""

import copy
import gc
import shutil

import pytest
import torch

from pumer_llava import apply_pumer, disabled, list_methods, methods_for, remove_pumer
from test_architectures import BUILDERS
from tiny import IMAGE_TOKEN, N_VIS, VOCAB, alone, append_tokens, make_inputs, make_qwen_vl_inputs, tiny_llava

GEN = dict(do_sample=False, max_new_tokens=4)
# (method, layers): the default layers, and the earliest each method can reduce at
SETUPS = {
    "pumer": (None, [0, 2]),
    "fastv": (None, [1]),
    "random": (None, [0]),
    "vispruner": (None, [0]),  # before the LLM, then a PuMer stage at layer 0 (the hybrid)
}
CASES = [(arch, method, where) for arch in BUILDERS for method in SETUPS for where in ("default", "layer0")
         if not (method == "vispruner" and arch.startswith("qwen"))]


def _apply(model, method, where, ratio=0.25):
    layers = SETUPS[method][0 if where == "default" else 1]
    return apply_pumer(model, ratio=ratio, method=method, layers=layers)


def _gen(model, inp, **kw):
    with torch.no_grad():
        return model.generate(**inp, **{**GEN, **kw})


@pytest.mark.parametrize("arch,method,where", CASES)
def test_cached_uncached_padded_and_scores(arch, method, where):
    model, inp, counts = BUILDERS[arch]()
    _apply(model, method, where)
    out = _gen(model, inp, output_scores=True, output_logits=True, return_dict_in_generate=True)
    stats = model.pumer.last_stats
    assert stats.visual_tokens_final == [round(c * 0.25) for c in counts]
    if where == "layer0":  # the earliest layer the method can reduce at already holds fewer visual tokens
        first = SETUPS[method][1][0]
        assert all(v < c for v, c in zip(stats.visual_tokens_per_layer[first], counts))
    again = _gen(model, inp, output_scores=True, return_dict_in_generate=True, use_cache=False)
    assert torch.equal(out.sequences, again.sequences)
    for a, b in zip(out.scores, again.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    bsz, vocab = inp["input_ids"].shape[0], model.config.text_config.vocab_size
    assert len(out.scores) == len(out.logits) == GEN["max_new_tokens"]
    assert all(s.shape == (bsz, vocab) for s in out.scores + out.logits)
    n = GEN["max_new_tokens"]
    for i in range(bsz):  # a left-padded batch gives each sample its own answer
        one = _gen(model, alone(inp, i))
        assert torch.equal(out.sequences[i, -n:], one[0, -n:])


@pytest.mark.parametrize("arch,method,where", CASES)
def test_beams_sampling_and_speculative_decoding(arch, method, where):
    model, inp, _ = BUILDERS[arch]()
    _apply(model, method, where)
    # prompt-lookup decoding proposes tokens and rolls the cache back (crop) when they are rejected
    one = alone(inp, 0)  # transformers' speculative decoding takes one sample at a time
    looked = _gen(model, one, prompt_lookup_num_tokens=2, max_new_tokens=6)
    assert torch.equal(looked, _gen(model, one, max_new_tokens=6))
    beams = _gen(model, inp, num_beams=3, num_return_sequences=2)
    beams_nc = _gen(model, inp, num_beams=3, num_return_sequences=2, use_cache=False)
    assert beams.shape[0] == 2 * inp["input_ids"].shape[0] and torch.equal(beams, beams_nc)
    samples = []
    for _ in range(2):
        torch.manual_seed(7)
        samples.append(_gen(model, inp, do_sample=True, num_return_sequences=2, top_k=0, temperature=1.5))
    assert torch.equal(samples[0], samples[1]) and samples[0].shape[0] == 2 * inp["input_ids"].shape[0]


@pytest.mark.parametrize("arch,method,where", CASES)
def test_static_cache_gives_the_dynamic_cache_tokens(arch, method, where):
    """``cache_implementation="static"``: reduced layers are preallocated to what they keep plus
    the new tokens, and answer as the dynamic cache does (greedy, beams, a padded batch)."""
    from pumer_llava.hooks.cache import ReducedStaticLayer

    model, inp, _ = BUILDERS[arch]()
    _apply(model, method, where)
    for kw in (dict(), dict(num_beams=2)):
        dynamic = _gen(model, inp, **kw)
        static = _gen(model, inp, cache_implementation="static", return_dict_in_generate=True, **kw)
        assert torch.equal(static.sequences, dynamic), (arch, method, where, kw)
    layers = static.past_key_values.layers
    reduced = [x for x in layers if isinstance(x, ReducedStaticLayer)]
    assert reduced and all(x.max_cache_len < x.logical_len for x in reduced)  # fewer slots than positions


@pytest.mark.parametrize("arch,method,where", CASES)
def test_compiled_decoding_gives_the_dynamic_cache_tokens_and_compiles_once(arch, method, where):
    """generate()'s compiled decoding forward (a static cache, ``torch.compile`` with
    ``fullgraph=True``, as transformers' own compile tests ask): the dynamic cache's tokens, one
    graph for every step (a reduced layer's shapes do not change from step to step), reused by
    the next generation of the same shapes."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model, inp, _ = BUILDERS[arch]()
    _apply(model, method, where)
    cfg = CompileConfig(fullgraph=True, backend="aot_eager")  # the graph inductor takes, without a C++ build
    cfg._compile_all_devices = True  # generate() compiles on its own only on accelerators
    dynamic = _gen(model, inp, max_new_tokens=6)
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        compiled = _gen(model, inp, max_new_tokens=6, cache_implementation="static", compile_config=cfg)
        assert torch.equal(compiled, dynamic), (arch, method, where)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    if where == "default":  # beam search reorders the slots' positions with the keys
        kw = dict(num_beams=2, max_new_tokens=4)
        assert torch.equal(_gen(model, inp, cache_implementation="static", compile_config=cfg, **kw), _gen(model, inp, **kw))


# the methods registered as plug-ins beyond the four above: every mode once, on the row with one
# image per sample and on the anyres row (images of other sizes, fillers, a padded batch)
PLUGIN_CASES = [(arch, method) for arch in ("llava-llama", "llava_next") for method in list_methods()
                if method not in SETUPS]


@pytest.mark.parametrize("arch,method", PLUGIN_CASES)
def test_every_generation_mode_with_each_plugin_method(arch, method):
    """Static cache (greedy, beams, sampling), compiled decoding, beams without a cache,
    prompt-lookup decoding and a second turn from the cache: what the dynamic cache, the
    uncached model and the whole conversation give, at the method's default layers."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model, inp, _ = BUILDERS[arch]()
    if method not in methods_for(model):  # refused there, with the reason (tests/test_methods.py)
        pytest.skip(f"{method} does not run on {arch}")
    apply_pumer(model, ratio=0.25, method=method)
    dynamic = _gen(model, inp)
    assert torch.equal(_gen(model, inp, cache_implementation="static"), dynamic)
    assert torch.equal(_gen(model, inp, cache_implementation="static", num_beams=2), _gen(model, inp, num_beams=2))
    assert torch.equal(_gen(model, inp, num_beams=3, num_return_sequences=2, use_cache=False),
                       _gen(model, inp, num_beams=3, num_return_sequences=2))
    samples = []
    for cache in ("static", "dynamic"):
        torch.manual_seed(3)
        samples.append(_gen(model, inp, do_sample=True, top_k=0, temperature=1.5, cache_implementation=cache))
    assert torch.equal(*samples)
    one = alone(inp, 0)
    assert torch.equal(_gen(model, one, prompt_lookup_num_tokens=2, max_new_tokens=6), _gen(model, one, max_new_tokens=6))
    with torch.no_grad():
        first = model.generate(**inp, **GEN, return_dict_in_generate=True)
        question = torch.randint(5, VOCAB - 1, (inp["input_ids"].shape[0], 3), generator=torch.Generator().manual_seed(3))
        turn2 = append_tokens(append_tokens(inp, first.sequences[:, inp["input_ids"].shape[1]:]), question)
        text_only = {k: v for k, v in turn2.items() if k in ("input_ids", "attention_mask")}
        cont = model.generate(**text_only, **GEN, past_key_values=first.past_key_values)
        assert torch.equal(cont, model.generate(**turn2, **GEN, use_cache=False))
    if arch == "llava-llama":
        cfg = CompileConfig(fullgraph=True, backend="aot_eager")  # inductor's graph, without a C++ build
        cfg._compile_all_devices = True
        torch.compiler.reset()
        counters.clear()
        for _ in range(2):
            assert torch.equal(_gen(model, inp, cache_implementation="static", compile_config=cfg), dynamic)
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def _two_inputs(arch, model):
    """Two different prompts of one shape (the same layout, other ids and pixels)."""
    if arch.startswith("qwen"):
        return [make_qwen_vl_inputs(model, seed=s)[0] for s in (0, 1)]
    return [make_inputs((3, 6), (5, 2), seed=s) for s in (0, 1)]


def _finite_diff(a, b) -> float:
    """Largest difference of two score tensors where they are finite (-inf: a suppressed token)."""
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    ok = torch.isfinite(a)
    return (a[ok].float() - b[ok].float()).abs().max().item()


def _assert_same_generation(a, b, atol):
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.scores) == len(b.scores)
    for x, y in zip(a.scores, b.scores):
        assert _finite_diff(x, y) <= atol


UPSTREAM = [(arch, method) for arch in ("llava-llama", "qwen2_vl") for method in SETUPS
            if not (method == "vispruner" and arch.startswith("qwen"))]


@pytest.mark.parametrize("arch,method", UPSTREAM)
def test_upstream_static_cache_checks_hold_with_the_reduction_on(arch, method):
    """What transformers' static-cache generation test checks, with the reduction on: 20 new
    tokens in float32 and float16; the cache is a ``StaticCache`` whose every layer is as long
    as the dynamic cache's after the same generation (the prompt's kept entries plus the new
    tokens: a reduced layer is preallocated to what it keeps, not to the prompt); the same
    tokens, and scores within 1e-5 of the dynamic cache's in float32. In float16 on a CPU the
    unreduced model's own static and dynamic caches differ by ~5e-4 (attention over the
    preallocated slots sums in another order), so there the bound is that difference, twice."""
    from transformers import StaticCache

    model, inp, _ = BUILDERS[arch]()
    _apply(model, method, "default")
    kw = dict(max_new_tokens=20, return_dict_in_generate=True, output_scores=True, use_cache=True)
    for dtype in (torch.float32, torch.float16):
        model.to(dtype)
        x = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in inp.items()}
        static = _gen(model, x, cache_implementation="static", **kw)
        dynamic = _gen(model, x, **kw)
        assert isinstance(static.past_key_values, StaticCache)
        lengths = [layer.keys.shape[-2] for layer in static.past_key_values.layers]
        assert lengths == [layer.keys.shape[-2] for layer in dynamic.past_key_values.layers], dtype
        plain = x["input_ids"].shape[1] + kw["max_new_tokens"] - 1  # the unreduced length, the last token uncached
        assert max(lengths) <= plain and min(lengths) < plain  # the reduced layers are shorter
        atol = 1e-5
        if dtype == torch.float16:
            with disabled(model):
                ref = [_gen(model, x, cache_implementation=c, **kw).scores for c in ("static", "dynamic")]
            atol = max(atol, 2 * max(_finite_diff(a, b) for a, b in zip(*ref)))
        _assert_same_generation(static, dynamic, atol=atol)


@pytest.mark.parametrize("arch,method", UPSTREAM)
def test_upstream_compile_checks_hold_with_the_reduction_on(arch, method):
    """What transformers' compiled-forward generation test checks, with the reduction on: two
    different prompts of one shape, generated one after the other by ``generate``'s compiled
    decoding forward (a static cache, ``fullgraph=True``, ``dynamic=False``), give what eager
    decoding with the dynamic cache gives (tokens, scores), with one graph and no
    recompilation for the second prompt (the reduced cache's slots depend on the prompt's
    shape, never on its content)."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model, _, _ = BUILDERS[arch]()
    _apply(model, method, "default")
    inputs = _two_inputs(arch, model)
    cfg = CompileConfig(fullgraph=True, dynamic=False, backend="aot_eager")  # inductor's graph, no C++ build
    cfg._compile_all_devices = True  # generate() compiles on its own only on accelerators
    kw = dict(max_new_tokens=5, return_dict_in_generate=True, output_scores=True, compile_config=cfg)
    with torch.compiler.set_stance("force_eager"):
        eager = [_gen(model, x, **kw) for x in inputs]
    assert not torch.equal(eager[0].sequences, eager[1].sequences)  # two prompts, two answers
    torch.compiler.reset()
    counters.clear()
    compiled = [_gen(model, inputs[0], cache_implementation="static", **kw)]
    with torch.compiler.set_stance("fail_on_recompile"):  # the second prompt reuses the graph as it is
        compiled.append(_gen(model, inputs[1], cache_implementation="static", **kw))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for a, b in zip(compiled, eager):
        _assert_same_generation(a, b, atol=1e-5)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler on CPU")
def test_inductor_compiles_the_reduced_decoding_forward():
    """The default backend, as transformers runs its compile test: inductor builds the reduced
    decoding forward (fullgraph, static shapes) once and gives the dynamic cache's tokens."""
    from transformers import CompileConfig

    model, inp, _ = BUILDERS["llava-llama"]()
    _apply(model, "pumer", "default")
    cfg = CompileConfig(fullgraph=True, dynamic=False)
    cfg._compile_all_devices = True
    dynamic = _gen(model, inp, max_new_tokens=5)
    torch.compiler.reset()
    assert torch.equal(_gen(model, inp, max_new_tokens=5, cache_implementation="static", compile_config=cfg), dynamic)
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(_gen(model, inp, max_new_tokens=5, cache_implementation="static", compile_config=cfg),
                           dynamic)


def test_chunked_prefill_is_refused_with_the_reason():
    model, inp, _ = BUILDERS["llava-llama"]()
    apply_pumer(model, ratio=0.25)
    before = _gen(model, inp)
    with pytest.raises(NotImplementedError, match=r"prefill_chunk_size=\.\.\.\) is not supported"):
        _gen(model, inp, prefill_chunk_size=8)
    assert torch.equal(_gen(model, inp), before)  # the next generation is not disturbed


@pytest.mark.parametrize("method,where", [(m, w) for m in SETUPS for w in ("default", "layer0")])
def test_assisted_decoding_equals_greedy(method, where):
    model = tiny_llava()
    assistant = tiny_llava(seed=1)  # another model proposes; every rejected proposal is cropped away
    inp = make_inputs((3,), (5,))
    _apply(model, method, where)
    greedy = _gen(model, inp, max_new_tokens=6)
    assisted = _gen(model, inp, max_new_tokens=6, assistant_model=assistant)
    assert torch.equal(assisted, greedy)


@pytest.mark.parametrize("arch,method,where", CASES)
def test_second_turn_from_the_cache_equals_the_whole_conversation(arch, method, where):
    """Turn 2 continues the reduced cache; without a cache, the whole conversation keeps the
    tokens turn 1's prompt chose (the prompt decides), so both give the same answer."""
    model, inp, _ = BUILDERS[arch]()
    _apply(model, method, where)
    with torch.no_grad():
        first = model.generate(**inp, **GEN, return_dict_in_generate=True)
        n_full = first.past_key_values.get_seq_length()
        assert n_full == first.sequences.shape[1] - 1  # the logical length, removed tokens counted
        g = torch.Generator().manual_seed(3)
        question = torch.randint(5, VOCAB - 1, (inp["input_ids"].shape[0], 3), generator=g)
        turn2 = append_tokens(append_tokens(inp, first.sequences[:, inp["input_ids"].shape[1]:]), question)
        text_only = {k: v for k, v in turn2.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
        cont = model.generate(**text_only, **GEN, past_key_values=first.past_key_values)
        whole = model.generate(**turn2, **GEN, use_cache=False)
    assert torch.equal(cont, whole)


@pytest.mark.parametrize("arch,method,where", [c for c in CASES if c[0] in ("llava-llama", "qwen2_vl")])
def test_prompt_reuse_with_a_deep_copy_of_the_prompt_cache(arch, method, where):
    """Encode the image once, ask several questions: each from a copy of the prompt's reduced cache
    gives what a fresh prefill of the prompt followed by the same question gives."""
    model, inp, _ = BUILDERS[arch]()
    _apply(model, method, where)
    n = inp["input_ids"].shape[1]
    with torch.no_grad():
        prompt_cache = model(**inp, use_cache=True).past_key_values
        kept = model.pumer.last_stats.kept_positions
        g = torch.Generator().manual_seed(5)
        for _ in range(2):
            question = torch.randint(5, VOCAB - 1, (inp["input_ids"].shape[0], 4), generator=g)
            full = append_tokens(inp, question)
            text_only = {k: v for k, v in full.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
            reused = model.generate(**text_only, **GEN, past_key_values=copy.deepcopy(prompt_cache))
            fresh_cache = model(**inp, use_cache=True).past_key_values
            assert model.pumer.last_stats.kept_positions == kept
            fresh = model.generate(**text_only, **GEN, past_key_values=fresh_cache)
            assert torch.equal(reused, fresh)
            assert torch.equal(reused[:, : n + 4], full["input_ids"])
        assert prompt_cache.get_seq_length() == n  # the copies grew, the prompt's cache did not


def test_vispruner_chat_continues_for_several_turns():
    model = tiny_llava()
    inp = make_inputs((3,), (5,))
    apply_pumer(model, method="vispruner", ratio=0.25)
    with torch.no_grad():
        out = model.generate(**inp, **GEN, return_dict_in_generate=True)
        seq, cache = out.sequences, out.past_key_values
        for turn in range(2):
            nxt = torch.cat([seq, torch.tensor([[10 + turn, 11, 12]])], 1)
            step = model.generate(input_ids=nxt, attention_mask=torch.ones_like(nxt), past_key_values=cache, **GEN,
                                  return_dict_in_generate=True)
            whole = model.generate(input_ids=nxt, attention_mask=torch.ones_like(nxt),
                                   pixel_values=inp["pixel_values"], **GEN, use_cache=False)
            assert torch.equal(step.sequences, whole)
            seq, cache = step.sequences, step.past_key_values


def test_deep_copy_of_a_patched_model_reduces_on_its_own():
    model = tiny_llava()
    inp = make_inputs((3, 6), (5, 2))
    with torch.no_grad():
        ref = model(**inp).logits
    apply_pumer(model, ratio=0.25)
    twin = copy.deepcopy(model)
    assert twin.pumer is not model.pumer and twin.pumer.model is twin
    with torch.no_grad():
        reduced = twin(**inp).logits
        assert twin.pumer.last_stats.visual_tokens_final == [4, 4]
        with disabled(twin):
            torch.testing.assert_close(twin(**inp).logits, ref, atol=1e-5, rtol=1e-5)
        remove_pumer(model)
        del model
        gc.collect()
        torch.testing.assert_close(twin(**inp).logits, reduced)  # still reducing, on its own state
        remove_pumer(twin)
        assert not hasattr(twin, "pumer")
        assert not [h for m in twin.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
                    if type(h).__module__ == "pumer_llava.hooks.runtime"]
        torch.testing.assert_close(twin(**inp).logits, ref, atol=1e-5, rtol=1e-5)


def test_labels_as_tuple_and_shift_labels_behave_as_transformers():
    model = tiny_llava()
    inp = make_inputs((3,), (5,))
    labels = inp["input_ids"].masked_fill(inp["input_ids"] == IMAGE_TOKEN, -100)
    apply_pumer(model, ratio=0.25)
    with torch.no_grad():
        out = model(**inp, labels=labels)
        tup = model(**inp, labels=labels, return_dict=False)
        assert torch.equal(tup[0], out.loss) and torch.equal(tup[1], out.logits)
        shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
        by_shift = model(**inp, shift_labels=shift, labels=labels)
        torch.testing.assert_close(by_shift.loss, out.loss)
        # shift_labels decides which targets count: dropping the last answer target changes the loss
        fewer = shift.clone()
        fewer[:, -2] = -100
        assert (model(**inp, labels=labels, shift_labels=fewer).loss - out.loss).abs() > 1e-6
    assert torch.equal(labels, inp["input_ids"].masked_fill(inp["input_ids"] == IMAGE_TOKEN, -100))  # untouched


def test_inputs_embeds_with_images_are_refused_in_forward_and_generate():
    model = tiny_llava()
    inp = make_inputs((3,), (5,))
    apply_pumer(model, ratio=0.25)
    emb = model.get_input_embeddings()(inp["input_ids"])
    msg = "pass input_ids with the images, not inputs_embeds"
    with pytest.raises(ValueError, match=msg):
        model(inputs_embeds=emb, attention_mask=inp["attention_mask"], pixel_values=inp["pixel_values"])
    with pytest.raises(ValueError, match=msg):
        model.generate(inputs_embeds=emb, attention_mask=inp["attention_mask"], pixel_values=inp["pixel_values"], **GEN)


def test_placeholder_ids_without_pixels_are_plain_tokens():
    model = tiny_llava()
    inp = make_inputs((3,), (5,))
    text = {"input_ids": inp["input_ids"], "attention_mask": inp["attention_mask"]}
    with torch.no_grad():
        ref = model(**text).logits
        apply_pumer(model, ratio=0.25)
        model.pumer.last_stats = None
        torch.testing.assert_close(model(**text).logits, ref)
        assert model.pumer.last_stats is None  # nothing was reduced


def test_pumer_reads_a_question_that_comes_before_the_image():
    """No text after the image: the question before it still decides which patches stay."""
    model = tiny_llava()
    g = torch.Generator().manual_seed(0)
    pixel = torch.randn(1, 3, 32, 32, generator=g)
    kept = []
    for q in range(2):
        question = torch.randint(5, VOCAB, (6,), generator=torch.Generator().manual_seed(10 + q))
        ids = torch.cat([question, torch.full((N_VIS,), IMAGE_TOKEN)])[None]
        apply_pumer(model, ratio=0.25, merge_share=0.0, layers=[2])
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel)
        kept.append(model.pumer.last_stats.kept_patches[2][0])
    assert all(len(k) == 4 for k in kept)
    assert kept[0] != kept[1]  # different questions keep different patches
    assert kept[0] != [0, 1, 2, 3] and kept[1] != [0, 1, 2, 3]


def _layer(pos, fillers=False, log_size=None):
    from pumer_llava.hooks.cache import ReducedLayer

    layer = ReducedLayer()
    bsz, k = pos.shape
    kv = torch.arange(bsz * k, dtype=torch.float).view(bsz, 1, k, 1)
    layer.pending = (pos, log_size, int(pos.max()) + 1, fillers)
    layer.update(kv, kv.clone())
    return layer


def test_reduced_layer_crop_drops_by_original_position():
    # row 0 kept 4 tokens of 8, row 1 kept 3 (one filler, -1); then 2 decode steps
    pos = torch.tensor([[0, 2, 5, 7], [-1, 1, 3, 7]])
    layer = _layer(pos, fillers=True)
    for _ in range(2):
        layer.update(torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 1))
    assert layer.get_seq_length() == 10 and layer.pos.tolist() == [[0, 2, 5, 7, 8, 9], [-1, 1, 3, 7, 8, 9]]
    layer.crop(-2)  # speculative rollback: the two appended tokens go
    assert layer.get_seq_length() == 8 and layer.keys.shape[2] == 4 and layer.pos.tolist() == pos.tolist()
    layer.crop(-4)  # into the prompt: rows lose different counts; what one row keeps longer becomes a filler
    assert layer.get_seq_length() == 4
    assert layer.pos.tolist() == [[0, 2, -1], [-1, 1, 3]]
    assert layer.keys.shape[2] == 3 and layer.fillers
    with pytest.raises(ValueError, match="negative count"):
        layer.crop(3)


def test_reduced_layer_batch_operations_carry_positions():
    pos = torch.tensor([[0, 2, 5], [1, 3, 6]])
    log_size = torch.tensor([[0.0, 0.7, 0.0], [1.1, 0.0, 0.0]])
    layer = _layer(pos, log_size=log_size)
    layer.reorder_cache(torch.tensor([1, 1]))
    assert layer.pos.tolist() == [[1, 3, 6]] * 2 and layer.log_size.tolist() == [log_size[1].tolist()] * 2
    assert torch.equal(layer.keys[0], layer.keys[1])
    layer.batch_select_indices(torch.tensor([0]))
    assert layer.pos.tolist() == [[1, 3, 6]] and layer.keys.shape[0] == 1
    layer.batch_repeat_interleave(3)
    assert layer.pos.shape == (3, 3) and layer.log_size.shape == (3, 3) and layer.keys.shape[0] == 3
    twin = copy.deepcopy(layer)
    twin.update(torch.zeros(3, 1, 1, 1), torch.zeros(3, 1, 1, 1))
    assert twin.pos.shape == (3, 4) and layer.pos.shape == (3, 3) and twin.get_seq_length() == 8
    assert twin.log_size[:, -1].tolist() == [0.0] * 3


def test_a_cache_without_images_stays_plain():
    from transformers.cache_utils import DynamicLayer

    model = tiny_llava()
    apply_pumer(model, ratio=0.25)
    inp = make_inputs((3,), (5,))
    with torch.no_grad():
        text = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True).past_key_values
        with disabled(model):
            off = model(**inp, use_cache=True).past_key_values
        on = model(**inp, use_cache=True).past_key_values
    assert all(type(x) is DynamicLayer for x in text.layers + off.layers)
    from pumer_llava.hooks.cache import ReducedLayer
    first = model.pumer.layers[0]
    assert all(type(x) is DynamicLayer for x in on.layers[:first])
    assert all(isinstance(x, ReducedLayer) for x in on.layers[first:])
    assert on.get_seq_length() == off.get_seq_length() == inp["input_ids"].shape[1]
