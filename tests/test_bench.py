"""pumer-bench on the tiny preset: the JSON's fields and that its numbers agree with each other."""

import json
import subprocess
import sys

import pytest
import torch

from pumer_llava import apply_pumer
from pumer_llava.cli.bench import (
    BenchSpec,
    PeakTensorMemory,
    kv_cache_bytes,
    main,
    make_inputs,
    run_benchmark,
    to_markdown,
    write_outputs,
)
from pumer_llava.presets import PRESETS, build_preset, get_preset

SPEC = dict(
    model="tiny",
    methods=("pumer", "fastv"),
    fractions=(1.0, 0.25),
    batch_sizes=(1, 2),
    repeats=2,
    gen_repeats=1,
    warmup=1,
    new_tokens=3,
    device="cpu",
    threads=1,  # a shared 2-core machine: two threads make a tiny forward ~100x slower
)


@pytest.fixture(scope="module")
def result():
    threads = torch.get_num_threads()
    out = run_benchmark(BenchSpec(**SPEC), progress=False)
    assert torch.get_num_threads() == threads  # --threads applies to the run only
    return out


def _row(rows, method, fraction, batch=1):
    return next(r for r in rows if r["method"] == method and r["fraction"] == fraction and r["batch_size"] == batch)


def test_fields(result):
    assert result["schema"] == "pumer-bench/1"
    for key in ("device", "device_name", "torch", "transformers", "torch_threads", "peak_rss_bytes_process"):
        assert key in result["env"]
    c = result["config"]
    assert (c["model"], c["dtype"], c["visual_tokens"], c["text_layers"]) == ("tiny", "fp32", 16, 6)
    assert c["prompt_tokens"] == c["prefix_tokens"] + 16 + c["suffix_tokens"]
    # one unreduced row, then every method x fraction; generation rows per batch size
    assert [(r["method"], r["fraction"]) for r in result["prefill"]] == [
        ("none", 1.0), ("pumer", 1.0), ("pumer", 0.25), ("fastv", 1.0), ("fastv", 0.25)
    ]
    assert len(result["generation"]) == 2 * 5
    for r in result["prefill"]:
        # the unreduced model runs once per method group in every repeat
        groups = len(SPEC["methods"]) if r["method"] == "none" else 1
        assert len(r["prefill_samples"]) == SPEC["repeats"] * groups
        for key in ("speedup", "llm_speedup", "flops_speedup", "speedup_vs_predicted", "select_share",
                    "kv_cache_bytes", "peak_tensor_bytes"):
            assert r[key] is not None and r[key] >= 0, (key, r)
    for r in result["generation"]:
        for key in ("samples_per_s", "decode_tokens_per_s", "throughput_ratio", "decode_ratio", "kv_cache_bytes"):
            assert r[key] is not None and r[key] > 0, (key, r)
    json.dumps(result)  # plain data only


def test_unreduced_rows_are_the_reference(result):
    base = result["prefill"][0]
    assert base["speedup"] == 1.0 and base["flops_ratio"] == 1.0 and base["select_share"] == 0.0
    for method in SPEC["methods"]:
        r = _row(result["prefill"], method, 1.0)
        # ratio 1.0: nothing removed, same cache, but the speedup fields are there
        assert r["flops_ratio"] == 1.0 and r["kv_cache_bytes"] == base["kv_cache_bytes"] and r["kv_ratio"] == 1.0
        assert r["speedup"] > 0 and r["speedup_vs_predicted"] == pytest.approx(r["speedup"])
        assert r["visual_tokens_kept"] == 16
    for b in SPEC["batch_sizes"]:
        g = _row(result["generation"], "none", 1.0, b)
        assert g["throughput_ratio"] == 1.0 and g["decode_ratio"] == 1.0 and g["kv_ratio"] == 1.0


@pytest.mark.parametrize("method", SPEC["methods"])
def test_flops_ratio_is_what_last_stats_reports(result, method):
    row = _row(result["prefill"], method, 0.25)
    model = build_preset("tiny")
    p = get_preset("tiny")
    apply_pumer(model, ratio=0.25, method=method)
    with torch.inference_mode():
        model(**make_inputs(model, 1, p.prompt_prefix, p.prompt_suffix), logits_to_keep=1)
    stats = model.pumer.last_stats
    assert row["flops_ratio"] == pytest.approx(stats.flops_ratio, rel=1e-12)
    assert row["flops_speedup"] == pytest.approx(1 / stats.flops_ratio)
    assert row["speedup_vs_predicted"] == pytest.approx(row["speedup"] * stats.flops_ratio)
    assert row["visual_tokens_kept"] == stats.visual_tokens_final[0] == 4
    assert row["reducing_layers"] == stats.reducing_layers


