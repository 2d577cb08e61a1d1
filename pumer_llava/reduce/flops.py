"""FLOPs estimate of a decoder stack (multiply-accumulates, the field's usual formula)."""

from __future__ import annotations

from collections.abc import Sequence


def decoder_flops(tokens_per_layer: Sequence[int], hidden: int, mlp: int) -> float:
    """Sum over layers of ``4 n d^2 + 2 n^2 d + 2 n d m`` with each layer's own ``n``.

    ``4nd^2`` is the q/k/v/o projections, ``2n^2d`` the attention scores and weighted sum,
    ``2ndm`` the MLP (FastV's and VisPruner's formula; it ignores GQA and gated MLPs, which
    is why it is used only for ratios).
    """
    d, m = float(hidden), float(mlp)
    return sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in tokens_per_layer)
