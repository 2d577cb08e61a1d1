"""The one state object per patched model (``model.pumer``) and its per-call scratch."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import PumerConfig
from ..methods import Recipe
from ..reduce import StagePlan
from ..reduce.images import Images
from .adapters import Adapter


@dataclass
class ReductionStats:
    """What the last forward that carried images did (decode steps leave it unchanged).

    visual_tokens_total:      per sample, visual tokens in the input.
    visual_tokens_per_layer:  per decoder layer, per sample, visual tokens that layer saw.
    tokens_per_layer:         per decoder layer, per sample, sequence length without padding.
    kept_positions:           reducing layer (-1: before the first decoder layer) -> per sample, positions (in the padded input
                              sequence) of the visual tokens still present from that layer on.
    kept_patches:             the same as indices into the sample's visual span (0 .. T-1),
                              i.e. which image patches survive: draw them on the image.
    flops / flops_unreduced:  decoder FLOPs estimate (DESIGN.md formula) summed over the batch,
                              scoring work included in ``flops``.
    select_seconds:           wall time spent scoring, selecting and merging.
    """

    visual_tokens_total: list[int]
    visual_tokens_per_layer: list[list[int]]
    tokens_per_layer: list[list[int]]
    kept_positions: dict[int, list[list[int]]]
    kept_patches: dict[int, list[list[int]]]
    flops: float
    flops_unreduced: float
    select_seconds: float
    reducing_layers: list[int] = field(default_factory=list)

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.flops_unreduced if self.flops_unreduced else 1.0

    @property
    def visual_tokens_final(self) -> list[int]:
        return list(self.visual_tokens_per_layer[-1]) if self.visual_tokens_per_layer else []

    def to_dict(self) -> dict[str, Any]:
        return {
            "visual_tokens_total": self.visual_tokens_total,
            "visual_tokens_per_layer": self.visual_tokens_per_layer,
            "visual_tokens_final": self.visual_tokens_final,
            "tokens_per_layer": self.tokens_per_layer,
            "reducing_layers": self.reducing_layers,
            "kept_positions": {str(k): v for k, v in self.kept_positions.items()},
            "kept_patches": {str(k): v for k, v in self.kept_patches.items()},
            "flops": self.flops,
            "flops_unreduced": self.flops_unreduced,
            "flops_ratio": self.flops_ratio,
            "select_seconds": self.select_seconds,
        }


@dataclass
class Record:
    """What a KV cache holds after a reduced prefill, so later forwards can extend it.

    Coordinates: "full" positions index the caller's input ids (and the 2-D mask generate
    keeps growing); "LM" positions index what the language model received, which differs
    only when tokens were removed before it (VisPruner): ``pre_cols`` (B, N_lm) maps LM
    positions to full ones. Layers of stage s keep, in their cache, the tokens at LM
    positions ``stage_cols[s]`` (B, N_s), in order; decode tokens are appended everywhere.
    """

    layer_stage: list[int]  # per decoder layer: stage index, -1 before the first in-LLM reduction
    stage_cols: list[torch.Tensor]
    stage_logsize: list[torch.Tensor | None]  # (B, N_s) log token sizes, None if all 1
    n_full: int  # full positions seen so far (prefill + appended)
    n_lm: int  # LM positions seen so far = what the first layer's cache holds
    pre_cols: torch.Tensor | None = None
    pre_fill: torch.Tensor | None = None  # (B, N_lm) LM slots that are fillers (their pre_cols is a dropped token)
    stage_fill: list[torch.Tensor | None] = field(default_factory=list)  # (B, N_s) filler slots per stage


@dataclass
class CallState:
    """Scratch of one forward of the inner model; reset at the start of each."""

    mode: str  # "prefill" (reduce now), "extend" (decode on a reduced cache) or "off"
    active: bool = True  # False once the inner model returned
    record: Record | None = None
    cache: Any = None
    n_totals: list[int] = field(default_factory=list)  # visual tokens per sample in the input
    # prefill
    input_ids: torch.Tensor | None = None  # (B, N0)
    images: Images | None = None  # which image each input token belongs to (reduce.images)
    group: torch.Tensor | None = None  # (B, N) image of each token present, -1 for text, padding, fillers
    plans: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per stage: (prune, merge), (G,) each
    pre_plan: list[StagePlan] | None = None  # per image: removal before the first decoder layer
    pre_fill: torch.Tensor | None = None  # (B, N_lm) filler slots of the LM input (samples that kept fewer)
    lm_counts: tuple[torch.Tensor, torch.Tensor] | None = None  # (tokens, visual) per sample at the LM input
    stage_of_layer: dict[int, int] = field(default_factory=dict)  # reducing layer -> stage
    score_at: dict[int, int] = field(default_factory=dict)  # scoring layer -> stage (offset < 0)
    pos: torch.Tensor | None = None  # (B, N) full positions of the tokens present
    idx: torch.Tensor | None = None  # (B, N) their LM positions (== pos unless reduced before the LLM)
    pre_cols: torch.Tensor | None = None  # (B, N_lm) full positions of the LM input
    is_vis: torch.Tensor | None = None  # (B, N) bool
    size: torch.Tensor | None = None  # (B, N) float, tokens each one stands for
    valid: torch.Tensor | None = None  # (B, N) bool, not padding (and not a filler)
    filler: torch.Tensor | None = None  # (B, N) bool, slots left-padding rows that kept fewer tokens
    has_fillers: bool = False
    valid_full: torch.Tensor | None = None  # (B, N0) bool, not padding, full length
    is_vis_full: torch.Tensor | None = None  # (B, N0) bool
    vis_start: torch.Tensor | None = None  # (B,) first visual position per sample
    last_vis: torch.Tensor | None = None  # (B,) last visual position per sample
    stage_kw: dict[str, Any] | None = None  # gathered kwargs for the current stage
    stage_pos: list[tuple] = field(default_factory=list)  # per stage: (idx, log sizes, fillers)
    pending_scores: dict[int, torch.Tensor] = field(default_factory=dict)
    key_metric: tuple[int, torch.Tensor] | None = None  # (id of the hidden states, (B, N, hd) keys) from scoring
    tokens_per_layer: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B,)
    vis_per_layer: dict[int, torch.Tensor] = field(default_factory=dict)
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # key -> (pos, is_vis)
    select_seconds: float = 0.0
    score_flops: float = 0.0
    merged: bool = False
    # extend
    new_pos: torch.Tensor | None = None  # (q,) LM positions of the new tokens
    new_full: torch.Tensor | None = None  # (q,) their full positions
    mask2d: torch.Tensor | None = None  # (B, n_full + q) bool
    ext_cols: dict[int, torch.Tensor] = field(default_factory=dict)
    ext_logsize: dict[int, torch.Tensor | None] = field(default_factory=dict)
    ext_fill: dict[int, torch.Tensor | None] = field(default_factory=dict)
    ext_mask: dict[int, Any] = field(default_factory=dict)
    # top-level call
    logits_to_keep: Any = 0


@dataclass
class PumerState:
    """Reached as ``model.pumer``: the config, the hook handles, per-call scratch, stats."""

    config: PumerConfig
    recipe: Recipe
    adapter: Adapter
    layers: tuple[int, ...]
    model_ref: Any = None  # weakref to the patched model
    flash: bool = False  # flash attention takes 2-D masks
    visual_ids: torch.Tensor | None = None  # placeholder ids of visual tokens (images, video)
    handles: list[Any] = field(default_factory=list)
    enabled: bool = True
    last_stats: ReductionStats | None = None
    call: CallState | None = None
    records: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    importance: torch.Tensor | None = None  # VisPruner: (n_views, P) importance of the last tower call
    # VisPruner: per tower call since the last prefill, [importance (V, P), projector output (V, P, d)]
    vision_calls: list[list[Any]] = field(default_factory=list)
    vision_consumed: bool = False  # a prefill read vision_calls: the next tower call starts a new list
    pending_logits_to_keep: Any = 0

    @property
    def model(self):
        return self.model_ref()

    @property
    def model_config(self):
        return self.model_ref().config

    @property
    def merge_share(self) -> float:
        return self.recipe.merge_share if self.config.merge_share is None else self.config.merge_share

    @property
    def important_ratio(self) -> float:
        r = self.config.important_ratio
        return self.recipe.important_ratio if r is None else r

    @property
    def prop_attn(self) -> bool:
        return self.recipe.prop_attn if self.config.prop_attn is None else self.config.prop_attn

    def to_dict(self) -> dict[str, Any]:
        d = self.config.to_dict()
        d.update(layers=list(self.layers), merge_share=self.merge_share, prop_attn=self.prop_attn)
        if self.recipe.pre_llm:
            d.update(pre_llm=self.recipe.pre_llm, important_ratio=self.important_ratio)
        return d
