"""Accuracy of every reduction method on the proxy task, with control rows.

Scores each registered method (``pumer_llava.list_methods()``) at several kept
fractions of the 64 visual tokens on the held-out test split of
``eval/proxy_task.py``, next to control rows built as custom ``Method`` objects:

- ``oracle_aware``: keeps the cells the question needs first, then other object
  cells, then background (an upper bound for question-aware selection);
- ``oracle_blind``: keeps object cells (random order) before background, without
  reading the question (what a perfect question-blind saliency could do);
- ``lowest``: keeps the tokens with the *lowest* PuMer text-attention score
  (should collapse: shows the score carries signal);
- ``feature_norm``: keeps the tokens with the largest input norm (question-blind);
- ``random`` is a registered method and appears with them.

Variant rows (``VARIANTS``) run a registered method with one setting changed at
the method's own layers: ``pumer-prune`` is PuMer without its merging,
``pumer-bipartite`` PuMer with the paper's merge rule.

Controls act at one decoder layer (``--control-layer``, default 2, where
``fastv`` and ``random`` act). Accuracy is the greedy first answer word
(``generate(max_new_tokens=1)``, batched with left padding). Reported per row:
accuracy overall and per question type, mean visual tokens per decoder layer,
FLOPs ratio (``pumer_llava.reduce.flops``, scoring included), visual tokens merged per
image (folded into another, not dropped: ``last_stats.merged_per_layer``), selection
seconds and wall time. Writes ``accuracy.json``, ``accuracy.md`` and ``accuracy.png``.

Usage::

    python eval/accuracy.py                                   # embedded model, full test split
    python eval/accuracy.py --limit 120 --fractions 1.0 0.25  # quick look
    python eval/accuracy.py --model DIR --data eval/data/proxy_test/questions.jsonl
"""

from __future__ import annotations

import os

# On a shared CPU, OpenMP's spinning threads of several processes fight each other:
# passive waiting made forward passes ~10x faster here (set before torch starts OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the package, when not installed
import proxy_task as task  # noqa: E402

from pumer_llava import Method, apply_pumer, list_methods, remove_pumer  # noqa: E402
from pumer_llava.methods import MergeOptions, get_method, visual_scorer  # noqa: E402

DEFAULT_FRACTIONS = (1.0, 0.5, 0.25, 0.11)
CONTROLS = ("oracle_aware", "oracle_blind", "lowest", "feature_norm")
# The hybrid: VisPruner before the language model, then PuMer's text-informed
# pruning and merging at a deeper layer, all under one budget.
HYBRIDS = {"vispruner+pumer": {"method": "vispruner", "merge_share": 0.5}}
# Registered methods with one setting changed, at the same layers as the method itself:
# PuMer's text-informed pruning without its merging, to tell what the merging adds or costs,
# and PuMer with the paper's merge rule (pair up the most similar of the kept tokens).
VARIANTS = {
    "pumer-prune": ("pumer", {"merge_share": 0.0}),
    "pumer-bipartite": ("pumer", {"merge_rule": "bipartite", "merge_threshold": None}),
}


