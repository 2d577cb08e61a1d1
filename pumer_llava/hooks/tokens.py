"""The tokens present in the hidden states during a prefill, as one immutable set.

Coordinates: ``pos`` indexes the forward's own input sequence (the rows and columns of
the mask the model built, its position ids and cos/sin, and the columns of the 2-D
attention mask), which for a prefill on an empty cache is also the position in the
unreduced sequence the cache records. Removing or merging tokens is one
:meth:`Tokens.take`, never a lockstep re-gathering of separate tensors.

What a slot holds (text, padding, filler, or a visual token of image g) is its ``code``
(:mod:`.layout`), known on the host; only ``pos`` (which visual tokens stayed) and
``size`` (what merged) are data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch

from .layout import FILLER, TEXT


@dataclass(frozen=True)
class Tokens:
    """Per sample (rows) and slot (columns), what each slot of the hidden states holds.

    pos:    (B, N) long, where the token was in the input; a filler slot holds the position
            of some other token of its row, so gathers with it stay in range, and is masked
            everywhere.
    code:   (B, N) long, the image a visual token belongs to (>= 0), or text / input padding
            / filler (:mod:`.layout`).
    size:   (B, N) float, how many input tokens each slot stands for (merging adds up), or
            None while nothing is merged.
    has_fillers / merged: whether any filler exists / any token was merged (known on the host).
    """

    pos: torch.Tensor
    code: torch.Tensor
    size: torch.Tensor | None = None
    has_fillers: bool = False
    merged: bool = False

    @classmethod
    def full(cls, code: torch.Tensor) -> Tokens:
        bsz, n = code.shape
        return cls(pos=torch.arange(n, device=code.device).expand(bsz, n), code=code)

    @cached_property
    def valid(self) -> torch.Tensor:
        """(B, N) bool: a real token, not input padding, not a filler."""
        return self.code >= TEXT

    @cached_property
    def is_vis(self) -> torch.Tensor:
        return self.code >= 0

    @cached_property
    def filler(self) -> torch.Tensor:
        return self.code == FILLER

    @cached_property
    def group(self) -> torch.Tensor:
        """(B, N) the image of a visual token, -1 for every other slot."""
        return self.code.clamp_min(-1)

    @cached_property
    def sizes(self) -> torch.Tensor:
        """(B, N) float sizes, ones while nothing is merged."""
        if self.size is not None:
            return self.size
        return torch.ones(self.pos.shape, device=self.pos.device)

    @cached_property
    def cache_pos(self) -> torch.Tensor:
        """(B, N) positions as the cache records them: -1 for fillers."""
        return self.pos.masked_fill(self.filler, -1) if self.has_fillers else self.pos

    def log_size(self, prop_attn: bool) -> torch.Tensor | None:
        """(B, N) log sizes for proportional attention, or None when they are all zero."""
        if not (prop_attn and self.merged):
            return None
        if "_log_size" not in self.__dict__:
            self.__dict__["_log_size"] = self.size.log()
        return self.__dict__["_log_size"]

    def take(self, sel: torch.Tensor, code: torch.Tensor, has_fillers: bool) -> Tokens:
        """The slots ``sel`` (B, N'), which then hold ``code`` (B, N'); a filler has size 1."""
        size = None
        if self.size is not None:
            size = self.size.gather(1, sel)
            if has_fillers:
                size = size.masked_fill(code == FILLER, 1.0)
        return Tokens(pos=self.pos.gather(1, sel), code=code, size=size, has_fillers=has_fillers, merged=self.merged)

    def with_sizes(self, size: torch.Tensor) -> Tokens:
        return replace(self, size=size, merged=True)
