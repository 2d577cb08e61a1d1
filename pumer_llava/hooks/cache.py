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
        layer.pos, layer.log_size, layer.n_full, layer.fillers = pend[:4]
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
        # (pos, log_size, n_full, fillers, ...); None appends the next positions of the sequence
        self.pending: tuple | None = None

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


class StaticSlots:
    """What the static layers of one stage share: every slot's original position (and merge
    size), the logical length and the slots written, all preallocated tensors updated in place,
    so a decode step has the same shapes at every step (what a compiled forward needs)."""

    def __init__(self, pos: torch.Tensor, log_size: torch.Tensor | None, n_full: int, slots: int, key: int):
        bsz, q = pos.shape
        self.key = key  # the stage's first layer: names the stage the same way in every generation
        self.pos = pos.new_full((bsz, slots), -1)  # -1: a filler, or a slot not written yet
        self.pos[:, :q] = pos
        self.log_size = None
        if log_size is not None:
            self.log_size = log_size.new_zeros(bsz, slots)
            self.log_size[:, :q] = log_size
        self.seen = pos.new_full((), n_full)  # logical length (filled on the device: no upload)
        self.written = pos.new_full((), q)  # slots written
        self.host_written = q  # the same on the host, kept by eager steps (checks overflow)
        self.reordered_by = None  # the beam index the rows were last reordered by
        if not torch.compiler.is_compiling():
            # fixed addresses, as the static layers' keys and values: a CUDA graph replays over them
            for t in (self.pos, self.log_size, self.seen, self.written):
                if t is not None:
                    torch._dynamo.mark_static_address(t)

    def advance(self, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``q`` positions of the sequence: (slots written (q,), their positions (B, q))."""
        if not torch.compiler.is_compiling():
            if self.host_written + q > self.pos.shape[1]:
                raise RuntimeError(
                    f"the static cache is full ({self.pos.shape[1]} entries in a reduced layer): it was sized for "
                    "fewer tokens than this forward adds"
                )
            self.host_written += q
        step = torch.arange(q, device=self.pos.device)
        slot = step + self.written
        q_pos = (step + self.seen).expand(self.pos.shape[0], q)
        self.pos.index_copy_(1, slot, q_pos)
        if self.log_size is not None:
            self.log_size.index_fill_(1, slot, 0.0)
        self.seen.add_(q)
        self.written.add_(q)
        return slot, q_pos

    def reorder(self, beam_idx: torch.Tensor) -> None:
        if self.reordered_by is beam_idx:  # every layer of the stage passes the same index
            return
        self.reordered_by = beam_idx
        self.pos = self.pos.index_select(0, beam_idx.to(self.pos.device))
        if self.log_size is not None:
            self.log_size = self.log_size.index_select(0, beam_idx.to(self.log_size.device))


class ReducedStaticLayer(StaticLayer):
    """A preallocated cache layer (``generate(..., cache_implementation="static")``) whose
    entries carry their original positions, as :class:`ReducedLayer`.

    It holds what the reducing prefill keeps plus every position the static cache was sized
    for after the prompt, so a generation that fits the plain static cache fits here. The
    prefill writes its entries and attends to them; every later forward writes its tokens in
    place and attends over all preallocated slots, the unwritten ones masked (their position
    is -1), so its shapes do not change from step to step and the decoding forward compiles
    once. The positions live in :class:`StaticSlots`, shared by the layers of a stage; the
    slot each new token takes is handed to :meth:`update` by the decode hook (``pending``).
    """

    fillers = True  # unwritten slots are masked as fillers are

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len)
        self.logical_len = max_cache_len  # the positions the plain static cache holds (the mask's columns)
        self.slots: StaticSlots | None = None
        self.index = -1  # the layer's index in the cache
        self.pending = None  # at prefill the stage's cache view, at a later forward the slots to write

    @property
    def pos(self) -> torch.Tensor | None:
        return None if self.slots is None else self.slots.pos

    @property
    def log_size(self) -> torch.Tensor | None:
        return None if self.slots is None else self.slots.log_size

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        q = key_states.shape[-2]
        pend, self.pending = self.pending, None
        if not self.is_initialized:
            # the entries this prefill writes, plus what the plain cache leaves after the prompt
            if isinstance(pend, tuple) and pend[0].shape[1] == q:
                pos, log_size, n_full, shared = pend[0], pend[1], pend[2], pend[4]
            else:
                pos, log_size, n_full, shared = torch.arange(q, device=key_states.device).expand(
                    key_states.shape[0], q), None, q, {}
            self.max_cache_len = q + max(self.max_cache_len - n_full, 0)
            self.lazy_initialization(key_states, value_states)
            if "static" not in shared:
                shared["static"] = StaticSlots(pos, log_size, n_full, self.max_cache_len, self.index)
            self.slots = shared["static"]
            self.keys[:, :, :q] = key_states
            self.values[:, :, :q] = value_states
            self.cumulative_length.fill_(q)
            return self.keys[:, :, :q], self.values[:, :, :q]
        if not torch.is_tensor(pend):
            raise RuntimeError(
                "a reduced static cache is continued only with pumer_llava on (its decode hook says which slots "
                "the new tokens take): not under disabled() or after remove_pumer"
            )
        self.keys.index_copy_(2, pend, key_states)
        self.values.index_copy_(2, pend, value_states)
        self.cumulative_length.add_(q)
        return self.keys, self.values

    def get_seq_length(self):
        return self.slots.seen if self.is_initialized and self.slots is not None else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.logical_len, 0  # the model's mask is over positions, as for the plain static cache

    def reset(self) -> None:
        # the next prefill keeps its own number of tokens: allocate anew for it
        super().reset()
        self.slots = self.pending = None
        self.max_cache_len, self.is_initialized = self.logical_len, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.slots is not None:
            self.slots.reorder(beam_idx)


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
        new.index = idx
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
        (isinstance(x, ReducedLayer) and x.pos is not None and x.n_full > 0)
        or (isinstance(x, ReducedStaticLayer) and x.slots is not None)
        for x in cache.layers
    )