def prompt(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"


def load_records(data: str | None, limit: int | None, seed: int = task.TEST_SEED,
                 conversations: bool = False) -> list[dict]:
    """Test questions with their PIL images: from a written JSONL, or generated in memory
    (identical to what ``proxy_task.write_split`` writes). With ``conversations``, the
    conversation split instead: each scene's four questions asked one after the other, a
    record's ``history`` holding the earlier turns with their right answers, ``turn`` its
    1-based turn."""
    if conversations:
        if data:
            raise SystemExit("--conversations generates its split; it does not read --data")
        records = []
        n_images = task.CONVERSATION_IMAGES if limit is None else -(-limit // 4)
        for scene, questions in task.make_conversation_split(num_images=n_images, seed=seed):
            img = task.render(scene)
            for j, q in enumerate(questions):
                history = [(p.question, p.answer) for p in questions[:j]]
                records.append({**q.__dict__, "pil": img, "history": history, "turn": j + 1})
        return records[:limit] if limit else records
    if data:
        records = task.read_split(data)
        images = {}
        for r in records:
            if r["image"] not in images:
                with Image.open(r["image"]) as im:
                    images[r["image"]] = im.convert("RGB")
            r["pil"] = images[r["image"]]
    else:
        records = []
        n_images = task.TEST_IMAGES if limit is None else -(-limit // len(task.QUESTION_TYPES))
        for scene, questions in task.make_split("test", n_images, seed):
            img = task.render(scene)
            records += [{**q.__dict__, "pil": img} for q in questions]
    return records[:limit] if limit else records


class Priorities:
    """Per-batch keep priorities for the oracle rows, read by a custom scorer."""

    def __init__(self):
        self.table: torch.Tensor | None = None  # (B, 64) higher = keep

    def set(self, records: list[dict], kind: str, seed: int = 0):
        table = torch.zeros(len(records), task.NUM_CELLS)
        for b, r in enumerate(records):
            rng = random.Random(f"{kind}-{seed}-{r['id']}")
            tie = torch.tensor([rng.random() for _ in range(task.NUM_CELLS)])  # random order within a tier
            tier = torch.zeros(task.NUM_CELLS)
            tier[r["object_cells"]] = 1.0
            if kind == "oracle_aware":
                tier[r["needed_cells"]] = 2.0
            table[b] = tier + 0.5 * tie
        self.table = table

    def scorer(self, ctx):
        t = self.table.to(ctx.patch_index.device)
        return t.gather(1, ctx.patch_index.clamp(0, task.NUM_CELLS - 1))  # (B, n)


def lowest_text_attention(ctx):
    """Scores = minus PuMer's text-attention score at the reducing layer (the library's own
    attention service, so it is exactly PuMer's score with the sign flipped)."""
    return -ctx.attention("text")


def feature_norm(ctx):
    """Scores = L2 norm of each visual token as it enters the language model (the projector's
    output): the question-blind heuristic that beat both attention scores on an easy version
    of this task."""
    return ctx.input_embeddings().norm(dim=-1)


def control_method(name: str, score, layer: int) -> Method:
    """A control row at one decoder layer; ``score`` reads the LayerContext (wrap a scorer over
    the visual tokens alone with ``visual_scorer``). Takes the merge options (none by default)."""
    return Method(name=name, score=score, default_layers=lambda depth: (layer,), options=MergeOptions,
                  description=f"control: {name}")


def make_batches(processor, records, batch_size) -> list[tuple[list[dict], dict]]:
    """Processor outputs per batch (left padding), built once and reused by every row."""
    processor.tokenizer.padding_side = "left"
    batches = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        texts = [processor.apply_chat_template(task.conversation_messages(r["history"], r["question"]),
                                               add_generation_prompt=True) if r.get("history") else prompt(r["question"])
                 for r in chunk]
        inputs = processor(images=[r["pil"] for r in chunk], text=texts, return_tensors="pt", padding=True)
        batches.append((chunk, inputs))
    return batches


@torch.no_grad()
def evaluate(model, processor, batches, before_batch=None) -> dict:
    """Greedy first word for every record; accuracy and reduction statistics."""
    correct, types, turns = [], [], []
    vis_layers, flops, flops_un, select_s, n_seen, merged = None, 0.0, 0.0, 0.0, 0, 0
    t0 = time.perf_counter()
    for chunk, inputs in batches:
        if before_batch:
            before_batch(chunk)
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        words = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += [w.strip() == r["answer"] for w, r in zip(words, chunk)]
        types += [r["type"] for r in chunk]
        turns += [r.get("turn", 1) for r in chunk]
        stats = getattr(getattr(model, "pumer", None), "last_stats", None)
        if stats is not None:
            per_layer = [sum(v) for v in stats.visual_tokens_per_layer]  # summed over the batch
            vis_layers = per_layer if vis_layers is None else [a + b for a, b in zip(vis_layers, per_layer)]
            flops += stats.flops
            flops_un += stats.flops_unreduced
            select_s += stats.select_seconds
            merged += sum(sum(v) for v in stats.merged_per_layer.values())
        n_seen += len(chunk)
    wall = time.perf_counter() - t0
    by = defaultdict(list)
    for t, c in zip(types, correct):
        by[t].append(c)
    res = {
        "n": len(correct),
        "accuracy": sum(correct) / len(correct),
        "per_type": {t: sum(v) / len(v) for t, v in sorted(by.items())},
        "wall_seconds": round(wall, 2),
    }
    if len(set(turns)) > 1:
        by_turn = defaultdict(list)
        for t, c in zip(turns, correct):
            by_turn[t].append(c)
        res["per_turn"] = {f"turn{t}": sum(v) / len(v) for t, v in sorted(by_turn.items())}
    if vis_layers is not None:
        res["visual_tokens_per_layer"] = [round(v / n_seen, 2) for v in vis_layers]
        res["flops_ratio"] = flops / flops_un if flops_un else 1.0
        res["select_seconds"] = round(select_s, 3)
        res["merged_per_image"] = round(merged / n_seen, 2)  # one image per question
    else:
        depth = model.config.text_config.num_hidden_layers
        res["visual_tokens_per_layer"] = [float(task.NUM_CELLS)] * depth
        res["flops_ratio"] = 1.0
        res["select_seconds"] = 0.0
        res["merged_per_image"] = 0.0
    return res


def run(model, processor, records, methods, fractions, controls, control_layer, batch_size, log=print,
        hybrids=None, hybrid_layers=(2,), method_layers=None, variants=None) -> dict:
    """``method_layers``: reducing layers for every in-LLM method instead of its defaults
    (raised to a method's smallest allowed layer, FastV's 1); VisPruner stays before the LLM.
    ``variants``: name -> (registered method, apply_pumer overrides), default ``VARIANTS``;
    each row records the merge share the patched model ran with."""
    total = task.NUM_CELLS
    rows = []
    batches = make_batches(processor, records, batch_size)

    def add(name, kind, fraction, keep, res, layers, merge_share=0.0):
        rows.append({"name": name, "kind": kind, "fraction": fraction, "keep_tokens": keep, "layers": layers,
                     "merge_share": merge_share, **res})
        per = " ".join(f"{t}={a:.3f}" for t, a in {**res["per_type"], **res.get("per_turn", {})}.items())
        log(f"{name:>13} keep {keep:>2}: acc {res['accuracy']:.3f} flops {res['flops_ratio']:.3f} "
            f"wall {res['wall_seconds']:.1f}s | {per}")

    remove_pumer(model)
    add("unreduced", "baseline", 1.0, total, evaluate(model, processor, batches), [])
    priorities = Priorities()
    for fraction in fractions:
        if fraction >= 1.0:
            continue
        keep = max(1, round(total * fraction))
        todo = [(name, name, {}) for name in methods]
        todo += [(name, base, kw) for name, (base, kw) in (VARIANTS if variants is None else variants).items()
                 if base in methods]
        for name, base, kw in todo:
            method = get_method(base)
            override = dict(kw)
            if method_layers is not None and method.before_llm is None:
                low = max(method.min_layer, -method.score_offset)
                override["layers"] = sorted({max(x, low) for x in method_layers})
            apply_pumer(model, keep_tokens=keep, method=base, **override)
            res = evaluate(model, processor, batches)
            add(name, "method", fraction, keep, res, list(model.pumer.layers), model.pumer.merge_share)
            remove_pumer(model)
        for name, kwargs in (HYBRIDS if hybrids is None else hybrids).items():
            apply_pumer(model, keep_tokens=keep, layers=list(hybrid_layers), **kwargs)
            res = evaluate(model, processor, batches)
            add(name, "method", fraction, keep, res, ["pre"] + list(model.pumer.layers), model.pumer.merge_share)
            remove_pumer(model)
        for name in controls:
            before = None
            if name.startswith("oracle"):
                method = control_method(name, visual_scorer(priorities.scorer), control_layer)
                before = lambda chunk, kind=name: priorities.set(chunk, kind)  # noqa: E731
            elif name == "lowest":
                method = control_method(name, lowest_text_attention, control_layer)
            elif name == "feature_norm":
                method = control_method(name, feature_norm, control_layer)
            else:
                raise ValueError(f"unknown control {name!r}; known: {', '.join(CONTROLS)}")
            apply_pumer(model, keep_tokens=keep, method=method)
            try:
                res = evaluate(model, processor, batches, before_batch=before)
            finally:
                remove_pumer(model)
            add(name, "control", fraction, keep, res, [control_layer])
    return {"rows": rows}


def to_markdown(results: dict) -> str:
    rows = results["rows"]
    types = list(rows[0]["per_type"]) + list(rows[0].get("per_turn", {}))
    head = ["method", "kept", "layers", "acc"] + types + ["FLOPs", "merged", "visual tokens per layer", "select s",
                                                           "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (-r["keep_tokens"], r["kind"] != "baseline", r["kind"], r["name"])):
        cells = [r["name"], str(r["keep_tokens"]), ",".join(map(str, r["layers"])) or "-", f"{r['accuracy']:.3f}"]
        cells += [f"{r['per_type'].get(t, r.get('per_turn', {}).get(t, float('nan'))):.3f}" for t in types]
        cells += [f"{r['flops_ratio']:.3f}", f"{r.get('merged_per_image', 0.0):g}", " ".join(f"{v:g}" for v in r["visual_tokens_per_layer"]),
                  f"{r['select_seconds']:.2f}", f"{r['wall_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    meta = results.get("meta", {})
    kind = "conversation questions (turn k asked after turns 1..k-1 and their right answers)" if meta.get(
        "conversations") else "test questions"
    note = (f"\n{meta.get('questions', '?')} {kind}; model `{meta.get('model', '?')}`; "
            f"controls at layer {meta.get('control_layer', '?')}; accuracy = greedy first answer word.\n")
    return "\n".join(lines) + "\n" + note


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    base = next(r for r in rows if r["kind"] == "baseline")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = sorted({r["name"] for r in rows if r["kind"] != "baseline"}, key=lambda n: (n in CONTROLS, n))
    for name in names:
        pts = sorted([(r["keep_tokens"], r["accuracy"]) for r in rows if r["name"] == name] + [
            (base["keep_tokens"], base["accuracy"])])
        style = "--" if name in CONTROLS else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["keep_tokens"] for r in rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("visual tokens kept (of 64)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"proxy LLaVA, {results.get('meta', {}).get('questions', '?')} test questions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict, out_dir: str | Path, stem: str = "accuracy") -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["md"].write_text(to_markdown(results))
    plot(results, paths["png"])
    return paths


def parse_variants(items: list[str]) -> dict[str, tuple[str, dict]]:
    """``NAME=METHOD:KEY=VALUE,KEY=VALUE`` strings as variants, the options converted and
    validated by the method's own dataclass."""
    out = {}
    for item in items:
        name, sep, rest = item.partition("=")
        base, _, opts = rest.partition(":")
        if not sep or not name or not base:
            raise SystemExit(f"--variant takes NAME=METHOD:KEY=VALUE,..., got {item!r}")
        text = dict(kv.split("=", 1) for kv in opts.split(",") if kv)
        opts = get_method(base).options.parse(base, text).to_dict()  # validated, typed
        out[name] = (base, {k: v for k, v in opts.items() if k in text})
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="save_pretrained folder (default: the embedded proxy LLaVA)")
    p.add_argument("--data", default=None, help="questions.jsonl written by proxy_task (default: generate the test split)")
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument("--conversations", action="store_true",
                   help="the conversation split: four turns per image, each asked after the earlier ones")
    p.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    p.add_argument("--fractions", nargs="*", type=float, default=list(DEFAULT_FRACTIONS))
    p.add_argument("--controls", nargs="*", default=list(CONTROLS))
    p.add_argument("--control-layer", type=int, default=2)
    p.add_argument("--method-layers", nargs="*", type=int, default=None,
                   help="reducing layers for every in-LLM method (default: each method's own)")
    p.add_argument("--hybrid-layers", nargs="*", type=int, default=[2],
                   help="decoder layers of the hybrid's PuMer stages (after VisPruner before the LLM)")
    p.add_argument("--variant", action="append", default=None, metavar="NAME=METHOD:KEY=VALUE,...",
                   help="a registered method with some options changed, e.g. pumer-t=pumer:merge_rule=recycle,"
                   "merge_threshold=0.85 (repeatable; replaces the built-in variants)")
    p.add_argument("--no-hybrids", action="store_true", help="skip the VisPruner + PuMer hybrid rows")
    p.add_argument("--no-variants", action="store_true", help="skip the variant rows (pumer-prune, pumer-bipartite)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="eval/results")
    p.add_argument("--stem", default="accuracy")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model:
        from pumer_llava.loading import load_model

        model, processor, _ = load_model(args.model, device="cpu", dtype="float32", attn="sdpa")
    else:
        from pumer_llava.embedded import EMBEDDED_MODEL_DIR, load_embedded

        model, processor = load_embedded()
        args.model = str(EMBEDDED_MODEL_DIR)
    model.eval()
    processor.tokenizer.padding_side = "left"
    records = load_records(args.data, args.limit, conversations=args.conversations)
    methods = args.methods if args.methods is not None else list_methods()
    variants = {} if args.no_variants else VARIANTS if args.variant is None else parse_variants(args.variant)
    hybrids = {} if args.no_hybrids else HYBRIDS
    t0 = time.perf_counter()
    results = run(model, processor, records, methods, args.fractions, args.controls, args.control_layer,
                  args.batch_size, hybrids=hybrids, hybrid_layers=args.hybrid_layers, method_layers=args.method_layers,
                  variants=variants)
    root = Path(__file__).resolve().parent.parent
    model_path = Path(args.model).resolve()
    results["meta"] = {
        "hybrids": {name: {**kw, "layers": args.hybrid_layers} for name, kw in hybrids.items()},
        "variants": {name: {"method": base, **kw} for name, (base, kw) in variants.items()},
        "model": str(model_path.relative_to(root)) if model_path.is_relative_to(root) else args.model,
        "questions": len(records),
        "conversations": args.conversations,
        "fractions": args.fractions,
        "methods": methods,
        "controls": args.controls,
        "control_layer": args.control_layer,
        "method_layers": args.method_layers,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    paths = write_outputs(results, args.out, args.stem)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return results


if __name__ == "__main__":
    main()
