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


def token_importance(state, tok: Tokens, emb: torch.Tensor) -> torch.Tensor:
    """(B, N) importance of every visual token of the LM input (NaN elsewhere).

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


def vispruner_keep(state, tok: Tokens, images, keep: list[int], emb: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(B, N) bool: the visual tokens VisPruner keeps, every image on its own budget ``keep[g]``.

    ``K * important_ratio`` by importance, the rest the most diverse of what remains
    (``reduce.diversity``). Returns the mask and the FLOPs the similarity cost."""
    importance = token_importance(state, tok, emb)  # (B, N)
    kept = torch.zeros_like(tok.is_vis)
    flops = 0.0
    for g, n_keep in enumerate(keep):
        b = int(images.sample[g])
        vis_b = (tok.group[b] == g).nonzero()[:, 0]  # (T_g,) slots of this image's tokens
        if n_keep >= vis_b.shape[0]:
            kept[b, vis_b] = True
            continue
        n_imp = round(n_keep * state.important_ratio)
        imp = importance[b, vis_b.to(emb.device)].topk(n_imp).indices.to(vis_b.device)  # local indices
        rest = torch.ones_like(vis_b, dtype=torch.bool).scatter(0, imp, False).nonzero()[:, 0]  # ascending
        feats = emb[b, vis_b[rest].to(emb.device)][None]  # (1, T_g - n_imp, d)
        diverse = rest[remove_duplicates(feats, n_keep - n_imp)[0].to(rest.device)]
        kept[b, vis_b[torch.cat([imp, diverse])]] = True
        flops += feats.shape[1] ** 2 * feats.shape[2]
    return kept, flops
