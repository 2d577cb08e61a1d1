"""PumerConfig: the validated description of one reduction setup."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


MERGE_RULES = {
    # bipartite soft matching among the tokens pruning kept (ToMe, as PuMer): the most similar
    # kept tokens average into one, so two look-alike objects in different places can become one
    "bipartite": "merge the most similar of the tokens pruning kept, pairwise (ToMe)",
    # the tokens pruning would drop next (the best-scored of the removed) are folded into their
    # most similar kept token; every token the score ranks in the budget stays as it was
    "recycle": "fold the best-scored removed tokens into their most similar kept token",
}


@dataclass(frozen=True)
class PumerConfig:
    """What to reduce, where, and by how much.

    method:      a name from :data:`pumer_llava.methods.METHODS`.
    ratio:       fraction of each image's visual tokens still in the sequence after the
                 last reducing layer, in (0, 1]; 1.0 removes nothing. Several images (or a
                 video) in one prompt each keep their own share.
    keep_tokens: the same budget as an absolute count of visual tokens (per image).
                 Give ``ratio`` or ``keep_tokens``, not both.
    layers:      decoder layers (0-based) at which tokens are removed; ``None`` takes the
                 method's default for the model's depth. Several layers make a cascade:
                 each removes the same fraction, and the last lands on the budget exactly.
    merge_share: share of each stage's removal done by merging similar visual tokens
                 instead of pruning them, in [0, 1]; ``None`` takes the method's default.
    prop_attn:   proportional attention: a merged token standing for ``s`` tokens gets
                 ``log s`` added to its attention logits; ``None`` takes the default.
    seed:        seed of the ``random`` baseline.
    merge_rule:  how a stage's merge share is spent (see :data:`MERGE_RULES`); ``None`` takes
                 the default, ``"bipartite"``.
    important_ratio: VisPruner's share of the budget kept for importance ([CLS] attention, or the
                 mean attention a patch receives for towers without a [CLS]);
                 the rest is kept for diversity. In [0, 1]; ``None`` takes 0.5 (the paper's).
    """

    method: str = "pumer"
    ratio: float | None = 0.25
    keep_tokens: int | None = None
    layers: tuple[int, ...] | None = None
    merge_share: float | None = None
    prop_attn: bool | None = None
    seed: int = 0
    important_ratio: float | None = None
    merge_rule: str | None = None

    def __post_init__(self) -> None:
        if self.layers is not None and not isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple(self.layers))
        self.validate()

    def validate(self) -> None:
        """Check what can be checked without a model; raise ValueError saying what is accepted."""
        if self.keep_tokens is not None:
            if self.ratio is not None:
                raise ValueError(
                    f"give ratio or keep_tokens, not both (got ratio={self.ratio}, keep_tokens={self.keep_tokens})"
                )
            if isinstance(self.keep_tokens, bool) or not isinstance(self.keep_tokens, int) or self.keep_tokens < 1:
                raise ValueError(f"keep_tokens must be a positive int, got {self.keep_tokens!r}")
        else:
            if self.ratio is None:
                raise ValueError("give ratio (a fraction in (0, 1]) or keep_tokens (a positive int)")
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
                raise ValueError(f"ratio must be a number in (0, 1], got {self.ratio!r}")
            if not (math.isfinite(self.ratio) and 0.0 < self.ratio <= 1.0):
                raise ValueError(f"ratio must be in (0, 1] (1.0 = nothing removed), got {self.ratio}")
        if self.layers is not None:
            if len(self.layers) == 0:
                raise ValueError("layers must name at least one decoder layer, got an empty list")
            if any(isinstance(x, bool) or not isinstance(x, int) for x in self.layers):
                raise ValueError(f"layers must be ints (0-based decoder layer indices), got {self.layers!r}")
            if list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"layers must be strictly increasing, got {list(self.layers)}")
        if self.merge_share is not None:
            if isinstance(self.merge_share, bool) or not isinstance(self.merge_share, (int, float)):
                raise ValueError(f"merge_share must be a number in [0, 1], got {self.merge_share!r}")
            if not 0.0 <= self.merge_share <= 1.0:
                raise ValueError(f"merge_share must be in [0, 1] (0 = prune only, 1 = merge only), got {self.merge_share}")
        if self.prop_attn is not None and not isinstance(self.prop_attn, bool):
            raise ValueError(f"prop_attn must be True, False or None, got {self.prop_attn!r}")
        if self.important_ratio is not None:
            if isinstance(self.important_ratio, bool) or not isinstance(self.important_ratio, (int, float)):
                raise ValueError(f"important_ratio must be a number in [0, 1], got {self.important_ratio!r}")
            if not 0.0 <= self.important_ratio <= 1.0:
                raise ValueError(f"important_ratio must be in [0, 1], got {self.important_ratio}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.merge_rule is not None and self.merge_rule not in MERGE_RULES:
            raise ValueError(f"merge_rule must be one of {', '.join(MERGE_RULES)}, got {self.merge_rule!r}")

    @property
    def removes_nothing(self) -> bool:
        return self.keep_tokens is None and self.ratio == 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PumerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PumerConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
