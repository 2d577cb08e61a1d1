"""What a reduction method is made of, and what the runtime hands it.

A :class:`Method` is a recipe of callables; the runtime (:mod:`pumer_llava.hooks`) calls
them and holds no method names:

- ``before_llm(ctx: VisionContext) -> Choice``: which visual tokens enter the language
  model, from the vision tower's attention, keys and features, the projected tokens and
  the prompt's text embeddings (VisPruner, VisionZip, DivPrune, CDPruner).
- ``score(ctx: LayerContext) -> (B, N)``: scores of the current slots at a decoder layer
  (``score_offset`` layers before the one that reduces: FastV reads layer K-1 and drops at
  K); higher = keep. Only visual slots are read.
- ``select(ctx: LayerContext) -> Choice``: what a reducing layer keeps; default
  :func:`keep_top` (each image keeps its best-scored tokens). PuMer's merging and DART's
  duplication-aware choice are selections.
- ``default_layers(depth)``: the decoder layers that reduce when the user names none.
- ``options``: a frozen dataclass of the method's own settings (:class:`MethodOptions`),
  validated before the model is touched.

Budgets are per image and exact: the runtime plans how many tokens every image holds after
every stage (``ctx.keep``, ``ctx.merge``, ``ctx.out``) and every shape follows from that
plan, so a method's tensors have fixed shapes and it needs no host sync.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


# ---------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class MethodOptions:
    """Base of a method's options: a frozen dataclass with defaults; ``validate`` raises
    ValueError saying what is accepted. ``merge_share`` / ``prop_attn`` (when a subclass has
    them) are read by the runtime: how much of each stage merges, and whether merged tokens
    get proportional attention."""

    def validate(self) -> None:
        """Check the values; raise ValueError naming the option and what it accepts."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def build(cls, method: str, given: dict[str, Any]) -> MethodOptions:
        """The options from keyword arguments, validated. None is the value of an option whose
        type allows it (``merge_threshold=None``: no threshold), else it means the default."""
        names = cls.names()
        unknown = sorted(k for k, v in given.items() if k not in names and v is not None)
        if unknown:
            takes = f"takes the options {', '.join(names)}" if names else "takes no options"
            raise ValueError(f"method {method!r} {takes}; got unknown {', '.join(repr(u) for u in unknown)}")
        hints = _hints(cls)
        opts = cls(**{k: v for k, v in given.items() if k in names and (v is not None or _unwrap_optional(hints[k])[1])})
        for f in dataclasses.fields(cls):
            check_type(f.name, getattr(opts, f.name), hints[f.name])
        opts.validate()
        return opts

    @classmethod
    def parse(cls, method: str, text: dict[str, str]) -> MethodOptions:
        """The options from strings (a command line), converted by each field's type."""
        names = cls.names()
        unknown = sorted(set(text) - set(names))
        if unknown:
            takes = f"takes the options {', '.join(names)}" if names else "takes no options"
            raise ValueError(f"method {method!r} {takes}; got unknown {', '.join(repr(u) for u in unknown)}")
        hints = _hints(cls)
        return cls.build(method, {k: from_text(k, v, hints[k]) for k, v in text.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(the inner type, whether None is allowed) of ``X | None`` / ``Optional[X]``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return (inner[0] if len(inner) == 1 else hint), True
    return hint, False


def check_type(name: str, value: Any, hint: Any) -> None:
    hint, optional = _unwrap_optional(hint)
    if optional and value is None:
        return
    base = typing.get_origin(hint) or hint
    if base is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a number, got {value!r}")


def from_text(name: str, value: Any, hint: Any) -> Any:
    """A command-line string as the type ``hint`` says (values that are not strings pass)."""
    hint, _ = _unwrap_optional(hint)
    if not isinstance(value, str):
        return value
    s = value.strip()
    if s.lower() in ("", "none", "null"):
        return None
    try:
        if hint is bool:
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(s)
        if hint is float:
            return float(s)
    except ValueError:
        kind = {bool: "true or false", int: "an int", float: "a number"}[hint]
        raise ValueError(f"{name} must be {kind}, got {value!r}") from None
    return s.lower() if (typing.get_origin(hint) is typing.Literal) else s


def in_range(name: str, value: float, lo: float, hi: float, what: str = "") -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo:g}, {hi:g}]{what}, got {value}")


MERGE_RULES = {
    # bipartite soft matching among the tokens pruning kept (ToMe, as PuMer): the most similar
    # kept tokens average into one, so two look-alike objects in different places can become one
    "bipartite": "merge the most similar of the tokens pruning kept, pairwise (ToMe)",
    # the tokens pruning would drop next (the best-scored of the removed) are folded into their
    # most similar kept token; every token the score ranks in the budget stays as it was
    "recycle": "fold the best-scored removed tokens into their most similar kept token",
}


