"""The reduced KV cache: every entry knows where its token was in the unreduced sequence.

A reducing prefill swaps the cache layers of the layers that hold fewer tokens for
:class:`ReducedLayer`, a ``DynamicLayer`` that also carries, per entry:

- ``pos`` (B, K) long: the token's position in the unreduced sequence (the column of the
  2-D attention mask ``generate`` keeps growing), ``-1`` for a filler slot (a row of a
  left-padded batch that kept fewer tokens than the others);
- ``log_size`` (B, K) float or None: ``log`` of how many tokens a merged entry stands for
  (proportional attention), None while nothing was merged.

Every mask, at prefill and at decode, is derived from these tensors, so what transformers
does to a cache stays correct by construction: ``get_seq_length()`` is the logical
(unreduced) length ``generate`` computes positions and slices a new turn with; ``crop``
drops the entries whose position is past the new length (speculative rollback);
``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave`` and
``copy.deepcopy`` carry the positions along. Layers that hold every token stay plain
``DynamicLayer``s, and a cache that was never reduced is a plain ``DynamicCache``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer


class ReducedLayer(DynamicLayer):
    """A cache layer whose entries carry their original positions (and merge sizes)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.pos: torch.Tensor | None = None  # (B, K) long, -1: filler
        self.log_size: torch.Tensor | None = None  # (B, K) float, or None: every entry stands for one token
        self.n_full = 0  # logical length: positions seen so far, removed ones included
        self.fillers = False  # whether any entry is a filler (known on the host)
        # what this layer holds after the next update, set by the layer's hook:
        # (pos, log_size, n_full, fillers); None appends the next positions of the sequence
        self.pending: tuple[torch.Tensor, torch.Tensor | None, int, bool] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        pend, self.pending = self.pending, None
        if pend is not None and pend[0].shape[1] == keys.shape[-2]:
            self.pos, self.log_size, self.n_full, self.fillers = pend
            return keys, values
        # nobody said which positions arrive: the next ones of the sequence
        bsz, q = key_states.shape[0], key_states.shape[-2]
        new = torch.arange(self.n_full, self.n_full + q, device=keys.device).expand(bsz, q)
        self.pos = new if self.pos is None else torch.cat([self.pos, new.to(self.pos.device)], dim=1)
        if self.log_size is not None:
            self.log_size = torch.cat([self.log_size, self.log_size.new_zeros(bsz, q)], dim=1)
        self.n_full += q
        return keys, values

    def get_seq_length(self) -> int:
        return self.n_full if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.pos = self.log_size = self.pending = None
        self.n_full, self.fillers = 0, False

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions of the sequence (a negative count, as
        transformers passes it): every entry whose original position is past the new length."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of trailing tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized or self.pos is None:
            return
        new_len = max(self.n_full - abs(tokens_to_remove), 0)
        gone = self.pos >= new_len  # (B, K)
        # entries are appended in order, so what goes is a tail (fillers, -1, may sit in it):
        # cut the tail every row shares, turn what is left of the others into fillers
        tail = (gone | (self.pos < 0)).flip(1).long().cumprod(1).sum(1)  # (B,) trailing removable
        cut = int(tail.min())
        k = self.pos.shape[1] - cut
        self.keys, self.values = self.keys[..., :k, :], self.values[..., :k, :]
        left = gone[:, :k]
        self.fillers = self.fillers or bool(left.any())
        self.pos = self.pos[:, :k].masked_fill(left, -1)
        if self.log_size is not None:
            self.log_size = self.log_size[:, :k]
        self.n_full = new_len

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rows(lambda t: t[indices.to(t.device) if torch.is_tensor(indices) else indices])

    def _rows(self, fn) -> None:
        if self.pos is not None:
            self.pos = fn(self.pos)
        if self.log_size is not None:
            self.log_size = fn(self.log_size)


def reduced_layer(cache: Cache, idx: int) -> ReducedLayer:
    """Layer ``idx`` of ``cache`` as a :class:`ReducedLayer` (swapped in while still empty)."""
    layers = cache.layers
    while len(layers) <= idx and cache.layer_class_to_replicate is not None:
        layers.append(cache.layer_class_to_replicate())
    layer = layers[idx]
    if isinstance(layer, ReducedLayer):
        return layer
    if layer.get_seq_length() > 0:
        raise RuntimeError(f"cache layer {idx} already holds tokens: a reduced prefill needs an empty cache")
    layers[idx] = new = ReducedLayer()
    return new


def check_cache(cache: Cache) -> None:
    """Refuse, before anything is computed, a cache whose layers a reduction cannot swap."""
    if getattr(cache, "is_compileable", False):
        raise ValueError(
            f"pumer_llava does not support {type(cache).__name__} (a static, fixed-length cache): reduced "
            "layers hold fewer tokens than the cache preallocates. Use the default DynamicCache "
            "(generate(..., cache_implementation=None))."
        )
    ok = (DynamicLayer, DynamicSlidingWindowLayer, ReducedLayer)
    bad = {type(layer).__name__ for layer in cache.layers if type(layer) not in ok}
    if bad:
        raise ValueError(
            f"pumer_llava stores reduced layers in a DynamicCache; this {type(cache).__name__} has "
            f"{', '.join(sorted(bad))} layers: use the default DynamicCache"
        )


def is_reduced(cache: Cache | None) -> bool:
    """Whether ``cache`` holds a reduced prefill (some layer with its positions)."""
    return cache is not None and any(isinstance(x, ReducedLayer) and x.pos is not None for x in cache.layers)
