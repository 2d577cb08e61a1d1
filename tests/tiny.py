"""Tiny VLMs (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL) built from a config (no download), shared by the tests."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

IMAGE_TOKEN = 3
VIDEO_TOKEN = 4  # Qwen2-VL's video placeholder; the Qwen inputs draw text ids above it
PAD = 0
VOCAB = 64
# PuMer merging only, by key similarity alone (the paper's bipartite rule, every pair merges):
# its decisions read no text, so a prompt with other text after the image makes the same ones
TEXT_BLIND = dict(merge_share=1.0, merge_rule="bipartite", merge_threshold=None)
IMAGE_SIZE, PATCH = 32, 8
N_VIS = (IMAGE_SIZE // PATCH) ** 2  # 16 visual tokens per image
QWEN_PATCH = 4  # Qwen2-VL: a (t, h, w) grid of patches gives t*h*w/4 tokens (2x2 merged)


def text_config(kind: str, layers: int = 6):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama":
        return LlamaConfig(num_key_value_heads=4, **common)
    if kind == "qwen2":  # grouped-query attention, q/k/v biases
        return Qwen2Config(num_key_value_heads=2, **common)
    raise ValueError(kind)


def tiny_llava(kind: str = "llama", attn: str = "sdpa", layers: int = 6, seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=32,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text_config(kind, layers),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg)
    model.set_attn_implementation(attn) if hasattr(model, "set_attn_implementation") else None
    return _sharpen(model)


def _sharpen(model):
    # sharper attention, so that different selections give clearly different logits
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    # with random weights a placeholder id can win greedy decoding; re-fed with the image's features
    # (use_cache=False) it no longer matches them, which breaks the model itself
    model.generation_config.suppress_tokens = [IMAGE_TOKEN, 4]
    return model.eval()


def _image_prompts(counts, prefix_lens, suffix_lens, g, first_text_id: int):
    """Left-padded rows of random text ids (>= ``first_text_id``), each with one image of
    ``counts[i]`` visual tokens between a prefix and a suffix: (input_ids, attention_mask)."""
    seqs = []
    for n_vis, pre, suf in zip(counts, prefix_lens, suffix_lens):
        a = torch.randint(first_text_id, VOCAB, (pre,), generator=g)
        b = torch.randint(first_text_id, VOCAB, (suf,), generator=g)
        seqs.append(torch.cat([a, torch.full((n_vis,), IMAGE_TOKEN), b]))
    return _left_pad(seqs)


def _left_pad(seqs):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), PAD)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s) :] = s
        mask[i, n - len(s) :] = 1
    return ids, mask


def make_inputs(prefix_lens=(3,), suffix_lens=(5,), seed: int = 0, images: int = 1):
    """Left-padded batch: [pad..] prefix <image>*N_VIS suffix, one image per sample."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for pre, suf in zip(prefix_lens, suffix_lens):
        a = torch.randint(4, VOCAB, (pre,), generator=g)
        b = torch.randint(4, VOCAB, (suf,), generator=g)
        seqs.append(torch.cat([a, torch.full((N_VIS * images,), IMAGE_TOKEN), b]))
    ids, mask = _left_pad(seqs)
    pixel = torch.randn(len(seqs) * images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel}


def make_mixed_inputs(images=(1, 2, 0), prefix_lens=(3, 2, 4), suffix_lens=(5, 3, 6), seed: int = 0):
    """Left-padded batch whose samples carry different numbers of images (so of visual tokens).

    Each image is ``<image>``*N_VIS followed by one text token; pixel_values lists the images
    in order of appearance, which is how LLaVA scatters features into the placeholders.
    """
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n_img, pre, suf in zip(images, prefix_lens, suffix_lens):
        parts = [torch.randint(4, VOCAB, (pre,), generator=g)]
        for _ in range(n_img):
            parts += [torch.full((N_VIS,), IMAGE_TOKEN), torch.randint(4, VOCAB, (1,), generator=g)]
        parts.append(torch.randint(4, VOCAB, (suf,), generator=g))
        seqs.append(torch.cat(parts))
    ids, mask = _left_pad(seqs)
    pixel = torch.randn(sum(images), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel}, list(images)


