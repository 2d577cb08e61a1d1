"""Accuracy per conversation turn through the chat's own flow (``pumer-chat``'s ``ChatSession``).

Each scene of the conversation split (``proxy_task.make_conversation_split``: four questions of
different types about one image) is one conversation: turn 1 is a prefill of the image and the
first question (reduced when a method is on), every later turn continues the KV cache the
previous turn left, as the chat does, after the model's *own* earlier answers. A turn is right
when the greedy answer equals the expected word. Rows: the unreduced model, then each method at
its default layers, or at ``--layers``, for every ``--keep`` budget.

Writes ``chat_turns.json`` and ``chat_turns.md``.

Usage::

    python eval/chat_turns.py                                  # embedded model, 300 conversations
    python eval/chat_turns.py --images 40 --methods pumer random --keep 16 7
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the package, when not installed
import proxy_task as task  # noqa: E402

from pumer_llava import remove_pumer  # noqa: E402
from pumer_llava.cli.chat import ChatSession  # noqa: E402

DEFAULT_METHODS = ("pumer", "fastv", "random", "vispruner")


def run_conversations(session: ChatSession, conversations, image_paths, reduce: bool) -> dict:
    """Per-turn and overall accuracy of ``session`` over ``conversations``."""
    by_turn = defaultdict(list)
    t0 = time.perf_counter()
    for (scene, questions), path in zip(conversations, image_paths):
        session.set_image(path)
        for j, q in enumerate(questions):
            answer, _ = session.ask(q.question, reduce=reduce)
            by_turn[j + 1].append(answer.strip() == q.answer)
    every = [c for v in by_turn.values() for c in v]
    return {
        "n": len(every),
        "accuracy": sum(every) / len(every),
        "per_turn": {f"turn{t}": sum(v) / len(v) for t, v in sorted(by_turn.items())},
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }


def run(model, processor, conversations, image_paths, methods, keeps, layers=None, log=print) -> list[dict]:
    remove_pumer(model)
    session = ChatSession(model, processor, max_new_tokens=3)
    rows = [{"name": "unreduced", "keep_tokens": task.NUM_CELLS, "layers": [],
             **run_conversations(session, conversations, image_paths, reduce=False)}]
    log(_line(rows[-1]))
    for keep in keeps:
        for name in methods:
            session = ChatSession(model, processor, max_new_tokens=3)  # a fresh session per reduction
            session.set_reduction(keep_tokens=keep, method=name, layers=layers)
            try:
                res = run_conversations(session, conversations, image_paths, reduce=True)
                rows.append({"name": name, "keep_tokens": keep, "layers": list(model.pumer.layers), **res})
            finally:
                remove_pumer(model)
            log(_line(rows[-1]))
    return rows


def _line(row: dict) -> str:
    turns = " ".join(f"{k}={v:.3f}" for k, v in row["per_turn"].items())
    return f"{row['name']:>10} keep {row['keep_tokens']:>2}: acc {row['accuracy']:.3f} | {turns} ({row['wall_seconds']}s)"


def to_markdown(rows: list[dict], meta: dict) -> str:
    turns = list(rows[0]["per_turn"])
    head = ["method", "kept", "layers", "all turns"] + turns
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], str(r["keep_tokens"]), ",".join(map(str, r["layers"])) or "-", f"{r['accuracy']:.3f}"]
        cells += [f"{r['per_turn'][t]:.3f}" for t in turns]
        lines.append("| " + " | ".join(cells) + " |")
    return ("\n".join(lines) + f"\n\n{meta['conversations']} conversations of {meta['turns']} turns through "
            f"`pumer-chat`'s session (later turns continue the cache, after the model's own answers); "
            f"model `{meta['model']}`.\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="save_pretrained folder (default: the embedded proxy LLaVA)")
    p.add_argument("--images", type=int, default=task.CONVERSATION_IMAGES, help="conversations (one per scene)")
    p.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS))
    p.add_argument("--keep", nargs="*", type=int, default=[16], help="visual tokens kept (of 64)")
    p.add_argument("--layers", default=None, help="reducing layers for every method, e.g. 0 or 2,4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="eval/results")
    p.add_argument("--stem", default="chat_turns")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model:
        from pumer_llava.loading import load_model

        model, processor, _ = load_model(args.model, device="cpu", dtype="float32", attn="sdpa")
        name = args.model
    else:
        from pumer_llava.embedded import load_embedded

        model, processor = load_embedded()
        name = "embedded proxy LLaVA"
    model.eval()
    conversations = task.make_conversation_split(num_images=args.images)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (scene, _) in enumerate(conversations):
            paths.append(str(Path(tmp) / f"{i}.png"))
            task.render(scene).save(paths[-1])
        rows = run(model, processor, conversations, paths, args.methods, args.keep, args.layers)
    meta = {"model": name, "conversations": len(conversations), "turns": len(conversations[0][1]),
            "layers": args.layers, "threads": torch.get_num_threads(), "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=1) + "\n")
    (out / f"{args.stem}.md").write_text(to_markdown(rows, meta))
    print(f"wrote {out / (args.stem + '.json')}, {out / (args.stem + '.md')}")
    return rows


if __name__ == "__main__":
    main()
