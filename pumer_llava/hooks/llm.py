"""Forward hooks that reduce visual tokens inside the language model.

Flow of one prefill (DESIGN.md section 3):

1. ``inner`` pre-hook (LlavaModel): finds each sample's visual tokens from ``input_ids``,
   plans the cascade, opens a fresh :class:`CallState`, and makes sure a cache object exists
   so later forwards can be matched to this reduction.
2. decoder-layer pre-hooks: at a reducing layer, score, prune and merge the visual tokens,
   shrink ``hidden_states``, and gather position embeddings, position ids and the mask with
   the kept indices; every later layer gets the gathered kwargs of its stage (the decoder
   loop hands every layer the same full-length ones).
3. ``inner`` forward hook: stores a :class:`Record` keyed by the cache (which full positions
   each layer's cache holds), writes ``last_stats``, and scatters the reduced last hidden
   state back to full length when the caller wants logits beyond the last position.

A later forward on the same cache (decode, or the next turn of a conversation) is an
"extend": each layer's full-length mask is mapped onto the columns its cache holds.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache

from ..methods import ScoreContext
from ..reduce import StagePlan, bipartite_merge, decoder_flops, plan_stages
from ..reduce.diversity import remove_duplicates
from ..reduce.images import split_images
from ..reduce.match import match_rows
from ..reduce.ragged import left_pack, ragged_nonzero, top_per_row
from ..reduce.scoring import (
    apply_rope,
    mean_over_rows,
    mean_over_rows_after,
    mean_received_attention,
    query_row_attention,
)
from .state import CallState, PumerState, Record, ReductionStats


# ----------------------------------------------------------------------------- helpers


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather dim 1 of t (b0, N, ...) with idx (B, N'), broadcasting a batch of 1."""
    idx = idx.to(t.device)
    t = t.expand(idx.shape[0], *t.shape[1:])
    if t.ndim == 2:
        return t.gather(1, idx)
    return t.gather(1, idx.view(*idx.shape, *([1] * (t.ndim - 2))).expand(-1, -1, *t.shape[2:]))


