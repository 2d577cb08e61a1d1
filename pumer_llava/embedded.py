"""The proxy LLaVA shipped inside the package.

A small ``LlavaForConditionalGeneration`` of the real architecture (CLIP tower
with [CLS], 2-layer projector, Llama decoder with one key/value head per query head,
as in LLaVA-1.5's Vicuna) trained here by ``eval/train_proxy.py`` on the generated visual-question task of
``eval/proxy_task.py``: 128x128 images, patch 16, so 64 visual tokens. It is the
default model of the chat demo, the benchmarks and the lmms-eval tests, and it
loads offline::

    from pumer_llava.embedded import load_embedded
    model, processor = load_embedded()

Its ``training_args.json`` records the seed, the configuration and the
validation/test accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_MODEL_DIR = _ASSETS / "proxy-llava"
EMBEDDED_EXAMPLES_DIR = _ASSETS / "examples"


def load_embedded(dtype=torch.float32, attn_implementation: str = "sdpa", device="cpu"):
    """Load the shipped proxy LLaVA and its processor: ``(model, processor)``.

    The model is in eval mode, on ``device``, in ``dtype``.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(
        EMBEDDED_MODEL_DIR, dtype=dtype, attn_implementation=attn_implementation
    )
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(EMBEDDED_MODEL_DIR)
    return model, processor


def embedded_examples() -> list[dict]:
    """Example images from the proxy task's test split, shipped for the chat demo.

    Each record: ``image`` (absolute path), ``question``, ``answer``, ``type``.
    """
    records = []
    with open(EMBEDDED_EXAMPLES_DIR / "examples.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            rec["image"] = str(EMBEDDED_EXAMPLES_DIR / rec["image"])
            records.append(rec)
    return records


def embedded_training_record() -> dict:
    """The shipped model's ``training_args.json`` (seed, config, accuracies)."""
    return json.loads((EMBEDDED_MODEL_DIR / "training_args.json").read_text())
