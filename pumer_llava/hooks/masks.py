"""One attention-mask builder for every reduced layer, at prefill and at decode.

The model builds one mask for the unreduced sequence and hands it to every decoder layer.
A layer that holds fewer tokens needs the rows of its queries and the columns of its keys,
both found by original position, with filler slots masked and, for merged tokens, ``log``
of their size added to the logits (proportional attention). Gathering the model's own mask
keeps whatever pattern it encodes (causality, padding, a sliding window).
"""

from __future__ import annotations

from typing import Any

import torch


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def layer_mask(
    model_mask: Any,
    q_rows: torch.Tensor | None,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    log_size: torch.Tensor | None,
    *,
    fillers: bool,
    dtype: torch.dtype,
    flash: bool,
    eager: bool,
) -> Any:
    """The mask of a layer whose queries sit at ``q_pos`` (B, q) and keys at ``k_pos`` (B, K).

    model_mask: what the model built for the unreduced sequence: None (causal, no padding),
        a 2-D key mask (flash attention) or a 4-D (b, 1, Q, KV) bool or additive mask whose
        columns are original positions.
    q_rows:     (B, q) rows of ``model_mask`` that the queries are (prefill), or None when
        its rows already are the queries (decode).
    k_pos:      original positions of the keys, -1 for fillers (``fillers`` says whether any).
    log_size:   (B, K) log token sizes of the keys, or None.
    """
    if model_mask is None:
        # causal without padding: the same after removing tokens, unless fillers, sizes or
        # queries that are not the last keys (a decode step with several new tokens) need saying
        if not fillers and log_size is None and (q_rows is not None or q_pos.shape[1] == 1):
            return None
        if flash:
            return (k_pos >= 0).long()
        neg = torch.finfo(dtype).min
        if log_size is None and not eager:  # fillers only: a boolean mask
            allowed = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos >= 0)[:, None, :]  # (B, q, K)
            return allowed[:, None]
        bias = log_size.to(dtype) if log_size is not None else torch.zeros(k_pos.shape, dtype=dtype, device=k_pos.device)
        if fillers:
            bias = bias.masked_fill(k_pos < 0, neg)
        b, k = k_pos.shape
        bias = bias.view(b, 1, 1, k)
        if q_rows is None and q_pos.shape[1] == 1:  # one new token: it sees every key the cache holds
            return bias
        return bias.masked_fill(k_pos.view(b, 1, 1, k) > q_pos.view(b, 1, -1, 1), neg)
    cols = k_pos.clamp_min(0).to(model_mask.device)
    if model_mask.ndim == 2:  # flash attention: a key mask
        m = model_mask.gather(1, cols)
        return m * (k_pos >= 0).to(m.device, m.dtype) if fillers else m
    bsz = k_pos.shape[0]
    m = model_mask.expand(bsz, *model_mask.shape[1:])
    h = m.shape[1]
    if q_rows is not None:
        rows = q_rows.to(m.device)
        m = m.gather(2, rows[:, None, :, None].expand(bsz, h, rows.shape[1], m.shape[3]))
    m = m.gather(3, cols[:, None, None, :].expand(bsz, h, m.shape[2], cols.shape[1]))
    if fillers:
        ok = (k_pos >= 0).to(m.device)[:, None, None, :]
        if m.dtype == torch.bool:
            m = m & ok
            m = m | ~m.any(-1, keepdim=True)  # a row left with no key attends to all, as for padding rows
        else:
            m = m.masked_fill(~ok, torch.finfo(m.dtype).min)
    if log_size is not None:
        m = _additive(m, dtype) + log_size[:, None, None, :].to(m.device, dtype)
    return m
