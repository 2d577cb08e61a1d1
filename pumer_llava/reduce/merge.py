"""Bipartite soft matching with size-weighted averages (ToMe, Bolya et al. 2023).

PuMer's modality-aware merging applies it to the visual tokens only: text tokens are
never passed in, so they can never be merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .host import upload


@dataclass
class MergeResult:
    x: torch.Tensor  # (B, n, d) every slot's value after merging (merged-away slots: stale)
    size: torch.Tensor  # (B, n) tokens each slot stands for
    survive: torch.Tensor  # (B, n) bool: valid and not merged away
    src: torch.Tensor  # (B, r_max) local indices of merged-away tokens (see src_ok)
    dst: torch.Tensor  # (B, r_max) local index each src was merged into
    src_ok: torch.Tensor  # (B, r_max) bool: which src/dst entries are real merges

    @property
    def keep(self) -> torch.Tensor:
        """(B, n - r) survivors' local indices, ascending (rows must keep equal counts)."""
        return self.survive.nonzero()[:, 1].view(self.survive.shape[0], -1)


def bipartite_merge(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: torch.Tensor,
    r: int | torch.Tensor | list[int],
    valid: torch.Tensor | None = None,
    counts: list[int] | None = None,
) -> MergeResult:
    """Merge, in each row, the ``r`` most similar tokens of set A into their best match in B.

    x: (B, n, d) token values; metric: (B, n, c) what similarity is measured on (PuMer:
    head-averaged keys); size: (B, n) how many original tokens each one already stands for;
    r: merges per row (int, or (B,) for rows of different lengths); valid: (B, n) bool, the
    real tokens of each row, its first entries (padding never merges and is never merged into).
    Tokens alternate A, B, A, B... in the given order. A merged value is the size-weighted
    mean, so ``sum(size * x)`` and ``sum(size)`` over survivors equal those over the valid
    inputs. ``r`` is clamped to half a row's valid tokens (B has that many members).
    The matching is :func:`match_pairs`, the averaging :func:`merge_pairs`; ``counts`` (each
    row's valid tokens, on the host) spares reading them from ``valid``.
    """
    bsz, n, _ = x.shape
    dev = x.device
    if valid is None:
        valid = torch.ones(bsz, n, dtype=torch.bool, device=dev)
    counts = valid.sum(1).tolist() if counts is None else list(counts)
    r = [int(r)] * bsz if isinstance(r, int) else [int(v) for v in (r.tolist() if torch.is_tensor(r) else r)]
    r = [min(max(v, 0), c // 2) for v, c in zip(r * (bsz if len(r) == 1 else 1), counts)]
    r_max = max(r, default=0)
    if r_max == 0:
        empty = torch.zeros(bsz, 0, dtype=torch.long, device=dev)
        return MergeResult(x, size, valid.clone(), empty, empty, empty.bool())
    pairs = match_pairs(metric, counts, r, None if min(counts) == n else ~valid)
    src, dst = pairs.src, pairs.dst  # (B, r_max) local indices
    src_ok = torch.arange(r_max, device=dev)[None, :] < torch.tensor(r, device=dev)[:, None]
    base = (torch.arange(bsz, device=dev) * n)[:, None]
    flat_src, flat_dst = (base + src)[src_ok], (base + dst)[src_ok]
    x_new, size_new = merge_pairs(x, size, flat_src, flat_dst)
    survive = valid.clone()
    survive.view(-1)[flat_src] = False
    return MergeResult(x=x_new, size=size_new.to(size.dtype), survive=survive, src=src, dst=dst, src_ok=src_ok)


@dataclass
class Pairs:
    """What bipartite matching decided, without touching the values (see :func:`match_pairs`).

    src_a: (B, r_max) the merging tokens as indices into set A (token ``2 * i``); dst_b:
    (B, r_max) their partners as indices into set B (token ``2 * j + 1``); real for j < r[b].
    keep: (B, o_max) local indices of the survivors, ascending (valid for j < n_valid - r).
    sim: (B, r_max) the cosine similarity of each pair.
    """

    src_a: torch.Tensor
    dst_b: torch.Tensor
    keep: torch.Tensor
    sim: torch.Tensor

    @property
    def src(self) -> torch.Tensor:
        return self.src_a * 2

    @property
    def dst(self) -> torch.Tensor:
        return self.dst_b * 2 + 1


def match_pairs(metric: torch.Tensor, counts: list[int], r: list[int], invalid: torch.Tensor | None = None) -> Pairs:
    """Bipartite soft matching as in :func:`bipartite_merge`, deciding only which token merges
    into which: every shape from the host (``counts``: valid tokens of each row, first in the
    row; ``r``: merges per row, at most half of them), no host sync, no values computed.

    metric: (B, n, c); invalid: (B, n) bool, True past each row's count (or None when all
    rows are full). Tokens alternate A, B, A, B...; the ``r`` A tokens most similar to their
    best B partner merge into it (ties: the earlier A token)."""
    bsz, n, _ = metric.shape
    dev = metric.device
    r = [min(max(int(x), 0), c // 2) for x, c in zip(r, counts)]
    r_max = max(r, default=0)
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    sim = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # (B, na, nb) cosine similarity
    if invalid is not None:
        sim = sim.masked_fill(invalid[:, None, 1::2], float("-inf"))
    node_max, node_idx = sim.max(dim=-1)  # best B partner of every A token
    if invalid is not None:
        node_max = node_max.masked_fill(invalid[:, 0::2], float("-inf"))
    src_a = node_max.argsort(dim=-1, descending=True, stable=True)[:, :r_max]  # (B, r_max)
    dst_b = node_idx.gather(1, src_a)
    # survivors: every valid token that is not a real source, ascending
    o_max = max((c - x for c, x in zip(counts, r)), default=0)
    drop = torch.zeros(bsz, n, dtype=torch.bool, device=dev)
    if min(r, default=0) == r_max:
        drop[:, 0::2].scatter_(1, src_a, True)
    else:  # rows with fewer merges: their padding pairs scatter into a trash column
        gone = upload(torch.tensor([[j >= x for j in range(r_max)] for x in r], dtype=torch.bool), dev)
        wide = torch.zeros(bsz, n // 2 + n % 2 + 1, dtype=torch.bool, device=dev)
        wide.scatter_(1, src_a.masked_fill(gone, wide.shape[1] - 1), True)
        drop[:, 0::2] = wide[:, :-1]
    if invalid is not None:
        drop = drop | invalid
    keep = torch.arange(n, device=dev).expand(bsz, n).masked_fill(drop, n - 1).sort(1).values[:, :o_max]
    return Pairs(src_a=src_a, dst_b=dst_b, keep=keep, sim=node_max.gather(1, src_a))


@dataclass
class FlatPairs:
    """:func:`match_pairs` of rows of slots, in the flat (B*N) slots they stand for.

    src, dst: (P,) flat slots, ``src[p]`` merging into ``dst[p]`` (the real pairs only);
    sim: (P,) their cosine similarity; keep: (rows, o_max) survivors as indices into each
    row (ascending)."""

    src: torch.Tensor
    dst: torch.Tensor
    sim: torch.Tensor
    keep: torch.Tensor


def pair_within_rows(metric: torch.Tensor, flat: torch.Tensor, counts: list[int], r: list[int],
               invalid: torch.Tensor | None, pair_sel: torch.Tensor | None, o_max: int) -> FlatPairs:
    """Bipartite matching within each row of slots (an image's kept tokens, a run of text):
    ``metric`` (rows, n, c) the tokens' keys, ``flat`` (rows, n) their flat slots, ``counts``
    / ``r`` each row's valid tokens and merges, ``invalid`` (rows, n) padding, ``pair_sel``
    (P,) the real pairs among the (rows, r_max) ones (None: all), ``o_max`` the most any row
    keeps. Tokens alternate A, B, A, B... (see :func:`match_pairs`)."""
    pairs = match_pairs(metric, counts, r, invalid)
    dev = flat.device
    src = flat[:, 0::2].gather(1, pairs.src_a.to(dev)).reshape(-1)
    dst = flat[:, 1::2].gather(1, pairs.dst_b.to(dev)).reshape(-1)
    sim = pairs.sim.reshape(-1)
    if pair_sel is not None:  # rows with fewer merges than others: only the real pairs
        sel = pair_sel.to(dev)
        src, dst, sim = src[sel], dst[sel], sim[sel.to(sim.device)]
    return FlatPairs(src, dst, sim, pairs.keep[:, :o_max])


def merge_pairs(x: torch.Tensor, size: torch.Tensor | None, src: torch.Tensor, dst: torch.Tensor,
                weight: torch.Tensor | None = None):
    """Apply merges given as flat indices into ``x.view(B*N, d)``: token ``src[p]`` into
    ``dst[p]`` (every pair real). A destination becomes the size-weighted mean of itself and
    its sources, and its size their sum; other slots keep their values (up to rounding when
    sizes are not 1). ``size`` None: every token stands for one. ``weight`` (P,) float or bool:
    each source counts that many times its size (0: the pair does not merge, the source is only dropped),
    so a data-dependent choice of which pairs merge needs no host sync. Returns (x, size)."""
    bsz, n, d = x.shape
    acc = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xf = x.reshape(bsz * n, d).to(acc)
    if size is None:
        sf = torch.ones(bsz * n, dtype=acc, device=x.device)
        xs = xf
    else:
        sf = size.reshape(-1).to(acc)
        xs = xf * sf[:, None]
    add_s = sf.index_select(0, src)
    if weight is not None:
        add_s = add_s * weight  # a bool weight is promoted inside the product
    add_x = xf.index_select(0, src)
    if size is not None or weight is not None:
        add_x = add_x * add_s[:, None]  # a source counts size x weight times
    num = xs.index_add(0, dst, add_x)
    den = sf.index_add(0, dst, add_s)
    out = num / den[:, None]
    return out.view(bsz, n, d).to(x.dtype), den.view(bsz, n)


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length, in float32 (cosine similarity is then a dot product)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def recycle_targets(kept: torch.Tensor, removed: torch.Tensor, kept_invalid: torch.Tensor | None = None,
                    allowed: torch.Tensor | None = None, with_similarity: bool = False, normalized: bool = False):
    """For each removed token, the kept token it folds into: the most similar by cosine.

    kept: (B, o, c) and removed: (B, r, c) metrics (PuMer: head-averaged keys; ``normalized``:
    already :func:`unit` rows); kept_invalid: (B, o) bool, padding among the kept (never a
    target); allowed: (B, r, o) bool, which kept tokens each removed one may fold into (e.g.
    its spatial neighbours), or None (any).
    Returns (B, r) indices into kept, and with ``with_similarity`` also (B, r) the cosine to that
    target (-inf where nothing is allowed). Ties go to the earlier kept token. Used by the
    ``recycle`` merge rule: the tokens the score ranks in the budget stay as they are, each only
    absorbing what is folded into it.
    """
    mk, ms = (kept, removed) if normalized else (unit(kept), unit(removed))
    sim = torch.bmm(ms, mk.transpose(1, 2))  # (B, r, o)
    if kept_invalid is not None:
        sim = sim.masked_fill(kept_invalid[:, None, :], float("-inf"))
    if allowed is not None:
        sim = sim.masked_fill(~allowed, float("-inf"))
    if with_similarity:
        best, target = sim.max(-1)
        return target, best
    return sim.argmax(-1)


def grid_distance(a: torch.Tensor, b: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """(G, r, o) Chebyshev distance on each image's patch grid between patch indices a (G, r)
    and b (G, o), row-major grids of ``width`` (G,) columns."""
    w = width[:, None, None]
    ra, ca = a[:, :, None] // w, a[:, :, None] % w
    rb, cb = b[:, None, :] // w, b[:, None, :] % w
    return torch.maximum((ra - rb).abs(), (ca - cb).abs())