def tiny_llava_next(kind: str = "llama", attn: str = "sdpa", seed: int = 0):
    """A tiny LLaVA-NeXT (anyres): each image gives a base view plus crops, so visual counts vary."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    cfg = LlavaNextConfig(
        vision_config=vision, text_config=text_config(kind), image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE],
                              [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]],
    )
    cfg._attn_implementation = attn
    model = LlavaNextForConditionalGeneration(cfg)
    model.set_attn_implementation(attn)
    return _sharpen(model)


def make_next_inputs(model, sizes=((IMAGE_SIZE, 2 * IMAGE_SIZE), (2 * IMAGE_SIZE, 2 * IMAGE_SIZE)),
                     prefix_lens=(3, 5), suffix_lens=(6, 2), seed: int = 0):
    """Left-padded LLaVA-NeXT batch: the visual count of each image comes from the model itself."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n_patches = [image_size_to_num_patches(list(s), cfg.image_grid_pinpoints, IMAGE_SIZE) for s in sizes]
    pixel = torch.randn(len(sizes), max(n_patches), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    image_sizes = torch.tensor(sizes)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel, image_sizes, vision_feature_layer=cfg.vision_feature_layer,
                                               vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    counts = [f.shape[0] for f in feats.pooler_output]
    ids, mask = _image_prompts(counts, prefix_lens, suffix_lens, g, first_text_id=4)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel, "image_sizes": image_sizes}, counts


def tiny_qwen_vl(version: str = "2", attn: str = "sdpa", seed: int = 0):
    """A tiny Qwen2-VL (version "2") or Qwen2.5-VL ("2.5"): M-RoPE, 2x2-merged patches, no [CLS].

    head_dim 16, so mrope_section (2, 3, 3) splits its 8 frequencies over time, height, width.
    """
    import transformers as tf

    torch.manual_seed(seed)
    text = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VOCAB - 1)
    common = dict(depth=2, num_heads=2, patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2)
    if version == "2":
        vision = dict(embed_dim=32, hidden_size=64, mlp_ratio=2, **common)
        cfg = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        cls = tf.Qwen2VLForConditionalGeneration
    elif version == "2.5":  # window attention in block 0 (windows of 2x2 merged tokens), full in block 1
        vision = dict(hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=4 * QWEN_PATCH,
                      fullatt_block_indexes=[1], **common)
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = tf.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(version)
    cfg._attn_implementation = attn
    model = cls(cfg)
    model.set_attn_implementation(attn)
    return _sharpen(model)


def make_qwen_vl_inputs(model, samples=((("image", (1, 8, 8)),), (("image", (1, 4, 8)), ("video", (2, 4, 6)))),
                        prefix_lens=(3, 2), suffix_lens=(5, 3), seed: int = 0):
    """Left-padded Qwen2-VL batch, built by hand as the processor would (no download).

    Each sample is a list of (kind, (t, h, w)) items, a grid in patches; an item becomes
    t*h*w / merge^2 placeholders followed by one text token. ``pixel_values`` (and
    ``pixel_values_videos``) are the flat patch rows of all items in order of appearance, as
    the tower takes them; ``mm_token_type_ids`` marks text 0, image 1, video 2 for M-RoPE.
    Returns the inputs and the visual-token count of each sample.
    """
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    merge2 = vc.spatial_merge_size**2
    row = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    kinds = {"image": (IMAGE_TOKEN, 1, "pixel_values", "image_grid_thw"),
             "video": (VIDEO_TOKEN, 2, "pixel_values_videos", "video_grid_thw")}
    seqs, types, grids, counts = [], [], {"image": [], "video": []}, []
    for items, pre, suf in zip(samples, prefix_lens, suffix_lens):
        parts, tparts, n_vis = [torch.randint(VIDEO_TOKEN + 1, VOCAB - 1, (pre,), generator=g)], [torch.zeros(pre)], 0
        for kind, grid in items:
            token, ttype = kinds[kind][:2]
            n = grid[0] * grid[1] * grid[2] // merge2
            parts += [torch.full((n,), token), torch.randint(VIDEO_TOKEN + 1, VOCAB - 1, (1,), generator=g)]
            tparts += [torch.full((n,), ttype), torch.zeros(1)]
            grids[kind].append(grid)
            n_vis += n
        parts.append(torch.randint(VIDEO_TOKEN + 1, VOCAB - 1, (suf,), generator=g))
        tparts.append(torch.zeros(suf))
        seqs.append(torch.cat(parts))
        types.append(torch.cat(tparts).int())
        counts.append(n_vis)
    ids, mask = _left_pad(seqs)
    tt, _ = _left_pad(types)
    inp = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": tt.int()}
    for kind, gl in grids.items():
        if gl:
            _, _, pix_key, grid_key = kinds[kind]
            grid = torch.tensor(gl)
            inp[pix_key] = torch.randn(int(grid.prod(-1).sum()), row, generator=g)
            inp[grid_key] = grid
    return inp, counts


_PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids")
# Qwen2-VL's flat layout: each grid row (t, h, w) owns t*h*w rows of the pixel tensor
_FLAT_VISUALS = (("pixel_values", "image_grid_thw", 1), ("pixel_values_videos", "video_grid_thw", 2))


def alone(inp, i):
    """Sample i of a left-padded batch, unpadded.

    Per-token inputs (ids, mask, ``mm_token_type_ids``) lose their padding. Per-image inputs
    are cut to sample i's images: one row per sample (LLaVA, LLaVA-NeXT), or, where a grid
    lists every image of the batch (Qwen2-VL), the sample's grid rows and their patch rows.
    """
    keep = inp["attention_mask"][i].bool()
    out = {k: inp[k][i : i + 1, keep] for k in _PER_TOKEN if k in inp}
    absent = set()
    for key, grid_key, ttype in _FLAT_VISUALS:
        if grid_key not in inp:
            continue
        per_sample = []  # items of this modality in each sample: runs of its token type
        for tt in inp["mm_token_type_ids"]:
            hit = tt == ttype
            per_sample.append(int((hit & ~torch.cat([hit.new_zeros(1), hit[:-1]])).sum()))
        first, count = sum(per_sample[:i]), per_sample[i]
        if count == 0:  # the model takes no grid rather than an empty one
            absent |= {key, grid_key}
            continue
        grid = inp[grid_key]
        rows = torch.cat([grid.new_zeros(1), grid.prod(-1).cumsum(0)])
        out[grid_key] = grid[first : first + count]
        out[key] = inp[key][rows[first] : rows[first + count]]
    out.update({k: v[i : i + 1] for k, v in inp.items() if k not in out and k not in absent})
    return out


def alone_mixed(inp, images, i):
    """Sample i of a :func:`make_mixed_inputs` batch (``images``: images per sample), unpadded."""
    keep = inp["attention_mask"][i].bool()
    start = sum(images[:i])
    out = {"input_ids": inp["input_ids"][i : i + 1, keep], "attention_mask": inp["attention_mask"][i : i + 1, keep]}
    if images[i]:
        out["pixel_values"] = inp["pixel_values"][start : start + images[i]]
    return out


def append_tokens(inp, ids):
    """The inputs with text tokens ``ids`` (B, q) appended: per-token inputs grow (mask 1, type text)."""
    grow = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": torch.zeros_like(ids)}
    return {k: torch.cat([v, grow[k].to(v.dtype)], 1) if k in _PER_TOKEN else v for k, v in inp.items()}


