"""DART's core (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", arXiv 2502.11494): keep a few pivot tokens and the image tokens
least like them, so that what stays covers the image instead of repeating itself.

Pivots are the tokens whose keys have the largest L1 norm: ``P_i`` of the image's own tokens
(kept) and ``P_t`` of the text after it (references only). Each pivot in turn, image pivots by
descending key norm then text pivots by descending key norm, takes the image tokens least
cosine-similar to it from a pool that shrinks (the image's tokens minus its pivots), so no
token is taken twice. :func:`duplication_plan` decides on the host how many each pivot takes,
so that every image lands exactly on its budget.

Rows are images (G of them, padded to ``m`` tokens, ``pad`` (G, m) True at padding), float32
math, one batched loop over the pivots.
"""

from __future__ import annotations

import torch


def duplication_plan(counts: list[int], out: list[int], n_text: list[int], pivot_image: int,
                     pivot_text: int) -> list[list[int]]:
    """Per image, ``[image pivots kept, picks of pivot 0, ..., picks of pivot P-1]``.

    P = pivot_image + pivot_text pivot slots (image pivots first). Image g has
    ``min(pivot_image, counts[g])`` image pivots and ``min(pivot_text, n_text[g])`` text
    pivots; when ``out[g]`` is at most its image pivots it keeps the ``out[g]`` first of them
    and picks nothing, otherwise it keeps them all and splits ``out[g] - pivots`` over its
    pivots as evenly as possible (the first take one more). Absent pivots pick 0.
    """
    rows = []
    for c, o, t in zip(counts, out, n_text):
        n_img, n_txt = min(pivot_image, c), min(pivot_text, t)
        if o <= n_img:
            rows.append([o] + [0] * (pivot_image + pivot_text))
            continue
        n_piv, picks = n_img + n_txt, o - n_img
        share = [picks // n_piv + (i < picks % n_piv) for i in range(n_piv)]
        row = share[:n_img] + [0] * (pivot_image - n_img) + share[n_img:] + [0] * (pivot_text - n_txt)
        rows.append([n_img] + row)
    return rows


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def duplication_keep(
    img_norm: torch.Tensor,
    img_feat: torch.Tensor,
    txt_norm: torch.Tensor,
    txt_feat: torch.Tensor,
    txt_valid: torch.Tensor,
    plan: torch.Tensor,
    plan_host: list[list[int]],
    pivot_image: int,
    pad: torch.Tensor | None = None,
) -> torch.Tensor:
    """(G, m) bool: the image tokens DART keeps.

    img_norm (G, m) / txt_norm (G, R): key L1 norms of the image's tokens and of the text rows
    after it (txt_valid (G, R)); img_feat (G, m, d) / txt_feat (G, R, d): the features the
    similarity is measured on; plan (G, 1 + pivot_image + pivot_text) long:
    :func:`duplication_plan`, whose host copy ``plan_host`` sets the loop's shapes (the most
    any image takes per pivot). Ties in the key norms or similarities: the order ``topk`` gives.
    """
    g, m = img_norm.shape
    dev = img_norm.device
    real = torch.ones(g, m, dtype=torch.bool, device=dev) if pad is None else ~pad.to(dev)
    plan = plan.to(dev)
    k_img = min(pivot_image, m)
    k_txt = min(plan.shape[1] - 1 - pivot_image, txt_norm.shape[1])
    piv = img_norm.float().masked_fill(~real, float("-inf")).topk(k_img, dim=1).indices  # (G, k_img)
    tpiv = txt_norm.float().to(dev).masked_fill(~txt_valid.to(dev), float("-inf")).topk(k_txt, dim=1).indices
    d = img_feat.shape[-1]
    feats = _unit(img_feat.to(dev))
    refs = torch.cat([feats.gather(1, piv[..., None].expand(-1, -1, d)),
                      _unit(txt_feat.to(dev)).gather(1, tpiv[..., None].expand(-1, -1, d))], 1)
    sim = refs @ feats.transpose(1, 2)  # (G, k_img + k_txt, m) cosine of each pivot to every token
    keep = torch.zeros(g, m, dtype=torch.bool, device=dev)
    keep.scatter_(1, piv, torch.arange(k_img, device=dev)[None] < plan[:, :1])  # the first plan[g, 0] pivots
    pool = real.scatter(1, piv, False)
    columns = [1 + p for p in range(k_img)] + [1 + pivot_image + q for q in range(k_txt)]
    for p, col in enumerate(columns):
        most = max(row[col] for row in plan_host)
        if not most:
            continue
        far = (-sim[:, p]).masked_fill(~pool, float("-inf")).topk(most, dim=1).indices  # least similar first
        take = torch.zeros_like(keep).scatter(1, far, torch.arange(most, device=dev)[None] < plan[:, col : col + 1])
        keep |= take
        pool &= ~take
    return keep


def duplication_flops(n_images: int, m: int, n_pivots: int, d: int) -> float:
    """Multiply-adds of the pivots' similarities to every token."""
    return float(n_images) * n_pivots * m * d
