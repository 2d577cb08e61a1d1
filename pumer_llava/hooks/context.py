"""What a method sees at a stage: :class:`LayerContext` (a decoder layer) and
:class:`VisionContext` (before the first one).

Both hold the stage's host plan (:class:`StageIndex`: where each image's tokens are and how
many each keeps, already on the device) and offer the runtime's lean services, so a method
file is tensor code over per-image rows and never waits for the device:

- ``ctx.order(scores)``: each image's tokens by descending score (the budget's sort);
- ``ctx.attention("text" | "last")``: the attention the prompt's text after each image (or
  its last token) gives every slot, from the layer's own norm, q/k projections and RoPE;
- ``ctx.keys(flat)``: head-averaged keys of any slots (shared with the attention just computed);
- before the LLM, ``ctx.importance()``, ``ctx.tower_keys()``, ``ctx.tower_features()``,
  ``ctx.project(x)`` and ``ctx.text()`` read the vision tower's outputs and the prompt's text
  (``per_image=True``: per-image rows (G, m, ...) straight from the tower, no (B, N) detour).

Rows are the batch's images (G of them, each padded to the longest, ``m`` tokens): local
index ``j`` of image ``g`` is its ``j``-th token at this stage, ``flat_slots[g, j]`` its slot in
the flattened (B * N) hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import TEXT, StageSlots, cached, to_device
from .scoring import layer_keys


@dataclass
class TextIndex:
    """Where a stage's merging text runs are (the runtime merges them; methods never see them)."""

    flat: torch.Tensor  # (T, m) flat (B*N) slots of each run's tokens (padded with its last)
    dst: torch.Tensor  # (U,) flat output slots of text-run tokens
    src: torch.Tensor  # (U,) flat (T, o_max) entries of the chosen local indices they take
    pad: torch.Tensor | None  # (T, m) bool: padding entries (None: every run has m tokens)
    pair_sel: torch.Tensor | None  # (P,) the real merges among the flattened (T, r_max) pairs (None: all)
    counts: list[int]
    merge: list[int]
    o_max: int


@dataclass
class StageIndex:
    """One stage's host plan on the device (one copy): where each image's tokens are, how many
    each keeps, and the template of the slots that stay."""

    slots_in: StageSlots
    slots_out: StageSlots
    img_idx: torch.Tensor  # (G, m) slots of each image's tokens (padded with its first)
    img_flat: torch.Tensor  # (G, m) the same in the flattened (B*N) layout
    sel_base: torch.Tensor  # (B, W') input slot of each kept non-visual token; an image's first slot
    vis_dst: torch.Tensor  # (V,) flat output slots of visual tokens
    vis_src: torch.Tensor | None  # (V,) flat (G, o_max) entries of the chosen local indices they take (None: all, in order)
    code_out: torch.Tensor  # (B, W')
    img_pad: torch.Tensor | None  # (G, m) bool: padding entries (None: every image has m tokens)
    k_pad: torch.Tensor | None  # (G, k_max) bool: j >= what the image keeps after pruning (None: all keep k_max)
    pair_sel: torch.Tensor | None  # (P,) the real merges among the flattened (G, r_max) pairs (None: all)
    o_pad: torch.Tensor | None  # (G, o_max) bool: j >= what the image keeps (None: all keep o_max)
    k: list[int]
    r: list[int]
    o_max: int
    text: TextIndex | None = None  # the text runs that merge at this stage (``merge_text``), or None


