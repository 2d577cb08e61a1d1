"""The lmms-eval model ``pumer_llava``.

The argument parsing, failure counting, stats and prompt helpers are plain functions
and run without lmms-eval; the model class tests skip cleanly when lmms-eval 0.7.3
is not importable (install recipe: eval/lmms/INSTALL_NOTES.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from pumer_llava import lmms_eval_plugin as plug
from pumer_llava.config import PumerConfig

# ------------------------------------------------------------------ argument parsing


def test_strings_from_the_command_line_are_converted():
    a = plug.parse_model_args(
        pretrained="some/model",
        ratio="0.5",
        method="PuMer",
        layers="[1,3]",
        merge_share="0.25",
        prop_attn="false",
        batch_size="8",
        max_new_tokens="16",
        load_in_4bit="true",
        dtype="torch.float16",
        max_failure_rate="0.1",
    )
    assert a.reduction == PumerConfig.make("pumer", ratio=0.5, layers=(1, 3), merge_share=0.25, prop_attn=False)
    assert (a.batch_size, a.max_new_tokens, a.load_in_4bit, a.dtype, a.max_failure_rate) == (8, 16, True, "float16", 0.1)


def test_values_as_lmms_eval_converts_them():
    # lmms-eval's handle_arg_string turns "1" into int 1, "0.25" into float, "true" into bool
    a = plug.parse_model_args(pretrained="m", ratio=0.25, method="random", keep_tokens=None, seed=3, use_cache=False,
                              batch_size=4)
    assert a.reduction.ratio == 0.25 and a.reduction.options.seed == 3 and a.use_cache is False and a.batch_size == 4
    assert plug.parse_model_args(pretrained="m", keep_tokens=64).reduction == PumerConfig.make(keep_tokens=64)
    a = plug.parse_model_args(pretrained="m", method="visionzip", keep_tokens=64, dominant=54)
    assert a.reduction.options.dominant == 54


@pytest.mark.parametrize("value, expected", [("[2,8,16]", (2, 8, 16)), ("2;8;16", (2, 8, 16)), ("2 8", (2, 8)),
                                             ("4", (4,)), (4, (4,)), ([1, 2], (1, 2)), ("none", None), (None, None)])
def test_layers_forms(value, expected):
    assert plug.parse_layers(value) == expected


@pytest.mark.parametrize("kw", [dict(ratio=1.0), dict(ratio="1"), dict(method="none"), dict(method="off", ratio=0.5)])
def test_unreduced_forms(kw):
    assert plug.parse_model_args(pretrained="m", **kw).reduction is None


def test_default_is_pumer_at_a_quarter():
    assert plug.parse_model_args(pretrained="m").reduction == PumerConfig.make("pumer", ratio=0.25)


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(ratio=1.5), "ratio"),
        (dict(ratio="lots"), "ratio"),
        (dict(ratio=0.5, keep_tokens=64), "not both"),
        (dict(keep_tokens=0), "keep_tokens"),
        (dict(method="tome"), "unknown method"),
        (dict(method="none", keep_tokens=8), "unreduced"),
        (dict(layers="a;b"), "layers"),
        (dict(layers="[3,1]"), "increasing"),
        (dict(merge_share=2), "merge_share"),
        (dict(prop_attn="maybe"), "prop_attn"),
        (dict(method="random", seed="x"), "seed must be an int"),
        (dict(seed=3), r"unknown model_args \['seed'\]; .*; method 'pumer' takes merge_share, merge_rule, prop_attn, merge_window, merge_threshold, merge_metric, merge_text"),
        (dict(method="fastv", merge_share=0.5), "method 'fastv' takes no options"),
        (dict(method="none", merge_share=0.5), "unknown model_args"),
        (dict(dtype="int8"), "dtype"),
        (dict(attn_implementation="paged"), "attn_implementation"),
        (dict(device="tpu"), "device"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size="auto"), "batch_size"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_failure_rate=1.5), "max_failure_rate"),
        (dict(load_in_4bit="maybe"), "load_in_4bit"),
        (dict(ratios=0.5), "unknown model_args"),
    ],
)
def test_bad_args_raise_clear_value_errors(kw, words):
    with pytest.raises(ValueError, match=words):
        plug.parse_model_args(pretrained="m", **kw)


def test_pretrained_is_required():
    with pytest.raises(ValueError, match="pretrained"):
        plug.parse_model_args(pretrained=None)


# ---------------------------------------------------------------------- failures


def test_tracker_allows_floor_of_rate_times_total():
    t = plug.FailureTracker(total=40, max_rate=0.05)
    assert t.allowed == 2
    t.record("a", ValueError("x"))
    t.record("b", ValueError("y"))
    with pytest.raises(plug.TooManyFailures, match="3 of 40"):
        t.record("c", ValueError("z"))


def test_tracker_rate_zero_raises_on_first_failure_and_logs_the_id():
    logged = []
    t = plug.FailureTracker(total=10, max_rate=0.0)
    with pytest.raises(plug.TooManyFailures, match="doc-7"):
        t.record("doc-7", RuntimeError("boom"), log=logged.append)
    assert "doc-7" in logged[0] and "boom" in logged[0]


def _chunks(items, n):
    pairs = list(enumerate(items))
    return [pairs[i : i + n] for i in range(0, len(pairs), n)]


def test_failing_sample_is_isolated_counted_and_answered_none():
    calls = []

    def run(items):
        calls.append(list(items))
        if "bad" in items:
            raise RuntimeError("cannot")
        return [x.upper() for x in items]

    failed = []
    tracker = plug.FailureTracker(total=6, max_rate=0.5)
    out = plug.run_chunks(_chunks(["a", "b", "bad", "c", "d", "e"], 3), run, tracker, lambda item, exc: failed.append(item) or item)
    assert out == {0: "A", 1: "B", 2: None, 3: "C", 4: "D", 5: "E"}
    assert failed == ["bad"] and tracker.count == 1
    assert calls[0] == ["a", "b", "bad"] and ["a"] in calls and ["bad"] in calls  # retried one at a time


def test_failures_past_the_threshold_stop_the_run():
    def run(items):
        raise RuntimeError("always")

    tracker = plug.FailureTracker(total=4, max_rate=0.25)
    with pytest.raises(plug.TooManyFailures):
        plug.run_chunks(_chunks(["a", "b", "c", "d"], 2), run, tracker, lambda item, exc: item)
    assert tracker.count == 2


def test_wrong_number_of_answers_is_a_failure():
    tracker = plug.FailureTracker(total=2, max_rate=1.0)
    out = plug.run_chunks(_chunks(["a", "b"], 2), lambda items: ["only one"], tracker, lambda item, exc: item)
    # the batch answered 1 of 2: retried one at a time, where one answer each is right
    assert out == {0: "only one", 1: "only one"} and tracker.count == 0


# ------------------------------------------------------------------------ stats


def test_stats_recorder_per_sample_counts_and_summary(tmp_path):
    rec = plug.StatsRecorder(model_args={"pretrained": "m"}, reduction={"method": "pumer", "ratio": 0.25})
    stats = SimpleNamespace(
        to_dict=lambda: {
            "visual_tokens_total": [64, 64],
            "visual_tokens_per_layer": [[64, 64], [32, 32], [16, 16]],
            "visual_tokens_final": [16, 16],
            "flops_ratio": 0.5,
            "select_seconds": 0.01,
            "reducing_layers": [1, 2],
        }
    )
    rec.add_batch(["t/test/0", "t/test/1"], [64, 64], stats, "generate_until")
    rec.add_batch(["t/test/2"], [64], None, "loglikelihood")  # unreduced: counted from the ids
    s = rec.summary()
    assert s["pumer_samples"] == 3 and s["pumer_failures"] == 0
    assert s["pumer_visual_tokens_final"] == pytest.approx(32.0) and s["pumer_flops_ratio"] == 0.5
    assert rec.samples["t/test/1"]["visual_tokens_per_layer"] == [64, 32, 16]
    assert rec.samples["t/test/2"]["visual_tokens_final"] == 64
    d = json.loads(rec.write(tmp_path / "x" / "s.json").read_text())
    assert d["reduction"]["method"] == "pumer" and set(d["samples"]) == {"t/test/0", "t/test/1", "t/test/2"}


def test_output_path_and_sidecar_location():
    argv = ["eval", "--model", "pumer_llava", "--output_path", "res/", "--tasks", "x"]
    assert plug.output_path_from_argv(argv) == "res/"
    assert plug.output_path_from_argv(["--tasks", "x"]) is None
    p = plug.default_stats_path("res", "llava-hf/llava-1.5-7b-hf", stamp="20260101_000000")
    assert p.name == "20260101_000000_pumer_stats.json" and p.parent.parent.name == "res"


def _recorder(ids, final, failures=(), tokens=0):
    rec = plug.StatsRecorder(model_args={"pretrained": "m"}, reduction={"method": "pumer", "ratio": 0.25})
    stats = SimpleNamespace(to_dict=lambda: {"visual_tokens_total": [64] * len(ids),
                                             "visual_tokens_per_layer": [[64] * len(ids), list(final)],
                                             "visual_tokens_final": list(final), "flops_ratio": 0.5})
    rec.add_batch(list(ids), [64] * len(ids), stats, "generate_until")
    rec.failures.extend({"sample": f, "error": "OSError: x"} for f in failures)
    rec.gen_tokens = tokens
    return rec


def test_stats_of_ranks_merge_into_one_run():
    r0 = _recorder(["t/test/0", "t/test/2", "t/test/4"], [16, 16, 16], tokens=5)
    # rank 1 ran a copy of its last request to even out the ranks: the same sample again
    r1 = _recorder(["t/test/1", "t/test/3", "t/test/3"], [8, 8, 8], failures=["t/test/5"], tokens=7)
    m = plug.StatsRecorder.merged([r0, r1])
    assert sorted(m.samples) == ["t/test/0", "t/test/1", "t/test/2", "t/test/3", "t/test/4"]
    assert m.samples["t/test/3"]["rank"] == 1 and m.samples["t/test/0"]["rank"] == 0
    assert m.failures == [{"sample": "t/test/5", "error": "OSError: x", "rank": 1}]
    assert m.gen_tokens == 12 and len(m.batches) == 2
    s = m.summary()  # means over all five samples, not rank 0's three
    assert s["pumer_samples"] == 5 and s["pumer_failures"] == 1
    assert s["pumer_visual_tokens_final"] == pytest.approx((16 * 3 + 8 * 2) / 5)
    with pytest.raises(ValueError, match="at least one"):
        plug.StatsRecorder.merged([])


def test_rank_files_and_launcher_environment(monkeypatch):
    assert plug.rank_stats_path("res/m/20260101_000000_pumer_stats.json", 3).name == (
        "20260101_000000_pumer_stats_rank3.json")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert plug.launcher_rank() == (0, 0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert plug.launcher_rank() == (3, 1, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4 and WORLD_SIZE=4"):
        plug.launcher_rank()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="must be integers"):
        plug.launcher_rank()


def _gather_on_rank(rank, world, port, folder, ids, out):
    """One process of a gloo group: the plugin's own gathering of its statistics."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        me = SimpleNamespace(stats=_recorder(ids[rank], [16] * len(ids[rank]), tokens=rank + 1),
                             # each rank stamped its own path; rank 0's names the merged file
                             _stats_path=Path(folder) / f"stamp{rank}_pumer_stats.json",
                             _rank=rank, _world_size=world, _log=SimpleNamespace(info=print, warning=print))
        merged, path = plug.PumerLlava._gathered_stats(me)
        out.put((rank, sorted(merged.samples), merged.gen_tokens, str(path)))
    finally:
        dist.destroy_process_group()


