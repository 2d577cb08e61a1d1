"""CDPruner's core (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional
Diversity for Token Pruning in MLLMs", arXiv 2506.10967): keep the visual tokens that a
determinantal point process conditioned on the instruction finds most probable together.

- similarity ``S``: cosine of the tokens' features (an image's tokens among themselves);
- relevance ``r``: mean cosine of each token to the instruction's rows, min-max normalised
  per image;
- kernel ``L = diag(r) S diag(r)``, so ``log det L_Y = sum_Y 2 log r_i + log det S_Y``: a
  set scores high when its tokens are relevant and unlike one another;
- greedy MAP inference (Chen, Zhang and Zhou, "Fast Greedy MAP Inference for Determinantal
  Point Process", NeurIPS 2018): each step adds the token that most increases ``log det L_Y``,
  with the gains kept up to date by an incremental Cholesky factorisation, O(n T^2).

Rows are images (G of them, padded to ``m`` tokens, ``pad`` (G, m) True at padding), all math in
float32, every image in one batched loop of a host-known number of steps.
"""

from __future__ import annotations

import torch

from .merge import unit


def relevance(feats: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor,
              pad: torch.Tensor | None = None, negate: bool = False, unit_feats: bool = False) -> torch.Tensor:
    """(G, m) relevance of each token to its image's instruction, in [0, 1).

    feats: (G, m, d) the tokens (``unit_feats``: already unit rows, :func:`.merge.unit`); text: (G, R, d)
    the instruction's rows; text_valid: (G, R) bool. r_i = mean over valid rows j of
    cos(feats_i, text_j) (``negate``: of -cos, the authors' sign for CLIP's penultimate
    features), then (r - min) / (max - min + 1e-6) over the image's real tokens. Padding gets 0.
    """
    cos = (feats if unit_feats else unit(feats)) @ unit(text).transpose(1, 2)  # (G, m, R)
    w = text_valid.to(cos)
    r = (cos * w[:, None, :]).sum(-1) / w.sum(-1, keepdim=True).clamp_min(1.0)
    if negate:
        r = -r
    if pad is None:  # every token is real
        lo, hi = r.amin(1, keepdim=True), r.amax(1, keepdim=True)
        return (r - lo) / (hi - lo + 1e-6)
    lo = r.masked_fill(pad, float("inf")).amin(1, keepdim=True)
    hi = r.masked_fill(pad, float("-inf")).amax(1, keepdim=True)
    return ((r - lo) / (hi - lo + 1e-6)).masked_fill(pad, 0.0)


def dpp_kernel(feats: torch.Tensor, rel: torch.Tensor, unit_feats: bool = False) -> torch.Tensor:
    """(G, m, m) the conditional kernel L = diag(r) S diag(r), S the cosine of ``feats`` (G, m, d)
    (``unit_feats``: already unit rows)."""
    f = feats if unit_feats else unit(feats)
    r = rel.float()
    return r[:, :, None] * (f @ f.transpose(1, 2)) * r[:, None, :]


def greedy_map(kernel: torch.Tensor, steps: int, pad: torch.Tensor | None = None) -> torch.Tensor:
    """(G, steps) local indices in the order greedy MAP inference picks them.

    kernel: (G, m, m) positive semi-definite (NaN entries are read as 0). Step t adds the
    token with the largest gain d2_i = det(L_{Y+i}) / det(L_Y), the squared residual of row i
    after the Cholesky rows of the picks so far: e = (L[j] - sum_s C_s[j] C_s) / sqrt(d2_j),
    d2 <- d2 - e^2. A picked or padded token is never picked (its gain is -inf); the divisor is
    clamped so a kernel of rank below ``steps`` (more tokens than feature dimensions) gives
    distinct picks instead of NaNs. An image with fewer than ``steps`` available tokens gets
    arbitrary entries past them (the caller ignores them).

    One step is a handful of kernels (it runs once per kept token): the kernel's row and the
    pick's Cholesky coefficients come in one gather (they sit side by side in one buffer), and
    the correction reads every coefficient column, the ones not written yet being 0.
    """
    g, m, _ = kernel.shape
    if steps <= 0:
        return torch.zeros(g, 0, dtype=torch.long, device=kernel.device)
    L = kernel.float().nan_to_num(nan=0.0)
    both = L.new_zeros(g, m, m + steps)  # [L | C]: C[:, i, s] = C_s[i]
    both[..., :m] = L
    chol = both[..., m:]  # (G, m, steps)
    chol_t = chol.transpose(1, 2)  # (G, steps, m): the Cholesky rows
    d2 = both.diagonal(dim1=1, dim2=2).clone()  # (G, m) gains
    if pad is not None:
        d2 = d2.masked_fill(pad.to(d2.device), float("-inf"))
    picks = []
    for t in range(steps):
        gain, j = d2.max(1, keepdim=True)  # (G, 1): the first of equal gains
        picks.append(j)
        if t == steps - 1:  # the last pick updates nothing
            break
        got = both.gather(1, j.unsqueeze(2).expand(-1, 1, m + steps))  # (G, 1, m + steps): L[j] and C[j]
        row = got[..., :m]
        if t:
            row = torch.baddbmm(row, got[..., m:], chol_t, alpha=-1.0)  # L[j] - sum_s C_s[j] C_s
        e = row.view(g, m) * gain.clamp_min_(1e-12).rsqrt_()
        chol[:, :, t] = e
        d2 = d2.addcmul_(e, e, value=-1.0).scatter_(1, j, float("-inf"))
    return torch.cat(picks, 1)


def greedy_map_flops(n_images: int, m: int, steps: int) -> float:
    """Multiply-adds of :func:`greedy_map`: each step but the first and the last corrects every
    row by every coefficient column."""
    return float(n_images) * m * steps * max(steps - 2, 0)
