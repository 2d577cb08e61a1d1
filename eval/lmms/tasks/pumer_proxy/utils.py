"""Helpers of the ``pumer_proxy`` lmms-eval task (see pumer_proxy.yaml).

Records are the lines of ``questions.jsonl`` written by ``eval/proxy_task.py``:
``id, image`` (relative to the JSONL's folder), ``question, answer, type,
needed_cells, object_cells, scene_key``. The prompt is the question alone; the
model's chat template turns it into ``USER: <image>\\n{question} ASSISTANT:``,
the format the proxy was trained on. Answers are one word, so the score is the
exact match of the response's first word (lower-cased): for the proxy's
word-level tokenizer that is the first greedy token, i.e. the project's own
scoring (``evaluate_processor`` in eval/train_proxy.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[4]
DEFAULT_DATA = "eval/data/proxy_test"


def data_dir() -> Path:
    """Folder of questions.jsonl and images/ (PUMER_PROXY_DATA, else the YAML's default)."""
    d = Path(os.environ.get("PUMER_PROXY_DATA", DEFAULT_DATA))
    if not d.is_absolute() and not d.exists():
        d = REPO_ROOT / d
    return d


def doc_to_visual(doc: dict) -> list[Image.Image]:
    path = data_dir() / doc["image"]
    if not path.is_file():
        raise FileNotFoundError(
            f"proxy image {path} not found: write the split with `python eval/proxy_task.py --out {DEFAULT_DATA}` "
            "or set PUMER_PROXY_DATA to its folder"
        )
    with Image.open(path) as im:
        return [im.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def normalize(text: str) -> str:
    """First word of a response, lower-cased, without surrounding punctuation."""
    words = text.strip().lower().split()
    return words[0].strip(".,;:!?\"'") if words else ""


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(normalize(results[0]) == doc["answer"].strip().lower())}