def _decoder_flops(tokens_per_layer, cfg):
    """2 FLOPs per multiply-add of a Llama decoder: q/k/v/o (grouped kv heads), the gated MLP
    (three matrices) and attention over every key (as torch counts attention, mask ignored)."""
    d, m, h, hkv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // h
    return sum(2 * n * d * (2 * h * hd + 2 * hkv * hd) + 2 * 3 * n * d * m + 2 * 2 * h * n * n * hd
               for n in tokens_per_layer)


def test_counted_flops_are_the_model_s_and_predict_the_speedup(result):
    """The prediction counts the FLOPs each prefill ran: the unreduced language model's are
    exactly the decoder's (CPU attention included), the whole prefill adds the tower and the
    head; a reduced prefill runs fewer, and every ratio is taken from those counts."""
    cfg = get_preset("tiny").text
    base = result["prefill"][0]
    n = result["config"]["prompt_tokens"]
    assert base["llm_flops_counted"] == _decoder_flops([n] * cfg["num_hidden_layers"], cfg)
    assert base["prefill_flops_counted"] > base["llm_flops_counted"]  # vision tower, projector, lm head
    assert base["counted_speedup"] == 1.0 and base["speedup_vs_counted"] == pytest.approx(base["speedup"])
    for method in SPEC["methods"]:
        one, red = _row(result["prefill"], method, 1.0), _row(result["prefill"], method, 0.25)
        # ratio 1.0 runs the unreduced products (the scoring of a stage that keeps everything is skipped)
        assert one["prefill_flops_counted"] == base["prefill_flops_counted"]
        assert red["llm_flops_counted"] < base["llm_flops_counted"]
        tower = base["prefill_flops_counted"] - base["llm_flops_counted"]
        assert red["prefill_flops_counted"] - red["llm_flops_counted"] == tower  # the tower is not reduced
        assert red["counted_speedup"] == base["prefill_flops_counted"] / red["prefill_flops_counted"]
        assert red["llm_counted_speedup"] == base["llm_flops_counted"] / red["llm_flops_counted"]
        assert 1 < red["counted_speedup"] < red["llm_counted_speedup"]  # the unreduced tower dilutes it
        assert red["speedup_vs_counted"] == pytest.approx(red["speedup"] / red["counted_speedup"])
    assert "| decoder formula |" in to_markdown(result)


def test_flop_counter_counts_cpu_attention_as_torch_counts_cuda_attention():
    from pumer_llava.counting import flop_counter

    q, kv = torch.randn(2, 8, 10, 16), torch.randn(2, 2, 12, 16)
    with flop_counter() as f:
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    assert f.get_total_flops() == 2 * (2 * 2 * 8 * 10 * 12 * 16)  # q k^T and the weighted sum


@pytest.mark.parametrize("method", SPEC["methods"])
def test_reduced_rows_hold_a_smaller_cache(result, method):
    cfg = get_preset("tiny").text
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_key_value_heads"] * head_dim * 4  # keys + values, fp32
    base, red = result["prefill"][0], _row(result["prefill"], method, 0.25)
    assert red["kv_cache_bytes"] < base["kv_cache_bytes"] and red["kv_ratio"] < 1
    assert red["peak_tensor_bytes"] < base["peak_tensor_bytes"]
    # the bytes are the tokens each layer holds: fewer from the reducing layer on
    assert red["kv_cache_bytes"] == per_token * sum(red["kv_tokens_per_layer"])
    assert base["kv_tokens_per_layer"] == [result["config"]["prompt_tokens"]] * 6
    first = min(red["reducing_layers"])
    assert red["kv_tokens_per_layer"][:first] == base["kv_tokens_per_layer"][:first]
    assert all(a < b for a, b in zip(red["kv_tokens_per_layer"][first:], base["kv_tokens_per_layer"][first:]))
    for b in SPEC["batch_sizes"]:
        g, g0 = _row(result["generation"], method, 0.25, b), _row(result["generation"], "none", 1.0, b)
        assert g["kv_cache_bytes"] < g0["kv_cache_bytes"]
        # after generation every layer also holds the new tokens (all but the last, which was never fed back)
        assert g0["kv_cache_bytes"] == b * per_token * 6 * (result["config"]["prompt_tokens"] + SPEC["new_tokens"] - 1)


def test_generation_numbers_agree(result):
    for r in result["generation"]:
        if r["method"] == "none":
            continue  # one run per method group: medians of several
        # one timed repeat: the medians are that run's numbers
        assert r["samples_per_s"] == pytest.approx(r["batch_size"] / r["total_seconds"])
        assert r["ttft_seconds"] < r["total_seconds"]


def test_outputs_written(result, tmp_path):
    paths = write_outputs(result, tmp_path / "speed_tiny")
    assert sorted(p.suffix for p in paths) == [".json", ".md", ".png"]
    assert json.loads(paths[0].read_text())["prefill"] == json.loads(json.dumps(result["prefill"]))
    md = to_markdown(result)
    assert "| fastv | 0.25 | 4 |" in md and "throughput ratio" in md
    assert paths[2].stat().st_size > 10_000


