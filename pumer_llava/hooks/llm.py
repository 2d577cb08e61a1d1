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
from ..reduce.ragged import left_pack, ragged_nonzero, top_per_row
from ..reduce.scoring import apply_rope, mean_over_rows, query_row_attention
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
    after = text & (call.pos > call.last_vis[:, None])
    # a prompt that ends with its image has no question after it: use all its text
    rows_mask = torch.where(after.any(1, keepdim=True), after, text)
    count = rows_mask.sum(1)
    r = max(int(count.max()), 1)
    order = torch.argsort((~rows_mask).to(torch.int8), dim=1, stable=True)[:, :r]
    return order, torch.arange(r, device=order.device)[None, :] < count[:, None]


def _attention_scores(state: PumerState, call: CallState, module, hs: torch.Tensor, kw: dict, kind: str, layer: int = -1):
    """(B, N) mean attention the query rows give every current token (layer's own q/k/RoPE)."""
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
    return mean_over_rows(probs, row_valid).to(hs.device)


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
        keep = (vis_ok.sum(1) - call.plans[stage][0]).tolist()
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


def _reduce(state: PumerState, call: CallState, module, layer: int, stage: int, hs: torch.Tensor, scores):
    prune, merge = call.plans[stage]  # (B,) each: per-sample counts of this stage
    bsz, n, d = hs.shape
    vis_idx, vis_ok = ragged_nonzero(call.is_vis)  # (B, n_max) current indices of the visual tokens
    top, kept_ok = top_per_row(scores, vis_ok.to(scores.device), (vis_ok.sum(1) - prune).to(scores.device))
    kept = vis_idx.gather(1, top.to(vis_idx.device))  # (B, k_max) current indices, ascending
    kept_ok = kept_ok.to(kept.device)
    if bool(merge.any()):
        parts = state.adapter.attn_parts(module, state.adapter.text_config(state.model_config))
        dev = parts.k_proj.weight.device
        xv = _take(hs, kept).to(dev)  # (B, k_max, d)
        k_max = kept.shape[1]
        reuse = call.key_metric is not None and call.key_metric[0] == layer
        if reuse:
            metric = _take(call.key_metric[1], kept.to(dev))  # keys the scoring already computed
        else:
            with torch.no_grad():
                metric = parts.k_proj(parts.norm(xv)).view(bsz, k_max, parts.num_kv_heads, parts.head_dim).mean(2)
        res = bipartite_merge(xv, metric, call.size.gather(1, kept).to(dev), merge.to(dev), valid=kept_ok.to(dev))
        hs = _scatter_rows(hs, kept.to(hs.device), kept_ok.to(hs.device), res.x.to(hs.device))
        call.size = _scatter_rows(call.size, kept, kept_ok, res.size.to(call.size.device))
        kept_ok = res.survive.to(kept.device)
        call.merged = True
        if not reuse:
            call.score_flops += bsz * k_max * d * parts.num_kv_heads * parts.head_dim
    kept_mask = _scatter_rows(torch.zeros_like(call.is_vis), kept, kept_ok, torch.ones_like(kept_ok))
    return _repack(call, hs, (~call.is_vis & ~call.filler) | kept_mask, layer)


