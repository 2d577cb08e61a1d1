"""The project's own scoring of the proxy test split, without lmms-eval.

Runs the model on the first ``--limit`` questions of ``questions.jsonl`` with the
prompt the proxy was trained on (``prompt_text`` in eval/train_proxy.py:
``USER: <image>\\n{question} ASSISTANT:``), one sample per forward, and scores the
first greedy token against the answer (``evaluate_processor`` in train_proxy.py).
``eval/lmms/check_results.py`` compares this with what lmms-eval's ``pumer_proxy``
task measured through the ``pumer_llava`` model on the same questions.

With ``--multiple-choice`` it scores the ``pumer_proxy_mc`` task's questions instead
(the first ``--limit`` colour questions): one forward of prompt, space and colour word
per choice, the mean negative log-likelihood of the word's tokens, the lowest wins.
That is the unreduced model's answer by plain full forwards, against which the
plugin's shared-context scoring (one encoding of the context, choices from copies of
its cache) is checked.

Usage::

    python eval/lmms/reference_score.py --model pumer_llava/assets/proxy-llava \\
        --data eval/data/proxy_test --limit 40 --ratio 0.25 --method pumer --out ref.json
    python eval/lmms/reference_score.py --model pumer_llava/assets/proxy-llava \\
        --data eval/data/proxy_test --limit 40 --method none --multiple-choice --out ref_mc.json
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
sys.path.insert(0, str(REPO / "eval" / "lmms"))

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
    p.add_argument("--multiple-choice", action="store_true", help="score the colour questions by their choices")
    a = p.parse_args(argv)

    from pumer_llava import apply_pumer
    from pumer_llava.loading import load_model

    torch.manual_seed(0)
    model, processor, _ = load_model(a.model, device="cpu")
    if a.method != "none" and a.ratio < 1.0:
        apply_pumer(model, ratio=a.ratio, method=a.method)
    records = read_split(Path(a.data) / "questions.jsonl")
    if a.multiple_choice:
        return _multiple_choice(a, model, processor, records)
    records = records[: a.limit]
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
    return _write(a, out, f"reference accuracy {out['accuracy']:.4f} on {len(records)} questions "
                          f"({a.method}, ratio {a.ratio})")


def _multiple_choice(a, model, processor, records) -> dict:
    from tasks.pumer_proxy_mc.utils import COLOURS  # the task's choices, in its order

    records = [r for r in records if r["type"] == "color_at"][: a.limit]
    tok = processor.tokenizer
    losses, chosen, answers = [], [], []
    with torch.inference_mode():
        for rec in records:
            with Image.open(rec["image"]) as im:
                img = im.convert("RGB")
            prompt = prompt_text(rec["question"])
            n_ctx = len(processor(images=[img], text=[prompt], return_tensors="pt")["input_ids"][0])
            row = []
            for colour in COLOURS:
                inputs = processor(images=[img], text=[f"{prompt} {colour}"], return_tensors="pt")
                ids = inputs["input_ids"][0]
                logp = torch.log_softmax(model(**inputs).logits[0].float(), dim=-1)
                target = ids[n_ctx:]
                row.append(float(-logp[n_ctx - 1 : -1].gather(-1, target[:, None]).mean()))
            losses.append(row)
            chosen.append(min(range(len(row)), key=row.__getitem__))
            answers.append(COLOURS.index(rec["answer"].strip().lower()))
    correct = [c == t for c, t in zip(chosen, answers)]
    out = {
        "model": a.model,
        "method": a.method,
        "ratio": a.ratio,
        "questions": [r["question"] for r in records],
        "choices": list(COLOURS),
        "losses": losses,
        "chosen": chosen,
        "answers": answers,
        "correct": correct,
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
    }
    return _write(a, out, f"reference multiple-choice accuracy {out['accuracy']:.4f} on {len(records)} colour "
                          f"questions ({a.method})")


def _write(a, out: dict, line: str) -> dict:
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(line)
    return out


if __name__ == "__main__":
    main()
