"""How a visual-token budget is split over the reducing stages of a cascade."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StagePlan:
    """What one reducing stage does to the visual tokens of one sample.

    ``n_in`` tokens enter, ``prune`` are dropped by score, then ``merge`` of the
    survivors are merged into others, leaving ``n_out = n_in - prune - merge``.
    """

    n_in: int
    prune: int
    merge: int

    @property
    def n_out(self) -> int:
        return self.n_in - self.prune - self.merge


def plan_stages(total: int, keep: int, n_stages: int, merge_share: float) -> list[StagePlan]:
    """Split the reduction ``total -> keep`` over ``n_stages`` stages.

    The count after stage s is ``round(total * (keep / total) ** (s / S))``: every stage
    removes the same *fraction*, so early layers (which see more tokens) are not asked to
    do all the work, and the last stage lands on ``keep`` exactly.

    ``merge_share`` is the share of each stage's removal done by merging (0 = prune only,
    1 = merge only). Bipartite matching merges at most one source per kept destination, so
    a stage merges at most ``n_out`` tokens; the rest of its removal is pruning.
    """
    if total < 1:
        raise ValueError(f"total visual tokens must be >= 1, got {total}")
    if not 1 <= keep <= total:
        raise ValueError(f"keep must be in [1, {total}], got {keep}")
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    if not 0.0 <= merge_share <= 1.0:
        raise ValueError(f"merge_share must be in [0, 1], got {merge_share}")
    frac = keep / total
    counts = [total] + [round(total * frac ** (s / n_stages)) for s in range(1, n_stages)] + [keep]
    # rounding can only break monotonicity by one token near the end: clamp
    for s in range(1, len(counts)):
        counts[s] = max(min(counts[s], counts[s - 1]), keep)
    plans = []
    for n_in, n_out in zip(counts[:-1], counts[1:]):
        removed = n_in - n_out
        merge = min(round(removed * merge_share), n_out)
        plans.append(StagePlan(n_in=n_in, prune=removed - merge, merge=merge))
    return plans
