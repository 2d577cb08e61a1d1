"""Helpers of the ``pumer_proxy_mc`` lmms-eval task (see pumer_proxy_mc.yaml): the proxy's
``color_at`` questions, answered by choosing one of its colour words."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_pumer_proxy_utils", _HERE.parent / "pumer_proxy" / "utils.py")
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)

# the colour words of eval/proxy_task.py, in its order
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")

doc_to_visual = _base.doc_to_visual
doc_to_text = _base.doc_to_text


def colour_questions(dataset):
    return dataset.filter(lambda doc: doc["type"] == "color_at")


def doc_to_choice(doc: dict) -> list[str]:
    return list(COLOURS)


def doc_to_target(doc: dict) -> int:
    return COLOURS.index(doc["answer"].strip().lower())
