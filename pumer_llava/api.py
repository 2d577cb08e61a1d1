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
from .methods import Recipe, get_recipe

_ATTN_OK = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")
_RATIO_DEFAULT = 0.25


def _resolve_layers(recipe: Recipe, config: PumerConfig, depth: int) -> tuple[int, ...]:
    layers = tuple(config.layers) if config.layers is not None else tuple(recipe.default_layers(depth))
    low = max(recipe.min_layer, -recipe.score_offset)
    bad = [x for x in layers if not low <= x < depth]
    if bad:
        raise ValueError(
            f"reducing layers {bad} are outside the model: method {recipe.name!r} accepts layers "
            f"{low}..{depth - 1} of this {depth}-layer language model"
        )
    if recipe.score_offset:
        for prev, cur in zip(layers, layers[1:]):
            if cur + recipe.score_offset < prev:
                raise ValueError(
                    f"method {recipe.name!r} scores at layer L{recipe.score_offset:+d}: layers {prev} and {cur} "
                    f"are too close (need at least {-recipe.score_offset} apart)"
                )
    return layers


def apply_pumer(
    model: nn.Module,
    ratio: float | None = None,
    method: str | Recipe = "pumer",
    *,
    keep_tokens: int | None = None,
    layers: Sequence[int] | None = None,
    merge_share: float | None = None,
    prop_attn: bool | None = None,
    seed: int = 0,
    important_ratio: float | None = None,
    merge_rule: str | None = None,
) -> nn.Module:
    """Turn visual-token reduction on for ``model`` (in place) and return it.

    ratio:       fraction of each image's visual tokens still in the sequence after the
                 last reducing layer, in (0, 1] (default 0.25; 1.0 removes nothing). Every
                 image (or video) of a prompt is scored and budgeted on its own.
    keep_tokens: the budget as an absolute number of visual tokens per image instead of ``ratio``.
    method:      "pumer" (default), "vispruner", "fastv", "random" (``list_methods()``), or a Recipe.
    layers:      decoder layers (0-based) that reduce; default: the method's for this depth.
    merge_share: share of each stage's removal done by merging (0 prune only, 1 merge only).
    merge_rule:  "bipartite" (default: ToMe matching among the kept tokens) or "recycle" (the
                 best-scored removed tokens fold into their most similar kept token).
    prop_attn:   proportional attention for merged tokens (needs an additive-mask backend).
    seed:        seed of the random baseline.
    important_ratio: VisPruner's share of its budget kept by importance (default 0.5): the
                 [CLS] query's attention, or, for towers without a [CLS] (SigLIP) and for
                 LLaVA's "full" strategy, the mean attention each patch receives.

    Applying again replaces the previous setup. Every argument is checked before the
    model is touched; a bad one raises ValueError saying what is accepted.
    """
    adapter = get_adapter(model)
    recipe = get_recipe(method)
    if ratio is None and keep_tokens is None:
        ratio = _RATIO_DEFAULT
    config = PumerConfig(
        method=recipe.name,
        ratio=ratio,
        keep_tokens=keep_tokens,
        layers=tuple(layers) if layers is not None else None,
        merge_share=merge_share,
        prop_attn=prop_attn,
        seed=seed,
        important_ratio=important_ratio,
        merge_rule=merge_rule,
    )
    decoder_layers = adapter.layers(model)
    depth = len(decoder_layers)
    resolved = _resolve_layers(recipe, config, depth)
    per_image = adapter.visual_tokens_per_image(model.config)
    if keep_tokens is not None and per_image is not None and keep_tokens > per_image:
        raise ValueError(
            f"keep_tokens={keep_tokens} is larger than the visual span of one image ({per_image} tokens): "
            f"accepted 1..{per_image}, or use ratio"
        )
    if recipe.pre_llm:
        if adapter.vision_parts is None or adapter.projector is None:
            raise ValueError(
                f"method {recipe.name!r} reads the vision tower's attention, which {adapter.class_name} "
                f"does not offer here: {adapter.no_vision_parts}. Use pumer, fastv or random"
            )
        vparts = adapter.vision_parts(model)
        projector = adapter.projector(model)
    elif important_ratio is not None:
        raise ValueError(f"important_ratio applies to vispruner only, not to method {recipe.name!r}")
    text_config = adapter.text_config(model.config)
    attn = getattr(text_config, "_attn_implementation", None) or getattr(model.config, "_attn_implementation", None)
    if attn not in _ATTN_OK and attn is not None:
        raise ValueError(f"attention implementation {attn!r} is not supported; supported: {', '.join(_ATTN_OK)}")
    use_prop = recipe.prop_attn if prop_attn is None else prop_attn
    merges = (recipe.merge_share if merge_share is None else merge_share) > 0
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
        recipe=recipe,
        adapter=adapter,
        layers=resolved,
        model_ref=weakref.ref(model),
        flash=bool(attn and attn.startswith("flash")),
        eager=attn == "eager",
        visual_ids=torch.tensor(adapter.visual_token_ids(model.config)),
        visual_id_set=frozenset(int(i) for i in adapter.visual_token_ids(model.config)),
    )
    if recipe.pre_llm:
        runtime.install(model, state, vparts, projector)
    else:
        runtime.install(model, state)
    if gen_cfg is not None:
        # generate() compiles the decoding forward on a GPU with a static cache; the hooks run
        # Python between layers, so that compiled forward is not supported: keep it eager
        state.saved_disable_compile = (getattr(gen_cfg, "disable_compile", None),)
        gen_cfg.disable_compile = True
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
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None and state.saved_disable_compile is not None:
        (gen_cfg.disable_compile,) = state.saved_disable_compile
    state.call = state.prompt = state.importance = None
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
