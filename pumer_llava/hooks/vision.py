"""The vision tower's side of a pre-LLM method: what the tower hooks collect, and how it maps
onto the language model's visual tokens.

Per tower call, :class:`.runtime.VisionLayerHook` records the importance of every token the
projector reads and the layer's head-averaged keys; :class:`.runtime.ProjectorHook` adds the
projector's output (and its input, for methods that rebuild tokens from tower features). At
the first decoder layer, :func:`tower_map` says which tower token every visual token is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reduce.match import match_rows
from ..reduce.scoring import mean_received_attention, query_row_attention
from .layout import cached, to_device
from .tokens import Tokens


@dataclass
class TowerCall:
    """One run of the vision tower: (V, P) importance, (V, P, hd) keys, and the projector's
    (V, P, d) output and (V, P, dv) input (None until it runs / when not needed)."""

    importance: torch.Tensor
    keys: torch.Tensor
    projected: torch.Tensor | None = None
    features: torch.Tensor | None = None


def tower_importance(parts, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_img, P) importance of every token the projector reads, from the selected layer's
    input, and (n_img, P, hd) the layer's keys averaged over heads.

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
        k_tok = parts.k_proj(x).view(n_img, n, parts.num_heads, parts.head_dim)
        k = k_tok.transpose(1, 2)  # (n_img, H, N, hd)
        if parts.has_cls:
            q = parts.q_proj(x[:, :1]).view(n_img, 1, parts.num_heads, parts.head_dim).transpose(1, 2)
            allowed = torch.ones(n_img, 1, n, dtype=torch.bool, device=x.device)
            imp = query_row_attention(q, k, allowed, parts.scaling).mean(1)[:, 0]  # (n_img, N)
        else:
            q = parts.q_proj(x).view(n_img, n, parts.num_heads, parts.head_dim).transpose(1, 2)
            imp = mean_received_attention(q, k, parts.scaling)  # (n_img, N)
        keys = k_tok.mean(2)  # (n_img, N, hd), laid out token by token
    if parts.drop_first:
        return imp[:, 1:], keys[:, 1:]
    return imp, keys


class TowerMap:
    """Which tower token each visual token of the language model input is.

    slots: (M,) flat (B*N) slots of the mapped visual tokens; rows: (M,) their rows in the
    concatenated tower tokens; loose: (M,) bool, visual tokens that are no tower patch
    (newlines), or None."""

    def __init__(self, calls: list[TowerCall], shape, slots, rows, loose):
        self.calls, self.shape = calls, shape
        self.slots, self.rows, self.loose = slots, rows, loose

    def values(self, which: int) -> torch.Tensor:
        """(K, c) one recorded quantity of every tower token: 0 importance, 1 keys, 2 features."""
        parts = []
        for c in self.calls:
            v = (c.importance, c.keys, c.features)[which]
            if v is None:
                raise RuntimeError("the projector's input was not recorded for this prefill")
            parts.append(v.reshape(-1, 1) if which == 0 else v.reshape(-1, v.shape[-1]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def image_rows(self, img_flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(G, m) the tower token of every image's visual token (``img_flat``: their flat
        slots), and (G, m) bool which are loose (None: none is)."""
        bsz, n = self.shape
        dev = self.slots.device
        img_flat = img_flat.to(dev)
        rows = self.rows.new_zeros(bsz * n).index_put((self.slots,), self.rows)[img_flat]
        if self.loose is None:
            return rows, None
        loose = self.loose.new_zeros(bsz * n).index_put((self.slots,), self.loose)[img_flat]
        return rows, loose

    def per_image(self, values: torch.Tensor, rows, loose_fill: float) -> torch.Tensor:
        """(G, m, c) ``values`` (K, c) at every image's visual tokens, ``loose_fill`` at loose
        ones; ``rows``: :meth:`image_rows`."""
        idx, loose = rows
        vals = values.to(idx.device)[idx].float()
        return vals if loose is None else vals.masked_fill(loose[..., None], loose_fill)

    def place(self, values: torch.Tensor, loose_fill: float) -> torch.Tensor:
        """(B, N, c) ``values`` (K, c) at the visual slots; NaN elsewhere, ``loose_fill`` at loose ones."""
        bsz, n = self.shape
        dev = self.slots.device
        vals = values.to(dev)[self.rows].float()
        if self.loose is not None:
            vals = vals.masked_fill(self.loose[:, None], loose_fill)
        out = torch.full((bsz * n, values.shape[-1]), float("nan"), device=dev)
        return out.index_put((self.slots,), vals).view(bsz, n, -1)


