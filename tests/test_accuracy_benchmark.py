"""The accuracy benchmark runs end to end on a handful of questions, and its
control rows keep what they claim to keep."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import accuracy  # noqa: E402

from pumer_llava import apply_pumer, remove_pumer  # noqa: E402
from pumer_llava.methods import visual_scorer  # noqa: E402


@pytest.fixture(scope="module")
def records():
    return accuracy.load_records(None, limit=12)


def kept_patches(model, inputs, layer, **apply_kwargs):
    """The patches each sample keeps at ``layer`` with ``apply_pumer(layers=[layer], ...)``."""
    apply_pumer(model, layers=[layer], **apply_kwargs)
    try:
        with torch.no_grad():
            model(**inputs)
        return model.pumer.last_stats.kept_patches[layer]
    finally:
        remove_pumer(model)


def kept_by_lowest(model, inputs, layer, keep):
    return kept_patches(model, inputs, layer, keep_tokens=keep,
                        method=accuracy.control_method("lowest", accuracy.lowest_text_attention, layer), merge_share=0.0)


def test_oracle_keeps_the_needed_cells_first(small_proxy, records):
    model, processor = small_proxy
    (chunk, inputs), = accuracy.make_batches(processor, records, batch_size=len(records))
    pri = accuracy.Priorities()
    pri.set(chunk, "oracle_aware")
    keep = 4
    kept = kept_patches(model, inputs, 1, keep_tokens=keep,
                        method=accuracy.control_method("oracle_aware", visual_scorer(pri.scorer), 1), merge_share=0.0)
    for r, cells in zip(chunk, kept):
        need = r["needed_cells"]
        if len(need) <= keep:
            assert set(need) <= set(cells), (r["question"], need, cells)
        else:
            assert set(cells) <= set(need)
        extra = set(cells) - set(need)
        objects_left = set(r["object_cells"]) - set(need)
        if len(objects_left) >= keep - len(set(cells) & set(need)):
            assert extra <= objects_left, "object cells come before background"


def test_lowest_control_is_minus_the_pumer_score(small_proxy, records):
    """Keep-the-lowest at ratio 1/2 and PuMer (prune only, same layer) keep disjoint halves."""
    model, processor = small_proxy
    (chunk, inputs), = accuracy.make_batches(processor, records[:4], batch_size=4)
    top = kept_patches(model, inputs, 2, keep_tokens=32, method="pumer", merge_share=0.0)
    bottom = kept_by_lowest(model, inputs, 2, 32)
    for a, b in zip(top, bottom):
        assert len(set(a) & set(b)) <= 2, "lowest keeps what PuMer drops (ties aside)"


def test_feature_norm_control_keeps_the_largest_input_tokens(small_proxy, records):
    model, processor = small_proxy
    (chunk, inputs), = accuracy.make_batches(processor, records[:3], batch_size=3)
    image_id = model.config.image_token_id
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=inputs["pixel_values"])
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    expected = [sorted(feats[b].reshape(64, -1).norm(dim=-1).topk(16).indices.tolist()) for b in range(3)]
    kept = kept_patches(model, inputs, 2, keep_tokens=16,
                        method=accuracy.control_method("feature_norm", accuracy.feature_norm, 2))
    assert (inputs["input_ids"] == image_id).sum(1).tolist() == [64] * 3
    assert [sorted(k) for k in kept] == expected


def test_benchmark_runs_and_writes_outputs(small_proxy, records, tmp_path):
    model, processor = small_proxy
    res = accuracy.run(model, processor, records, ["pumer", "fastv", "random"], [1.0, 0.25],
                       list(accuracy.CONTROLS), control_layer=2, batch_size=6, log=lambda *_: None)
    res["meta"] = {"questions": len(records), "model": "small", "control_layer": 2}
    names = [r["name"] for r in res["rows"]]
    assert names[0] == "unreduced"
    assert set(names) == {"unreduced", "pumer", "fastv", "random", *accuracy.HYBRIDS, *accuracy.VARIANTS,
                          *accuracy.CONTROLS}
    hybrid = next(r for r in res["rows"] if r["name"] == "vispruner+pumer")
    assert hybrid["layers"] == ["pre", 2]
    # VisPruner removes part of the budget before layer 0, PuMer the rest at layer 2
    assert 16 < hybrid["visual_tokens_per_layer"][0] < 64 and hybrid["visual_tokens_per_layer"][2] == 16
    for r in res["rows"]:
        assert r["n"] == len(records) and 0.0 <= r["accuracy"] <= 1.0
        assert set(r["per_type"]) == {rec["type"] for rec in records}
        if r["name"] != "unreduced":
            assert r["keep_tokens"] == 16 and r["visual_tokens_per_layer"][-1] == 16
            assert r["flops_ratio"] < 1.0
    paths = accuracy.write_outputs(res, tmp_path)
    assert json.loads(paths["json"].read_text())["rows"][0]["name"] == "unreduced"
    assert "| oracle_aware | 16 |" in paths["md"].read_text()
    assert paths["png"].stat().st_size > 0


def test_method_layers_override_and_layer0_controls(small_proxy, records):
    model, processor = small_proxy
    res = accuracy.run(model, processor, records[:6], ["pumer", "fastv", "vispruner"], [0.25], ["lowest"],
                       control_layer=0, batch_size=6, log=lambda *_: None, hybrids={}, method_layers=[0])
    layers = {r["name"]: r["layers"] for r in res["rows"]}
    assert layers["pumer"] == [0] and layers["fastv"] == [1] and layers["vispruner"] == []
    assert layers["lowest"] == [0]
    low = next(r for r in res["rows"] if r["name"] == "lowest")
    assert low["visual_tokens_per_layer"][0] == 16  # reduced before layer 0 runs


def test_prune_only_variant_keeps_the_top_pumer_scores(small_proxy, records):
    """``pumer-prune`` runs at PuMer's layers without merging: what it keeps at ratio 1/2 is
    disjoint from what keep-the-lowest keeps, and its row says merge share 0. PuMer's default
    merge folds the next-ranked tokens into those same kept ones; the paper's bipartite rule
    merges among the kept, so it keeps a different set. Rows count the real merges."""
    model, processor = small_proxy
    res = accuracy.run(model, processor, records[:4], ["pumer"], [0.5], [], control_layer=2, batch_size=4,
                       log=lambda *_: None, hybrids={}, method_layers=[2])
    rows = {r["name"]: r for r in res["rows"]}
    assert rows["pumer-prune"]["layers"] == rows["pumer"]["layers"] == rows["pumer-bipartite"]["layers"] == [2]
    assert rows["pumer-prune"]["merge_share"] == 0.0 and rows["pumer"]["merge_share"] == 0.5
    assert rows["pumer-prune"]["visual_tokens_per_layer"] == rows["pumer"]["visual_tokens_per_layer"]
    assert rows["pumer-prune"]["merged_per_image"] == 0.0
    assert rows["pumer-bipartite"]["merged_per_image"] == 16.0  # half of the 32 removed, every pair merges
    assert 0.0 <= rows["pumer"]["merged_per_image"] <= 16.0
    (chunk, inputs), = accuracy.make_batches(processor, records[:4], batch_size=4)
    base, kw = accuracy.VARIANTS["pumer-prune"]
    top = kept_patches(model, inputs, 2, keep_tokens=32, method=base, **kw)
    folded = kept_patches(model, inputs, 2, keep_tokens=32, method="pumer")
    paired = kept_patches(model, inputs, 2, keep_tokens=32, method="pumer", **accuracy.VARIANTS["pumer-bipartite"][1])
    bottom = kept_by_lowest(model, inputs, 2, 32)
    for a, b in zip(top, bottom):
        assert len(a) == 32 and len(set(a) & set(b)) <= 2, "prune-only keeps PuMer's top half (ties aside)"
    assert folded == top, "the default merge keeps what pruning keeps"
    assert paired != top, "bipartite merging among the kept keeps a different set"


def test_the_methods_table_reads_the_harness_outputs(tmp_path):
    """eval/methods_table.py over the committed first-look runs: one row per method and control,
    the accuracy values as the runs wrote them."""
    import methods_table

    res = Path(__file__).resolve().parent.parent / "eval" / "results"
    t = methods_table.main(["--default", str(res / "accuracy_methods_default.json"),
                            "--layer0", str(res / "accuracy_methods_layer0.json"), "--out", str(tmp_path / "t")])
    names = {r["method"] for r in t["rows"]}
    from pumer_llava import list_methods

    assert set(list_methods()) <= names
    rows = json.loads((res / "accuracy_methods_default.json").read_text())["rows"]
    want = next(r["accuracy"] for r in rows if r["name"] == "cdpruner" and r["keep_tokens"] == 7)
    got = next(r for r in t["rows"] if r["method"] == "cdpruner")["default"][7]
    assert got == want
    assert (tmp_path / "t.md").read_text().count("\n| ") == len(t["rows"])  # the header opens the file


def test_variants_from_the_command_line_are_validated_by_the_method():
    v = accuracy.parse_variants(["pumer-t=pumer:merge_rule=recycle,merge_threshold=0.85", "prune=pumer:merge_share=0"])
    assert v == {"pumer-t": ("pumer", {"merge_rule": "recycle", "merge_threshold": 0.85}),
                 "prune": ("pumer", {"merge_share": 0.0})}
    with pytest.raises(ValueError, match="merge_rule must be one of bipartite, recycle"):
        accuracy.parse_variants(["x=pumer:merge_rule=average"])
    with pytest.raises(ValueError, match="method 'fastv' takes no options"):
        accuracy.parse_variants(["x=fastv:merge_share=0.5"])


def test_conversation_records_ask_each_turn_after_the_earlier_ones(small_proxy, tmp_path):
    """The conversation split: four turns per image, each prompt the chat template's rendering
    of the earlier turns with their right answers; the benchmark reports accuracy per turn."""
    model, processor = small_proxy
    recs = accuracy.load_records(None, limit=8, conversations=True)
    assert [r["turn"] for r in recs] == [1, 2, 3, 4, 1, 2, 3, 4]
    assert recs[2]["history"] == [(recs[0]["question"], recs[0]["answer"]), (recs[1]["question"], recs[1]["answer"])]
    assert recs[0]["pil"] is recs[3]["pil"] and recs[0]["pil"] is not recs[4]["pil"]
    (chunk, inputs), = accuracy.make_batches(processor, recs, batch_size=8)
    text = processor.tokenizer.decode(inputs["input_ids"][2], skip_special_tokens=False)
    want = (f"USER: {recs[0]['question']} ASSISTANT: {recs[0]['answer']}</s> USER: {recs[1]['question']} "
            f"ASSISTANT: {recs[1]['answer']}</s> USER: {recs[2]['question']} ASSISTANT:")
    assert text.replace("<image>", "").replace("<pad>", "").split() == ["<s>"] + want.lower().replace("</s>", " </s>").split()
    res = accuracy.run(model, processor, recs, ["random"], [1.0, 0.25], ["oracle_aware"], control_layer=2,
                       batch_size=8, log=lambda *_: None, hybrids={}, variants={})
    for r in res["rows"]:
        assert set(r["per_turn"]) == {"turn1", "turn2", "turn3", "turn4"}
    res["meta"] = {"questions": len(recs), "model": "small", "control_layer": 2, "conversations": True}
    md = accuracy.write_outputs(res, tmp_path)["md"].read_text()
    assert "| turn4 |" in md.splitlines()[0] + "|" and "conversation questions" in md
    with pytest.raises(SystemExit, match="does not read --data"):
        accuracy.load_records("x.jsonl", None, conversations=True)


def test_the_pumer_score_layer_study_compares_the_two_layers(tmp_path):
    import pumer_score_layer
    from pumer_llava import list_methods

    res = pumer_score_layer.main(["--limit", "6", "--fractions", "0.25", "--threads", "1", "--out", str(tmp_path)])
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {"unreduced", "pumer", pumer_score_layer.PREVIOUS}  # no variants, hybrids or controls
    assert rows["pumer"]["layers"] == rows[pumer_score_layer.PREVIOUS]["layers"] == [1, 2, 4]
    # the same budgets; the earlier layer's keys are already projected, so the scoring counts fewer FLOPs
    assert rows["pumer"]["visual_tokens_per_layer"] == rows[pumer_score_layer.PREVIOUS]["visual_tokens_per_layer"]
    assert rows[pumer_score_layer.PREVIOUS]["flops_ratio"] < rows["pumer"]["flops_ratio"]
    assert (tmp_path / "accuracy_pumer_score_layer.md").exists()
    assert pumer_score_layer.PREVIOUS not in list_methods()  # unregistered once the study ran
