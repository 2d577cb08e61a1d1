"""Attention a stage's query rows give the current slots: how the runtime calls ``reduce.scoring``.

- text rows: the attention the text after each image gives its tokens, from the layer's own
  norm, q/k projections and RoPE, for those query rows only. An image with no text after it
  (the prompt ends with it, or asks its question first) is scored by the prompt's text before
  it instead, with the causal mask lifted for that image's keys: the question's queries
  against the image's keys, so the question still decides.
- the last row: the same from the last prompt token.

The result is (B, N) over the current slots (only visual slots are read): higher = keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reduce.scoring import apply_rope_rolled, rope_sin, scores_from_rows
from .tokens import Tokens


def take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather dim 1 of t (b0, N, ...) with idx (B, N'), broadcasting a batch of 1."""
    idx = idx.to(t.device)
    if t.shape[0] == 1 and t.ndim > 2:  # rows of one sample: index_select (a gather over the feature dim is slower)
        return t[0].index_select(0, idx.reshape(-1)).view(*idx.shape, *t.shape[2:])
    if t.shape[0] != idx.shape[0]:
        t = t.expand(idx.shape[0], *t.shape[1:])
    if t.ndim == 2:
        return t.gather(1, idx)
    return t.gather(1, idx.view(*idx.shape, *([1] * (t.ndim - 2))).expand(-1, -1, *t.shape[2:]))


def layer_keys(parts, hs: torch.Tensor, flat: torch.Tensor | None = None):
    """The layer's own norm and k projection (before RoPE) of the slots ``flat`` of hs
    (B, N, d) (flat (B*N) indices, any shape; None: every slot): (normed rows (M, d), keys
    (*shape, Hkv, hd), FLOPs of the projection), on the projection's device. Every reader of a
    layer's keys (scoring, merging, methods that ask for them) projects through here."""
    dev = parts.k_proj.weight.device
    bsz, n, d = hs.shape
    rows = hs.to(dev).reshape(bsz * n, d)
    shape = (bsz, n) if flat is None else tuple(flat.shape)
    if flat is not None:
        rows = rows.index_select(0, flat.to(dev).reshape(-1))
    with torch.no_grad():
        x = parts.norm(rows)  # the projections take 2-D rows: no folding of batch dims
        k = parts.k_proj(x).view(*shape, parts.num_kv_heads, parts.head_dim)
    return x, k, rows.shape[0] * d * parts.num_kv_heads * parts.head_dim


@dataclass(frozen=True)
class QueryRows:
    """The prompt's query rows at a stage and what each key needs, built on the host
    (:meth:`.prefill.Prefill._query_rows`), so scoring waits for nothing.

    flat: (B*R,) the rows' slots in the flattened (B*N) hidden states; row_pos (B, R): their
    input positions (-2: padding rows); key_pos (B, N): a key a row at p sees when
    ``key_pos <= p`` (a visual key stands at its image's first position, or -1 when no row
    follows its image: then the whole prompt reads it; padding and fillers past every row);
    key_end (B, N): rows after this position score the key (-1: every row); count (B, N):
    heads times those rows. row_pos None: the rows are read from the device (a row that is a
    visual token, whose position is data). dynamic (B, N) bool: slots of text runs that
    merged, whose positions (as keys and as rows) are read from the device; None: none.
    """

    flat: torch.Tensor
    row_pos: torch.Tensor | None
    key_pos: torch.Tensor
    key_end: torch.Tensor
    count: torch.Tensor
    dynamic: torch.Tensor | None = None
    masks: tuple[torch.Tensor, ...] | None = None  # ``reduce.scoring.row_masks``, when positions are known
    slot: torch.Tensor | None = None  # (B*R,) the rows' slots within their row