@dataclass(frozen=True)
class MergeOptions(MethodOptions):
    """Merging after a score-based selection (PuMer's; a custom method may reuse it).

    merge_share: share of each stage's removal done by merging similar visual tokens instead of
                 pruning them, in [0, 1] (0 prune only, 1 merge only).
    merge_rule:  how that share is spent (:data:`MERGE_RULES`).
    prop_attn:   proportional attention: a merged token standing for ``s`` tokens gets ``log s``
                 added to its attention logits.
    merge_window: recycle only: a removed token folds only into a kept token at most this many
                 patches away on the image's grid (Chebyshev distance; square grids, e.g.
                 LLaVA-1.5's 24 x 24), else it is dropped; None: anywhere.
    merge_threshold: a pair merges only when the cosine similarity of its keys is at least
                 this, else its source is dropped (pruned); None: every pair merges.
    merge_metric: what merge similarity is measured on: "keys" (the layer's keys before RoPE,
                 averaged over heads: what a token says), or "rotated_keys" (every head's key after
                 RoPE: the same, discounted by how far apart two tokens are in the sequence).
    merge_text:  share of the prompt's text merged away over the cascade, in [0, 0.5]: at each
                 reducing layer, bipartite matching within each run of text between images
                 (never the first token, never the last prompt token, never across an image),
                 every pair merges; 0: text is never touched.
    """

    merge_share: float = 0.0
    merge_rule: typing.Literal["bipartite", "recycle"] = "recycle"
    prop_attn: bool = False
    merge_window: int | None = None
    merge_threshold: float | None = 0.85
    merge_metric: typing.Literal["keys", "rotated_keys"] = "keys"
    merge_text: float = 0.0

    def validate(self) -> None:
        in_range("merge_share", self.merge_share, 0.0, 1.0, " (0 = prune only, 1 = merge only)")
        in_range("merge_text", self.merge_text, 0.0, 0.5, " (share of the prompt's text merged away)")
        if self.merge_window is not None and self.merge_window < 1:
            raise ValueError(f"merge_window must be at least 1 (patches apart on the grid), got {self.merge_window}")
        if self.merge_threshold is not None:
            in_range("merge_threshold", self.merge_threshold, -1.0, 1.0, " (a cosine similarity)")
        if self.merge_rule != "recycle" and self.merge_window is not None:
            raise ValueError("merge_window applies to merge_rule='recycle' (a removed token folds into a nearby "
                             f"kept one), got merge_rule={self.merge_rule!r}")


# ---------------------------------------------------------------------------------- choices


@dataclass(frozen=True)
class Choice:
    """What a stage keeps, per image (the rows are the batch's images, G of them).

    keep:    (G, out_max) local indices (0 .. count-1) of the tokens each image keeps,
             ascending; entries past ``ctx.out[g]`` are ignored.
    merge:   optional (src, dst) or (src, dst, weight), flat indices into the stage's (B * N)
             input slots (``ctx.flat_slots``): token ``src[p]`` is averaged into ``dst[p]``
             (size-weighted; ``weight[p]`` scales the source, 0: it is dropped, not merged),
             every pair real. A destination must be kept.
    replace: optional (slots, values): flat input slots (P,) of kept tokens and the (P, d)
             values they take instead (VisionZip's contextual tokens, built from the tower's
             features and projected again).
    """

    keep: torch.Tensor
    merge: tuple[torch.Tensor, torch.Tensor] | None = None
    replace: tuple[torch.Tensor, torch.Tensor] | None = None


# ---------------------------------------------------------------------------------- the legacy scorer view