def assert_cached_equals_recomputed(model, inp, **gen):
    """Greedy generate with the KV cache and without it: same tokens, close scores.

    Returns the cached run and the ``last_stats`` of its prefill."""
    with torch.no_grad():
        cached = model.generate(**inp, **gen, output_scores=True, return_dict_in_generate=True)
        stats = model.pumer.last_stats
        again = model.generate(**inp, **gen, output_scores=True, return_dict_in_generate=True, use_cache=False)
    assert torch.equal(cached.sequences, again.sequences)
    for a, b in zip(cached.scores, again.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    return cached, stats


VIDEO_TOKEN = 4
# anyres grid: a 32x32 image gives a base view + 1 crop, a 64x40 one a base view + 4 crops (unpadded)
OV_PINPOINTS = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE],
                [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]


def tiny_onevision(attn: str = "sdpa", seed: int = 0, aspect: str = "anyres_max_9"):
    """A tiny LLaVA-OneVision: SigLIP tower (no [CLS], all patches kept: strategy "full"), Qwen2 LLM."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=IMAGE_SIZE, patch_size=PATCH)
    cfg = LlavaOnevisionConfig(
        vision_config=vision, text_config=text_config("qwen2"), image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        image_grid_pinpoints=OV_PINPOINTS, vision_aspect_ratio=aspect,
    )
    cfg._attn_implementation = attn
    model = LlavaOnevisionForConditionalGeneration(cfg)
    model.set_attn_implementation(attn)
    return _sharpen(model)


def onevision_counts(model, pixel, image_sizes, batch_num_images=None):
    """Visual tokens of each image as the model itself packs them (base view, crops, newline tokens)."""
    cfg = model.config
    with torch.no_grad():
        feats = model.model.get_image_features(pixel, image_sizes, batch_num_images=batch_num_images,
                                               vision_feature_layer=cfg.vision_feature_layer,
                                               vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                               vision_aspect_ratio=cfg.vision_aspect_ratio)
    return [f.shape[0] for f in feats.pooler_output]


def make_onevision_inputs(model, sizes=((IMAGE_SIZE, IMAGE_SIZE), (2 * IMAGE_SIZE, 40)),
                          prefix_lens=(3, 5), suffix_lens=(6, 2), seed: int = 0):
    """Left-padded OneVision batch, one anyres image per sample: the counts differ (36 and 72)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    n_views = [image_size_to_num_patches(list(s), OV_PINPOINTS, IMAGE_SIZE) for s in sizes]
    pixel = torch.randn(len(sizes), max(n_views), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    image_sizes = torch.tensor(sizes)
    counts = onevision_counts(model, pixel, image_sizes)
    ids, mask = _image_prompts(counts, prefix_lens, suffix_lens, g, first_text_id=5)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel, "image_sizes": image_sizes}, counts


def make_video_inputs(frames: int = 3, prefix: int = 3, suffix: int = 5, seed: int = 0):
    """One sample with a video: each frame's patches are pooled 2x2, then one newline token."""
    g = torch.Generator().manual_seed(seed)
    side = -(-(IMAGE_SIZE // PATCH) // 2)
    n_vis = frames * side * side + 1
    ids = torch.cat([torch.randint(5, VOCAB, (prefix,), generator=g), torch.full((n_vis,), VIDEO_TOKEN),
                     torch.randint(5, VOCAB, (suffix,), generator=g)])[None]
    video = torch.randn(1, frames, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": video}, n_vis


def image_runs(ids):
    """Positions of each image's tokens, per sample: runs of the image placeholder."""
    runs = []
    for row in ids.tolist():
        sample, prev = [], False
        for p, t in enumerate(row):
            if t == IMAGE_TOKEN:
                if not prev:
                    sample.append([])
                sample[-1].append(p)
            prev = t == IMAGE_TOKEN
        runs.append(sample)
    return runs


def capture_layers(model):
    """Each decoder layer's prefill call: (input, kwargs, output), as the layer really got them."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.language_model.layers):
        def hook(mod, args, kwargs, out, i=i):
            h = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(i, (h.detach(), dict(kwargs), (out[0] if isinstance(out, tuple) else out).detach()))
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    return seen, handles
