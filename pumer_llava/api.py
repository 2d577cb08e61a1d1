"""apply_pumer / remove_pumer / disabled: validate everything first, then patch."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .config import PumerConfig
from .hooks import PumerState, get_adapter
from .hooks import runtime
from .methods import NEEDS, Method, get_method, list_methods

_ATTN_OK = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


def _resolve_layers(method: Method, config: PumerConfig, depth: int) -> tuple[int, ...]:
    if config.layers is not None and not method.in_llm:
        raise ValueError(f"method {method.name!r} acts before the language model only: it takes no layers")
    layers = tuple(config.layers) if config.layers is not None else tuple(method.default_layers(depth))
    low = max(method.min_layer, -method.score_offset)
    bad = [x for x in layers if not low <= x < depth]
    if bad:
        raise ValueError(
            f"reducing layers {bad} are outside the model: method {method.name!r} accepts layers "
            f"{low}..{depth - 1} of this {depth}-layer language model"
        )
    if method.score_offset:
        for prev, cur in zip(layers, layers[1:]):
            if cur + method.score_offset < prev:
                raise ValueError(
                    f"method {method.name!r} scores at layer L{method.score_offset:+d}: layers {prev} and {cur} "
                    f"are too close (need at least {-method.score_offset} apart)"
                )
    return layers


def missing_inputs(method: Method, model: nn.Module, adapter=None) -> str | None:
    """Why ``model`` cannot run ``method`` (the inputs it needs that the model lacks), or None."""
    adapter = adapter or get_adapter(model)
    if method.before_llm is not None or method.needs:
        if adapter.vision_parts is None or adapter.projector is None:
            return f"{adapter.class_name} has no pre-LLM path here: {adapter.no_vision_parts}"
    if "cls" in method.needs or "vision" in method.needs:
        try:
            parts = adapter.vision_parts(model)
        except ValueError as e:
            return str(e)
        if "cls" in method.needs and not parts.has_cls:
            return (f"it needs {NEEDS['cls']}; this tower has none (SigLIP), or LLaVA feeds it to the language model "
                    "(vision_feature_select_strategy='full')")
    if "tower_features" in method.needs and adapter.visual_tokens_per_image(model.config) is None:
        return f"it needs {NEEDS['tower_features']}; {adapter.class_name} packs several views per image (anyres)"
    return None


def methods_for(model: nn.Module) -> list[str]:
    """The registered methods that can run on ``model``."""
    adapter = get_adapter(model)
    return [n for n in list_methods() if missing_inputs(get_method(n), model, adapter) is None]


def apply_pumer(
    model: nn.Module,
    ratio: float | None = None,
    method: str | Method = "pumer",
    *,
    keep_tokens: int | None = None,
    layers: Sequence[int] | None = None,
    **options,
) -> nn.Module:
    """Turn visual-token reduction on for ``model`` (in place) and return it.

    ratio:       fraction of each image's visual tokens still in the sequence after the
                 last reducing layer, in (0, 1] (default 0.25; 1.0 removes nothing). Every
                 image (or video) of a prompt is scored and budgeted on its own.
    keep_tokens: the budget as an absolute number of visual tokens per image instead of ``ratio``.
    method:      a registered name (``list_methods()``: pumer, fastv, vispruner, visionzip,
                 divprune, cdpruner, dart, pyramiddrop, sparsevlm, random) or a ``Method``.
    layers:      decoder layers (0-based) that reduce; default: the method's for this depth.
    **options:   the method's own options (its options dataclass, e.g. PuMer's ``merge_share``,
                 ``merge_rule``, ``prop_attn``; VisPruner's ``important_ratio``; random's
                 ``seed``): an unknown one raises ValueError listing the method's options.

    Applying again replaces the previous setup. Every argument is checked before the
    model is touched; a bad one raises ValueError saying what is accepted.
    """
    adapter = get_adapter(model)
    m = get_method(method)
    config = PumerConfig.make(m, ratio=ratio, keep_tokens=keep_tokens, layers=layers, **options)
    opts = config.options
    decoder_layers = adapter.layers(model)
    depth = len(decoder_layers)
    resolved = _resolve_layers(m, config, depth)
    per_image = adapter.visual_tokens_per_image(model.config)
    if keep_tokens is not None and per_image is not None and keep_tokens > per_image:
        raise ValueError(
            f"keep_tokens={keep_tokens} is larger than the visual span of one image ({per_image} tokens): "
            f"accepted 1..{per_image}, or use ratio"
        )
    if m.check_budget is not None:
        budget = keep_tokens if keep_tokens is not None else (
            max(1, round(per_image * config.ratio)) if per_image is not None else None)
        if budget is not None:
            m.check_budget(opts, budget)
    why = missing_inputs(m, model, adapter)
    if why is not None:
        raise ValueError(f"method {m.name!r} cannot run on {adapter.class_name}: {why}. "
                         f"Methods that work here: {', '.join(methods_for(model))}")
    vparts = adapter.vision_parts(model) if "vision" in m.needs else None
    projector = adapter.projector(model) if vparts is not None else None
    text_config = adapter.text_config(model.config)
    attn = getattr(text_config, "_attn_implementation", None) or getattr(model.config, "_attn_implementation", None)
    if attn not in _ATTN_OK and attn is not None:
        raise ValueError(f"attention implementation {attn!r} is not supported; supported: {', '.join(_ATTN_OK)}")
    use_prop = bool(getattr(opts, "prop_attn", False))
    merges = float(getattr(opts, "merge_share", 0.0)) > 0 or float(getattr(opts, "merge_text", 0.0)) > 0
    if float(getattr(opts, "merge_text", 0.0)) > 0 and not resolved:
        raise ValueError(f"merge_text merges the prompt's text inside the language model, and method {m.name!r} "
                         "reduces only before it here: pass layers=[...] (decoder layers that reduce) or merge_text=0")
    if attn and attn.startswith("flash") and use_prop and merges:
        raise ValueError(
            "proportional attention adds log token sizes to the attention logits, which needs an additive "
            f"mask; {attn} takes none: pass prop_attn=False or load the model with attn_implementation='sdpa'"
        )
    gen_cfg = getattr(model, "generation_config", None)
    if getattr(gen_cfg, "cache_implementation", None) in ("offloaded_static", "sliding_window", "hybrid"):
        raise ValueError(
            f"generation_config.cache_implementation={gen_cfg.cache_implementation!r} is not supported with "
            "reduction: set it to None (DynamicCache) or 'static'"
        )

    # everything is valid: now patch (replacing, never stacking)
    remove_pumer(model)
    state = PumerState(
        config=config,
        method=m,
        adapter=adapter,
        layers=resolved,
        model_ref=weakref.ref(model),
        flash=bool(attn and attn.startswith("flash")),
        eager=attn == "eager",
        visual_ids=torch.tensor(adapter.visual_token_ids(model.config)),
        visual_id_set=frozenset(int(i) for i in adapter.visual_token_ids(model.config)),
        options=opts,
        vision_info=vparts,
    )
    runtime.install(model, state, projector)
    model.pumer = state
    return model


def remove_pumer(model: nn.Module) -> nn.Module:
    """Remove every hook and the ``pumer`` attribute: the exact original model again."""
    state = model.__dict__.get("pumer")
    if state is None:
        return model
    for h in state.handles:
        h.remove()
    state.handles.clear()
    close = getattr(state.call, "close_taps", None)  # a prefill that raised mid-way holds one-shot hooks
    if close is not None:
        close()
    state.call = state.prompt = None
    state.vision_calls.clear()
    del model.pumer
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` unreduced inside the block; the reduction comes back after it."""
    state = model.__dict__.get("pumer")
    if state is None:
        raise ValueError("disabled() needs a model patched with apply_pumer")
    was = state.enabled
    state.enabled = False
    try:
        yield model
    finally:
        state.enabled = was
