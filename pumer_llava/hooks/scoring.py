"""Scores of the visual tokens at a reducing stage: how the runtime calls ``reduce.scoring``.

- ``text_attention`` (PuMer): the attention the text after each image gives its tokens,
  from the layer's own norm, q/k projections and RoPE, for those query rows only. An image
  with no text after it (the prompt ends with it, or asks its question first) is scored by
  the prompt's text before it instead, with the causal mask lifted for that image's keys:
  the question's queries against the image's keys, so the question still decides.
- ``last_token_attention`` (FastV): the same from the last prompt token.
- ``random``: seeded by each sample's own ids, so a prompt gets the same choice in any batch.
- a callable: a custom scorer over a :class:`ScoreContext`.

Every scorer returns (B, n) scores over the visual tokens in ``ragged_nonzero`` order:
higher = keep.
"""

from __future__ import annotations

import torch

from ..methods import ScoreContext
from ..reduce.images import Images
from ..reduce.ragged import ragged_nonzero
from ..reduce.scoring import apply_rope, mean_over_rows, mean_over_rows_after, query_row_attention
from .tokens import Tokens


def take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather dim 1 of t (b0, N, ...) with idx (B, N'), broadcasting a batch of 1."""
    idx = idx.to(t.device)
    t = t.expand(idx.shape[0], *t.shape[1:])
    if t.ndim == 2:
        return t.gather(1, idx)
    return t.gather(1, idx.view(*idx.shape, *([1] * (t.ndim - 2))).expand(-1, -1, *t.shape[2:]))


def _text_rows(tok: Tokens, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) slots of every text token of the prompt, and their validity."""
    idx, ok = ragged_nonzero(prompt & ~tok.is_vis)
    if idx.shape[1] == 0:  # a prompt of visual tokens only: read them from the last one
        idx, ok = _last_row(tok, prompt)
    return idx, ok


def _last_row(tok: Tokens, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = tok.pos.shape[1]
    last = (prompt.long() * torch.arange(n, device=tok.pos.device)).argmax(1)  # (B,)
    return last[:, None], torch.ones_like(last[:, None], dtype=torch.bool)


def attention_scores(state, tok: Tokens, images: Images, module, hs: torch.Tensor, kw: dict, kind: str,
                     n_prompt: int | None = None):
    """(B, N) attention the query rows give every current slot, and the head-averaged keys
    (B, N, hd) the layer's own k projection gives (merging measures similarity on them).

    Query rows come from the prompt, the first ``n_prompt`` input positions (default: all):
    tokens after it (candidates a speculative decoder checks) never steer the choice."""
    parts = state.adapter.attn_parts(module, state.text_config)
    w = parts.q_proj.weight
    if w.device.type == "meta":
        raise RuntimeError(
            "the reducing layer's weights are offloaded (meta device) when its pre-hook runs; "
            "pumer_llava cannot score tokens on offloaded layers: keep reducing layers on a device"
        )
    dev = w.device
    x = parts.norm(hs.to(dev))  # (B, N, d)
    bsz, n, d = x.shape
    prompt = tok.valid if n_prompt is None else tok.valid & (tok.pos < n_prompt)
    rows, row_ok = _last_row(tok, prompt) if kind == "last_token_attention" else _text_rows(tok, prompt)
    rows, row_ok = rows.to(dev), row_ok.to(dev)
    r = rows.shape[1]
    xq = x.gather(1, rows[..., None].expand(-1, -1, d))  # (B, R, d)
    q = parts.q_proj(xq).view(bsz, r, parts.num_heads, parts.head_dim).transpose(1, 2)  # (B, H, R, hd)
    k = parts.k_proj(x).view(bsz, n, parts.num_kv_heads, parts.head_dim).transpose(1, 2)  # (B, Hkv, N, hd)
    metric = k.mean(1)  # (B, N, hd) pre-RoPE keys, head mean
    cos, sin = kw["position_embeddings"]
    cos, sin = cos.to(dev).expand(bsz, -1, -1), sin.to(dev).expand(bsz, -1, -1)
    q = apply_rope(q, take_rows(cos, rows), take_rows(sin, rows))
    k = apply_rope(k, cos, sin)
    pos = tok.pos.to(dev)
    row_pos = pos.gather(1, rows)  # (B, R)
    allowed = (pos[:, None, :] <= row_pos[:, :, None]) & tok.valid.to(dev)[:, None, :] & row_ok[:, :, None]
    key_end = None
    if kind == "text_attention":
        group = tok.group.to(dev)
        # each image is read by the text after it; an image with none after it by all the text
        last_text = torch.where(row_ok, row_pos, torch.full_like(row_pos, -1)).amax(1)  # (B,)
        follows = last_text[images.sample.to(dev)] > images.end.to(dev)  # (G,)
        vis = group >= 0
        own_end = images.end.to(dev)[group.clamp_min(0)]
        lone = vis & ~follows[group.clamp_min(0)]  # (B, N) keys of an image nothing follows
        allowed = allowed | (lone[:, None, :] & row_ok[:, :, None])
        key_end = torch.where(vis & ~lone, own_end, torch.full_like(group, -1))  # (B, N)
    key_bias = tok.log_size(state.prop_attn)
    probs = query_row_attention(q, k, allowed, parts.scaling, None if key_bias is None else key_bias.to(dev))
    hq, hkv, hd = parts.num_heads * parts.head_dim, parts.num_kv_heads * parts.head_dim, parts.head_dim
    flops = bsz * (r * d * hq + n * d * hkv + parts.num_heads * r * n * hd)
    if key_end is None:
        scores = mean_over_rows(probs, row_ok)
    else:
        scores = mean_over_rows_after(probs, row_pos, row_ok, key_end)
    return scores.to(hs.device), metric, flops


def random_scores(seed: int, input_ids: torch.Tensor, valid: torch.Tensor, n: int, device) -> torch.Tensor:
    """(B, n) seeded by each sample's own (unpadded) ids: the same prompt gets the same choice in
    any batch, so beams and padded batches agree with single samples."""
    out = []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][valid[b]].tolist()
        g = torch.Generator().manual_seed(hash((seed, len(ids), tuple(ids))) & (2**62 - 1))
        out.append(torch.rand(n, generator=g))
    return torch.stack(out).to(device)


def custom_scores(scorer, tok: Tokens, hs, layer, stage, input_ids, vis_start, keep) -> torch.Tensor:
    vis_idx, vis_ok = ragged_nonzero(tok.is_vis)
    positions = tok.pos.gather(1, vis_idx)
    ctx = ScoreContext(
        layer=layer,
        stage=stage,
        hidden=hs.gather(1, vis_idx.to(hs.device)[..., None].expand(-1, -1, hs.shape[-1])),
        positions=positions,
        patch_index=positions - vis_start[:, None],
        input_ids=input_ids,
        keep=max(keep),
        valid=vis_ok,
        keep_per_sample=keep,
    )
    scores = scorer(ctx)
    if tuple(scores.shape) != tuple(vis_idx.shape):
        raise ValueError(f"custom scorer returned shape {tuple(scores.shape)}, expected {tuple(vis_idx.shape)}")
    return scores.to(vis_idx.device).float()
