"""The hooks ``apply_pumer`` installs: small named classes that only route.

- :class:`TopHook` (the generation class): remembers ``logits_to_keep``, hands the model
  clones of ``labels`` / ``shift_labels`` that a reducing prefill can mask.
- :class:`InnerPreHook` / :class:`InnerPostHook` (the multimodal model): open the call
  (a :class:`.prefill.Prefill`, or an :class:`.decode.Extend` on a reduced cache) and close it.
- :class:`LanguageModelHook`: the LM's input embeddings, to recognise a prompt being extended.
- :class:`DecoderLayerHook`: one per decoder layer from the first that scores or reduces.
- :class:`VisionLayerHook` / :class:`ProjectorHook`: a pre-LLM method's inputs from the tower.

Each hook holds the :class:`PumerState` of the model it was installed on; a deep copy of
the model copies the hooks with a state of its own.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .cache import check_cache, is_reduced
from .decode import Extend
from .layout import PromptLayout
from .prefill import Prefill
from .state import PumerState
from .vision import TowerCall, tower_importance


def carries_visual_inputs(kwargs: dict) -> bool:
    """Whether a forward brings images or video (raw pixels, or features generate() encoded)."""
    return any(v is not None and k.startswith("pixel_values") for k, v in kwargs.items()) or bool(
        kwargs.get("mm_encoder_outputs")
    )


def key_padding(mask, n: int) -> torch.Tensor | None:
    """(B, n) bool, True at real tokens, from whatever attention mask the forward got: the 2-D
    mask, or the mask ``generate`` precomputed for a static cache (a 4-D mask, or one per layer
    type), whose last query row sees every key that is not padding. None: no padding."""
    if isinstance(mask, dict):
        mask = next((m for m in mask.values() if m is not None), None)
    if mask is None:
        return None
    if mask.ndim == 2:
        return mask[:, -n:] != 0
    last = mask[:, 0, -1, :n]  # (B, n) what the last query row may read
    return last if last.dtype == torch.bool else last == 0


def read_layout(state: PumerState, input_ids: torch.Tensor, mask) -> PromptLayout:
    """The prompt's layout from one read of the ids (padding, where the mask says so, as -1)."""
    ids = input_ids
    valid = key_padding(mask, ids.shape[1])
    if valid is not None:
        ids = ids.masked_fill(~valid.to(ids.device), -1)
    per_image = state.adapter.visual_tokens_per_image(state.model_config)
    return PromptLayout(ids.tolist(), state.visual_id_set, per_image)


def _use_cache(state: PumerState, kwargs: dict) -> bool:
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(state.text_config, "use_cache", True)
    return bool(use_cache)


class _Hook:
    def __init__(self, state: PumerState):
        self.state = state

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TopHook(_Hook):
    """Pre-hook of the generation class (``LlavaForConditionalGeneration`` ...)."""

    def __call__(self, module, args, kwargs):
        state = self.state
        state.logits_to_keep = kwargs.get("logits_to_keep", 0)
        state.labels = (None, None)
        if not state.enabled:
            return None
        if kwargs.get("inputs_embeds") is not None and carries_visual_inputs(kwargs):
            raise ValueError(
                "pumer_llava finds the visual tokens from input_ids: pass input_ids with the images, not inputs_embeds"
            )
        labels, shift = kwargs.get("labels"), kwargs.get("shift_labels")
        if labels is None and shift is None:
            return None
        # the prefill masks predictions made at removed positions in these copies, in place
        state.labels = (None if labels is None else labels.clone(), None if shift is None else shift.clone())
        new = dict(kwargs)
        if labels is not None:
            new["labels"] = state.labels[0]
        if shift is not None:
            new["shift_labels"] = state.labels[1]
        return args, new


class InnerPreHook(_Hook):
    """Pre-hook of the multimodal model: decide what this forward is."""

    def __call__(self, module, args, kwargs):
        state = self.state
        if isinstance(state.call, Prefill):  # a forward that raised before its end left it open
            state.call.close_taps()
        state.call = None
        if not state.enabled:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        if isinstance(cache, Cache):
            check_cache(cache)
        visual = carries_visual_inputs(kwargs)
        if is_reduced(cache):
            if visual and input_ids is not None and bool(torch.isin(input_ids, state.visual_ids.to(input_ids.device)).any()):
                raise NotImplementedError(
                    "new image tokens in a forward that continues a reduced cache: start a new conversation "
                    "(a fresh cache) for a new image; generate(prefill_chunk_size=...) is not supported either "
                    "(a reduction chooses from the whole prompt, and chunks cut it)"
                )
            q = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
            state.call = Extend(state, cache, q)
            return None
        if input_ids is None:
            if visual:
                raise ValueError(
                    "pumer_llava finds the visual tokens from input_ids: pass input_ids with the images, not inputs_embeds"
                )
            return None
        if not visual:
            return None  # placeholder ids with no image behind them are plain tokens, as transformers embeds them
        layout = read_layout(state, input_ids, kwargs.get("attention_mask"))  # the prefill's one host sync
        if not layout.images:
            return None
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                "image tokens arrive on a cache that pumer_llava did not build (made before apply_pumer or "
                "under disabled()): start from an empty cache"
            )
        state.call = Prefill(state, input_ids, layout, _use_cache(state, kwargs), state.logits_to_keep)
        state.vision_consumed = True  # the next tower run encodes new images
        return None


