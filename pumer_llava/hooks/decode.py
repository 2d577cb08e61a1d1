"""A forward that continues a reduced cache: a decode step, or the next turn of a conversation.

The new tokens are appended to every layer. Each reduced cache layer's mask comes from the
positions it stores plus those of the new tokens (:func:`.masks.layer_mask`); layers that
share one position tensor (all layers of a stage, as the prefill left them) share one
mask and one appended position tensor, so a step costs a few ops per stage, not per layer.
In a static cache the stage's positions are preallocated (:class:`.cache.StaticSlots`): the
step writes the new positions in place and its mask covers every slot, so each step has the
same shapes and a compiled decoding forward does not compile again.
"""

from __future__ import annotations

import torch

from .cache import ReducedLayer, ReducedStaticLayer
from .masks import layer_mask


class Extend:
    """Scratch of one forward on a reduced cache."""

    def __init__(self, state, cache, q: int):
        self.state, self.cache, self.q = state, cache, q
        self.n_full: int | None = None  # the logical length, from the reduced layers (host ints)
        # what a stage's layers share -> (pending, mask): the id of their position tensor, or the
        # static slots' stage (a key that is the same in every generation, for the compiled forward)
        self.memo: dict[int, tuple] = {}

    def at_layer(self, layer: int, args: tuple, kwargs: dict):
        cache = self.cache
        entry = cache.layers[layer] if layer < len(cache.layers) else None
        static = isinstance(entry, ReducedStaticLayer)
        if not (static and entry.slots is not None) and not (isinstance(entry, ReducedLayer) and entry.pos is not None):
            return None  # a layer that holds every token: the model's own mask fits it
        key = ("static", entry.slots.key) if static else id(entry.pos)
        hit = self.memo.get(key)
        if hit is None:
            dtype = (args[0] if args else kwargs["hidden_states"]).dtype
            extend = self._extend_static if static else self._extend
            hit = self.memo[key] = extend(entry, kwargs.get("attention_mask"), dtype)
        entry.pending, mask = hit
        return args, {**kwargs, "attention_mask": mask}

    def _extend_static(self, entry, model_mask, dtype):
        slots = entry.slots
        slot, q_pos = slots.advance(self.q)
        state = self.state
        mask = layer_mask(model_mask, None, q_pos, slots.pos, slots.log_size, fillers=True, dtype=dtype,
                          flash=state.flash, eager=state.eager)
        return slot, mask

    def _extend(self, entry, model_mask, dtype):
        if self.n_full is None:
            self.n_full = entry.n_full
        elif entry.n_full != self.n_full:
            raise RuntimeError(
                f"the reduced cache's layers disagree on the sequence length ({entry.n_full} vs {self.n_full}): "
                "it was changed layer by layer outside transformers' cache operations"
            )
        bsz, q, n = entry.pos.shape[0], self.q, self.n_full
        q_pos = torch.arange(n, n + q, device=entry.pos.device).expand(bsz, q)
        k_pos = torch.cat([entry.pos, q_pos], dim=1)
        log_size = None
        if entry.log_size is not None:
            log_size = torch.cat([entry.log_size, entry.log_size.new_zeros(bsz, q)], dim=1)
        state = self.state
        mask = layer_mask(model_mask, None, q_pos, k_pos, log_size, fillers=entry.fillers, dtype=dtype,
                          flash=state.flash, eager=state.eager)
        return (k_pos, log_size, n + q, entry.fillers), mask
