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
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, StaticLayer


def _record(layer, key_states: torch.Tensor, total: int) -> None:
    """After ``layer`` stored ``key_states`` and holds ``total`` entries: what they are."""
    pend, layer.pending = layer.pending, None
    if pend is not None and pend[0].shape[1] == total:
        layer.pos, layer.log_size, layer.n_full, layer.fillers = pend
        return
    # nobody said which positions arrive: the next ones of the sequence
    bsz, q = key_states.shape[0], key_states.shape[-2]
    new = torch.arange(layer.n_full, layer.n_full + q, device=key_states.device).expand(bsz, q)
    layer.pos = new if layer.pos is None else torch.cat([layer.pos, new.to(layer.pos.device)], dim=1)
    if layer.log_size is not None:
        layer.log_size = torch.cat([layer.log_size, layer.log_size.new_zeros(bsz, q)], dim=1)
    layer.n_full += q


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
        _record(self, key_states, keys.shape[-2])
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


class ReducedStaticLayer(StaticLayer):
    """A preallocated cache layer (``generate(..., cache_implementation="static")``) whose
    entries carry their original positions, as :class:`ReducedLayer`.

    It holds what the reducing prefill keeps plus every position the static cache was sized
    for after the prompt, so a generation that fits the plain static cache fits here. Keys
    and values are written in place into the preallocated tensors; attention reads the
    slots written so far (a view), so masks and positions are those of :class:`ReducedLayer`.
    It still says it is compileable, as a static layer does: that is what makes the model
    build its mask for the preallocated length the plain static layers need. Compiling the
    forward is what is not supported (``apply_pumer`` turns ``generate``'s auto-compile off).
    """

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len)
        self.logical_len = max_cache_len  # the positions the plain static cache holds (the mask's columns)
        self.pos: torch.Tensor | None = None
        self.log_size: torch.Tensor | None = None
        self.n_full = 0
        self.used = 0  # slots written
        self.fillers = False
        self.pending: tuple | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        q = key_states.shape[-2]
        if not self.is_initialized:
            # the entries this prefill writes, plus what the plain cache leaves after the prompt
            n_full = self.pending[2] if self.pending is not None else q
            self.max_cache_len = q + max(self.max_cache_len - n_full, 0)
            self.lazy_initialization(key_states, value_states)
        if self.used + q > self.max_cache_len:
            raise RuntimeError(
                f"the static cache is full ({self.max_cache_len} entries in a reduced layer): it was sized for "
                "fewer tokens than this forward adds"
            )
        idx = torch.arange(self.used, self.used + q, device=self.device)
        self.keys.index_copy_(2, idx, key_states)
        self.values.index_copy_(2, idx, value_states)
        self.used += q
        self.cumulative_length.fill_(self.used)
        _record(self, key_states, self.used)
        return self.keys[:, :, : self.used], self.values[:, :, : self.used]

    def get_seq_length(self) -> int:
        return self.n_full if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.logical_len, 0  # the model's mask is over positions, as for the plain static cache

    def reset(self) -> None:
        super().reset()
        self.pos = self.log_size = self.pending = None
        self.n_full = self.used = 0
        self.fillers = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for name in ("pos", "log_size"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, beam_idx.to(t.device)))


def reduced_layer(cache: Cache, idx: int):
    """Layer ``idx`` of ``cache`` as a :class:`ReducedLayer` (a :class:`ReducedStaticLayer` in a
    static cache), swapped in while still empty."""
    layers = cache.layers
    while len(layers) <= idx and cache.layer_class_to_replicate is not None:
        layers.append(cache.layer_class_to_replicate())
    layer = layers[idx]
    if isinstance(layer, (ReducedLayer, ReducedStaticLayer)):
        return layer
    if layer.is_initialized and int(layer.get_seq_length()) > 0:
        raise RuntimeError(f"cache layer {idx} already holds tokens: a reduced prefill needs an empty cache")
    if isinstance(layer, StaticLayer):
        layers[idx] = new = ReducedStaticLayer(max_cache_len=layer.max_cache_len)
    else:
        layers[idx] = new = ReducedLayer()
    return new


def check_cache(cache: Cache) -> None:
    """Refuse, before anything is computed, a cache whose layers a reduction cannot swap."""
    ok = (DynamicLayer, DynamicSlidingWindowLayer, ReducedLayer, StaticLayer, ReducedStaticLayer)
    bad = {type(layer).__name__ for layer in cache.layers if type(layer) not in ok}
    if bad or getattr(cache, "offloading", False):
        what = ", ".join(sorted(bad)) + " layers" if bad else "offloaded layers"
        raise ValueError(
            f"pumer_llava stores reduced layers in a DynamicCache or a StaticCache; this {type(cache).__name__} has "
            f"{what}: use generate(..., cache_implementation=None) or 'static'"
        )


def is_reduced(cache: Cache | None) -> bool:
    """Whether ``cache`` holds a reduced prefill (some layer with its positions)."""
    return cache is not None and any(
        isinstance(x, (ReducedLayer, ReducedStaticLayer)) and x.pos is not None and x.n_full > 0 for x in cache.layers
    )
