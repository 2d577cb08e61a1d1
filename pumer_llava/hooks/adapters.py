"""One table of what differs between architectures, keyed by ``config.model_type``.

Everything model-specific that the hooks need is looked up here; no other module tests
``model_type``. An unknown type raises a ValueError naming it and the supported ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class AttnParts:
    """The pieces of a decoder layer that importance scoring recomputes."""

    norm: nn.Module  # the pre-attention norm
    q_proj: nn.Module
    k_proj: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float


@dataclass(frozen=True)
class VisionParts:
    """The vision-tower layer whose attention VisPruner reads, and its pieces.

    has_cls:    the tower has a [CLS] token that the LLM does not see: importance is the
                [CLS] query's attention. Otherwise (SigLIP has none; LLaVA's "full" strategy
                feeds the [CLS] to the LLM as one more visual token) importance is the mean
                attention each token receives from all tokens.
    drop_first: the projector reads the tower's tokens without the first one (LLaVA's
                "default" feature-select strategy), so importance drops it too.
    """

    layer: nn.Module
    norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    num_heads: int
    head_dim: int
    scaling: float
    has_cls: bool
    drop_first: bool = True


@dataclass(frozen=True)
class Adapter:
    model_type: str
    class_name: str
    processor_class: str  # what AutoProcessor builds for it (the tools' fallback without torchvision)
    inner: Callable[[nn.Module], nn.Module]  # sees input_ids, runs the vision tower + LLM
    language_model: Callable[[nn.Module], nn.Module]
    layers: Callable[[nn.Module], nn.ModuleList]
    text_config: Callable[[object], object]
    visual_token_ids: Callable[[object], tuple[int, ...]]  # image (and video) placeholder ids
    visual_tokens_per_image: Callable[[object], int | None]  # None: varies per image (anyres)
    attn_parts: Callable[[nn.Module, object], AttnParts]
    vision_parts: Callable[[nn.Module], VisionParts] | None = None
    projector: Callable[[nn.Module], nn.Module] | None = None  # its output rows become visual tokens
    newline: Callable[[nn.Module], nn.Parameter] | None = None  # the row-end token anyres packing inserts
    no_vision_parts: str = "the model does not expose it"  # why vision_parts is None, for the refusal
    text_types: tuple[str, ...] = ("llama", "mistral", "qwen2")
    # modules bitsandbytes leaves in full precision: the vision side and the head
    full_precision: tuple[str, ...] = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    notes: str = ""


def _llama_style_attn(layer: nn.Module, text_config: object) -> AttnParts:
    attn = layer.self_attn
    n_heads = text_config.num_attention_heads
    return AttnParts(
        norm=layer.input_layernorm,
        q_proj=attn.q_proj,
        k_proj=attn.k_proj,
        num_heads=n_heads,
        num_kv_heads=getattr(text_config, "num_key_value_heads", None) or n_heads,
        head_dim=attn.head_dim,
        scaling=attn.scaling,
    )


def _vision_parts(model: nn.Module) -> VisionParts:
    """The encoder layer whose output LLaVA feeds the projector (``vision_feature_layer``).

    ``hidden_states[h]`` is the output of encoder layer ``h - 1`` (index 0 is the embeddings),
    so the attention that produced the selected features lives in that layer. CLIP and
    SigLIP towers share the layout (``layer_norm1``, ``self_attn.q_proj/k_proj``).
    """
    tower = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)  # 5.x flattens CLIPVisionModel
    layers = tower.encoder.layers
    h = model.config.vision_feature_layer
    if not isinstance(h, int):
        raise ValueError(f"VisPruner needs a single vision_feature_layer, got {h!r}")
    idx = (len(layers) + h) if h < 0 else h - 1
    if not 0 <= idx < len(layers):
        raise ValueError(f"vision_feature_layer={h} selects no encoder layer's output")
    layer = layers[idx]
    attn = layer.self_attn
    tower_cls = getattr(tower.embeddings, "class_embedding", None) is not None  # CLIP has one, SigLIP none
    drop_first = getattr(model.config, "vision_feature_select_strategy", "default") == "default"
    return VisionParts(
        layer=layer,
        norm=layer.layer_norm1,
        q_proj=attn.q_proj,
        k_proj=attn.k_proj,
        num_heads=attn.num_heads,
        head_dim=attn.head_dim,
        scaling=attn.scale,
        has_cls=tower_cls and drop_first,
        drop_first=drop_first,
    )


def _llava_visual_tokens(config: object) -> int:
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + (1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0)


# Where every row of this table keeps its decoder: ``model.model.language_model`` (transformers >= 4.52
# layout for LLaVA-1.5/-NeXT/-OneVision and Qwen2-VL/2.5-VL alike).
_MODEL_LANGUAGE_MODEL = dict(
    inner=lambda m: m.model,
    language_model=lambda m: m.model.language_model,
    layers=lambda m: m.model.language_model.layers,
    text_config=lambda c: c.text_config,
)


def _qwen_vl(model_type: str, class_name: str, processor_class: str) -> Adapter:
    """Qwen2-VL and Qwen2.5-VL: one row shape, two class names.

    The tower (NaViT-style, any image size, no [CLS]) merges 2x2 patches before the LLM: an
    image or video of (t, h, w) patches gives t * (h/2) * (w/2) tokens under the image or
    video id, so counts vary per image. Positions are M-RoPE: the model computes (3, B, N)
    temporal/height/width ids (``get_rope_index``; generate() prepends a text row, (4, B, N)),
    and the text model hands every decoder layer cos/sin already interleaved by
    ``mrope_section``, (B, N, head_dim), with the text row (or None) as ``position_ids``.
    Gathering those with the kept indices keeps each token's original 3-D position. Decode
    positions (generate's, or the model's own from the cache length and ``rope_deltas``) are
    those of the unreduced sequence, because the first decoder layer's cache keeps every token.
    """
    return Adapter(
        model_type=model_type,
        class_name=class_name,
        processor_class=processor_class,
        **_MODEL_LANGUAGE_MODEL,
        visual_token_ids=lambda c: (c.image_token_id, c.video_token_id),
        visual_tokens_per_image=lambda c: None,
        attn_parts=_llama_style_attn,  # Qwen2 attention: q/k/v biases, grouped-query heads
        no_vision_parts=(
            "its tower merges each 2x2 block of patches after its last attention layer, so patch importance "
            "does not map onto one visual token, and the pre-LLM path does not build M-RoPE decode positions"
        ),
        text_types=(f"{model_type}_text",),
        full_precision=("model.visual", "lm_head"),
        notes="M-RoPE positions; visual tokens per image vary with the image size; video tokens count as visual",
    )


def _llava_family(model_type: str, class_name: str, processor_class: str, **fields) -> Adapter:
    """LLaVA-1.5, -NeXT and -OneVision share the module layout (``model.language_model``,
    ``model.multi_modal_projector``), the decoder attention and the CLIP/SigLIP tower."""
    return Adapter(
        model_type=model_type,
        class_name=class_name,
        processor_class=processor_class,
        **_MODEL_LANGUAGE_MODEL,
        attn_parts=_llama_style_attn,
        vision_parts=_vision_parts,
        projector=lambda m: m.model.multi_modal_projector,
        **fields,
    )


ADAPTERS: dict[str, Adapter] = {
    "llava": _llava_family(
        "llava",
        "LlavaForConditionalGeneration",
        "LlavaProcessor",
        visual_token_ids=lambda c: (c.image_token_id,),
        visual_tokens_per_image=_llava_visual_tokens,
    ),
    # anyres: each image becomes a base view plus crops, unpadded, with a newline token per
    # row, all under the image token id, so samples carry different visual counts; the
    # newline tokens are visual tokens like the others. VisPruner reads each crop's own [CLS]
    # attention and maps it onto the packed tokens through the projector rows they copy.
    "llava_next": _llava_family(
        "llava_next",
        "LlavaNextForConditionalGeneration",
        "LlavaNextProcessor",
        visual_token_ids=lambda c: (c.image_token_id,),
        visual_tokens_per_image=lambda c: None,
        newline=lambda m: m.model.image_newline,
        notes="anyres: visual tokens per image vary; newline tokens count as visual",
    ),
    # anyres like LLaVA-NeXT (base view + unpadded crops + a newline token per row, and the
    # crops are downscaled past ``vision_aspect_ratio``), plus video: each frame's patches
    # pooled 2x2, then one newline, all under video_token_id. The SigLIP tower has no [CLS]:
    # VisPruner reads the mean attention each patch receives, and refuses interpolated tokens.
    "llava_onevision": _llava_family(
        "llava_onevision",
        "LlavaOnevisionForConditionalGeneration",
        "LlavaOnevisionProcessor",
        visual_token_ids=lambda c: (c.image_token_id, c.video_token_id),
        visual_tokens_per_image=lambda c: None,
        newline=lambda m: m.model.image_newline,
        notes="anyres and video: visual tokens per image vary; newline tokens count as visual",
    ),
    "qwen2_vl": _qwen_vl("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": _qwen_vl("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
}


def get_adapter(model: nn.Module) -> Adapter:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(f"{a.class_name} (model_type={k!r})" for k, a in ADAPTERS.items())
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model {type(model).__name__} (model_type={model_type!r}); supported: {supported}"
        )
    adapter = ADAPTERS[model_type]
    if type(model).__name__ != adapter.class_name:
        raise ValueError(
            f"unsupported model class {type(model).__name__}; pumer_llava patches the generation class, "
            f"supported: {supported}"
        )
    text_type = getattr(adapter.text_config(config), "model_type", None)
    if text_type not in adapter.text_types:
        raise ValueError(
            f"unsupported text backbone {text_type!r} inside {type(model).__name__}; "
            f"supported: {', '.join(adapter.text_types)}"
        )
    return adapter
