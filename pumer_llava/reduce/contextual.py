"""VisionZip's dominant and contextual tokens (Yang et al., CVPR 2025, arXiv 2412.04467).

Per image, from the vision tower's layer that the projector reads:

1. dominant: the ``D`` tokens the [CLS] query attends to most;
2. the other tokens, in their original order, are the remaining list; ``C`` of them, evenly
   spaced in it (every ``max(1, M // C)``-th from the first, ``M`` its length), are targets;
3. every other remaining token goes to the target whose key is most similar (cosine of the
   layer's head-averaged keys; ties: the earlier target);
4. a contextual token is its target's feature plus the mean of the features assigned to it
   (a target nobody joins keeps its own feature).

Rows are images padded to the longest (``pad`` True at padding); per-image counts come as
(G,) tensors, so nothing here reads the device.
"""

from __future__ import annotations

import torch


def contextual_tokens(
    importance: torch.Tensor,
    keys: torch.Tensor,
    feats: torch.Tensor,
    dominant: torch.Tensor,
    contextual: torch.Tensor,
    n_keep: int,
    n_ctx: int,
    pad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip's choice for G images of up to m tokens.

    importance: (G, m) the [CLS] attention of every token; keys: (G, m, hk) the layer's keys
    (head mean); feats: (G, m, dv) the features the projector reads; dominant, contextual:
    (G,) long, how many dominant / contextual tokens each image keeps (their sum at most its
    token count); n_keep, n_ctx: the largest sum and the largest ``contextual``.

    Returns ``keep`` (G, n_keep) local indices of dominant and target tokens, ascending,
    ``targets`` (G, n_ctx) the targets' local indices, ascending, and ``values``
    (G, n_ctx, dv) float32 contextual features; entries past an image's own counts hold
    ``m - 1`` (indices) and are meaningless (values).
    """
    g, m = importance.shape
    dev = importance.device
    ar = torch.arange(m, device=dev)
    pad = None if pad is None else pad.to(dev)
    valid = None if pad is None else ~pad  # None: every image has m tokens
    dominant, contextual = dominant.to(dev), contextual.to(dev)

    # 1) dominant: the top ``D`` by importance (ties: the earlier token; padding ranks last)
    imp = importance.float()
    if pad is not None:
        imp = imp.masked_fill(pad, float("-inf"))
    order = imp.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, ar.expand(g, m))
    dom = rank < dominant[:, None]
    if n_ctx == 0:
        keep = torch.where(dom, ar, m - 1).sort(1).values[:, :n_keep]
        return keep, ar.new_empty(g, 0), feats.new_empty(g, 0, feats.shape[-1], dtype=torch.float32)

    # 2) the remaining list in original order, and its evenly spaced targets
    rest = ~dom if valid is None else valid & ~dom
    # the remaining local indices first, ascending (without padding, ~rest is dom)
    rest_order = (dom if valid is None else ~rest).to(torch.int8).argsort(dim=1, stable=True)
    count = m if valid is None else valid.sum(1)
    step = ((count - dominant) // contextual.clamp_min(1)).clamp_min(1)
    j = torch.arange(n_ctx, device=dev)
    t_ok = j[None] < contextual[:, None]  # (G, C)
    targets = rest_order.gather(1, (j[None] * step[:, None]).clamp_max(m - 1))
    targets = targets.masked_fill(~t_ok, m - 1)
    is_target = torch.zeros(g, m + 1, dtype=torch.bool, device=dev)
    is_target = is_target.scatter_(1, targets.masked_fill(~t_ok, m), True)[:, :m]

    # 3) each other remaining token joins its most similar target (cosine of the keys)
    k = keys.float()
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k_t = k.gather(1, targets[..., None].expand(-1, -1, k.shape[-1]))  # (G, C, hk)
    sim = (k @ k_t.transpose(1, 2)).masked_fill(~t_ok[:, None, :], float("-inf"))  # (G, m, C)
    member = rest & ~is_target
    joins = ((sim.argmax(-1)[..., None] == j) & member[..., None]).float()  # (G, m, C); F.one_hot reads the device

    # 4) target feature + mean of its members
    f = feats.float()
    f_t = f.gather(1, targets[..., None].expand(-1, -1, f.shape[-1]))  # (G, C, dv)
    mean = (joins.transpose(1, 2) @ f) / joins.sum(1).clamp_min(1.0)[..., None]
    keep = torch.where(dom | is_target, ar, m - 1).sort(1).values[:, :n_keep]
    return keep, targets, f_t + mean


def contextual_flops(g: int, m: int, hk: int, dv: int, n_ctx: int) -> float:
    """Multiply-adds of :func:`contextual_tokens` (similarities and sums), for ``last_stats``."""
    return float(g * m * n_ctx * (hk + dv))