def _repack(call: CallState, hs: torch.Tensor, keep: torch.Tensor, key: int) -> torch.Tensor:
    """Keep the tokens where ``keep`` (B, N); rows that keep fewer are left-padded with fillers."""
    sel, filler = left_pack(keep)  # (B, N')
    hs = _take(hs, sel)
    call.pos = call.pos.gather(1, sel).masked_fill(filler, -1)  # -1: a filler is no position
    call.idx = call.idx.gather(1, sel)  # fillers keep a real index, so gathers stay in range
    call.is_vis = call.is_vis.gather(1, sel) & ~filler
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
    cfg = state.config
    keeps = []
    for b, total in enumerate(totals):
        if cfg.keep_tokens is not None:
            if 0 < total < cfg.keep_tokens:
                raise ValueError(
                    f"keep_tokens={cfg.keep_tokens} is larger than the visual span of sample {b} ({total} tokens)"
                )
            keeps.append(min(cfg.keep_tokens, total))
        else:
            keeps.append(min(total, max(1, round(total * cfg.ratio))))
    if state.recipe.pre_llm and len(set(totals)) > 1:
        raise NotImplementedError(
            f"{state.recipe.name} needs the same number of visual tokens in every sample of a batch, got {totals}"
        )
    last_vis = n0 - 1 - vis.flip(1).to(torch.int8).argmax(1)
    call = CallState(
        mode="prefill" if keeps != totals else "off",
        input_ids=input_ids,
        pos=torch.arange(n0, device=vis.device).expand(bsz, n0),
        idx=torch.arange(n0, device=vis.device).expand(bsz, n0),
        is_vis=vis,
        is_vis_full=vis,
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
    per_sample = [
        plan_stages(t, k, n_stages, state.merge_share) if t else [StagePlan(0, 0, 0)] * n_stages
        for t, k in zip(totals, keeps)
    ]
    if pre:  # removal before the LLM is pruning only: fold its merge share into pruning
        call.pre_plan = [StagePlan(n_in=p[0].n_in, prune=p[0].prune + p[0].merge, merge=0) for p in per_sample]
    dev = vis.device
    call.plans = [
        (torch.tensor([p[s].prune for p in per_sample], device=dev), torch.tensor([p[s].merge for p in per_sample], device=dev))
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
    if mask2d is not None and mask2d.ndim == 2:
        mask2d = mask2d.bool().to(dev)
        if record.pre_cols is not None:
            mask2d = mask2d.gather(1, torch.cat([record.pre_cols, new_full.expand(bsz, q)], dim=1))
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
    """VisPruner's importance: the [CLS] query's attention over the patches, head mean.

    Recomputed from the selected layer's own norm and q/k projections, so the tower may run
    under sdpa (no attention weights) and nothing depends on ``output_attentions``.
    """

    def hook(module, args, kwargs):
        if not state.enabled:
            return None
        parts = state.adapter.vision_parts(state.model)
        h = args[0] if args else kwargs["hidden_states"]  # (n_img, 1 + P, dv)
        with torch.no_grad():
            x = parts.norm(h)
            n_img, n, _ = x.shape
            q = parts.q_proj(x[:, :1]).view(n_img, 1, parts.num_heads, parts.head_dim).transpose(1, 2)
            k = parts.k_proj(x).view(n_img, n, parts.num_heads, parts.head_dim).transpose(1, 2)
            allowed = torch.ones(n_img, 1, n, dtype=torch.bool, device=x.device)
            probs = query_row_attention(q, k, allowed, parts.scaling)  # (n_img, H, 1, 1 + P)
        # kept until the tower runs again: generate(use_cache=False) encodes the image once and
        # re-runs prefill on the same features at every step
        state.importance = probs.mean(1)[:, 0, 1:]  # (n_img, P): drop [CLS] itself
        return None

    return hook


def _importance_per_sample(state: PumerState, call: CallState) -> torch.Tensor:
    if state.importance is None:
        raise RuntimeError(
            "VisPruner found no [CLS] attention for this prefill: the vision tower did not run under this "
            "model's hooks (were image features passed in precomputed?)"
        )
    imp = state.importance  # (n_img, P)
    bsz, total = call.input_ids.shape[0], call.n_totals[0]
    if imp.numel() == bsz * total:
        return imp.reshape(bsz, total)
    if (bsz * total) % imp.numel() == 0 and total % imp.shape[1] == 0:  # inputs expanded after encoding (beams)
        per = imp.reshape(-1, total)
        return per.repeat_interleave(bsz // per.shape[0], dim=0)
    raise RuntimeError(f"[CLS] attention for {tuple(imp.shape)} patches does not match {bsz} x {total} visual tokens")


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
        importance = _importance_per_sample(state, call).to(emb.device)  # (B, T), T equal in every sample
        vis_idx, _ = ragged_nonzero(call.is_vis)  # (B, T)
        n_keep = call.pre_plan[0].n_out
        n_imp = round(n_keep * state.important_ratio)
        imp = importance.topk(n_imp, dim=1).indices  # local visual indices
        rest_mask = torch.ones_like(importance, dtype=torch.bool).scatter(1, imp, False)
        rest = rest_mask.nonzero()[:, 1].view(emb.shape[0], -1)  # (B, T - n_imp), ascending
        feats = _take(emb, vis_idx.gather(1, rest.to(vis_idx.device)))
        diverse = rest.gather(1, remove_duplicates(feats, n_keep - n_imp).to(rest.device))
        kept_local = torch.cat([imp, diverse], dim=1).to(vis_idx.device)
        kept_mask = torch.zeros_like(call.is_vis).scatter(1, vis_idx.gather(1, kept_local), True)
        emb = _repack(call, emb, ~call.is_vis | kept_mask, -1)
        call.pre_cols = call.pos
        call.lm_counts = (call.valid.sum(1), (call.is_vis & call.valid).sum(1))
        call.idx = torch.arange(call.pos.shape[1], device=call.pos.device).expand_as(call.pos)
        kwargs["inputs_embeds"] = emb
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            kwargs["attention_mask"] = mask.gather(1, call.pos.to(mask.device))
        elif mask is None:
            # Kept tokens keep their original positions, so the ids now have gaps; with no mask and no
            # cache, transformers would read the gaps as packed sequences and mask across them.
            kwargs["attention_mask"] = torch.ones(call.pos.shape, dtype=torch.long, device=emb.device)
        pid = kwargs.get("position_ids")
        if pid is None:
            kwargs["position_ids"] = call.pos.to(emb.device)
        else:
            kwargs["position_ids"] = _take_positions(pid, call.pos)
        call.select_seconds += _now(emb.device) - t0
        call.score_flops += emb.shape[0] * feats.shape[1] ** 2 * feats.shape[2]
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