class _StageView:
    """What both contexts share: the plan of the stage, per image."""

    def __init__(self, pre, ix: StageIndex, hidden: torch.Tensor, stage: int):
        self._pre, self._ix = pre, ix
        self.stage = stage
        self.hidden = hidden
        self.tokens = pre.tokens
        self.layout = pre.layout
        self.slots = ix.slots_in
        self.options = pre.state.options
        self.device = pre.device
        self.counts: list[int] = list(ix.slots_in.counts)  # tokens each image holds entering the stage
        self.keep: list[int] = list(ix.k)  # ... after pruning (before merging)
        self.merge: list[int] = list(ix.r)  # ... merged away
        self.out: list[int] = [k - r for k, r in zip(ix.k, ix.r)]  # ... after the stage
        self.out_max = ix.o_max
        self.keep_max = max(ix.k, default=0)
        self.merge_max = max(ix.r, default=0)
        g, m = ix.img_idx.shape
        self.n_images, self.width = g, m
        self.image_slots = ix.img_idx  # (G, m) slots within the row
        self.flat_slots = ix.img_flat  # (G, m) slots in the flattened (B*N) layout
        self.image_pad = ix.img_pad  # (G, m) bool or None
        self.keep_pad, self.out_pad, self.pair_sel = ix.k_pad, ix.o_pad, ix.pair_sel

    def per_image(self, x: torch.Tensor) -> torch.Tensor:
        """(G, m, ...) the rows of ``x`` (B, N, ...) at each image's tokens (padding: its first)."""
        flat = x.reshape(-1, *x.shape[2:])
        return flat[self._ix.img_flat.to(x.device)]

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, n_prompt) the prompt's input ids."""
        return self._pre.input_ids[:, : self._pre.n_prompt]

    def order(self, scores: torch.Tensor) -> torch.Tensor:
        """(G, keep_max) each image's local indices by descending ``scores`` (B, N) (ties: the
        earlier token); entries past what an image keeps after pruning hold ``m - 1``."""
        img = self.per_image(scores.to(self.image_slots.device).float())
        if self.image_pad is not None:  # images of different sizes: padding never wins
            img = img.masked_fill(self.image_pad, float("-inf"))
        order = img.argsort(dim=1, descending=True, stable=True)[:, : self.keep_max]
        if self.keep_pad is not None:
            order = order.masked_fill(self.keep_pad, self.width - 1)
        return order

    def ascending(self, local: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """Local indices sorted ascending, entries where ``pad`` is True moved to the end."""
        if pad is not None:
            local = local.masked_fill(pad.to(local.device), self.width - 1)
        return local.sort(1).values

    def host_tensor(self, name: str, build) -> torch.Tensor:
        """A method's own plan tensor, from ``build()`` (int lists) on the host, on the device
        once per prompt structure (cached like the runtime's plans)."""
        key = ("method", name, self.layout.key, tuple(self.counts), tuple(self.keep), tuple(self.out), self.device)
        return cached(key, lambda: to_device(self.device, build()))[0]

    @property
    def memo(self) -> dict:
        """A dict that lives for this prefill: what a method computes at one stage and reuses at
        the next (SparseVLM's raters, chosen once)."""
        return self._pre.memo

    def add_flops(self, flops: float) -> None:
        """Count a method's own work in ``last_stats.flops``."""
        self._pre.score_flops += float(flops)


class LayerContext(_StageView):
    """A reducing (or scoring) decoder layer.

    layer, module: the decoder layer and its module; hidden: (B, N, d) its input (every slot);
    tokens: the :class:`.tokens.Tokens` present (``pos``, ``code``, ``size``); scores: what the
    method's ``score`` returned for this stage (None at the scoring call itself).
    """

    def __init__(self, pre, ix: StageIndex, stage: int, layer: int, module, hidden, kwargs, scores=None):
        super().__init__(pre, ix, hidden, stage)
        self.layer, self.module, self.kwargs = layer, module, kwargs
        self.scores = scores

    @property
    def parts(self):
        """The layer's attention pieces (``AttnParts``: norm, q/k projections, head counts)."""
        return self._pre.state.adapter.attn_parts(self.module, self._pre.state.text_config)

    @property
    def position_embeddings(self):
        """(cos, sin) of the current slots, as the layer gets them."""
        return self.kwargs.get("position_embeddings")

    def attention(self, rows: str) -> torch.Tensor:
        """(B, N) attention the prompt's query rows give every slot, heads and rows averaged.

        rows="text": the text after each image reads it (an image with none after it: all the
        prompt's text, the causal mask lifted for its keys; PuMer). rows="last": the last
        prompt token (FastV, PyramidDrop). Visual slots' entries are the scores; the query
        rows that count for no image (text before a sample's first image) are not computed,
        so text slots' entries average the rows that are."""
        if rows not in ("text", "last"):
            raise ValueError(f"attention rows must be 'text' or 'last', got {rows!r}")
        return self._pre.attention(self, rows)

    def row_attention(self, rows: str = "text") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention of each query row separately, for methods that weigh the rows
        themselves (SparseVLM's raters): ``probs`` (B, R, N) head-averaged probabilities of
        every row over every slot; ``row_slot`` (B, R) flat (B*N) slot of each row;
        ``counts`` (B, R, N) bool, whether a row counts for a key (valid, and after the key's
        image; an image with no text after it: every valid row)."""
        if rows not in ("text", "last"):
            raise ValueError(f"attention rows must be 'text' or 'last', got {rows!r}")
        return self._pre.row_attention(self, rows)

    def keys(self, flat: torch.Tensor | None = None, rotated: bool = False) -> torch.Tensor:
        """Head-averaged keys (pre-RoPE) of the slots ``flat`` (flat (B*N) indices, any shape;
        None: every slot, (B, N, hd)); ``rotated``: every kv head's key after RoPE,
        concatenated (..., Hkv * hd), so that similarity also says how far apart two tokens are."""
        return self._pre.keys(self, flat, rotated)

    def projected_keys(self) -> torch.Tensor:
        """(B, N, Hkv, hd) every slot's k projection at this layer, before RoPE: the one the
        layer computed when it already ran (a method that scores at an earlier layer), else the
        layer's own norm and k projection of the slots (counted in the scoring FLOPs)."""
        k = self._pre.projected_keys(self)
        if k is not None:
            return k
        _, k, flops = layer_keys(self.parts, self.hidden)
        self.add_flops(flops)
        return k

    def input_embeddings(self) -> torch.Tensor:
        """(B, N) rows of the language model's input embeddings of the current slots (the
        tokens before any layer ran; a merged token: its destination's)."""
        emb = self._pre.embeddings
        if emb is None:
            raise RuntimeError("the language model's input embeddings were not recorded for this prefill")
        idx = self.tokens.pos.to(emb.device)
        return emb.expand(idx.shape[0], *emb.shape[1:]).gather(1, idx[..., None].expand(-1, -1, emb.shape[-1]))

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The language model's final norm (the one before the head) applied to ``x``."""
        lm = self._pre.state.adapter.language_model(self._pre.state.model)
        norm = lm.norm
        with torch.no_grad():
            return norm(x.to(norm.weight.device))


class VisionContext(_StageView):
    """Before the first decoder layer: hidden (B, N, d) is the language model's input (the
    projected visual tokens at their slots)."""

    def __init__(self, pre, ix: StageIndex, hidden):
        super().__init__(pre, ix, hidden, stage=-1)
        self._map = None
        self._rows = None

    @property
    def has_cls(self) -> bool:
        return self._pre.state.vision_info.has_cls

    def _tower_map(self):
        if self._map is None:
            from .vision import tower_map

            self._map = tower_map(self._pre.state, self.tokens, self.hidden, self.layout)
        return self._map

    def _mapped(self, which: int, fill: float, per_image: bool) -> torch.Tensor:
        m = self._tower_map()
        if not per_image:
            return m.place(m.values(which), fill)
        if self._rows is None:
            self._rows = m.image_rows(self._ix.img_flat)
        return m.per_image(m.values(which), self._rows, fill)

    def importance(self, per_image: bool = False) -> torch.Tensor:
        """(B, N) the tower's importance of every visual token (the [CLS] query's attention,
        or the mean attention a token receives without one); NaN at other slots, -inf at
        tokens that are no tower patch (anyres newlines). ``per_image``: (G, m) instead, what
        ``per_image(importance())`` gives, read straight from the tower's outputs."""
        return self._mapped(0, float("-inf"), per_image)[..., 0]

    def tower_keys(self, per_image: bool = False) -> torch.Tensor:
        """(B, N, hd) the tower layer's keys (head mean, pre-normalisation) of every visual
        token; ``per_image``: (G, m, hd)."""
        return self._mapped(1, 0.0, per_image)

    def tower_features(self, per_image: bool = False) -> torch.Tensor:
        """(B, N, dv) the tower's features the projector reads, per visual token;
        ``per_image``: (G, m, dv)."""
        return self._mapped(2, 0.0, per_image)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The model's projector applied to tower features (..., dv) -> (..., d)."""
        state = self._pre.state
        with torch.no_grad():
            state.projecting = True
            try:
                proj = state.adapter.projector(state.model)
                w = next(proj.parameters())
                out = proj(x.to(w.device, w.dtype if w.is_floating_point() else x.dtype))
            finally:
                state.projecting = False
        return out.to(self.hidden.device, self.hidden.dtype)

    def text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, R) flat slots of each image's instruction (the prompt's text after the image, or
        all of its sample's text when none follows) and (G, R) validity."""
        key = ("text", self.layout.key, self._pre.n_prompt, self.device)
        return tuple(cached(key, lambda: _text_rows(self.layout, self.slots, self._pre.n_prompt, self.device)))


def _text_rows(layout, slots: StageSlots, n_prompt: int, device):
    rows = []
    for g, im in enumerate(layout.images):
        b = im.sample
        text = [(s, i) for s, (c, i) in enumerate(zip(slots.code[b], slots.src[b])) if c == TEXT and i < n_prompt]
        after = [s for s, i in text if i > im.end]
        rows.append(after or [s for s, _ in text])
    r = max(1, max((len(x) for x in rows), default=1))
    w = slots.width
    flat = [[layout.images[g].sample * w + (x[j] if j < len(x) else (x[0] if x else 0)) for j in range(r)]
            for g, x in enumerate(rows)]
    ok = [[j < len(x) for j in range(r)] for x in rows]
    idx, valid = to_device(device, flat, ok)
    return idx, valid.bool()
