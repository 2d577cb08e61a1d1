"""The method registry: name -> recipe (where it acts, how it scores, how it removes).

Every method is training-free. A :class:`Recipe` can also be passed to ``apply_pumer``
directly (``method=Recipe(...)``) to try a scoring rule without registering it; the
accuracy benchmark's control rows (oracles, keep-the-lowest) are built that way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# A custom scorer gets a ScoreContext and returns (B, n_visual) scores: higher = keep.
Scorer = Callable[["ScoreContext"], torch.Tensor]


@dataclass
class ScoreContext:
    """What a custom scorer sees at a reducing layer.

    layer:          the decoder layer about to run on the reduced sequence.
    stage:          0-based index of the reducing stage in the cascade.
    hidden:         (B, n, d) the visual tokens' hidden states entering that layer.
    positions:      (B, n) their positions in the original (padded) input sequence.
    patch_index:    (B, n) their index within the sample's visual span (0 .. T-1),
                    i.e. which image patch each one is (merged tokens: their destination).
    input_ids:      (B, N) the original input ids.
    keep:           how many of the n tokens the stage keeps after pruning (the most of
                    any sample; see ``keep_per_sample``). The top-k is taken per image:
                    each image of a sample keeps its own share of that count.
    valid:          (B, n) bool; rows with fewer visual tokens are padded at the end.
    """

    layer: int
    stage: int
    hidden: torch.Tensor
    positions: torch.Tensor
    patch_index: torch.Tensor
    input_ids: torch.Tensor
    keep: int
    valid: torch.Tensor | None = None
    keep_per_sample: list[int] | None = None


def _pumer_layers(depth: int) -> tuple[int, ...]:
    # 2, 8, 16 for a 32-layer LLM (the PuMer paper reduces at several cross-modal layers):
    # the first stage early enough to save most compute, late enough that the text has
    # read the image.
    cand = [max(1, round(depth / 16)), max(1, round(depth / 4)), max(1, round(depth / 2))]
    return tuple(sorted({min(c, depth - 1) for c in cand if depth > 1})) or (0,)


def _single_layer(k: int) -> Callable[[int], tuple[int, ...]]:
    def layers(depth: int) -> tuple[int, ...]:
        return (max(0, min(k, depth - 1)),)

    return layers


@dataclass(frozen=True)
class Recipe:
    """How a method reduces visual tokens inside the language model.

    scorer:         "text_attention" (attention from the text after the image, PuMer),
                    "last_token_attention" (attention from the last prompt token, FastV),
                    "random", or a callable ``(ScoreContext) -> (B, n) scores``.
    default_layers: depth -> reducing layers used when the user names none.
    score_offset:   scores are computed from the input of layer ``L + score_offset``
                    (FastV: -1, "attention at layer K-1, drop at K"); 0 or negative.
    merge_share:    default share of each stage's removal done by merging.
    prop_attn:      default for proportional attention.
    min_layer:      smallest reducing layer the recipe accepts.
    pre_llm:        "vision_cls" reduces before the first decoder layer from visual cues
                    (VisPruner); the in-LLM cascade (``default_layers``) may follow it.
    important_ratio: default share of the pre-LLM budget kept by importance.
    """

    name: str
    scorer: str | Scorer
    default_layers: Callable[[int], tuple[int, ...]]
    score_offset: int = 0
    merge_share: float = 0.0
    prop_attn: bool = False
    min_layer: int = 0
    pre_llm: str | None = None
    important_ratio: float = 0.5
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, Recipe] = {
    "pumer": Recipe(
        name="pumer",
        scorer="text_attention",
        default_layers=_pumer_layers,
        merge_share=0.5,
        prop_attn=True,
        description="text-informed pruning + modality-aware merging, cascaded (PuMer, training-free)",
    ),
    "fastv": Recipe(
        name="fastv",
        scorer="last_token_attention",
        default_layers=_single_layer(2),
        score_offset=-1,
        min_layer=1,
        description="attention from the last prompt token at layer K-1, drop at K (FastV)",
    ),
    "vispruner": Recipe(
        name="vispruner",
        scorer="text_attention",
        default_layers=lambda depth: (),
        pre_llm="vision_cls",
        description="before the LLM: keep tokens by the vision tower's [CLS] attention (without a [CLS]: the "
        "mean attention each patch receives), then the most diverse of the rest (VisPruner)",
    ),
    "random": Recipe(
        name="random",
        scorer="random",
        default_layers=_single_layer(2),
        description="seeded random choice of the same budget (baseline)",
    ),
}


def get_recipe(method: str | Recipe) -> Recipe:
    if isinstance(method, Recipe):
        return method
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[method]


def list_methods() -> list[str]:
    return sorted(METHODS)