def test_peak_tensor_memory_counts_new_storage_only():
    old = torch.ones(10_000)
    with PeakTensorMemory() as tracker:
        a = torch.ones(1000)  # 4000 bytes
        v = a.view(10, 100)  # a view: nothing new
        old.add_(1)  # in place on a tensor from before: nothing new
        b = torch.ones(500)  # 2000 bytes: peak 6000
        del a, v
        c = torch.ones(250)  # 1000 bytes, after a was freed
    assert tracker.peak == 6000 and tracker.live == 3000
    del b, c


def test_kv_cache_bytes_of_a_dynamic_cache():
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.zeros(2, 4, 7, 8), torch.zeros(2, 4, 7, 8), 0)
    cache.update(torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 3, 8), 1)
    assert kv_cache_bytes(cache) == (2 * 4 * 8 * 4 * 2 * (7 + 3), [7, 3])


def test_presets():
    assert {"llava-1.5-7b", "llava-1.5-7b-scaled", "tiny"} <= set(PRESETS)
    seven = get_preset("llava-1.5-7b").config()
    t, v = seven.text_config, seven.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size, t.vocab_size) == (
        4096, 32, 32, 11008, 32064)
    assert (v.image_size // v.patch_size) ** 2 == 576 and v.hidden_size == 1024 and v.num_hidden_layers == 24
    scaled = get_preset("llava-1.5-7b-scaled")
    sv = scaled.config().vision_config
    assert (sv.image_size // sv.patch_size) ** 2 == 576
    assert 40 <= scaled.prompt_prefix + scaled.prompt_suffix <= 60
    with pytest.raises(ValueError, match="known presets"):
        get_preset("llava-13b")


def test_cli_subprocess(tmp_path):
    out = tmp_path / "speed_cli"
    cmd = [sys.executable, "-m", "pumer_llava.cli.bench", "--model", "tiny", "--methods", "random",
           "--fractions", "1,0.5", "--batch-sizes", "2", "--repeats", "1", "--gen-repeats", "1",
           "--new-tokens", "2", "--device", "cpu", "--threads", "1", "--no-memory", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| random | 0.5 | 8 |" in proc.stdout
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in data["prefill"]] == ["none", "random", "random"]
    assert [r["batch_size"] for r in data["generation"]] == [2, 2, 2]
    assert "peak_tensor_bytes" not in data["prefill"][0]  # --no-memory
    assert out.with_suffix(".png").exists() and out.with_suffix(".md").exists()


def test_cli_rejects_bad_arguments(capsys, tmp_path):
    assert main(["--model", "no-such-model", "--quiet"]) == 2
    assert "neither a folder nor a preset" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--quiet"]) == 2
    assert "not a model folder (it has no config.json)" in capsys.readouterr().err
    assert main(["--model", "tiny", "--fractions", "0", "--quiet"]) == 2
    assert main(["--model", "tiny", "--methods", "nope", "--quiet", "--batch-sizes", "1"]) == 2


def test_every_method_at_the_layers_given(capsys, tmp_path):
    # random at PuMer's layers: a control that selects for free with PuMer's stages
    spec = dict(SPEC, methods=("pumer", "random"), batch_sizes=(), gen_repeats=0, repeats=1, memory=False,
                layers=(1, 3))
    out = run_benchmark(BenchSpec(**spec), progress=False)
    reduced = [r for r in out["prefill"] if r["fraction"] < 1]
    assert [r["method"] for r in reduced] == ["pumer", "random"]
    assert all(r["reducing_layers"] == [1, 3] for r in reduced)
    assert out["config"]["layers"] == (1, 3) and "every method reduces at layers 1, 3" in to_markdown(out)
    assert main(["--model", "tiny", "--methods", "visionzip", "--layers", "2", "--batch-sizes", "1", "--quiet",
                 "--out", str(tmp_path / "x")]) == 2
    assert "acts before the language model only: it takes no layers" in capsys.readouterr().err


def test_static_cache_generation(capsys):
    spec = dict(SPEC, methods=("pumer",), fractions=(1.0, 0.25), batch_sizes=(2,), repeats=1, gen_repeats=1,
                memory=False, cache="static")
    out = run_benchmark(BenchSpec(**spec), progress=False)
    assert out["config"]["cache"] == "static" and "static KV cache" in to_markdown(out)
    rows = {(r["method"], r["fraction"]): r for r in out["generation"]}
    # a static cache preallocates: the reduced layers hold fewer slots than the unreduced ones
    assert rows[("pumer", 0.25)]["kv_cache_bytes"] < rows[("none", 1.0)]["kv_cache_bytes"]
    with pytest.raises(ValueError, match="cache must be dynamic or static"):
        BenchSpec(**dict(SPEC, cache="paged")).validate()
    assert main(["--model", "tiny", "--compile", "--quiet"]) == 2
    assert "compiled decoding needs the static cache (--cache static)" in capsys.readouterr().err


def test_compiled_decoding_compiles_each_setting_once(monkeypatch):
    """``--cache static --compile``: generate() runs its compiled decoding forward (fullgraph),
    the warm-up compiles every setting, and the timed runs compile nothing more."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    from pumer_llava.cli import bench

    def eager_backend(device):  # dynamo's tracing and guards, without a C++ build on this machine
        cfg = CompileConfig(fullgraph=True, backend="eager")
        cfg._compile_all_devices = True
        return cfg

    monkeypatch.setattr(bench, "_compile_config", eager_backend)
    calls = []
    real = bench._generate

    def counted(*args, **kwargs):
        before = counters["stats"]["unique_graphs"]
        res = real(*args, **kwargs)
        calls.append(counters["stats"]["unique_graphs"] - before)
        return res

    monkeypatch.setattr(bench, "_generate", counted)
    torch._dynamo.reset()
    counters.clear()
    spec = dict(SPEC, methods=("pumer", "fastv"), fractions=(1.0, 0.25), batch_sizes=(1,), repeats=1, gen_repeats=1,
                memory=False, cache="static", compile=True)
    out = bench.run_benchmark(BenchSpec(**spec), progress=False)
    assert out["config"]["compile"] and "compiled decoding" in bench.to_markdown(out)
    n_settings = 1 + 2 * 2  # unreduced, then each method at each fraction
    warm, timed = calls[:n_settings], calls[n_settings:]
    assert len(timed) == 2 * (1 + 2) and sum(timed) == 0, calls  # per method: unreduced, then its fractions
    assert sum(warm) >= 1 + 2, calls  # the unreduced graph, and one per reduced setting (its own slots)


def test_ctrl_c_keeps_the_finished_rows(tmp_path, monkeypatch, capsys):
    import json

    from pumer_llava.cli import bench

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "_generation_rows", interrupted)
    out = tmp_path / "partial"
    code = main(["--model", "tiny", "--methods", "random", "--fractions", "1,0.25", "--batch-sizes", "1",
                 "--repeats", "1", "--no-memory", "--quiet", "--out", str(out)])
    assert code == 130
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["interrupted"] and data["generation"] == [] and len(data["prefill"]) == 3
    assert "the files hold the rows that finished" in capsys.readouterr().err
    monkeypatch.setattr(bench, "_prefill_rows", interrupted)
    assert main(["--model", "tiny", "--methods", "random", "--quiet", "--out", str(tmp_path / "none")]) == 130
    assert "nothing written" in capsys.readouterr().err and not (tmp_path / "none.json").exists()


@pytest.mark.parametrize("row", ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_every_adapter_row_is_benchmarked_from_its_folder(row, tmp_path):
    """A checkpoint folder of each row: its processor encodes the image (anyres crops, Qwen's
    grids and M-RoPE token types), the prompt holds what the processor made, and the reduced
    row keeps the exact budget of that count."""
    from checkpoints import processor, write_checkpoint

    from PIL import Image

    from pumer_llava.cli.bench import load_model
    from pumer_llava.hooks import get_adapter
    from pumer_llava.loading import count_visual_tokens

    path = write_checkpoint(row, tmp_path / row)
    spec = BenchSpec(**dict(SPEC, model=path, methods=("pumer",), batch_sizes=(2,), repeats=1, memory=False,
                            image_size=(64, 40), prefix_tokens=5, suffix_tokens=3))
    out = run_benchmark(spec, progress=False)
    model, proc = load_model(spec)
    enc = processor(row)(images=[Image.new("RGB", (64, 40))], text=[proc.image_token], return_tensors="pt")
    n_vis = count_visual_tokens(get_adapter(model), model.config, enc["input_ids"])[0]
    cfg = out["config"]
    assert cfg["visual_tokens"] == n_vis and cfg["prompt_tokens"] == 5 + n_vis + 3 and tuple(cfg["image_size"]) == (64, 40)
    reduced = _row(out["prefill"], "pumer", 0.25)
    assert reduced["visual_tokens_kept"] == round(n_vis * 0.25) and reduced["flops_ratio"] < 1
    assert _row(out["prefill"], "none", 1.0)["visual_tokens_kept"] == n_vis
    assert [r["batch_size"] for r in out["generation"]] == [2, 2, 2]
    if row != "llava":  # a varying count needs the processor: a folder without one is refused
        (tmp_path / row / "processor_config.json").unlink()
        with pytest.raises(ValueError, match="pumer-bench encodes its image with the folder's processor"):
            load_model(spec)
