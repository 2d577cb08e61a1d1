"""The tokens present in the hidden states during a prefill, as one immutable set.

Coordinates: ``pos`` indexes the forward's own input sequence (the rows and columns of
the mask the model built, its position ids and cos/sin, and the columns of the 2-D
attention mask), which for a prefill on an empty cache is also the position in the
unreduced sequence the cache records. Removing or merging tokens is one
:meth:`Tokens.take`, never a lockstep re-gathering of separate tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..reduce.ragged import left_pack


@dataclass(frozen=True)
class Tokens:
    """Per sample (rows) and slot (columns), what each slot of the hidden states holds.

    pos:    (B, N) long, where the token was in the input; a filler slot holds the index of
            a dropped token, so gathers with it stay in range, and is masked everywhere.
    filler: (B, N) bool, slots that left-pad a row that kept fewer tokens than the others.
    valid:  (B, N) bool, a real token: not input padding, not a filler.
    is_vis: (B, N) bool, a visual token (False for fillers).
    group:  (B, N) long, the image a visual token belongs to (``reduce.images``), -1 otherwise.
    size:   (B, N) float, how many input tokens each slot stands for (merging adds up).
    has_fillers / merged: whether any filler exists / any token was merged (known on the host).
    """

    pos: torch.Tensor
    filler: torch.Tensor
    valid: torch.Tensor
    is_vis: torch.Tensor
    group: torch.Tensor
    size: torch.Tensor
    has_fillers: bool = False
    merged: bool = False

    @classmethod
    def full(cls, valid: torch.Tensor, is_vis: torch.Tensor, group: torch.Tensor) -> Tokens:
        bsz, n = is_vis.shape
        pos = torch.arange(n, device=is_vis.device).expand(bsz, n)
        return cls(pos=pos, filler=torch.zeros_like(is_vis), valid=valid, is_vis=is_vis, group=group,
                   size=torch.ones(bsz, n, device=is_vis.device))

    @property
    def cache_pos(self) -> torch.Tensor:
        """(B, N) positions as the cache records them: -1 for fillers."""
        return self.pos.masked_fill(self.filler, -1) if self.has_fillers else self.pos

    def log_size(self, prop_attn: bool) -> torch.Tensor | None:
        """(B, N) log sizes for proportional attention, or None when they are all zero."""
        return self.size.log() if (prop_attn and self.merged) else None

    def take(self, sel: torch.Tensor, filler: torch.Tensor, has_fillers: bool) -> Tokens:
        """The slots ``sel`` (B, N'), with ``filler`` (B, N') marking new filler slots."""
        g = lambda t: t.gather(1, sel)  # noqa: E731
        return replace(
            self,
            pos=g(self.pos),
            filler=g(self.filler) | filler,
            valid=g(self.valid) & ~filler,
            is_vis=g(self.is_vis) & ~filler,
            group=g(self.group).masked_fill(filler, -1),
            size=g(self.size).masked_fill(filler, 1.0),
            has_fillers=has_fillers,
        )

    def with_sizes(self, size: torch.Tensor) -> Tokens:
        return replace(self, size=size, merged=True)


def keep_slots(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Which slots to take so that the kept ones (``keep`` (B, N)) end each row (left padding).

    Returns (sel, filler, has_fillers): see :func:`reduce.ragged.left_pack`."""
    sel, filler = left_pack(keep)
    count = keep.sum(1)
    lo, hi = torch.stack([count.min(), count.max()]).tolist()
    return sel, filler, lo != hi
