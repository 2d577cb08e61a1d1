"""DART (Wen et al., arXiv 2502.11494, EMNLP 2025): inside the language model, keep a few pivot
tokens and the image tokens least like them: duplicates go, whatever their importance.

The paper, on LLaVA-1.5-7B at layer K = 2: the keys of layer K-1 (post-RoPE, all heads) pick
pivots by their L1 norm, 4 image tokens (kept) and 4 tokens of the text after the image
(references only); every pivot in turn takes its ``per`` image tokens of lowest cosine to it,
measured on the final-normed input of layer K, from a pool that shrinks (the image's tokens
minus its pivots); layers K.. see the kept tokens at their original positions. Here the same
per image (``reduce.duplication``), batched over the batch's images: ``score`` (at layer K-1's
input) returns the key L1 norms of every slot, ``select`` (at layer K's input) chooses. Where
we differ:

- exact budget: the authors' ``per = budget // 8`` keeps the budget PLUS the 4 image pivots
  (68 / 132 / 196 for "64 / 128 / 192"); we split ``out - pivots`` over the pivots as evenly
  as possible (the first take one more), so an image keeps exactly its budget; a budget
  below the image pivots keeps the best of them.
- pivot order: the authors walk a Python set of positions (an order neither by score nor by
  position); we walk the image pivots by descending key norm, then the text pivots likewise,
  which is deterministic.
- text pivots come from the prompt's text after each image (the authors: everything after a
  fixed image span, one image per prompt); an image with fewer text tokens after it uses what
  exists, none with none.
- several images and batches: each image has its own pivots and pool; the authors assert
  batch size 1 and one image at a fixed offset.
- keys: the L1 norm over the layer's key heads; the authors' repeated heads (grouped-query
  attention) only multiply it by the group size, which changes no ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hooks.layout import TEXT, cached
from ..reduce.duplication import duplication_flops, duplication_keep, duplication_plan
from ..reduce.scoring import apply_rope
from .base import Choice, Method, MethodOptions, single_layer


@dataclass(frozen=True)
class DartOptions(MethodOptions):
    """pivot_image_tokens: image pivots per image (kept), at least 1; pivot_text_tokens: text
    pivots (the text after the image with the largest key norms; references only), 0 or more."""

    pivot_image_tokens: int = 4
    pivot_text_tokens: int = 4

    def validate(self) -> None:
        if self.pivot_image_tokens < 1:
            raise ValueError(f"pivot_image_tokens must be at least 1, got {self.pivot_image_tokens}")
        if self.pivot_text_tokens < 0:
            raise ValueError(f"pivot_text_tokens must be 0 or more, got {self.pivot_text_tokens}")


def key_norms(ctx) -> torch.Tensor:
    """(B, N) L1 norm of every slot's post-RoPE keys over all key heads of the layer."""
    hs = ctx.hidden
    k = ctx.projected_keys()  # (B, N, Hkv, hd)
    dev, bsz = k.device, hs.shape[0]
    with torch.no_grad():
        cos, sin = ctx.position_embeddings
        cos, sin = cos.to(dev).expand(bsz, -1, -1), sin.to(dev).expand(bsz, -1, -1)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, Hkv, N, hd)
    return k.float().abs().sum((1, 3)).to(hs.device)


def _text_after(ctx) -> list[list[int]]:
    """Per image, the flat slots of its sample's prompt text to the right of it (host lists,
    remembered per prompt structure)."""
    n_prompt, slots, w = ctx.input_ids.shape[1], ctx.slots, ctx.slots.width

    def build():
        return [[im.sample * w + s for s, (c, i) in enumerate(zip(slots.code[im.sample], slots.src[im.sample]))
                 if c == TEXT and im.end < i < n_prompt] for im in ctx.layout.images]

    return cached(("dart:text", ctx.layout.key, tuple(ctx.counts), n_prompt), build)


def select(ctx) -> Choice:
    o = ctx.options
    text = _text_after(ctx)
    r = max(1, max((len(t) for t in text), default=0))
    plan_host = duplication_plan(ctx.counts, ctx.out, [len(t) for t in text], o.pivot_image_tokens,
                                 o.pivot_text_tokens)
    name = f"dart:{o.pivot_image_tokens}:{o.pivot_text_tokens}:{ctx.input_ids.shape[1]}"
    plan = ctx.host_tensor(name, lambda: plan_host)
    txt = ctx.host_tensor(name + ":text", lambda: [t + [t[0] if t else 0] * (r - len(t)) + [1] * len(t)
                                                   + [0] * (r - len(t)) for t in text])
    slots, valid = txt[:, :r], txt[:, r:].bool()
    hs = ctx.hidden
    d = hs.shape[-1]
    flat_scores = ctx.scores.reshape(-1).to(hs.device)
    slots = slots.to(hs.device)
    keep = duplication_keep(
        img_norm=ctx.per_image(ctx.scores.to(hs.device)),
        img_feat=ctx.final_norm(ctx.per_image(hs)),
        txt_norm=flat_scores[slots],
        txt_feat=ctx.final_norm(hs.reshape(-1, d)[slots]),
        txt_valid=valid,
        plan=plan,
        plan_host=plan_host,
        pivot_image=o.pivot_image_tokens,
        pad=ctx.image_pad,
    )
    g, m = keep.shape
    ctx.add_flops(duplication_flops(g, m, o.pivot_image_tokens + o.pivot_text_tokens, d))
    local = torch.where(keep, torch.arange(m, device=keep.device), m - 1).sort(1).values[:, : ctx.out_max]
    return Choice(keep=local.to(ctx.flat_slots.device))


METHOD = Method(
    name="dart",
    description="at layer K (2): pivots by key L1 norm at layer K-1, then the image tokens least similar to "
    "them, duplicates dropped (DART)",
    options=DartOptions,
    score=key_norms,
    select=select,
    default_layers=single_layer(2),
    score_offset=-1,
    min_layer=1,
    paper="Wen et al., Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters "
    "More (DART), arXiv 2502.11494, EMNLP 2025",
)
