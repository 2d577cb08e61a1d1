"""Importance scores from the attention a few query rows give every key.

The layer's own attention weights are never materialised (``sdpa`` and flash attention
return none): the hooks recompute only the query rows that matter (the question's tokens
for PuMer, the last prompt token for FastV, the [CLS] for VisPruner) with the layer's own
norm, q/k projections and RoPE, and this module turns them into probabilities.
"""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split layout used by Llama, Qwen2 and Mistral.

    x: (B, H, T, hd); cos, sin: (B, T, hd).
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


_SIGNS: dict = {}


def rope_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated: then ``rotate_half(x) * sin`` is
    ``x.roll(hd // 2, -1) * rope_sin(sin)`` (one roll instead of a split, a negation and a cat;
    the same numbers, since negating is exact)."""
    hd = sin.shape[-1]
    key = (hd, sin.device, sin.dtype)
    sign = _SIGNS.get(key)
    if sign is None:
        sign = _SIGNS[key] = torch.cat([-torch.ones(hd // 2), torch.ones(hd - hd // 2)]).to(sin.device, sin.dtype)
    return sin * sign


def apply_rope_rolled(x: torch.Tensor, cos: torch.Tensor, rsin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` with ``rsin = rope_sin(sin)``; cos, rsin broadcast against x (B, H, T, hd).

    The rolled term comes first: ``roll`` returns a contiguous tensor, so the sum is laid out
    (B, H, T, hd) even when ``x`` is a transposed view, and the attention reads it without a
    copy; ``addcmul`` adds ``x * cos`` to it in the same kernel (three kernels in all)."""
    return torch.addcmul(x.roll(x.shape[-1] // 2, -1) * rsin, x, cos)


def query_row_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities of R query rows over N keys, in float32.

    q: (B, H, R, hd) queries (RoPE applied); k: (B, Hkv, N, hd) keys (RoPE applied), with
    H a multiple of Hkv (grouped-query attention: head h reads kv head h // (H / Hkv), as
    transformers' ``repeat_kv`` does); allowed: (B, R, N) bool, which keys each row may see
    (causality and padding); key_bias: (B, N) additive logit bias, e.g. log token sizes for
    proportional attention. Rows with no allowed key come out as zeros.
    Returns (B, H, R, N).
    """
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1) if n_rep > 1 else k  # (B, H, N, hd)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling  # (B, H, R, N)
    if key_bias is not None:
        logits = logits + key_bias.float()[:, None, None, :]
    neg = torch.finfo(logits.dtype).min
    logits = logits.masked_fill(~allowed[:, None], neg)
    probs = logits.softmax(dim=-1)
    return probs * allowed.any(-1)[:, None, :, None]  # zero rows that see nothing


def mean_over_rows(probs: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
    """Average attention over heads and valid query rows.

    probs: (B, H, R, N); row_valid: (B, R) bool. Returns (B, N).
    """
    per_row = probs.mean(dim=1)  # (B, R, N)
    w = row_valid.to(per_row.dtype)
    return (per_row * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)


def mean_received_attention(q: torch.Tensor, k: torch.Tensor, scaling: float, budget: int = 1 << 24) -> torch.Tensor:
    """Mean attention each token receives, over heads and over every query, in float32.

    VisPruner's importance for towers without a [CLS] query (SigLIP; CLIP when LLaVA feeds
    the [CLS] to the LLM too): a patch that every patch attends to is one the tower itself
    treats as salient. Full (unmasked) attention, as in a ViT.

    q, k: (n, H, N, hd) the layer's queries and keys. Returns (n, N); each row sums to 1.
    Queries are taken in chunks so that no more than ``budget`` probabilities exist at once.
    """
    n, h, t, _ = q.shape
    chunk = max(1, budget // max(1, n * h * t))
    kf = k.float().transpose(-1, -2)  # (n, H, hd, N)
    total = torch.zeros(n, t, dtype=torch.float32, device=q.device)
    for s in range(0, t, chunk):
        logits = torch.matmul(q[:, :, s : s + chunk].float(), kf) * scaling  # (n, H, c, N)
        total += logits.softmax(dim=-1).sum(dim=(1, 2))
    return total / (h * t)


def mean_over_rows_after(
    probs: torch.Tensor, row_pos: torch.Tensor, row_valid: torch.Tensor, key_end: torch.Tensor
) -> torch.Tensor:
    """Average attention over heads and over the query rows that come after each key's image.

    PuMer's text-informed score of a visual token is the attention it gets from the text
    that follows its image; with several images in a prompt, each image has its own
    followers. probs: (B, H, R, N); row_pos: (B, R) positions of the query rows; row_valid:
    (B, R) bool; key_end: (B, N) position of the last token of each key's image. A key with
    no valid row after its image (a prompt that ends with it) averages over all valid rows.
    Returns (B, N).
    """
    per_row = probs.mean(dim=1)  # (B, R, N)
    after = row_valid[:, :, None] & (row_pos[:, :, None] > key_end[:, None, :])  # (B, R, N)
    w = torch.where(after.any(1, keepdim=True), after, row_valid[:, :, None].expand_as(after)).to(per_row.dtype)
    return (per_row * w).sum(1) / w.sum(1).clamp_min(1.0)


def row_masks(key_pos: torch.Tensor, row_pos: torch.Tensor, key_end: torch.Tensor, count: torch.Tensor,
              heads: int, kv_heads: int):
    """What :func:`scores_from_rows` needs from positions alone, computed once for a plan whose
    positions are known before the forward.

    Returns ``bias`` (B * Hkv, G*R, N) float32: 0 where a row sees a key, the most negative
    float where it does not (rows of the ``G = heads / kv_heads`` query heads that share a kv
    head are stacked, as the scores read them); ``weight`` (B, H*R, N): what each head's row
    contributes to a key's score (``1 / count`` where the row counts for the key, else 0);
    ``counted`` (B, R, N) bool: whether a row counts for a key.
    """
    bsz, r = row_pos.shape
    n = key_pos.shape[1]
    groups = heads // kv_heads
    hidden = key_pos[:, None, :] > row_pos[:, :, None]  # (B, R, N)
    bias = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    bias = bias.masked_fill(hidden, torch.finfo(torch.float32).min)
    bias = bias[:, None].expand(bsz, kv_heads * groups, r, n).reshape(bsz * kv_heads, groups * r, n)
    counted = row_pos[:, :, None] > key_end[:, None, :]  # (B, R, N)
    weight = (counted / count[:, None, :].to(torch.float32))[:, None].expand(bsz, heads, r, n).reshape(bsz, heads * r, n)
    return bias, weight, counted


def scores_from_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    key_pos: torch.Tensor,
    row_pos: torch.Tensor,
    key_end: torch.Tensor,
    count: torch.Tensor,
    key_bias: torch.Tensor | None = None,
    per_row: bool = False,
    masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, N) mean attention the query rows that follow each key's image give it, lean.

    The same quantity as :func:`query_row_attention` then :func:`mean_over_rows_after`, with
    every mask folded into positions known before the forward (so it costs a handful of
    kernels and no host sync):

    q: (B, H, R, hd) queries; k: (B, Hkv, N, hd) keys (RoPE applied; H a multiple of Hkv,
    read in groups, no repeat). key_pos (B, N): a key is visible to a row at ``row_pos``
    (B, R) when ``key_pos <= row_pos`` (invalid rows at -2 see nothing, invalid keys sit
    past every row). key_end (B, N): a row counts for a key when ``row_pos > key_end``
    (-1: every valid row). count (B, N): heads times the rows that count (at least 1).
    key_bias: (B, N) additive logit bias (log token sizes). per_row: return instead each row's
    head-averaged probabilities (B, R, N) and whether it counts for each key (B, R, N) bool.
    masks: :func:`row_masks` of these positions, when already computed.
    """
    bsz, h, r, hd = q.shape
    hkv, n = k.shape[1], k.shape[2]
    if masks is None:
        masks = row_masks(key_pos, row_pos, key_end, count, h, hkv)
    bias, weight, counted = masks
    if key_bias is not None:  # (B, N): every row of every head gets it
        bias = (bias.view(bsz, hkv, -1, n) + key_bias.float()[:, None, None, :]).view(bsz * hkv, -1, n)
    qg = q.reshape(bsz * hkv, (h // hkv) * r, hd)  # heads sharing a kv head read it together
    kt = k.reshape(bsz * hkv, n, hd).transpose(1, 2)
    if qg.dtype != torch.float32:
        qg, kt = qg.float(), kt.float()
    probs = torch.baddbmm(bias, qg, kt, alpha=scaling).softmax(dim=-1)  # (B*Hkv, G*R, N): mask + q k^T
    if per_row:
        return probs.view(bsz, h, r, n).mean(1), counted & (row_pos >= 0)[:, :, None]
    return (probs.view(bsz, h * r, n) * weight).sum(1)
