"""Which layer's attention PuMer scores with, on the proxy task.

PuMer (the default) scores a stage at layer L with layer L's own attention: the stage
computes that layer's norm, k projection of every token and the text rows' queries before
the layer runs, about half of PuMer's selection time. The alternative reads the layer
before (``score_offset=-1``, as FastV does): its keys were projected anyway, so the scoring
costs a few query rows; this is also where PuMer's reference reducer sits (it reduces with
the attention of the layer it follows). Both run at PuMer's default layers and budgets.

Writes ``eval/results/accuracy_pumer_score_layer.{json,md,png}``::

    python eval/pumer_score_layer.py --threads 1     # ~5 minutes on one CPU core
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the package, when not installed
import accuracy  # noqa: E402

from pumer_llava.methods import METHODS, get_method, register_method  # noqa: E402

PREVIOUS = "pumer-previous-layer"


def main(argv=None) -> dict:
    pumer = get_method("pumer")
    register_method(dataclasses.replace(
        pumer, name=PREVIOUS, score_offset=-1,
        description="PuMer scored with the attention of the layer before each reducing one"), replace=True)
    args = ["--methods", "pumer", PREVIOUS, "--controls", "--no-hybrids", "--no-variants",
            "--fractions", "0.5", "0.25", "0.11", "--batch-size", "48", "--stem", "accuracy_pumer_score_layer"]
    try:
        return accuracy.main(args + list(sys.argv[1:] if argv is None else argv))
    finally:
        METHODS.pop(PREVIOUS, None)  # the study's method is not one of the package's


if __name__ == "__main__":
    main()