def test_ranks_gather_their_statistics_over_a_process_group(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ids = [["t/test/0", "t/test/2"], ["t/test/1"]]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_gather_on_rank, args=(r, 2, port, str(tmp_path), ids, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    merged_path = str(tmp_path / "stamp0_pumer_stats.json")
    assert got == [(r, ["t/test/0", "t/test/1", "t/test/2"], 3, merged_path) for r in range(2)]
    for r in range(2):  # each rank's own share, named after rank 0's path
        d = json.loads((tmp_path / f"stamp0_pumer_stats_rank{r}.json").read_text())
        assert sorted(d["samples"]) == ids[r]


# ---------------------------------------------------------------------- prompts


def _word_tokenizer(chat_template=None):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "user:", "assistant:", "what", "color", "is", "it", "?",
             "red", "blue", "green", "a", "the", "yes", "no"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


LIST_TEMPLATE = (
    "{%- for message in messages -%}{{ 'USER: ' }}"
    "{%- for item in message['content'] | selectattr('type', 'equalto', 'image') -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for item in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ item['text'] }}{%- endfor -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)
STRING_TEMPLATE = "{% for m in messages %}USER: {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"


class _Proc:
    """The two attributes build_prompt reads from a processor."""

    def __init__(self, tokenizer, chat_template):
        self.tokenizer, self.chat_template, self.image_token = tokenizer, chat_template, "<image>"

    def apply_chat_template(self, messages, **kw):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kw)


def test_prompt_uses_the_processors_chat_template():
    proc = _Proc(_word_tokenizer(), LIST_TEMPLATE)
    assert plug.build_prompt("what color is it ?", 1, proc) == "USER: <image>\nwhat color is it ? ASSISTANT:"
    assert plug.build_prompt("<image> what color ?", 1, proc) == "USER: <image> what color ? ASSISTANT:"


def test_prompt_falls_back_to_the_tokenizer_template_then_vicuna():
    proc = _Proc(_word_tokenizer(STRING_TEMPLATE), None)
    assert plug.build_prompt("what ?", 2, proc) == "USER: <image> <image>\nwhat ? ASSISTANT:"
    vic = plug.build_prompt("what ?", 1, _Proc(_word_tokenizer(), None))
    assert vic.startswith("A chat between") and "USER: <image>\nwhat ?" in vic and vic.endswith("ASSISTANT:")


def test_until_cuts_at_the_first_stop():
    assert plug.apply_until("red. and more\nx", ["\n", "."]) == "red"
    assert plug.apply_until("red", []) == "red"


# ------------------------------------------------------- the model inside lmms-eval

needs_lmms_eval = pytest.mark.skipif(
    not plug.HAVE_LMMS_EVAL, reason="lmms-eval 0.7.3 not importable (install recipe: eval/lmms/INSTALL_NOTES.md)"
)


@needs_lmms_eval
def test_manifest_registers_a_simple_model():
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    reg = ModelRegistryV2()
    reg.register_manifest(plug.manifest())
    assert reg.get_model_class("pumer_llava") is plug.PumerLlava
    assert plug.PumerLlava.is_simple


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A random LLaVA (CLIP tower with [CLS] + Llama) with a word-level processor, saved offline."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = _word_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LIST_TEMPLATE,
    )
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return str(path)


QUESTIONS = ["what color is it ?", "is it red ?", "what is the color ?", "is the it blue ?", "what ?"]


def _docs():
    imgs = []
    for i in range(len(QUESTIONS)):
        g = torch.Generator().manual_seed(i)
        arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        imgs.append(Image.fromarray(arr))
    return [{"image": im, "question": q, "answer": "red"} for im, q in zip(imgs, QUESTIONS)]


def _requests(kind="generate_until", bad=()):
    from lmms_eval.api.instance import Instance

    def visual(doc):
        if doc["question"] in bad:
            raise OSError("unreadable image")
        return [doc["image"]]

    out = []
    for i, q in enumerate(QUESTIONS):
        second = {"max_new_tokens": 3, "temperature": 0, "until": ["\n"]} if kind == "generate_until" else " red"
        out.append(Instance(request_type=kind, arguments=(q, second, visual, i, "toy", "test"), idx=0,
                            metadata={"task": "toy", "doc_id": i, "repeats": 1}))
    return out


def _lm(path, tmp_path, **kw):
    lm = plug.PumerLlava(pretrained=path, device="cpu", stats_path=str(tmp_path / "stats.json"), **kw)
    lm.task_dict = {"toy": {"test": _docs()}}
    return lm


def test_bad_model_args_raise_before_loading(tmp_path):
    with pytest.raises(ValueError, match="ratio"):
        plug.PumerLlava(pretrained=str(tmp_path / "does-not-exist"), ratio=3)
    with pytest.raises(ValueError, match="unknown model_args"):
        plug.PumerLlava(pretrained=str(tmp_path / "does-not-exist"), ration=0.5)


@needs_lmms_eval
def test_generate_batched_equals_one_by_one_and_records_stats(tiny_llava, tmp_path):
    lm8 = _lm(tiny_llava, tmp_path, ratio=0.25, batch_size=4, layers="1;2")
    out8 = lm8.generate_until(_requests())
    lm1 = _lm(tiny_llava, tmp_path, ratio="0.25", batch_size=1, layers="[1,2]")
    out1 = lm1.generate_until(_requests())
    assert out8 == out1 and len(out8) == len(QUESTIONS)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["reduction"]["method"] == "pumer" and stats["reduction"]["layers"] == [1, 2]
    assert len(stats["samples"]) == len(QUESTIONS) and not stats["failures"]
    s = stats["samples"]["toy/test/0"]
    assert s["visual_tokens_in"] == 16 and s["visual_tokens_final"] == 4  # 16 patches, a quarter kept


@needs_lmms_eval
def test_unreduced_model_is_the_plain_model(tiny_llava, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    lm = _lm(tiny_llava, tmp_path, method="none", batch_size=2)
    assert not hasattr(lm.model, "pumer")
    out = lm.generate_until(_requests())
    proc = AutoProcessor.from_pretrained(tiny_llava)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava).eval()
    doc = _docs()[0]
    inp = proc(images=[doc["image"]], text=[f"USER: <image>\n{QUESTIONS[0]} ASSISTANT:"], return_tensors="pt")
    ref = model.generate(**inp, max_new_tokens=3, do_sample=False)
    text = proc.tokenizer.decode(ref[0, inp["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0].strip()
    assert out[0] == text


@needs_lmms_eval
def test_loglikelihood_reduced_and_unreduced(tiny_llava, tmp_path):
    for kw in (dict(method="none"), dict(ratio=0.5)):
        lm = _lm(tiny_llava, tmp_path, **kw)
        res = lm.loglikelihood(_requests("loglikelihood"))
        assert len(res) == len(QUESTIONS)
        # wrapped so lmms-eval's evaluator keeps the (loss, greedy) pair instead of its text
        assert all(type(r).__name__ == "GenerationResult" for r in res)
        assert all(math.isfinite(loss) and loss > 0 and isinstance(g, bool) for loss, g in (r.text for r in res))


@needs_lmms_eval
def test_failures_are_counted_and_past_the_threshold_raise(tiny_llava, tmp_path):
    lm = _lm(tiny_llava, tmp_path, batch_size=3, max_failure_rate=0.2)  # 1 of 5 allowed
    out = lm.generate_until(_requests(bad=(QUESTIONS[1],)))
    assert out[1] == "" and all(isinstance(o, str) for o in out)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert [f["sample"] for f in stats["failures"]] == ["toy/test/1"]
    lm = _lm(tiny_llava, tmp_path, batch_size=3, max_failure_rate=0.2)
    with pytest.raises(plug.TooManyFailures, match="2 of 5"):
        lm.generate_until(_requests(bad=(QUESTIONS[1], QUESTIONS[3])))


@needs_lmms_eval
def test_multi_round_is_refused_clearly(tiny_llava, tmp_path):
    lm = _lm(tiny_llava, tmp_path, method="none")
    with pytest.raises(NotImplementedError, match="multi_round"):
        lm.generate_until_multi_round([])


def test_vispruner_important_ratio_reaches_the_config():
    from pumer_llava.lmms_eval_plugin import parse_reduction

    cfg = parse_reduction(ratio="0.25", method="vispruner", important_ratio="0.75")
    assert cfg.method == "vispruner" and cfg.options.important_ratio == 0.75
    with pytest.raises(ValueError, match=r"important_ratio must be in \[0, 1\]"):
        parse_reduction(method="vispruner", important_ratio="2")


def _choice_requests(question, choices, doc_id=0, bad=False):
    from lmms_eval.api.instance import Instance

    def visual(doc):
        if bad:
            raise OSError("unreadable image")
        return [doc["image"]]

    return [Instance(request_type="loglikelihood", arguments=(question, c, visual, doc_id, "toy", "test"), idx=i,
                     metadata={"task": "toy", "doc_id": doc_id, "repeats": 1}) for i, c in enumerate(choices)]


@needs_lmms_eval
def test_every_choice_is_scored_on_the_same_kept_tokens(tiny_llava, tmp_path):
    """One context, four choices: one prefill, one set of kept patches, and each choice's loss
    equals that choice scored alone and the patched model's own loss on context + choice."""
    lm = _lm(tiny_llava, tmp_path, ratio=0.25, batch_size=4)
    choices = [" red", " blue", " green", " a red square"]
    seen = []
    record = lm.stats.add_batch
    lm.stats.add_batch = lambda ids, vis, stats, kind: (seen.append(stats.kept_patches), record(ids, vis, stats, kind))
    res = [r.text for r in lm.loglikelihood(_choice_requests(QUESTIONS[0], choices))]
    assert len(seen) == 1 and seen[0]  # one encoding of the context, reduced once
    for c, (loss, _) in zip(choices, res):
        alone = lm.loglikelihood(_choice_requests(QUESTIONS[0], [c]))[0].text
        assert seen[-1] == seen[0] and abs(alone[0] - loss) < 1e-4
    # the model's own loss on context + choice, the choice left out of the selection (the prompt decides)
    model, doc = lm.model, lm.task_dict["toy"]["test"][0]
    prompt = plug.build_prompt(QUESTIONS[0], 1, lm._processor, lm.chat_template)
    with torch.no_grad():
        ctx = lm._encode([prompt], [doc["image"]])
        model(**ctx)
        for c, (loss, _) in zip(choices, res):
            full = lm._encode([prompt + c], [doc["image"]])
            labels = full["input_ids"].clone()
            labels[:, : ctx["input_ids"].shape[1]] = -100
            want = model(**full, labels=labels, use_cache=False).loss.item()
            assert abs(want - loss) < 1e-4


@needs_lmms_eval
def test_a_failed_choice_is_counted_and_never_chosen(tiny_llava, tmp_path):
    import numpy as np

    lm = _lm(tiny_llava, tmp_path, ratio=0.5, max_failure_rate=0.6)
    ok = lm.loglikelihood(_choice_requests(QUESTIONS[1], [" yes", " no"], doc_id=1))
    lm = _lm(tiny_llava, tmp_path, ratio=0.5, max_failure_rate=1.0)
    bad = lm.loglikelihood(_choice_requests(QUESTIONS[2], [" yes", " no"], doc_id=2, bad=True))
    assert [r.text for r in bad] == [(math.inf, False)] * 2
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert [f["sample"] for f in stats["failures"]] == ["toy/test/2", "toy/test/2"]
    lls = [ok[0].text[0], bad[0].text[0], ok[1].text[0]]
    assert np.argmin(lls) != 1


@pytest.fixture(scope="module")
def tiny_llava_next(tmp_path_factory):
    """A random LLaVA-NeXT (anyres: base view + crops + newline tokens) with the same word-level
    tokenizer and an anyres PIL image processor, saved offline."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor)

    tok = _word_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=pinpoints)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints, size={"shortest_edge": 32},
                                                   crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LIST_TEMPLATE,
    )
    path = tmp_path_factory.mktemp("tiny-llava-next")
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return str(path)


@needs_lmms_eval
@pytest.mark.parametrize("method", ["pumer", "visionzip", "cdpruner"])
def test_llava_next_evaluates_batched_as_one_by_one(tiny_llava_next, tmp_path, method):
    """The anyres row through the plugin: batched answers equal one-by-one ones and each sample's
    budget is exact; a method the row lacks inputs for is refused before anything runs."""
    if method == "visionzip":
        with pytest.raises(ValueError, match="method 'visionzip' cannot run on LlavaNextForConditionalGeneration"):
            _lm(tiny_llava_next, tmp_path, ratio=0.25, method=method)
        return
    lm4 = _lm(tiny_llava_next, tmp_path, ratio=0.25, method=method, batch_size=4)
    out4 = lm4.generate_until(_requests())
    stats4 = json.loads((tmp_path / "stats.json").read_text())
    lm1 = _lm(tiny_llava_next, tmp_path, ratio=0.25, method=method, batch_size=1)
    assert lm1.generate_until(_requests()) == out4 and len(out4) == len(QUESTIONS)
    for s in stats4["samples"].values():
        assert s["visual_tokens_in"] > 16 and s["visual_tokens_final"] == round(s["visual_tokens_in"] * 0.25)


# ------------------------------------------------------------------------ every adapter row

ROW_SIZES = ((32, 32), (64, 40), (48, 32), (32, 64), (40, 40))  # (width, height): ragged visual counts


def _row_docs():
    docs = []
    for i, (q, size) in enumerate(zip(QUESTIONS, ROW_SIZES)):
        g = torch.Generator().manual_seed(i)
        arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        docs.append({"image": Image.fromarray(arr), "question": q, "answer": "red"})
    return docs


@pytest.fixture(scope="module", params=["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def row_checkpoint(request, tmp_path_factory):
    from checkpoints import write_checkpoint

    return request.param, write_checkpoint(request.param, tmp_path_factory.mktemp(f"ckpt-{request.param}"))


def _row_lm(path, tmp_path, **kw):
    lm = plug.PumerLlava(pretrained=path, device="cpu", stats_path=str(tmp_path / "stats.json"), **kw)
    lm.task_dict = {"toy": {"test": _row_docs()}}
    return lm


def _plain(path):
    """The checkpoint as transformers loads it, and its processor as the plugin loads it."""
    from transformers import AutoModelForImageTextToText

    from pumer_llava.loading import adapter_for, load_processor, read_config

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return model, load_processor(path, adapter_for(read_config(path)[0]))


@needs_lmms_eval
def test_every_row_answers_as_its_plain_model_and_batches_as_one_by_one(row_checkpoint, tmp_path):
    """Unreduced, each answer is the plain model's greedy answer on the processor's inputs; reduced,
    a batch of ragged images equals the samples one by one and each sample keeps its exact budget."""
    row, path = row_checkpoint
    docs = _row_docs()
    out = _row_lm(path, tmp_path, method="none", batch_size=2).generate_until(_requests())
    model, proc = _plain(path)
    for i in (0, 1):
        prompt = plug.build_prompt(QUESTIONS[i], 1, proc)
        inp = proc(images=[docs[i]["image"]], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            ref = model.generate(**inp, max_new_tokens=3, do_sample=False)
        text = proc.tokenizer.decode(ref[0, inp["input_ids"].shape[1]:], skip_special_tokens=True)
        assert out[i] == text.split("\n")[0].strip()
    method = "vispruner" if row in ("llava", "llava_next", "llava_onevision") else "pumer"
    out4 = _row_lm(path, tmp_path, ratio=0.25, method=method, batch_size=4).generate_until(_requests())
    stats = json.loads((tmp_path / "stats.json").read_text())
    counts = {s["visual_tokens_in"] for s in stats["samples"].values()}
    assert len(counts) > 1 or row == "llava"  # the anyres and Qwen rows see ragged counts
    for s in stats["samples"].values():
        assert s["visual_tokens_final"] == round(s["visual_tokens_in"] * 0.25)
    assert _row_lm(path, tmp_path, ratio=0.25, method=method, batch_size=1).generate_until(_requests()) == out4


@needs_lmms_eval
def test_every_row_scores_choices_as_its_own_loss(row_checkpoint, tmp_path):
    """Multiple choice on each row: a choice's score is the reduced model's own loss on context +
    choice in one forward (Qwen's M-RoPE positions included), from one reduced context."""
    row, path = row_checkpoint
    lm = _row_lm(path, tmp_path, ratio=0.5)
    choices = [" red", " blue", " a red square"]
    res = [r.text for r in lm.loglikelihood(_choice_requests(QUESTIONS[1], choices, doc_id=1))]
    doc = lm.task_dict["toy"]["test"][1]
    prompt = plug.build_prompt(QUESTIONS[1], 1, lm._processor, lm.chat_template)
    with torch.no_grad():
        n_ctx = lm._encode([prompt], [doc["image"]])["input_ids"].shape[1]
        for c, (loss, _) in zip(choices, res):
            full = lm._encode([prompt + c], [doc["image"]])
            labels = full["input_ids"].clone()
            labels[:, :n_ctx] = -100
            want = lm.model(**full, labels=labels, use_cache=False).loss.item()
            assert abs(want - loss) < 1e-4, (row, c)
