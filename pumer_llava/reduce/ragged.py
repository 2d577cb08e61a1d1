"""Per-row selections when rows keep different numbers of tokens.

Samples of a batch may carry different numbers of visual tokens (LLaVA-NeXT's anyres, a
text-only sample next to an image one), so every selection here takes per-row counts and
returns padded index tensors with an ``ok`` mask, or a boolean keep mask.
"""

from __future__ import annotations

import torch


def ragged_nonzero(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries of each row, ascending, padded with 0 at the end.

    mask: (B, N) bool. Returns idx (B, n_max) and ok (B, n_max).
    """
    count = mask.sum(1)
    n_max = int(count.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n_max]
    ok = torch.arange(n_max, device=mask.device)[None, :] < count[:, None]
    return order.masked_fill(~ok, 0), ok