class LanguageModelHook(_Hook):
    """Pre-hook of the language model: its input embeddings tell a prompt being extended."""

    def __call__(self, module, args, kwargs):
        call = self.state.call
        if isinstance(call, Prefill) and call.reduces:
            emb = kwargs.get("inputs_embeds")
            if emb is not None:
                call.check_reuse(emb)
        return None


class DecoderLayerHook(_Hook):
    """Pre-hook of decoder layer ``layer``: hand the call the layer's inputs."""

    def __init__(self, state: PumerState, layer: int):
        super().__init__(state)
        self.layer = layer

    def __repr__(self) -> str:
        return f"DecoderLayerHook(layer={self.layer})"

    def __call__(self, module, args, kwargs):
        call = self.state.call
        if isinstance(call, Extend):
            return call.at_layer(self.layer, args, kwargs)
        if isinstance(call, Prefill) and call.reduces and self.layer >= call.first_layer:
            return call.at_layer(self.layer, module, args, kwargs)
        return None


class InnerPostHook(_Hook):
    """Forward hook of the multimodal model: close the call."""

    def __call__(self, module, args, kwargs, output):
        call = self.state.call
        if isinstance(call, Prefill):
            self.state.call = None
            return call.finish(output)
        self.state.call = None
        return None


class VisionLayerHook(_Hook):
    """Pre-hook of the vision-tower layer LLaVA reads features from: importance and keys."""

    def __call__(self, module, args, kwargs):
        state = self.state
        if not state.enabled:
            return None
        h = args[0] if args else kwargs["hidden_states"]  # (n_img, N, dv)
        imp, keys = tower_importance(state.vision_info, h)
        # kept until the tower runs after a prefill: generate(use_cache=False) encodes the image
        # once and re-runs prefill on the same features at every step
        if state.vision_consumed:
            state.vision_calls.clear()
            state.vision_consumed = False
        state.vision_calls.append(TowerCall(imp, keys))
        return None


class ProjectorHook(_Hook):
    """Forward hook of the projector: its output (and input, when the method rebuilds tokens
    from tower features) next to the importance of the same tower call."""

    def __init__(self, state: PumerState, keep_input: bool):
        super().__init__(state)
        self.keep_input = keep_input

    def __call__(self, module, args, output):
        state = self.state
        if state.enabled and not state.projecting and state.vision_calls and state.vision_calls[-1].projected is None:
            call = state.vision_calls[-1]
            call.projected = output.detach()
            if self.keep_input:
                call.features = (args[0] if args else None).detach()
        return None


def install(model, state: PumerState, projector=None) -> None:
    """Register every hook on ``model``; their handles go into ``state.handles``."""
    adapter, handles = state.adapter, state.handles
    handles.append(model.register_forward_pre_hook(TopHook(state), with_kwargs=True))
    inner = adapter.inner(model)
    handles.append(inner.register_forward_pre_hook(InnerPreHook(state), with_kwargs=True))
    handles.append(inner.register_forward_hook(InnerPostHook(state), with_kwargs=True))
    handles.append(adapter.language_model(model).register_forward_pre_hook(LanguageModelHook(state), with_kwargs=True))
    method = state.method
    if state.vision_info is not None:
        handles.append(state.vision_info.layer.register_forward_pre_hook(VisionLayerHook(state), with_kwargs=True))
        keep_input = "tower_features" in method.needs
        handles.append(projector.register_forward_hook(ProjectorHook(state, keep_input)))
    layers = adapter.layers(model)
    firsts = [0] if method.before_llm is not None else []
    firsts += [min(state.layers[0] + min(method.score_offset, 0), state.layers[0])] if state.layers else []
    for i in range(min(firsts, default=len(layers)), len(layers)):
        handles.append(layers[i].register_forward_pre_hook(DecoderLayerHook(state, i), with_kwargs=True))