def _take_positions(pid: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather position ids with idx (B, N') along the sequence: (b0, N) 1-D RoPE ids, or
    (R, b0, N) M-RoPE rows (Qwen2-VL: temporal, height, width, plus a text row in generate),
    every row with the same indices so each kept token keeps its whole original position."""
    if pid.ndim == 3:
        return torch.stack([_take(row, idx) for row in pid])  # (R, B, N')
    return _take(pid, idx)


def _scatter_rows(dst: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst (B, N, ...) with src (B, k, ...) written at idx (B, k) where ok; other entries untouched."""
    n = dst.shape[1]
    idx = torch.where(ok, idx, torch.full_like(idx, n))  # padding entries go to a trash slot
    ext = torch.cat([dst, dst[:, :1]], dim=1)
    if dst.ndim == 2:
        return ext.scatter(1, idx, src.to(dst.dtype))[:, :n]
    return ext.scatter(1, idx[..., None].expand(-1, -1, *dst.shape[2:]), src.to(dst.dtype))[:, :n]


def _mask_keys(m: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
    """Mask the key columns where ``key_ok`` (B, K) is False in a 4-D mask; a row left with
    no key attends to all (as transformers does for padding rows) so softmax stays finite."""
    ok = key_ok.to(m.device)[:, None, None, :]
    if m.dtype == torch.bool:
        m = m & ok
        return m | ~m.any(-1, keepdim=True)
    return m.masked_fill(~ok, torch.finfo(m.dtype).min)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def _gather_mask(
    mask: Any, idx: torch.Tensor, valid: torch.Tensor, log_size: torch.Tensor | None, dtype, fillers: bool, flash: bool
) -> Any:
    """The prefill mask for the tokens at LM positions ``idx`` (B, N').

    ``fillers``: some rows were left-padded with filler slots (their ``valid`` is False),
    whose columns must be masked explicitly: they gathered a dropped token's column.
    """
    bsz, n = idx.shape
    if mask is None:
        if flash:
            return valid.long() if fillers else None
        if log_size is None and not fillers:
            return None  # sdpa's is_causal path: still causal after removing tokens
        ar = torch.arange(n, device=idx.device)
        allowed = (ar[None, :] <= ar[:, None])[None] & valid[:, None, :].to(idx.device)  # (B, N', N')
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        if log_size is None:
            return allowed[:, None]
        return _additive(allowed[:, None], dtype) + log_size[:, None, None, :].to(dtype)
    if mask.ndim == 2:  # flash attention keeps the 2-D padding mask
        m = mask.gather(1, idx.to(mask.device))
        return m * valid.to(m.device, m.dtype) if fillers else m
    m = mask.expand(bsz, *mask.shape[1:])
    p = idx.to(m.device)
    h = m.shape[1]
    m = m.gather(2, p[:, None, :, None].expand(bsz, h, n, m.shape[3]))  # rows
    m = m.gather(3, p[:, None, None, :].expand(bsz, h, n, n))  # columns
    if fillers:
        m = _mask_keys(m, valid)
    if log_size is not None:
        m = _additive(m, dtype) + log_size[:, None, None, :].to(m.device, dtype)
    return m


# ----------------------------------------------------------------------------- scoring


def _query_rows(call: CallState, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) indices of the query rows and (B, R) validity, in current coordinates."""
    if kind == "last_token_attention":
        n = call.pos.shape[1]
        last = (call.valid.long() * torch.arange(n, device=call.pos.device)).argmax(1)  # (B,)
        return last[:, None], torch.ones_like(last[:, None], dtype=torch.bool)
    text = call.valid & ~call.is_vis
    after_last = text & (call.pos > call.last_vis[:, None])
    # every image reads the text after it (mean_over_rows_after picks each image's rows); a
    # prompt that ends with its last image has no question after it: use all its text
    rows_mask = torch.where(after_last.any(1, keepdim=True), text & (call.pos > call.vis_start[:, None]), text)
    count = rows_mask.sum(1)
    r = max(int(count.max()), 1)
    order = torch.argsort((~rows_mask).to(torch.int8), dim=1, stable=True)[:, :r]
    return order, torch.arange(r, device=order.device)[None, :] < count[:, None]


def _attention_scores(state: PumerState, call: CallState, module, hs: torch.Tensor, kw: dict, kind: str, layer: int = -1):
    """(B, N) mean attention the query rows give every current token (layer's own q/k/RoPE).

    PuMer's rows are the text after each token's own image; FastV's the last prompt token."""
    parts = state.adapter.attn_parts(module, state.adapter.text_config(state.model_config))
    w = parts.q_proj.weight
    if w.device.type == "meta":
        raise RuntimeError(
            "the reducing layer's weights are offloaded (meta device) when its pre-hook runs; "
            "pumer_llava cannot score tokens on offloaded layers: keep reducing layers on a device"
        )
    dev = w.device
    x = parts.norm(hs.to(dev))  # (B, N, d)
    bsz, n, d = x.shape
    rows, row_valid = _query_rows(call, kind)
    rows, row_valid = rows.to(dev), row_valid.to(dev)
    r = rows.shape[1]
    xq = x.gather(1, rows[..., None].expand(-1, -1, d))  # (B, R, d)
    q = parts.q_proj(xq).view(bsz, r, parts.num_heads, parts.head_dim).transpose(1, 2)  # (B, H, R, hd)
    k = parts.k_proj(x).view(bsz, n, parts.num_kv_heads, parts.head_dim).transpose(1, 2)  # (B, Hkv, N, hd)
    # merging at this layer measures similarity on the same (pre-RoPE, head-averaged) keys
    call.key_metric = (layer, k.mean(1))  # (B, N, hd)
    cos, sin = kw["position_embeddings"]
    cos, sin = cos.to(dev).expand(bsz, -1, -1), sin.to(dev).expand(bsz, -1, -1)
    q = apply_rope(q, _take(cos, rows), _take(sin, rows))
    k = apply_rope(k, cos, sin)
    key_idx = torch.arange(n, device=dev)
    valid = call.valid.to(dev)
    allowed = (key_idx[None, None, :] <= rows[:, :, None]) & valid[:, None, :] & row_valid[:, :, None]
    key_bias = call.size.to(dev).log() if (state.prop_attn and call.merged) else None
    probs = query_row_attention(q, k, allowed, parts.scaling, key_bias)  # (B, H, R, N)
    hq, hkv, hd = parts.num_heads * parts.head_dim, parts.num_kv_heads * parts.head_dim, parts.head_dim
    call.score_flops += bsz * (r * d * hq + n * d * hkv + parts.num_heads * r * n * hd)
    if kind != "text_attention":
        return mean_over_rows(probs, row_valid).to(hs.device)
    group = call.group.to(dev)
    key_end = torch.where(group >= 0, call.images.end.to(dev)[group.clamp_min(0)], torch.full_like(group, -1))  # (B, N)
    return mean_over_rows_after(probs, call.pos.to(dev).gather(1, rows), row_valid, key_end).to(hs.device)


def _random_scores(state: PumerState, call: CallState, n: int, device) -> torch.Tensor:
    # Seeded by the sample's own (unpadded) ids: the same prompt gets the same choice
    # whatever batch it is in, so beams and padded batches agree with single samples.
    out = []
    for b in range(call.input_ids.shape[0]):
        ids = call.input_ids[b][call.valid_full[b]].tolist()
        g = torch.Generator().manual_seed(hash((state.config.seed, len(ids), tuple(ids))) & (2**62 - 1))
        out.append(torch.rand(n, generator=g))
    return torch.stack(out).to(device)


def _score(state: PumerState, call: CallState, module, layer: int, stage: int, hs: torch.Tensor, kw: dict):
    """(B, n_max) scores of the current visual tokens for ``stage``: higher = keep.

    Rows with fewer visual tokens are padded at the end (``ragged_nonzero``)."""
    scorer = state.recipe.scorer
    vis_idx, vis_ok = ragged_nonzero(call.is_vis)
    n_vis = vis_idx.shape[1]
    if callable(scorer):
        positions = call.pos.gather(1, vis_idx)
        keep = (vis_ok.sum(1) - _per_sample(call, call.plans[stage][0])).tolist()
        ctx = ScoreContext(
            layer=state.layers[stage],
            stage=stage,
            hidden=hs.gather(1, vis_idx.to(hs.device)[..., None].expand(-1, -1, hs.shape[-1])),
            positions=positions,
            patch_index=positions - call.vis_start[:, None],
            input_ids=call.input_ids,
            keep=max(keep),
            valid=vis_ok,
            keep_per_sample=keep,
        )
        scores = scorer(ctx)
        if tuple(scores.shape) != tuple(vis_idx.shape):
            raise ValueError(f"custom scorer returned shape {tuple(scores.shape)}, expected {tuple(vis_idx.shape)}")
        return scores.to(vis_idx.device).float()
    if scorer == "random":
        return _random_scores(state, call, n_vis, vis_idx.device)
    scores = _attention_scores(state, call, module, hs, kw, scorer, layer)
    return scores.gather(1, vis_idx.to(scores.device))


# ----------------------------------------------------------------------------- reduction


def _per_sample(call: CallState, per_image: torch.Tensor) -> torch.Tensor:
    """(B,) sums of a per-image quantity (G,) over each sample's images."""
    out = torch.zeros(call.input_ids.shape[0], dtype=per_image.dtype, device=per_image.device)
    return out.index_add_(0, call.images.sample.to(per_image.device), per_image)


def _reduce(state: PumerState, call: CallState, module, layer: int, stage: int, hs: torch.Tensor, scores):
    """Prune, then merge, within each image: every image keeps its own budget (issue 8).

    Images are the rows here (G of them across the batch), so top-k and bipartite merging
    never move a token's share from one image to another."""
    prune, merge = call.plans[stage]  # (G,) each: per-image counts of this stage
    imgs = call.images
    dev0 = call.is_vis.device
    vis_idx, vis_ok = ragged_nonzero(call.is_vis)  # (B, n_max): the layout ``scores`` come in
    full = _scatter_rows(torch.zeros(call.is_vis.shape, device=dev0), vis_idx, vis_ok, scores.to(dev0).float())
    own = call.group[imgs.sample] == torch.arange(imgs.n, device=dev0)[:, None]  # (G, N)
    img_idx, img_ok = ragged_nonzero(own)  # (G, m) current indices of each image's tokens
    rows = imgs.sample[:, None].expand_as(img_idx)
    top, kept_ok = top_per_row(full[rows, img_idx], img_ok, img_ok.sum(1) - prune)
    kept = img_idx.gather(1, top)  # (G, k_max) current indices, ascending
    rows = imgs.sample[:, None].expand_as(kept)
    if bool(merge.any()):
        parts = state.adapter.attn_parts(module, state.adapter.text_config(state.model_config))
        dev = parts.k_proj.weight.device
        hrows, hkept = rows.to(hs.device), kept.to(hs.device)
        xv = hs[hrows, hkept].to(dev)  # (G, k_max, d)
        n_img, k_max, d = xv.shape
        reuse = call.key_metric is not None and call.key_metric[0] == layer
        if reuse:
            metric = call.key_metric[1][rows.to(dev), kept.to(dev)]  # keys the scoring already computed
        else:
            with torch.no_grad():
                metric = parts.k_proj(parts.norm(xv)).view(n_img, k_max, parts.num_kv_heads, parts.head_dim).mean(2)
        res = bipartite_merge(xv, metric, call.size[rows, kept].to(dev), merge.to(dev), valid=kept_ok.to(dev))
        ok = kept_ok
        hs = hs.index_put((hrows[ok.to(hs.device)], hkept[ok.to(hs.device)]), res.x[ok.to(dev)].to(hs.device, hs.dtype))
        call.size = call.size.index_put((rows[ok], kept[ok]), res.size[ok.to(dev)].to(call.size.device))
        kept_ok = res.survive.to(dev0)
        call.merged = True
        if not reuse:
            call.score_flops += n_img * k_max * d * parts.num_kv_heads * parts.head_dim
    kept_mask = torch.zeros_like(call.is_vis).index_put((rows[kept_ok], kept[kept_ok]), torch.tensor(True, device=dev0))
    return _repack(call, hs, (~call.is_vis & ~call.filler) | kept_mask, layer)


def _repack(call: CallState, hs: torch.Tensor, keep: torch.Tensor, key: int) -> torch.Tensor:
    """Keep the tokens where ``keep`` (B, N); rows that keep fewer are left-padded with fillers."""
    sel, filler = left_pack(keep)  # (B, N')
    hs = _take(hs, sel)
    call.pos = call.pos.gather(1, sel).masked_fill(filler, -1)  # -1: a filler is no position
    call.idx = call.idx.gather(1, sel)  # fillers keep a real index, so gathers stay in range
    call.is_vis = call.is_vis.gather(1, sel) & ~filler
    call.group = call.group.gather(1, sel).masked_fill(filler, -1)
    call.valid = call.valid.gather(1, sel) & ~filler
    call.size = call.size.gather(1, sel).masked_fill(filler, 1.0)
    call.filler = filler
    call.has_fillers = bool(filler.any())
    call.kept[key] = (call.pos, call.is_vis)
    return hs


def _stage_kwargs(state: PumerState, call: CallState, kwargs: dict, dtype) -> dict:
    """Gather the full-length kwargs of the decoder loop for the tokens now present."""
    out = {}
    pe = kwargs.get("position_embeddings")
    if pe is not None:
        out["position_embeddings"] = tuple(_take(t, call.idx) for t in pe)
    pid = kwargs.get("position_ids")
    if pid is not None:
        out["position_ids"] = _take_positions(pid, call.idx)
    log_size = call.size.log() if (state.prop_attn and call.merged) else None
    out["attention_mask"] = _gather_mask(
        kwargs.get("attention_mask"), call.idx, call.valid, log_size, dtype, call.has_fillers, state.flash
    )
    return out


# ----------------------------------------------------------------------------- hooks


def layer_pre_hook(state: PumerState, layer: int):
    def hook(module, args, kwargs):
        call = state.call
        if call is None or not call.active:
            return None
        if call.mode == "extend":
            return _extend_layer(state, call, layer, args, kwargs)
        hs = args[0] if args else kwargs["hidden_states"]
        stage = call.stage_of_layer.get(layer)
        if stage is not None:
            t0 = _now(hs.device)
            kw = call.stage_kw or kwargs
            scores = call.pending_scores.pop(stage, None)
            if scores is None:
                scores = _score(state, call, module, layer, stage, hs, kw)
            hs = _reduce(state, call, module, layer, stage, hs, scores)
            call.key_metric = None
            call.stage_kw = _stage_kwargs(state, call, kwargs, hs.dtype)
            call.stage_pos.append(
                (call.idx, call.size.log() if (state.prop_attn and call.merged) else None,
                 call.filler if call.has_fillers else None)
            )
            call.select_seconds += _now(hs.device) - t0
        later = call.score_at.get(layer)
        if later is not None:  # FastV-style: score from this layer's input, drop later
            t0 = _now(hs.device)
            call.pending_scores[later] = _score(state, call, module, layer, later, hs, call.stage_kw or kwargs)
            call.select_seconds += _now(hs.device) - t0
        call.tokens_per_layer[layer] = call.valid.sum(1)
        call.vis_per_layer[layer] = (call.is_vis & call.valid).sum(1)
        if call.stage_kw is None:
            return None
        if args:
            args = (hs, *args[1:])
        else:
            kwargs["hidden_states"] = hs
        return args, {**kwargs, **call.stage_kw}

    return hook


def _extend_layer(state: PumerState, call: CallState, layer: int, args, kwargs):
    stage = call.record.layer_stage[layer]
    if stage < 0:
        return None
    if stage not in call.ext_mask:
        hs = args[0] if args else kwargs["hidden_states"]
        call.ext_mask[stage] = _extend_mask(state, call, stage, kwargs.get("attention_mask"), hs.dtype)
    return args, {**kwargs, "attention_mask": call.ext_mask[stage]}


def _extend_mask(state: PumerState, call: CallState, stage: int, mask: Any, dtype) -> Any:
    cols = call.ext_cols[stage]  # (B, K) LM positions held by this stage's caches + new
    log_size = call.ext_logsize[stage]
    fill = call.ext_fill[stage]  # (B, K) filler slots of left-repacked rows, or None
    bsz, k = cols.shape
    q = call.new_pos.shape[0]
    if mask is None:
        if log_size is None and fill is None:
            return None
        key_valid = call.mask2d.gather(1, cols) if call.mask2d is not None else torch.ones_like(cols, dtype=torch.bool)
        if fill is not None:
            key_valid = key_valid & ~fill
        if state.flash:
            return key_valid.long()
        allowed = (cols[:, None, :] <= call.new_pos[None, :, None]) & key_valid[:, None, :]  # (B, q, K)
        if log_size is None:
            return allowed[:, None]
        return _additive(allowed[:, None], dtype) + log_size[:, None, None, :].to(dtype)
    if mask.ndim == 2:
        m = mask.gather(1, cols.to(mask.device))
        return m * (~fill).to(m.device, m.dtype) if fill is not None else m
    m = mask.expand(bsz, *mask.shape[1:])
    m = m.gather(3, cols.to(m.device)[:, None, None, :].expand(bsz, m.shape[1], m.shape[2], k))
    if fill is not None:
        m = _mask_keys(m, ~fill)
    if log_size is not None:
        m = _additive(m, dtype) + log_size[:, None, None, :].to(m.device, dtype)
    return m


def _resolve_use_cache(state: PumerState, kwargs: dict) -> bool:
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(state.adapter.text_config(state.model_config), "use_cache", True)
    return bool(use_cache)


def _carries_visual_inputs(kwargs: dict) -> bool:
    """Whether a forward brings images or video (raw pixels, or features generate() encoded)."""
    return any(v is not None and k.startswith("pixel_values") for k, v in kwargs.items()) or bool(
        kwargs.get("mm_encoder_outputs")
    )


def inner_pre_hook(state: PumerState):
    def hook(module, args, kwargs):
        state.call = None
        if not state.enabled:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        if isinstance(cache, Cache) and getattr(cache, "is_compileable", False):
            raise ValueError(
                f"pumer_llava does not support {type(cache).__name__} (a static, fixed-length cache): reduced "
                "layers hold fewer tokens than the cache preallocates. Use the default DynamicCache "
                "(generate(..., cache_implementation=None))."
            )
        record = state.records.get(cache) if cache is not None else None
        visual_ids = state.visual_ids
        if input_ids is None:
            if record is not None:
                q = kwargs["inputs_embeds"].shape[1]
                state.call = _open_extend(state, record, cache, q, kwargs)
            elif kwargs.get("pixel_values") is not None:
                raise ValueError("pumer_llava finds the visual tokens from input_ids: pass input_ids, not inputs_embeds")
            return None
        if record is not None and input_ids.shape[1] == 1:  # a decode step: no device sync to look for images
            state.call = _open_extend(state, record, cache, 1, kwargs)
            return None
        vis = torch.isin(input_ids, visual_ids.to(input_ids.device))
        has_images = bool(vis.any())
        continuing = record is not None or (cache is not None and cache.get_seq_length() > 0)
        if continuing and has_images and not _carries_visual_inputs(kwargs):
            # a generated or typed token that happens to carry a placeholder id, with no image
            # behind it: the model only embeds it, and so do we
            has_images = False
        if record is not None:
            if has_images:
                raise NotImplementedError(
                    "new image tokens in a forward that continues a reduced cache: start a new conversation "
                    "(a fresh cache) for a new image"
                )
            state.call = _open_extend(state, record, cache, input_ids.shape[1], kwargs)
            return None
        if not has_images:
            return None
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                "image tokens arrive on a cache that pumer_llava did not build (made before apply_pumer or "
                "under disabled()): start from an empty cache"
            )
        call = _open_prefill(state, input_ids, vis, kwargs)
        state.call = call
        state.vision_consumed = True  # the next tower run encodes new images
        if call.mode == "prefill" and cache is None and _resolve_use_cache(state, kwargs):
            # own the cache object, so the next forward on it can be recognised
            cache = DynamicCache(config=state.adapter.text_config(state.model_config))
            kwargs["past_key_values"] = cache
        call.cache = cache
        return args, kwargs

    return hook


def _open_prefill(state: PumerState, input_ids: torch.Tensor, vis: torch.Tensor, kwargs: dict) -> CallState:
    bsz, n0 = input_ids.shape
    mask2d = kwargs.get("attention_mask")
    valid = mask2d.bool() if (mask2d is not None and mask2d.ndim == 2) else torch.ones_like(vis)
    valid = valid.to(vis.device)
    totals = vis.sum(1).tolist()  # samples may carry different numbers of visual tokens
    # every image (or video) is budgeted on its own: a prompt with several keeps each one's share
    images = split_images(input_ids.to(vis.device), vis, state.adapter.visual_tokens_per_image(state.model_config))
    counts, owners = images.count.tolist(), images.sample.tolist()
    cfg = state.config
    keeps = []
    for n, b in zip(counts, owners):
        if cfg.keep_tokens is not None:
            if n < cfg.keep_tokens:
                raise ValueError(
                    f"keep_tokens={cfg.keep_tokens} is larger than an image of sample {b} ({n} visual tokens): "
                    "keep_tokens is a budget per image"
                )
            keeps.append(cfg.keep_tokens)
        else:
            keeps.append(min(n, max(1, round(n * cfg.ratio))))
    last_vis = n0 - 1 - vis.flip(1).to(torch.int8).argmax(1)
    call = CallState(
        mode="prefill" if keeps != counts else "off",
        input_ids=input_ids,
        pos=torch.arange(n0, device=vis.device).expand(bsz, n0),
        idx=torch.arange(n0, device=vis.device).expand(bsz, n0),
        is_vis=vis,
        is_vis_full=vis,
        group=images.group,
        images=images,
        size=torch.ones(bsz, n0, device=vis.device),
        valid=valid,
        valid_full=valid,
        vis_start=vis.to(torch.int8).argmax(1),
        last_vis=last_vis,
        logits_to_keep=state.pending_logits_to_keep,
        n_totals=totals,
        filler=torch.zeros_like(vis),
    )
    if call.mode == "off":
        state.last_stats = _stats_unreduced(state, call)
        return call
    pre = 1 if state.recipe.pre_llm else 0
    n_stages = len(state.layers) + pre
    per_image = [plan_stages(n, k, n_stages, state.merge_share) for n, k in zip(counts, keeps)]
    if pre:  # removal before the LLM is pruning only: fold its merge share into pruning
        call.pre_plan = [StagePlan(n_in=p[0].n_in, prune=p[0].prune + p[0].merge, merge=0) for p in per_image]
    dev = vis.device
    call.plans = [
        (torch.tensor([p[s].prune for p in per_image], device=dev, dtype=torch.long),
         torch.tensor([p[s].merge for p in per_image], device=dev, dtype=torch.long))
        for s in range(pre, n_stages)
    ]
    call.stage_of_layer = {layer: s for s, layer in enumerate(state.layers)}
    if state.recipe.score_offset:
        call.score_at = {layer + state.recipe.score_offset: s for s, layer in enumerate(state.layers)}
    return call


def _open_extend(state: PumerState, record: Record, cache, q: int, kwargs: dict) -> CallState:
    if cache.get_seq_length() != record.n_lm:
        raise RuntimeError(
            f"the cache holds {cache.get_seq_length()} positions in its first layer but pumer_llava recorded "
            f"{record.n_lm}: it was changed outside generate (cropped or reordered), which a reduced cache "
            "cannot follow"
        )
    if record.pre_cols is not None and q > 1:
        raise NotImplementedError(
            "continuing a conversation on a cache reduced before the language model (VisPruner) is not "
            "supported: generate() slices the new turn by the cache length, which no longer counts the "
            "removed tokens. Re-run the whole conversation as a new prompt"
        )
    ref = record.stage_cols[0] if record.stage_cols else record.pre_cols
    dev = ref.device
    bsz = ref.shape[0]
    new_pos = torch.arange(record.n_lm, record.n_lm + q, device=dev)
    new_full = torch.arange(record.n_full, record.n_full + q, device=dev)
    mask2d = kwargs.get("attention_mask")
    call = CallState(mode="extend", record=record, new_pos=new_pos, new_full=new_full)
    if mask2d is None and record.pre_fill is not None:
        mask2d = torch.ones(bsz, record.n_full + q, dtype=torch.bool, device=dev)  # fillers still need masking
    if mask2d is not None and mask2d.ndim == 2:
        mask2d = mask2d.bool().to(dev)
        if record.pre_cols is not None:
            mask2d = mask2d.gather(1, torch.cat([record.pre_cols, new_full.expand(bsz, q)], dim=1))
            if record.pre_fill is not None:
                mask2d[:, : record.pre_fill.shape[1]] &= ~record.pre_fill
        call.mask2d = mask2d
    for s, cols in enumerate(record.stage_cols):
        call.ext_cols[s] = torch.cat([cols, new_pos.expand(bsz, q)], dim=1)
        fill = record.stage_fill[s]
        call.ext_fill[s] = None if fill is None else torch.cat([fill, fill.new_zeros(bsz, q)], dim=1)
        ls = record.stage_logsize[s]
        call.ext_logsize[s] = None if ls is None else torch.cat([ls, ls.new_zeros(bsz, q)], dim=1)
    return call


def inner_post_hook(state: PumerState):
    def hook(module, args, kwargs, output):
        call = state.call
        if call is None or not call.active:
            return None
        call.active = False
        if call.mode == "extend":
            rec = call.record
            rec.stage_cols = [call.ext_cols[s] for s in range(len(rec.stage_cols))]
            rec.stage_logsize = [call.ext_logsize[s] for s in range(len(rec.stage_logsize))]
            rec.stage_fill = [call.ext_fill[s] for s in range(len(rec.stage_fill))]
            q = call.new_pos.shape[0]
            rec.n_full += q
            rec.n_lm += q
            if rec.pre_cols is not None:
                rec.pre_cols = torch.cat([rec.pre_cols, call.new_full.expand(rec.pre_cols.shape[0], q)], dim=1)
                if rec.pre_fill is not None:
                    rec.pre_fill = torch.cat([rec.pre_fill, rec.pre_fill.new_zeros(rec.pre_fill.shape[0], q)], dim=1)
            return None
        if call.mode != "prefill":
            return None
        n_layers = len(state.adapter.layers(state.model))
        layer_stage, s = [], -1
        for layer in range(n_layers):
            if layer in call.stage_of_layer:
                s = call.stage_of_layer[layer]
            layer_stage.append(s)
        if call.cache is not None:
            state.records[call.cache] = Record(
                layer_stage=layer_stage,
                stage_cols=[p for p, _, _ in call.stage_pos],
                stage_logsize=[ls for _, ls, _ in call.stage_pos],
                stage_fill=[f for _, _, f in call.stage_pos],
                n_full=call.input_ids.shape[1],
                n_lm=call.pre_cols.shape[1] if call.pre_cols is not None else call.input_ids.shape[1],
                pre_cols=call.pre_cols,
                pre_fill=call.pre_fill,
            )
        state.last_stats = _stats_reduced(state, call)
        return _scatter_back(call, output)

    return hook


def _scatter_back(call: CallState, output):
    """Put the reduced last hidden state back at its full-length positions (zeros elsewhere)."""
    h = output.last_hidden_state  # (B, N', d)
    bsz, n0 = call.input_ids.shape
    k = call.logits_to_keep
    if isinstance(k, int) and 0 < k <= h.shape[1]:
        tail = torch.arange(n0 - k, n0, device=call.pos.device)
        if bool((call.pos[:, -k:] == tail).all()):
            return None  # the caller only reads the last k positions, which are all kept
    pos = call.pos.to(h.device)
    pos = torch.where(pos < 0, torch.full_like(pos, n0), pos)  # fillers land in a trash column
    full = h.new_zeros(bsz, n0 + 1, h.shape[-1])
    full.scatter_(1, pos[..., None].expand(-1, -1, h.shape[-1]), h)
    output.last_hidden_state = full[:, :n0]
    return output


def vision_pre_hook(state: PumerState):
    """VisPruner's importance of every token the tower hands the projector, per image view.

    - Towers with a [CLS] the LLM does not see (CLIP, "default" strategy): the attention the
      [CLS] query gives each patch, head mean (the paper's rule).
    - Towers without a [CLS] (SigLIP), and CLIP under the "full" strategy (its [CLS] is one
      more visual token): the mean attention each token *receives*, over heads and over all
      queries. No single query summarises the image there; a token that the whole image
      attends to is one the tower itself treats as salient, and the rule needs no training.

    Recomputed from the selected layer's own norm and q/k projections, so the tower may run
    under sdpa (no attention weights) and nothing depends on ``output_attentions``.
    """

    def hook(module, args, kwargs):
        if not state.enabled:
            return None
        parts = state.adapter.vision_parts(state.model)
        h = args[0] if args else kwargs["hidden_states"]  # (n_img, N, dv)
        with torch.no_grad():
            x = parts.norm(h)
            n_img, n, _ = x.shape
            k = parts.k_proj(x).view(n_img, n, parts.num_heads, parts.head_dim).transpose(1, 2)  # (n_img, H, N, hd)
            if parts.has_cls:
                q = parts.q_proj(x[:, :1]).view(n_img, 1, parts.num_heads, parts.head_dim).transpose(1, 2)
                allowed = torch.ones(n_img, 1, n, dtype=torch.bool, device=x.device)
                imp = query_row_attention(q, k, allowed, parts.scaling).mean(1)[:, 0]  # (n_img, N)
            else:
                q = parts.q_proj(x).view(n_img, n, parts.num_heads, parts.head_dim).transpose(1, 2)
                imp = mean_received_attention(q, k, parts.scaling)  # (n_img, N)
        imp = imp[:, 1:] if parts.drop_first else imp  # the tokens the projector reads
        # kept until the tower runs after a prefill: generate(use_cache=False) encodes the image
        # once and re-runs prefill on the same features at every step
        if state.vision_consumed:
            state.vision_calls.clear()
            state.vision_consumed = False
        state.vision_calls.append([imp, None])
        state.importance = imp
        return None

    return hook


def projector_hook(state: PumerState):
    """Keep the projector's output next to the importance of the same tower call."""

    def hook(module, args, output):
        if state.enabled and state.vision_calls and state.vision_calls[-1][1] is None:
            state.vision_calls[-1][1] = output.detach()
        return None

    return hook


def _token_importance(state: PumerState, call: CallState, emb: torch.Tensor) -> torch.Tensor:
    """(B, N0) importance of every visual token of the LM input (NaN elsewhere).

    Each visual token is matched, bit for bit, to the projected patch it is a copy of
    (``reduce.match``), so any packing that only moves rows maps correctly: LLaVA's one view
    per image, anyres crops unpadded, several images, inputs expanded for beam search.
    Newline tokens get -inf: they are kept for diversity only, never for importance.
    """
    calls = [c for c in state.vision_calls if c[1] is not None]
    if not calls:
        raise RuntimeError(
            f"{state.recipe.name} found no vision-tower attention for this prefill: the vision tower did not run "
            "under this model's hooks (were image features passed in precomputed?)"
        )
    d = emb.shape[-1]
    y = torch.cat([proj.reshape(-1, proj.shape[-1]).to(emb.device) for _, proj in calls])  # (K, d)
    imp = torch.cat([i.reshape(-1).to(emb.device) for i, _ in calls])  # (K,)
    if y.shape[0] != imp.shape[0] or y.shape[-1] != d:
        raise RuntimeError(f"the projector returned {tuple(y.shape)} rows for {imp.shape[0]} tower tokens")
    vis = call.is_vis.to(emb.device)
    x = emb[vis]  # (M, d) visual tokens, row-major over the batch
    j = match_rows(x, y.to(x.dtype))  # (M,) which projected patch each is, -1: none
    vals = imp[j.clamp_min(0)]
    loose = j < 0
    if bool(loose.any()):
        newline = state.adapter.newline(state.model) if state.adapter.newline is not None else None
        is_nl = (x[loose] == newline.to(x)).all(-1) if newline is not None else torch.zeros_like(loose[loose])
        if not bool(is_nl.all()):
            raise NotImplementedError(
                f"{state.recipe.name}: {int((~is_nl).sum())} visual tokens are not copies of a projected vision-tower "
                "patch, so the tower's attention does not map onto them: this model interpolated them (LLaVA-OneVision "
                "downscales large anyres grids past vision_aspect_ratio and pools video frames 2x2). Use pumer, fastv or "
                "random for such inputs"
            )
        vals = vals.masked_fill(loose, float("-inf"))
    out = torch.full(vis.shape, float("nan"), device=emb.device)
    out[vis] = vals
    return out


def lm_pre_hook(state: PumerState):
    """Before the first decoder layer: VisPruner's reduction, and mapping decode masks onto it."""

    def hook(module, args, kwargs):
        call = state.call
        if call is None or not call.active:
            return None
        if call.mode == "extend":
            if call.record.pre_cols is None:
                return None
            kwargs["attention_mask"] = call.mask2d
            if kwargs.get("position_ids") is None:
                kwargs["position_ids"] = call.new_full[None]
            return args, kwargs
        if call.mode != "prefill" or call.pre_plan is None:
            return None
        emb = kwargs["inputs_embeds"]  # (B, N0, d)
        t0 = _now(emb.device)
        importance = _token_importance(state, call, emb)  # (B, N0)
        kept_mask = torch.zeros_like(call.is_vis)
        for g, plan in enumerate(call.pre_plan):  # every image on its own budget, any count
            b = int(call.images.sample[g])
            vis_b = (call.group[b] == g).nonzero()[:, 0]  # (T_g,) positions of this image's tokens
            n_keep = plan.n_out
            if n_keep >= vis_b.shape[0]:
                kept_mask[b, vis_b] = True
                continue
            n_imp = round(n_keep * state.important_ratio)
            imp = importance[b, vis_b.to(emb.device)].topk(n_imp).indices.to(vis_b.device)  # local indices
            rest = torch.ones_like(vis_b, dtype=torch.bool).scatter(0, imp, False).nonzero()[:, 0]  # ascending
            feats = emb[b, vis_b[rest].to(emb.device)][None]  # (1, T_g - n_imp, d)
            diverse = rest[remove_duplicates(feats, n_keep - n_imp)[0].to(rest.device)]
            kept_mask[b, vis_b[torch.cat([imp, diverse])]] = True
            call.score_flops += feats.shape[1] ** 2 * feats.shape[2]
        emb = _repack(call, emb, ~call.is_vis | kept_mask, -1)
        # LM position -> full position; a filler slot (a sample that kept fewer) points at a dropped
        # token, so gathers stay in range, and is masked out below
        call.pre_cols = call.idx
        call.pre_fill = call.filler if call.has_fillers else None
        call.lm_counts = (call.valid.sum(1), (call.is_vis & call.valid).sum(1))
        kwargs["inputs_embeds"] = emb
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            mask = mask.gather(1, call.pre_cols.to(mask.device))
        elif mask is None:
            # Kept tokens keep their original positions, so the ids now have gaps; with no mask and no
            # cache, transformers would read the gaps as packed sequences and mask across them.
            mask = torch.ones(call.pos.shape, dtype=torch.long, device=emb.device)
        if mask.ndim == 2 and call.pre_fill is not None:
            mask = mask * (~call.pre_fill).to(mask.device, mask.dtype)
        kwargs["attention_mask"] = mask
        pid = kwargs.get("position_ids")
        kwargs["position_ids"] = call.pre_cols.to(emb.device) if pid is None else _take_positions(pid, call.pre_cols)
        call.idx = torch.arange(call.pos.shape[1], device=call.pos.device).expand_as(call.pos)
        call.select_seconds += _now(emb.device) - t0
        return args, kwargs

    return hook


def top_pre_hook(state: PumerState):
    def hook(module, args, kwargs):
        state.pending_logits_to_keep = kwargs.get("logits_to_keep", 0)
        return None

    return hook


def top_post_hook(state: PumerState):
    def hook(module, args, kwargs, output):
        call = state.call
        labels = kwargs.get("labels")
        if labels is None or call is None or call.mode != "prefill" or output.logits is None:
            return None
        if output.logits.shape[1] != labels.shape[1]:
            return None
        # Logits at removed positions are not the model's prediction: never score them.
        n0 = labels.shape[1]
        pos = call.pos.to(labels.device)
        present = torch.zeros(labels.shape[0], n0 + 1, dtype=torch.bool, device=labels.device)
        present.scatter_(1, torch.where(pos < 0, torch.full_like(pos, n0), pos), True)
        present = present[:, :n0]
        masked = labels.clone()
        masked[:, 1:] = masked[:, 1:].masked_fill(~present[:, :-1], -100)
        output.loss = module.loss_function(
            logits=output.logits, labels=masked, vocab_size=state.adapter.text_config(state.model_config).vocab_size
        )
        return output

    return hook


# ----------------------------------------------------------------------------- stats


def _dims(state: PumerState) -> tuple[int, int]:
    tc = state.adapter.text_config(state.model_config)
    return tc.hidden_size, tc.intermediate_size


def _stats_unreduced(state: PumerState, call: CallState) -> ReductionStats:
    n_layers = len(state.adapter.layers(state.model))
    valid_n = call.valid.sum(1).tolist()
    d, m = _dims(state)
    flops = sum(decoder_flops([n] * n_layers, d, m) for n in valid_n)
    return ReductionStats(
        visual_tokens_total=list(call.n_totals),
        visual_tokens_per_layer=[list(call.n_totals) for _ in range(n_layers)],
        tokens_per_layer=[list(valid_n) for _ in range(n_layers)],
        kept_positions={},
        kept_patches={},
        flops=flops,
        flops_unreduced=flops,
        select_seconds=0.0,
        reducing_layers=[],
    )


def _stats_reduced(state: PumerState, call: CallState) -> ReductionStats:
    # layers before the first hooked one see the unreduced sequence
    n_layers = len(state.adapter.layers(state.model))
    full_tokens, full_vis = call.lm_counts or (call.valid_full.sum(1), (call.is_vis_full & call.valid_full).sum(1))
    tokens = torch.stack([call.tokens_per_layer.get(i, full_tokens) for i in range(n_layers)]).tolist()  # (L, B)
    vis = torch.stack([call.vis_per_layer.get(i, full_vis) for i in range(n_layers)]).tolist()
    d, m = _dims(state)
    bsz = call.input_ids.shape[0]
    valid_n = call.valid_full.sum(1).tolist()
    flops = sum(decoder_flops([tokens[layer][b] for layer in range(len(tokens))], d, m) for b in range(bsz))
    flops_full = sum(decoder_flops([valid_n[b]] * len(tokens), d, m) for b in range(bsz))
    kept, patches = {}, {}
    for key, (pos, is_vis) in call.kept.items():
        rows = [pos[b][is_vis[b]] for b in range(bsz)]
        kept[key] = [r.tolist() for r in rows]
        patches[key] = [(r - call.vis_start[b]).tolist() for b, r in enumerate(rows)]
    return ReductionStats(
        visual_tokens_total=list(call.n_totals),
        visual_tokens_per_layer=vis,
        tokens_per_layer=tokens,
        kept_positions=kept,
        kept_patches=patches,
        flops=flops + call.score_flops,
        flops_unreduced=flops_full,
        select_seconds=call.select_seconds,
        reducing_layers=list(state.layers),
    )
