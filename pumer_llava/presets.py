"""Named LLaVA architectures built from a config with random weights (no download).

Speed and memory do not depend on the weights' values, so a benchmark can run the real
LLaVA-1.5 shapes without a checkpoint. Random weights generate garbage text: callers
force a fixed number of new tokens.

    from pumer_llava.presets import build_preset
    model = build_preset("llava-1.5-7b-scaled")          # fp32, sdpa, on the CPU

Presets:

- ``llava-1.5-7b``: the real shapes. CLIP ViT-L/14 at 336 px (24 layers, hidden 1024,
  576 visual tokens from the penultimate layer, [CLS] dropped), a two-layer GELU
  projector, and a Llama-2-7B / Vicuna-7B text model (hidden 4096, 32 layers, 32 heads,
  MLP 11008, vocabulary 32064). Needs a GPU (about 14 GB in fp16).
- ``llava-1.5-7b-scaled``: the same 576 visual tokens and prompt, with a text model a
  2-core CPU can run (hidden 512, 16 layers, 8 heads of 64, MLP 1408: the 7B's
  depth-to-reducing-layer ratios, head size and about its MLP/hidden ratio; 1408 = 22 x 64
  because bitsandbytes' CPU nf4 kernel needs in-features divisible by 64) and a 2-layer tower
  (the tower runs before any reduction, so its size only dilutes the measured speedup).
  One unreduced prefill of ~630 tokens takes about 1-3 s on one shared CPU core.
- ``tiny``: 16 visual tokens, hidden 64, 6 layers: for tests (milliseconds).

Prompt lengths are LLaVA-1.5's conversation template: the system sentence and
``USER:`` before the image (36 tokens with BOS), the question and ``ASSISTANT:`` after
it (18 tokens), so ~54 text tokens around 576 visual ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_CLIP_L14_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
_LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    vocab_size=32064,
)


@dataclass(frozen=True)
class Preset:
    """A LLaVA architecture: vision and text configs, special ids, prompt shape."""

    name: str
    description: str
    vision: dict[str, Any]
    text: dict[str, Any]
    image_token_id: int
    pad_token_id: int
    prompt_prefix: int  # text tokens before the image (BOS included)
    prompt_suffix: int  # text tokens after it
    extra: dict[str, Any] = field(default_factory=dict)

    def config(self, attn: str = "sdpa"):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        text = LlamaConfig(pad_token_id=self.pad_token_id, bos_token_id=1, eos_token_id=2, **self.text)
        cfg = LlavaConfig(
            vision_config=CLIPVisionConfig(**self.vision),
            text_config=text,
            image_token_index=self.image_token_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            **self.extra,
        )
        cfg._attn_implementation = attn
        return cfg


PRESETS: dict[str, Preset] = {
    "llava-1.5-7b": Preset(
        name="llava-1.5-7b",
        description="LLaVA-1.5-7B shapes: CLIP ViT-L/14-336 (576 visual tokens), Llama-2-7B/Vicuna text",
        vision=_CLIP_L14_336,
        text=_LLAMA2_7B,
        image_token_id=32000,
        pad_token_id=32001,
        prompt_prefix=36,
        prompt_suffix=18,
    ),
    "llava-1.5-7b-scaled": Preset(
        name="llava-1.5-7b-scaled",
        description="576 visual tokens and the LLaVA-1.5 prompt; text hidden 512, 16 layers (CPU-sized)",
        vision=dict(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=336,
            patch_size=14,
            projection_dim=128,
        ),
        text=dict(
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=16,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            vocab_size=32064,
        ),
        image_token_id=32000,
        pad_token_id=32001,
        prompt_prefix=36,
        prompt_suffix=18,
    ),
    "tiny": Preset(
        name="tiny",
        description="16 visual tokens, text hidden 64, 6 layers (tests)",
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            vocab_size=64,
        ),
        image_token_id=3,
        pad_token_id=0,
        prompt_prefix=3,
        prompt_suffix=5,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def build_preset(
    name: str,
    dtype: torch.dtype = torch.float32,
    attn: str = "sdpa",
    device: str | torch.device = "cpu",
    seed: int = 0,
):
    """A ``LlavaForConditionalGeneration`` of preset ``name`` with seeded random weights.

    The weights are created directly on ``device`` in ``dtype`` (the 7B preset never
    exists in float32 on the host). Generation is set up for benchmarks: greedy, EOS off.
    """
    from transformers import LlavaForConditionalGeneration

    preset = get_preset(name)
    cfg = preset.config(attn)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    gen = model.generation_config
    gen.pad_token_id = preset.pad_token_id
    gen.eos_token_id = None
    gen.do_sample = False
    return model.eval()