@dataclass
class ScoreContext:
    """What a scorer written against the visual tokens alone sees (:func:`visual_scorer`).

    layer:          the decoder layer about to run on the reduced sequence.
    stage:          0-based index of the reducing stage in the cascade.
    hidden:         (B, n, d) the visual tokens' hidden states entering that layer.
    positions:      (B, n) their positions in the original (padded) input sequence.
    patch_index:    (B, n) their index within the sample's visual span (0 .. T-1),
                    i.e. which image patch each one is (merged tokens: their destination).
    input_ids:      (B, N) the original input ids.
    keep:           how many of the n tokens the stage keeps after pruning (the most of
                    any sample; see ``keep_per_sample``). The top-k is taken per image.
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


def visual_scorer(fn: Callable[[ScoreContext], torch.Tensor]) -> Callable:
    """A ``score`` callable from ``fn(ScoreContext) -> (B, n_visual)`` scores over each sample's
    visual tokens in order. Reads the device once to gather them (convenient, not lean)."""

    def score(ctx) -> torch.Tensor:
        from ..reduce.ragged import ragged_nonzero

        tok, hs = ctx.tokens, ctx.hidden
        vis_idx, vis_ok = ragged_nonzero(tok.is_vis)
        positions = tok.pos.gather(1, vis_idx)
        vis_start = torch.tensor(ctx.layout.vis_start, device=tok.pos.device)
        keep = ctx.layout.per_sample(ctx.keep)
        sc = ScoreContext(
            layer=ctx.layer,
            stage=ctx.stage,
            hidden=hs.gather(1, vis_idx.to(hs.device)[..., None].expand(-1, -1, hs.shape[-1])),
            positions=positions,
            patch_index=positions - vis_start[:, None],
            input_ids=ctx.input_ids,
            keep=max(keep),
            valid=vis_ok,
            keep_per_sample=keep,
        )
        scores = fn(sc)
        if tuple(scores.shape) != tuple(vis_idx.shape):
            raise ValueError(f"custom scorer returned shape {tuple(scores.shape)}, expected {tuple(vis_idx.shape)}")
        full = torch.zeros(tok.pos.shape, device=vis_idx.device)
        rows = torch.arange(vis_idx.shape[0], device=vis_idx.device)[:, None].expand_as(vis_idx)
        full[rows[vis_ok], vis_idx[vis_ok]] = scores.to(vis_idx.device).float()[vis_ok]
        return full

    score.__name__ = getattr(fn, "__name__", "visual_scorer")
    return score


# ---------------------------------------------------------------------------------- selections


def keep_top(ctx) -> Choice:
    """Each image keeps its ``out`` best-scored tokens (ties: the earlier token)."""
    order = ctx.order(ctx.scores)
    return Choice(keep=ctx.ascending(order[:, : ctx.out_max], ctx.out_pad))


# ---------------------------------------------------------------------------------- the method


def no_layers(depth: int) -> tuple[int, ...]:
    return ()


def single_layer(k: int) -> Callable[[int], tuple[int, ...]]:
    """Decoder layer ``k`` (the last layer of a shallower model)."""

    def layers(depth: int) -> tuple[int, ...]:
        return (max(0, min(k, depth - 1)),)

    layers.__name__ = f"layer_{k}"
    return layers


NEEDS = {
    "vision": "the vision tower's attention, keys and features at the layer the projector reads",
    "cls": "a [CLS] token in the vision tower that the language model does not see",
    "tower_features": "the vision tower's features before the projector, one view per image",
}


@dataclass(frozen=True)
class Method:
    """A reduction method: where it acts and the callables that decide (see the module doc).

    name, description, paper: what it is called and what it does.
    options:        the options dataclass (:class:`MethodOptions` subclass).
    before_llm:     selection before the first decoder layer, or None.
    score / select: scoring and selection at the reducing decoder layers (``select`` None
                    with a ``score``: :func:`keep_top`).
    default_layers: depth -> reducing layers when the user names none.
    score_offset:   ``score`` reads the input of layer ``L + score_offset`` (0 or negative).
    min_layer:      the smallest reducing layer accepted.
    needs:          inputs the model must offer (:data:`NEEDS`): refused by ``apply_pumer`` otherwise.
    check_budget:   ``(options, budget)`` raises ValueError when the options cannot fit a per-image
                    budget; ``apply_pumer`` calls it when the budget is known before the forward
                    (``keep_tokens``, or ``ratio`` on a model with a fixed count per image).
    """

    name: str
    description: str = ""
    options: type[MethodOptions] = MethodOptions
    before_llm: Callable[[Any], Choice] | None = None
    score: Callable[[Any], torch.Tensor] | None = None
    select: Callable[[Any], Choice] | None = None
    default_layers: Callable[[int], tuple[int, ...]] = no_layers
    score_offset: int = 0
    min_layer: int = 0
    needs: frozenset[str] = field(default_factory=frozenset)
    paper: str = ""
    check_budget: Callable[[Any, int], None] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name != self.name.strip():
            raise ValueError(f"a method needs a name, got {self.name!r}")
        if not (isinstance(self.options, type) and issubclass(self.options, MethodOptions)):
            raise ValueError(f"method {self.name!r}: options must be a MethodOptions dataclass, got {self.options!r}")
        if self.before_llm is None and self.score is None and self.select is None:
            raise ValueError(f"method {self.name!r} does nothing: give before_llm, score or select")
        if self.score_offset > 0:
            raise ValueError(f"method {self.name!r}: score_offset must be 0 or negative, got {self.score_offset}")
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"method {self.name!r} needs unknown inputs {sorted(unknown)}; known: {', '.join(NEEDS)}")
        object.__setattr__(self, "needs", frozenset(self.needs))

    @property
    def in_llm(self) -> bool:
        return self.score is not None or self.select is not None

    @property
    def selector(self) -> Callable[[Any], Choice]:
        return self.select or keep_top
