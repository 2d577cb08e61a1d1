"""A decoder layer's k projection, shared between a reducing stage and the layers around it.

Two one-shot hooks on a layer's ``k_proj`` (each goes once it fired; a forward that stops
before leaves them to :meth:`.prefill.Prefill.close_taps`):

- :func:`tap` keeps what the layer computed, for a stage that scores at an earlier layer
  (FastV, DART, SparseVLM read layer L-1's keys when their stage comes at L).
- :func:`hand_over` gives the layer what its stage computed. A stage that scores with its own
  layer's keys (PuMer) projects every slot entering it; the layer then runs on the slots the
  stage kept and would project those again. With the hand-over it reads them instead, and
  projects only the rows whose values the stage changed (merged into, replaced), from its own
  normed input: a number of rows known on the host, so no host sync. The layer's call of
  ``k_proj`` gets an empty input (no work), and its output is replaced.

The rows a stage hands over are the rows of one matrix product over more rows; a BLAS gives
the same bits for a row either way except in its small-matrix paths, so the hand-over needs
a few rows at least (:data:`MIN_ROWS`) and pads what it projects anew to that many.
"""

from __future__ import annotations

import torch

from .layout import FILLER

MIN_ROWS = 4  # fewer rows: a BLAS may take another path (bits differ); not worth a hand-over either


def tap(k_proj: torch.nn.Module, keep) -> torch.utils.hooks.RemovableHandle:
    """Call ``keep(output)`` with the next output of ``k_proj``, then remove the hook."""
    handle = None

    def hook(mod, args, out):
        keep(out)
        handle.remove()

    handle = k_proj.register_forward_hook(hook)
    return handle


def can_hand_over(k_proj: torch.nn.Module, hs: torch.Tensor) -> bool:
    """Whether the layer may read a stage's keys: the stage projects without autograd, so not
    when this forward records gradients through the layer."""
    if not torch.is_grad_enabled():
        return True
    return not hs.requires_grad and not any(p.requires_grad for p in k_proj.parameters())


def hand_over(k_proj: torch.nn.Module, keys: torch.Tensor, sel: torch.Tensor, code: torch.Tensor, fillers: bool,
              changed: torch.Tensor | None) -> list[torch.utils.hooks.RemovableHandle]:
    """Make the next call of ``k_proj`` return ``keys`` of the slots the stage kept.

    keys: (B, N, Hkv, hd) the stage's projection of the N slots entering it; sel (B, N'): the
    input slot (within its row) of every kept slot; code (B, N'): what each kept slot holds
    (fillers read any slot and are masked everywhere); changed: (P,) flat (B*N) input slots
    whose values the stage changed, or None. Returns the hooks' handles (both remove
    themselves when the call comes).
    """
    bsz, n_in = keys.shape[:2]
    dev = keys.device
    at = sel.to(dev)
    if bsz > 1:
        at = at + (torch.arange(bsz, device=dev) * n_in)[:, None]
    at = at.reshape(-1)  # (B*N',) flat input slot of every kept slot
    out = keys.reshape(bsz * n_in, -1).index_select(0, at)
    rows = None
    if changed is not None:  # the kept slots the stage changed: the layer projects them itself
        trash = bsz * n_in
        where = torch.where(code.reshape(-1).to(dev) == FILLER, trash, at) if fillers else at
        inv = at.new_zeros(trash + 1).index_copy_(0, where, torch.arange(at.shape[0], device=dev))
        rows = inv.index_select(0, changed.to(dev))
        if rows.shape[0] < MIN_ROWS:
            rows = torch.cat([rows, rows[:1].expand(MIN_ROWS - rows.shape[0])])
    seen: list[torch.Tensor] = []
    handles: list = []

    def remove():
        for h in handles:
            h.remove()

    def before(mod, args):
        x = args[0]
        if x.shape[:-1].numel() != out.shape[0]:  # not the kept slots: project as usual
            remove()
            return None
        seen.append(x)
        return (x.narrow(-2, 0, 0), *args[1:])  # no rows: the product costs nothing

    def after(mod, args, y):
        remove()
        if not seen:
            return None
        x = seen.pop()
        k = out
        if rows is not None:
            k = out.index_copy(0, rows, mod(x.reshape(-1, x.shape[-1]).index_select(0, rows)).to(out.dtype))
        return k.to(y.dtype).view(*x.shape[:-1], k.shape[-1])

    handles.append(k_proj.register_forward_pre_hook(before, prepend=True))
    handles.append(k_proj.register_forward_hook(after, prepend=True))
    return handles