def attention_scores(state, tok: Tokens, rows: QueryRows, module, hs: torch.Tensor, kw: dict, per_row: bool = False,
                     rope: torch.Tensor | None = None, keys: torch.Tensor | None = None):
    """(B, N) attention the query rows give every current slot, and the head-averaged keys
    (B, N, hd) the layer's own k projection gives (merging measures similarity on them).
    rope: (3, b0, N, hd) cos, sin and ``rope_sin(sin)`` of the current slots when the caller has
    them stacked, else they come from ``kw``'s position embeddings. keys: (B, N, Hkv, hd) the
    layer's k projection of every slot when the layer already computed it (then only the query
    rows are normed and projected). The keys come back as (every kv head before RoPE
    (B, N, Hkv, hd), and after it (B, Hkv, N, hd))."""
    parts = state.adapter.attn_parts(module, state.text_config)
    w = parts.q_proj.weight
    if w.device.type == "meta":
        raise RuntimeError(
            "the reducing layer's weights are offloaded (meta device) when its pre-hook runs; "
            "pumer_llava cannot score tokens on offloaded layers: keep reducing layers on a device"
        )
    dev = w.device
    bsz, n, d = hs.shape
    flat = rows.flat.to(dev)
    r = flat.shape[0] // bsz
    if keys is None:
        x, k, k_flops = layer_keys(parts, hs)
        q_in = x.index_select(0, flat)
    else:  # the norm is per token: the query rows alone
        q_in = parts.norm(hs.to(dev).reshape(bsz * n, d).index_select(0, flat))
        k, k_flops = keys.to(dev), 0
    q = parts.q_proj(q_in).view(bsz, r, parts.num_heads, parts.head_dim).transpose(1, 2)  # (B, H, R, hd)
    pre = k  # (B, N, Hkv, hd) before RoPE: merging averages the heads of the slots it reads
    if rope is None:
        cos, sin = kw["position_embeddings"]
        rope = torch.stack((cos, sin, rope_sin(sin)))
    rope = rope.to(dev)  # (3, b0, N, hd): cos, sin, rolled sin; b0 = 1 or B
    hd = rope.shape[-1]
    if rope.shape[1] == 1 and rows.slot is not None:  # one row of positions for the batch: no copy to B
        q_cs = rope.view(3, n, hd).index_select(1, rows.slot.to(dev))
    else:
        q_cs = rope.expand(3, bsz, n, hd).reshape(3, bsz * n, hd).index_select(1, flat)
    q_cos, _, q_rsin = q_cs.view(3, bsz, 1, r, hd).unbind(0)  # the rows' cos, sin, rolled sin
    q = apply_rope_rolled(q, q_cos, q_rsin)
    k_cos, _, k_rsin = rope.unsqueeze(2).unbind(0)  # (b0, 1, N, hd): broadcast over the kv heads
    k = apply_rope_rolled(k.transpose(1, 2), k_cos, k_rsin)
    row_pos, key_pos = rows.row_pos, rows.key_pos
    if row_pos is None:
        row_pos = tok.pos.reshape(-1).index_select(0, flat.to(tok.pos.device)).view(bsz, r)
    if rows.dynamic is not None:  # merged text runs: positions are data
        pos = tok.pos.to(key_pos.device)
        key_pos = torch.where(rows.dynamic, pos, key_pos)
        at = flat.to(pos.device)
        row_pos = torch.where(rows.dynamic.reshape(-1)[at].view(bsz, r), pos.reshape(-1)[at].view(bsz, r),
                              row_pos.to(pos.device))
    key_bias = tok.log_size(state.prop_attn)
    scores = scores_from_rows(q, k, parts.scaling, key_pos.to(dev), row_pos.to(dev), rows.key_end.to(dev),
                              rows.count.to(dev), None if key_bias is None else key_bias.to(dev), per_row=per_row,
                              masks=None if rows.masks is None else tuple(m.to(dev) for m in rows.masks))
    hq = parts.num_heads * parts.head_dim
    flops = bsz * (r * d * hq + parts.num_heads * r * n * parts.head_dim) + k_flops
    keys = (pre, k)  # every kv head's keys before RoPE (B, N, Hkv, hd) and after it (B, Hkv, N, hd)
    if per_row:
        probs, counts = scores
        return probs.to(hs.device), counts.to(hs.device), keys, flops
    return scores.to(hs.device), keys, flops
