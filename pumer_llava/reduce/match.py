"""Which projected tower patch each visual token of the language model is a copy of.

LLaVA-NeXT / OneVision pack a tower's patches into the LLM's visual tokens by moving rows
only (base view, crops reshaped and unpadded, a newline token appended per row), so every
visual token that came from a patch is a bit-exact copy of one row of the projector's
output. Matching the bits recovers the patch -> token map without re-implementing (and
silently diverging from) each model's packing. Rows that were interpolated (OneVision's
``anyres_max`` downscaling, video frames pooled 2x2) match nothing.
"""

from __future__ import annotations

import torch

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def match_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """For each row of x, the index of a row of y with exactly the same bits, or -1.

    x: (M, d); y: (K, d), same dtype. Returns (M,) long. Exact: no tolerance, no hashing.
    """
    if x.dtype != y.dtype or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"rows to match must agree in dtype and width, got {x.dtype}{tuple(x.shape)} and {y.dtype}{tuple(y.shape)}")
    m, k = x.shape[0], y.shape[0]
    if m == 0 or k == 0:
        return torch.full((m,), -1, dtype=torch.long, device=x.device)
    bits = _BITS[x.element_size()]
    rows = torch.cat([y, x.to(y.device)]).contiguous().view(bits)  # (K + M, d) same bits, integer view
    _, inv = torch.unique(rows, dim=0, return_inverse=True)  # equal rows share an id
    owner = torch.full((int(inv.max()) + 1,), -1, dtype=torch.long, device=rows.device)
    owner.scatter_(0, inv[:k], torch.arange(k, device=rows.device))  # id -> a row of y with those bits
    return owner[inv[k:]].to(x.device)
