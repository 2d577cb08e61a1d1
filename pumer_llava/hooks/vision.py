"""VisPruner's inputs and choice: importance from the vision tower, diversity among the rest.

Two hooks collect, per tower call, the importance of every token the projector reads and
the projector's output; at the first decoder layer :func:`vispruner_keep` maps that
importance onto the visual tokens of the language model and picks what each image keeps.
"""

from __future__ import annotations

import torch

from ..reduce.diversity import remove_duplicates
from ..reduce.match import match_rows
from ..reduce.scoring import mean_received_attention, query_row_attention
from .layout import to_device
from .tokens import Tokens


def tower_importance(parts, h: torch.Tensor) -> torch.Tensor:
    """(n_img, P) importance of every token the projector reads, from the selected layer's input.

    - Towers with a [CLS] the LLM does not see (CLIP, "default" strategy): the attention the
      [CLS] query gives each patch, head mean (the paper's rule).
    - Towers without a [CLS] (SigLIP), and CLIP under the "full" strategy (its [CLS] is one
      more visual token): the mean attention each token *receives*, over heads and over all
      queries. No single query summarises the image there; a token that the whole image
      attends to is one the tower itself treats as salient, and the rule needs no training.

    Recomputed from the layer's own norm and q/k projections, so the tower may run under
    sdpa (no attention weights) and nothing depends on ``output_attentions``.
    """
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
    return imp[:, 1:] if parts.drop_first else imp


def token_importance(state, tok: Tokens, emb: torch.Tensor, layout=None) -> torch.Tensor:
    """(B, N) importance of every visual token of the LM input (NaN elsewhere).

    When every image has the model's fixed number of tokens and the tower produced exactly
    as many patches as the prompt has visual tokens (LLaVA-1.5: the projector's rows are
    scattered into the image tokens in reading order), the map is that order, known on the
    host. Otherwise each visual token is matched, bit for bit, to the projected patch it is a
    copy of (``reduce.match``), so any packing that only moves rows maps correctly: LLaVA's
    one view per image, anyres crops unpadded, several images, inputs expanded for beam
    search. Newline tokens get -inf: they are kept for diversity only, never for importance.
    """
    calls = [c for c in state.vision_calls if c[1] is not None]
    if not calls:
        raise RuntimeError(
            f"{state.recipe.name} found no vision-tower attention for this prefill: the vision tower did not run "
            "under this model's hooks (were image features passed in precomputed?)"
        )
    d = emb.shape[-1]
    imp = torch.cat([i.reshape(-1).to(emb.device) for i, _ in calls])  # (K,)
    n_rows = sum(proj.reshape(-1, proj.shape[-1]).shape[0] for _, proj in calls)
    if n_rows != imp.shape[0] or any(proj.shape[-1] != d for _, proj in calls):
        raise RuntimeError(f"the projector returned {n_rows} rows of width {calls[0][1].shape[-1]} for "
                           f"{imp.shape[0]} tower tokens")
    bsz, n = tok.code.shape
    fixed = state.adapter.visual_tokens_per_image(state.model_config)
    if layout is not None and fixed and all(c == fixed for c in layout.counts) and sum(layout.counts) == n_rows:
        flat = [b * n + s for b, row in enumerate(layout.code) for s, c in enumerate(row) if c >= 0]
        (idx,) = to_device(emb.device, flat)
        out = torch.full((bsz * n,), float("nan"), device=emb.device)
        return out.index_put((idx,), imp.float()).view(bsz, n)
    y = torch.cat([proj.reshape(-1, proj.shape[-1]).to(emb.device) for _, proj in calls])  # (K, d)
    vis = tok.is_vis.to(emb.device)
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


def vispruner_keep(state, tok: Tokens, layout, slots, keep: list[int], emb: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(B, N) bool: the visual tokens VisPruner keeps, every image on its own budget ``keep[g]``.

    ``K * important_ratio`` by importance, the rest the most diverse of what remains
    (``reduce.diversity``). ``slots`` (:class:`.layout.StageSlots`) says where each image's
    tokens are, so no step waits for the device. Returns the mask and the FLOPs the
    similarity cost."""
    importance = token_importance(state, tok, emb, layout)  # (B, N)
    if len(set(slots.counts)) == 1 and len(set(keep)) == 1 and keep[0] < slots.counts[0]:
        return _keep_batched(state, layout, slots, keep[0], importance, emb)
    kept = torch.zeros(tok.code.shape, dtype=torch.bool, device=emb.device)
    flops = 0.0
    for g, n_keep in enumerate(keep):
        b, s0, t = layout.images[g].sample, slots.start[g], slots.counts[g]
        if n_keep >= t:
            kept[b, s0 : s0 + t] = True
            continue
        n_imp = round(n_keep * state.important_ratio)
        imp = importance[b, s0 : s0 + t].topk(n_imp).indices  # local indices
        ar = torch.arange(t, device=emb.device)
        free = torch.ones(t, dtype=torch.bool, device=emb.device).scatter(0, imp, False)
        rest = torch.where(free, ar, t).sort().values[: t - n_imp]  # ascending
        feats = emb[b, s0 + rest][None]  # (1, T_g - n_imp, d)
        diverse = rest[remove_duplicates(feats, n_keep - n_imp)[0]]
        kept[b, s0 + torch.cat([imp, diverse])] = True
        flops += (t - n_imp) ** 2 * emb.shape[-1]
    return kept, flops


def _keep_batched(state, layout, slots, n_keep: int, importance: torch.Tensor, emb: torch.Tensor):
    """:func:`vispruner_keep` when every image has the same count and budget (LLaVA-1.5): the
    images are the rows of one (G, T) problem."""
    bsz, n, d = emb.shape
    g, t = len(layout.images), slots.counts[0]
    n_imp = round(n_keep * state.important_ratio)
    flat = [im.sample * n + slots.start[i] + j for i, im in enumerate(layout.images) for j in range(t)]
    (idx,) = to_device(emb.device, flat)
    idx = idx.view(g, t)
    imp = importance.reshape(-1)[idx].topk(n_imp, dim=1).indices  # (G, n_imp) local indices
    free = torch.ones(g, t, dtype=torch.bool, device=emb.device).scatter(1, imp, False)
    ar = torch.arange(t, device=emb.device).expand(g, t)
    rest = ar.masked_fill(~free, t - 1).sort(1).values[:, : t - n_imp]  # (G, T - n_imp) ascending
    feats = emb.reshape(-1, d)[idx.gather(1, rest)]  # (G, T - n_imp, d)
    diverse = rest.gather(1, remove_duplicates(feats, n_keep - n_imp))
    chosen = idx.gather(1, torch.cat([imp, diverse], 1))  # (G, n_keep) flat slots
    kept = torch.zeros(bsz * n, dtype=torch.bool, device=emb.device)
    kept[chosen.reshape(-1)] = True
    return kept.view(bsz, n), float(g * (t - n_imp) ** 2 * d)
