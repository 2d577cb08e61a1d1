"""The project's own scoring of the proxy test split, without lmms-eval.

Runs the model on the first ``--limit`` questions of ``questions.jsonl`` with the
prompt the proxy was trained on (``prompt_text`` in eval/train_proxy.py:
``USER: <image>\\n{question} ASSISTANT:``), one sample per forward, and scores the
first greedy token against the answer (``evaluate_processor`` in train_proxy.py).
``eval/lmms/check_results.py`` compares this with what lmms-eval's ``pumer_proxy``
task measured through the ``pumer_llava`` model on the same questions.

Usage::

    python eval/lmms/reference_score.py --model pumer_llava/assets/proxy-llava \\
        --data eval/data/proxy_test --limit 40 --ratio 0.25 --method pumer --out ref.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))
sys.path.insert(0, str(REPO))

from proxy_task import read_split  # noqa: E402
from train_proxy import prompt_text  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="eval/data/proxy_test")
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--method", default="pumer", help="a pumer_llava method, or none")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from pumer_llava import apply_pumer

    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(a.model)
    model = LlavaForConditionalGeneration.from_pretrained(a.model, dtype="auto").eval()
    if a.method != "none" and a.ratio < 1.0:
        apply_pumer(model, ratio=a.ratio, method=a.method)
    records = read_split(Path(a.data) / "questions.jsonl")[: a.limit]
    preds, correct = [], []
    with torch.inference_mode():
        for rec in records:
            with Image.open(rec["image"]) as im:
                img = im.convert("RGB")
            inputs = processor(images=[img], text=[prompt_text(rec["question"])], return_tensors="pt")
            logits = model(**inputs).logits[:, -1]  # (1, V): the first greedy token
            pred = processor.tokenizer.decode(logits.argmax(-1)).strip()
            preds.append(pred)
            correct.append(pred == rec["answer"])
    out = {
        "model": a.model,
        "method": a.method,
        "ratio": a.ratio,
        "ids": [r["id"] for r in records],
        "answers": [r["answer"] for r in records],
        "predictions": preds,
        "correct": correct,
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"reference accuracy {out['accuracy']:.4f} on {len(records)} questions ({a.method}, ratio {a.ratio})")
    return out


if __name__ == "__main__":
    main()