def tower_map(state, tok: Tokens, emb: torch.Tensor, layout) -> TowerMap:
    """The map for this prefill's tower calls.

    When every image has the model's fixed number of tokens and the tower produced exactly
    as many patches as the prompt has visual tokens (LLaVA-1.5: the projector's rows are
    scattered into the image tokens in reading order), the map is that order, known on the
    host. Otherwise each visual token is matched, bit for bit, to the projected patch it is a
    copy of (``reduce.match``), so any packing that only moves rows maps correctly: LLaVA's
    one view per image, anyres crops unpadded, several images, inputs expanded for beam
    search. Newline tokens are loose: kept for diversity only, never for importance.
    """
    calls = [c for c in state.vision_calls if c.projected is not None]
    name = state.method.name
    if not calls:
        raise RuntimeError(
            f"{name} found no vision-tower outputs for this prefill: the vision tower did not run "
            "under this model's hooks (were image features passed in precomputed?)"
        )
    d = emb.shape[-1]
    n_rows = sum(c.projected.reshape(-1, c.projected.shape[-1]).shape[0] for c in calls)
    n_imp = sum(c.importance.numel() for c in calls)
    if n_rows != n_imp or any(c.projected.shape[-1] != d for c in calls):
        raise RuntimeError(f"the projector returned {n_rows} rows of width {calls[0].projected.shape[-1]} for "
                           f"{n_imp} tower tokens")
    bsz, n = tok.code.shape
    fixed = state.adapter.visual_tokens_per_image(state.model_config)
    if fixed and all(c == fixed for c in layout.counts) and sum(layout.counts) == n_rows:
        def build():  # once per prompt structure, as the runtime's plans
            flat = [b * n + s for b, row in enumerate(layout.code) for s, c in enumerate(row) if c >= 0]
            return to_device(emb.device, flat, list(range(n_rows)))

        slots, rows = cached(("tower rows", layout.key, n_rows, emb.device), build)
        return TowerMap(calls, (bsz, n), slots, rows, None)
    y = torch.cat([c.projected.reshape(-1, d).to(emb.device) for c in calls])  # (K, d)
    vis = tok.is_vis.to(emb.device)
    x = emb[vis]  # (M, d) visual tokens, row-major over the batch
    j = match_rows(x, y.to(x.dtype))  # (M,) which projected patch each is, -1: none
    loose = j < 0
    if bool(loose.any()):
        newline = state.adapter.newline(state.model) if state.adapter.newline is not None else None
        is_nl = (x[loose] == newline.to(x)).all(-1) if newline is not None else torch.zeros_like(loose[loose])
        if not bool(is_nl.all()):
            from ..methods import METHODS

            in_llm = ", ".join(n for n, m in sorted(METHODS.items()) if m.before_llm is None)
            raise NotImplementedError(
                f"{name}: {int((~is_nl).sum())} visual tokens are not copies of a projected vision-tower "
                "patch, so the tower's outputs do not map onto them: this model interpolated them (LLaVA-OneVision "
                f"downscales large anyres grids past vision_aspect_ratio and pools video frames 2x2). Use a method "
                f"that acts inside the language model ({in_llm}) for such inputs"
            )
    else:
        loose = None
    slots = vis.reshape(-1).nonzero()[:, 0]
    return TowerMap(calls, (bsz, n), slots, j.clamp_min(0), loose)
