"""A reducing prefill: plan the stages, then at each stage decide and apply, layer by layer.

Flow of one prefill (the hooks in :mod:`.runtime` only route here):

1. :class:`Prefill` is opened by the inner model's pre-hook with the prompt's
   :class:`.layout.PromptLayout` (the ids, read once from the device): which tokens are
   visual, which image each belongs to, how many each stage keeps per image, and so where
   every image's tokens sit at every stage.
2. At a stage's decoder layer, :meth:`Prefill.at_layer` scores (or takes the prompt's
   earlier decision, see below), decides a :class:`StageDecision` (which slots stay,
   which merge into which), applies it to the hidden states and the :class:`Tokens`, and
   gathers the decoder loop's full-length kwargs (cos/sin, position ids, mask) for the
   tokens now present. Every later layer gets those, and its cache layer is told the
   original positions of what it stores (:mod:`.cache`).
3. :meth:`Prefill.finish` hands ``last_stats`` its tensors (lists are built when read),
   masks labels that a removed position would predict, and scatters the last hidden state
   back to full length when the caller reads more than the last positions.

No host sync between the first decoder layer and the last (the built-in scorers): every
shape is known from the layout, each stage's index tensors go to the device in one copy,
the choice is a fixed-shape sort per image. A custom scorer's inputs and VisPruner's
patch matching still read the device.

The prompt decides. A method reads the prompt's tokens only; a forward without a cache
whose input extends the last reducing prefill's (same leading ids, same input embeddings
there, only text after them) applies that prefill's decisions instead of choosing again:
``generate(use_cache=False)`` and scoring a continuation keep the prompt's tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..reduce import plan_stages
from ..reduce.merge import merge_pairs, pair_within_rows
from .cache import reduced_layer
from .context import LayerContext, StageIndex, TextIndex, VisionContext
from .layout import FILLER, TEXT, PromptLayout, Segment, StageSlots, cached, text_segments, to_device
from .masks import layer_mask
from ..reduce.scoring import apply_rope_rolled, rope_sin, row_masks
from .scoring import QueryRows, attention_scores, layer_keys, take_rows
from .stats import stats_reduced, stats_unreduced
from .tokens import Tokens


class SelectTimer:
    """Time spent scoring, selecting and merging, without waiting for the device on the way:
    CUDA events are read when the statistics are (after the forward)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list = []
        self.seconds = 0.0
        self._t0 = 0.0

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.events.append([e, None])
        else:
            self._t0 = time.perf_counter()

    def stop(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.events[-1][1] = e
        else:
            self.seconds += time.perf_counter() - self._t0

    def total(self) -> float:
        if self.cuda:
            for a, b in self.events:
                b.synchronize()
                self.seconds += a.elapsed_time(b) / 1000.0
            self.events.clear()
        return self.seconds


def take_positions(pid: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather position ids with idx (B, N'): (b0, N) 1-D RoPE ids, or (R, b0, N) M-RoPE rows
    (Qwen2-VL: temporal, height, width, plus a text row in generate), every row with the same
    indices so each kept token keeps its whole original position."""
    if pid.ndim == 3:
        return torch.stack([take_rows(row, idx) for row in pid])  # (R, B, N')
    return take_rows(pid, idx)


@dataclass(frozen=True)
class Stage:
    """One reducing step of the cascade.

    index: 0-based, in order; layer: the decoder layer at whose input it acts; key: the
    ``last_stats`` key (-1: the choice before the LLM, made at the first layer's input);
    score_layer: the layer whose input is scored (FastV scores at L-1); vision: the method's
    ``before_llm`` decides instead of its ``score`` / ``select``.
    """

    index: int
    layer: int
    key: int
    score_layer: int
    vision: bool = False


@dataclass(frozen=True)
class StageDecision:
    """What a stage did, in the slots it received, so that it can be applied again.

    n_in: slots it received; sel (B, N'): which slots stay (left-padded rows); code (B, N'):
    what each new slot holds (:mod:`.layout`); merge: (src, dst) or (src, dst, weight) (P,)
    flat indices into the (B * n_in) slots received, ``src[p]`` merging into ``dst[p]``
    (``reduce.merge.merge_pairs``; weight 0: dropped, not merged), or None, the text runs'
    merges last; replace: (slots, values), flat slots that take new values first, or None.
    """

    n_in: int
    sel: torch.Tensor
    code: torch.Tensor
    has_fillers: bool
    merge: tuple[torch.Tensor, ...] | None = None
    replace: tuple[torch.Tensor, torch.Tensor] | None = None
    text_pairs: int = 0  # the last ``text_pairs`` merges are text runs' (``merge_text``)

    def extended(self, extra: int) -> StageDecision:
        """The same decision on ``extra`` more slots at the end (tokens after the prompt: kept)."""
        if extra == 0:
            return self
        bsz = self.sel.shape[0]
        tail = torch.arange(self.n_in, self.n_in + extra, device=self.sel.device).expand(bsz, extra)
        def widen(f):  # flat indices into rows of n_in slots: into rows of n_in + extra
            return f // self.n_in * (self.n_in + extra) + f % self.n_in

        merge = None if self.merge is None else (widen(self.merge[0]), widen(self.merge[1]), *self.merge[2:])
        replace = None if self.replace is None else (widen(self.replace[0]), self.replace[1])
        return StageDecision(self.n_in + extra, torch.cat([self.sel, tail], 1),
                             torch.cat([self.code, self.code.new_full((bsz, extra), TEXT)], 1),
                             self.has_fillers, merge, replace, self.text_pairs)


@dataclass
class PromptDecision:
    """The last reducing prefill, kept so a forward that extends its prompt can reuse it."""

    input_ids: torch.Tensor  # (B, n)
    mask: torch.Tensor  # (B, n) bool
    fingerprint: torch.Tensor  # (B, n) a fixed projection of the input embeddings
    decisions: list[StageDecision]


_PROJECTIONS: dict[tuple, torch.Tensor] = {}


def fingerprint(emb: torch.Tensor) -> torch.Tensor:
    """(B, N) a fixed random projection of each input embedding: the same prompt gives the same
    values, another image under the same placeholder ids different ones."""
    key = (emb.shape[-1], emb.device)
    w = _PROJECTIONS.get(key)
    if w is None:
        g = torch.Generator().manual_seed(0)
        w = _PROJECTIONS[key] = torch.randn(emb.shape[-1], generator=g).to(emb.device)
    return emb.float() @ w


def plan_text(state, stages: list[Stage], segments: list[Segment]) -> list[list[int]]:
    """Per stage, each text run's merges: ``merge_text`` of a run's tokens merged away over
    the stages inside the language model (none before it), each stage at most half of what
    the run holds (bipartite matching), the same fraction per stage."""
    share = state.merge_text
    llm = [s for s, st in enumerate(stages) if not st.vision]
    out = [[0] * len(segments) for _ in stages]
    if not share or not llm:
        return out
    for j, sg in enumerate(segments):
        keep = sg.count - min(round(sg.count * share), sg.count // 2)
        if keep == sg.count:
            continue
        for s, p in zip(llm, plan_stages(sg.count, keep, len(llm), 1.0)):
            out[s][j] = p.merge
    return out


def plan(state, layout: PromptLayout) -> tuple[list[Stage], list[list]]:
    """The stages of the cascade and, per stage, each image's (prune, merge, n_out)."""
    cfg, method = state.config, state.method
    counts = layout.counts
    keeps = []
    for n, im in zip(counts, layout.images):
        if cfg.keep_tokens is not None:
            if n < cfg.keep_tokens:
                raise ValueError(
                    f"keep_tokens={cfg.keep_tokens} is larger than an image of sample {im.sample} ({n} visual tokens): "
                    "keep_tokens is a budget per image"
                )
            keeps.append(cfg.keep_tokens)
        else:
            keeps.append(min(n, max(1, round(n * cfg.ratio))))
    if keeps == counts:
        return [], []
    stages = []
    if method.before_llm is not None:
        stages.append(Stage(index=0, layer=0, key=-1, score_layer=0, vision=True))
    for layer in state.layers:
        stages.append(Stage(index=len(stages), layer=layer, key=layer, score_layer=layer + method.score_offset))
    per_image = [plan_stages(n, k, len(stages), state.merge_share) for n, k in zip(counts, keeps)]
    plans = []
    for s, stage in enumerate(stages):
        rows = []
        for p in per_image:
            prune, merge = p[s].prune, p[s].merge
            if stage.vision:  # removal before the LLM is pruning only: fold its merge share into pruning
                prune, merge = prune + merge, 0
            rows.append((prune, merge, p[s].n_in - prune - merge))
        plans.append(rows)
    return stages, plans


class Prefill:
    """Scratch of one reducing prefill of the inner model; see the module docstring."""

    def __init__(self, state, input_ids: torch.Tensor, layout: PromptLayout, use_cache: bool, logits_to_keep):
        self.state, self.layout = state, layout
        bsz, n0 = input_ids.shape
        dev = input_ids.device
        self.input_ids, self.n0, self.device = input_ids, n0, dev
        self.use_cache, self.logits_to_keep = use_cache, logits_to_keep
        # The prompt: a caller that reads the logits of the last k positions of a prefill checks
        # the k - 1 tokens before them (a speculative decoder's candidates): they are not the prompt
        k = logits_to_keep if isinstance(logits_to_keep, int) else 0
        self.n_prompt = n0 - (k - 1) if 1 < k <= n0 else n0
        self.totals = list(layout.visual_n)  # samples may carry different numbers of visual tokens
        (code0,) = cached(("code", layout.key, dev), lambda: to_device(dev, layout.code))
        self.tokens = Tokens.full(code0)
        self.mask = self.tokens.valid
        self.stages, self.plans = plan(state, layout)
        self.reduces = bool(self.stages)
        self.counts = [list(layout.counts)]  # per stage: each image's count entering it, then after the last
        for rows in self.plans:
            self.counts.append([n_out for _, _, n_out in rows])
        # the prompt's text runs that merge (merge_text), and per stage each run's count entering it
        self.segments = tuple(text_segments(layout, self.n_prompt)) if self.reduces and state.merge_text else ()
        self.text_plans = plan_text(state, self.stages, list(self.segments))
        if not any(map(any, self.text_plans)):
            self.segments, self.text_plans = (), [[] for _ in self.stages]
        self.text_counts = [tuple(sg.count for sg in self.segments)]
        for merges in self.text_plans:
            self.text_counts.append(tuple(c - m for c, m in zip(self.text_counts[-1], merges)))
        self.at: dict[int, list[Stage]] = {}
        self.score_at: dict[int, list[Stage]] = {}
        for st in self.stages:
            self.at.setdefault(st.layer, []).append(st)
            if not st.vision and st.score_layer != st.layer:
                self.score_at.setdefault(st.score_layer, []).append(st)
        self.first_layer = min([st.score_layer for st in self.stages] + [st.layer for st in self.stages], default=0)
        self.first_reduced = min((st.layer for st in self.stages), default=0)
        self._slots: dict[tuple, StageSlots] = {}
        self.decisions: list[StageDecision] = []
        self.reuse: list[StageDecision] | None = None
        self.fingerprint: torch.Tensor | None = None
        self.embeddings: torch.Tensor | None = None
        self.memo: dict = {}  # a method's own scratch for this prefill (``LayerContext.memo``)
        self.kw: dict | None = None  # gathered kwargs for the tokens now present
        self._rope = None  # (the model's cos, stacked cos / sin / rolled sin), see _rope_full
        self.rope = None  # (3, B, N, hd) cos, sin, rolled sin of the tokens now present
        # (pos, log_size, n_full, fillers, shared) the reduced cache layers store; ``shared`` is
        # where the static layers of one stage keep the slot bookkeeping they share
        self.cache_view: tuple | None = None
        # a stage that scores at an earlier layer: that layer's (module, input, kwargs), scored at
        # the stage's own layer with the k projection the earlier layer computed (``taps``)
        self.deferred: dict[int, tuple] = {}
        self.taps: dict[int, torch.Tensor] = {}  # layer -> its k projection of this forward's slots
        self._tap_handles: list = []
        self.metric: tuple[int, torch.Tensor] | None = None  # (layer, keys) the scoring computed
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # stats key -> (pos, code)
        self.timer = SelectTimer(dev)
        self.score_flops = 0.0

    def slots(self, s: int) -> StageSlots:
        """The slot layout entering stage ``s`` (``s == len(stages)``: after the last)."""
        key = (tuple(self.counts[s]), self.text_counts[s])
        if key not in self._slots:
            self._slots[key] = self.layout.stage(self.counts[s], self.segments, self.text_counts[s])
        return self._slots[key]

    # ------------------------------------------------------------------ the prompt's decision

    def check_reuse(self, emb: torch.Tensor) -> None:
        """At the language model's input: reuse the last prompt's decisions if this extends it."""
        state = self.state
        self.embeddings = emb  # the input embeddings, for methods that read them (not a copy)
        self.fingerprint = fingerprint(emb)
        prev = state.prompt
        if prev is None or self.use_cache or not self.reduces:
            return
        n = prev.input_ids.shape[1]
        ids = self.input_ids
        if ids.shape[0] != prev.input_ids.shape[0] or ids.shape[1] < n:
            return
        if max(im.end for im in self.layout.images) >= n:
            return  # visual tokens after the prompt: a new image, choose anew
        same = (
            torch.equal(ids[:, :n].to(prev.input_ids.device), prev.input_ids)
            and torch.equal(self.mask[:, :n].to(prev.mask.device), prev.mask)
            and torch.allclose(self.fingerprint[:, :n].to(prev.fingerprint.device), prev.fingerprint, rtol=1e-4, atol=1e-4)
        )
        if same:
            self.reuse = prev.decisions

    # ------------------------------------------------------------------ layer by layer

    def at_layer(self, layer: int, module, args: tuple, kwargs: dict):
        hs = args[0] if args else kwargs["hidden_states"]
        for stage in self.at.get(layer, ()):
            self.timer.start()
            dec = self._decision(stage, module, hs, kwargs)
            hs = self._apply(dec, hs)
            self.kw = self._gather(kwargs, hs.dtype)
            tok = self.tokens
            self.cache_view = (tok.cache_pos, tok.log_size(self.state.prop_attn), self.n0, tok.has_fillers, {})
            self.kept[stage.key] = (tok.pos, tok.code)
            self.timer.stop()
        for stage in self.score_at.get(layer, ()):  # FastV-style: score from this layer's input, drop later
            if self.reuse is None:  # scored when the stage's layer comes, with this layer's own keys
                self.deferred[stage.index] = (module, hs, self.kw or kwargs)
                self._tap(layer, module)
        cache = kwargs.get("past_key_values")
        if cache is not None and self.use_cache and layer >= self.first_reduced:
            reduced_layer(cache, layer).pending = self.cache_view
        if self.kw is None:
            return None
        if args:
            args = (hs, *args[1:])
        else:
            kwargs["hidden_states"] = hs
        return args, {**kwargs, **self.kw}

    def _decision(self, stage: Stage, module, hs: torch.Tensor, kwargs: dict) -> StageDecision:
        if self.reuse is not None:
            dec = self.reuse[stage.index].extended(hs.shape[1] - self.reuse[stage.index].n_in)
        elif stage.vision:
            dec = self._decide_vision(stage, hs)
        else:
            dec = self._decide(stage, module, hs, self.kw or kwargs)
        self.decisions.append(dec)
        return dec

    def _apply(self, dec: StageDecision, hs: torch.Tensor) -> torch.Tensor:
        tok = self.tokens
        if dec.replace is not None:
            where, values = dec.replace
            hs = hs.reshape(-1, hs.shape[-1]).index_copy(0, where.to(hs.device), values.to(hs)).view(hs.shape)
        if dec.merge is not None:
            src, dst, *weight = (t.to(hs.device) for t in dec.merge)
            hs, size = merge_pairs(hs, None if tok.size is None else tok.size.to(hs.device), src, dst,
                                   weight[0] if weight else None)
            tok = tok.with_sizes(size.to(tok.pos.device))
        self.tokens = tok.take(dec.sel, dec.code, dec.has_fillers)
        return take_rows(hs, dec.sel)

    def _rope_full(self, pe) -> torch.Tensor | None:
        """(3, b0, N, hd): the model's cos and sin for the whole input, and the scoring's
        ``rope_sin`` of it, stacked once per prefill; None for cos/sin of another shape."""
        cos, sin = pe
        if cos.ndim != 3 or sin.shape != cos.shape:
            return None
        if self._rope is None or self._rope[0] is not cos:
            self._rope = (cos, torch.stack((cos, sin, rope_sin(sin))))
        return self._rope[1]

    def rope_now(self, kw: dict) -> torch.Tensor | None:
        """(3, b0, N, hd) cos, sin and rolled sin of the current slots for the scoring, or None
        (it computes them from ``kw``)."""
        if self.kw is not None:
            return self.rope
        pe = kw.get("position_embeddings")
        return None if pe is None else self._rope_full(pe)

    def _gather(self, kwargs: dict, dtype) -> dict:
        """The decoder loop's full-length kwargs, for the tokens now present."""
        tok, state, out = self.tokens, self.state, {}
        pe = kwargs.get("position_embeddings")
        self.rope = None
        if pe is not None:
            full = self._rope_full(pe)
            if full is not None:  # cos, sin and the scoring's rolled sin of the tokens now present, one gather
                idx = tok.pos.to(full.device)
                if idx.shape[0] == 1 and full.shape[1] == 1:  # one row: index_select (a gather over hd is slower)
                    three = full.index_select(2, idx.view(-1))
                else:
                    three = full.expand(3, idx.shape[0], *full.shape[2:]).gather(
                        2, idx.view(1, *idx.shape, 1).expand(3, -1, -1, full.shape[-1]))
                cos, sin, _ = three.unbind(0)
                out["position_embeddings"] = (cos, sin)
                self.rope = three
            else:
                out["position_embeddings"] = tuple(take_rows(t, tok.pos) for t in pe)
        pid = kwargs.get("position_ids")
        if pid is not None:
            out["position_ids"] = take_positions(pid, tok.pos)
        out["attention_mask"] = layer_mask(
            kwargs.get("attention_mask"), tok.pos, tok.pos, tok.cache_pos, tok.log_size(state.prop_attn),
            fillers=tok.has_fillers, dtype=dtype, flash=state.flash, eager=state.eager,
        )
        return out

    # ------------------------------------------------------------------ host plans

    def _index(self, s: int) -> StageIndex:
        """Stage ``s``'s index tensors, from the host layout, in one copy to the device."""
        key = ("index", self.layout.key, tuple(self.counts[s]), tuple(self.plans[s]), self.segments,
               self.text_counts[s], tuple(self.text_plans[s]), self.device)

        def build():
            host, flags, text = self._index_host(s)
            return to_device(self.device, *host), flags, text

        t, (ragged_m, ragged_k, ragged_r, ragged_o, k, r, o_max), text = cached(key, build)
        text_ix = None
        if text is not None:
            counts, merges, to_max, ragged_tm, ragged_tr = text
            flat, dst, src, pad, pair = t[10:15]
            text_ix = TextIndex(flat, dst, src, pad.bool() if ragged_tm else None, pair if ragged_tr else None,
                                counts, merges, to_max)
        return StageIndex(self.slots(s), self.slots(s + 1), *t[:4], t[4] if t[4].numel() else None, t[5],
                          t[6].bool() if ragged_m else None,
                          t[7].bool() if ragged_k else None, t[8] if ragged_r else None,
                          t[9].bool() if ragged_o else None, k, r, o_max, text_ix)

    def _index_host(self, s: int):
        slots_in, slots_out = self.slots(s), self.slots(s + 1)
        layout, plan_rows = self.layout, self.plans[s]
        k = [n - p for n, (p, _, _) in zip(slots_in.counts, plan_rows)]
        r = [m_ for _, m_, _ in plan_rows]  # at most half of k (``plan_stages``)
        o = slots_out.counts
        k_max, o_max, r_max = max(k), max(o), max(r)
        img_idx, img_ok = slots_in.image_slots()
        w_in = slots_in.width
        img_flat = [[layout.images[g].sample * w_in + i for i in row] for g, row in enumerate(img_idx)]
        img_pad = [[not x for x in row] for row in img_ok]
        k_pad = [[j >= kg for j in range(k_max)] for kg in k]
        w_out = slots_out.width
        # text runs: when one merges at this stage, every run's kept tokens are chosen on the device
        t_merge = list(self.text_plans[s])
        t_in = list(slots_in.text_counts)
        t_out = [c - m_ for c, m_ in zip(t_in, t_merge)]
        text_here = any(t_merge)
        to_max = max(t_out, default=0)
        sel_base, vis_dst, vis_src, txt_dst, txt_src = [], [], [], [], []
        for b in range(layout.bsz):
            # input position -> slot, for tokens whose position is known (not those of text runs)
            where = {i: s_ for s_, (i, j) in enumerate(zip(slots_in.src[b], slots_in.seg[b])) if i >= 0 and j < 0}
            row, seen, seen_t = [], {}, {}
            for t, (c, i) in enumerate(zip(slots_out.code[b], slots_out.src[b])):
                seg = slots_out.seg[b][t]
                if c >= 0:
                    j = seen.get(c, 0)
                    seen[c] = j + 1
                    row.append(slots_in.start[c])
                    vis_dst.append(b * w_out + t)
                    vis_src.append(c * o_max + j)
                elif seg >= 0:  # the j-th token a text run keeps: chosen now, or as it was
                    j = seen_t.get(seg, 0)
                    seen_t[seg] = j + 1
                    row.append(slots_in.seg_start[seg] + (0 if text_here else j))
                    if text_here:
                        txt_dst.append(b * w_out + t)
                        txt_src.append(seg * to_max + j)
                else:
                    row.append(where.get(i, 0))  # a filler takes any slot: it is masked everywhere
            sel_base.append(row)
        pair_sel = [g * r_max + j for g, rg in enumerate(r) for j in range(rg)]
        # masks only where rows differ (one image, or images of one size, need none)
        ragged_m, ragged_k, ragged_r = min(slots_in.counts) != max(slots_in.counts), min(k) != k_max, min(r) != r_max
        ragged_o = min(o) != o_max
        o_pad = [[j >= og for j in range(o_max)] for og in o]
        if vis_src == list(range(len(img_idx) * o_max)):  # every chosen index is taken, in order
            vis_src = []
        host = [img_idx, img_flat, sel_base, vis_dst, vis_src, slots_out.code,
                img_pad if ragged_m else [], k_pad if ragged_k else [], pair_sel if ragged_r else [],
                o_pad if ragged_o else []]
        text = None
        if text_here:
            tm_max, tr_max = max(t_in), max(t_merge)
            t_flat = [[self.segments[j].sample * w_in + slots_in.seg_start[j] + min(x, c - 1) for x in range(tm_max)]
                      for j, c in enumerate(t_in)]
            ragged_tm, ragged_tr = min(t_in) != tm_max, min(t_merge) != tr_max
            t_pad = [[x >= c for x in range(tm_max)] for c in t_in]
            t_pair = [j * tr_max + x for j, rj in enumerate(t_merge) for x in range(rj)]
            host += [t_flat, txt_dst, txt_src, t_pad if ragged_tm else [], t_pair if ragged_tr else []]
            text = (t_in, t_merge, to_max, ragged_tm, ragged_tr)
        return host, (ragged_m, ragged_k, ragged_r, ragged_o, k, r, o_max), text

    def _select(self, ix: StageIndex, choice, text=None) -> StageDecision:
        """The decision from each image's chosen local indices (G, o_max), ascending, and the
        text runs' ``(keep, src, dst)`` (:meth:`_text_choice`) when they merge at this stage."""
        local = choice.keep.to(ix.sel_base.device)
        if tuple(local.shape) != (ix.img_idx.shape[0], ix.o_max):
            raise ValueError(f"{self.state.method.name}: the choice keeps {tuple(local.shape)} local indices, "
                             f"expected {(ix.img_idx.shape[0], ix.o_max)} (images x the most any image keeps)")
        bsz, w_out = ix.sel_base.shape
        chosen = local.reshape(-1) if ix.vis_src is None else local.reshape(-1)[ix.vis_src]
        sel = ix.sel_base.reshape(-1).index_put((ix.vis_dst,), chosen, accumulate=True)
        merge, text_pairs = choice.merge, 0
        if text is not None:
            keep, src, dst = text
            sel = sel.index_put((ix.text.dst,), keep.reshape(-1).to(sel.device)[ix.text.src], accumulate=True)
            text_pairs = int(src.shape[0])
            if merge is None:
                merge = (src, dst)
            else:
                vs, vd, *w = merge
                dev = vs.device
                merge = (torch.cat([vs, src.to(dev)]), torch.cat([vd, dst.to(dev)]))
                if w:
                    merge += (torch.cat([w[0], w[0].new_ones(src.shape[0])]),)
        return StageDecision(ix.slots_in.width, sel.view(bsz, w_out), ix.code_out, ix.slots_out.has_fillers,
                             merge, choice.replace, text_pairs)

    def _text_choice(self, ctx: LayerContext, tx: TextIndex):
        """PuMer's text merging: in each text run, bipartite matching on the layer's keys (A: its
        even tokens, B: its odd ones), every pair merges; text never meets an image or another
        run. Returns (T, o_max) local indices each run keeps and the (src, dst) flat merges."""
        metric = self.keys(ctx, tx.flat)  # (T, m, hd)
        pad = None if tx.pad is None else tx.pad.to(metric.device)
        pairs = pair_within_rows(metric, tx.flat, tx.counts, tx.merge, pad, tx.pair_sel, tx.o_max)
        return pairs.keep, pairs.src, pairs.dst

    def _query_rows(self, slots: StageSlots, kind: str, scoring_only: bool = False) -> QueryRows:
        """The prompt's query rows at ``slots`` and what every key needs, on the host, then
        on the device in one copy (see :class:`.scoring.QueryRows`). scoring_only: only the
        rows that count for some visual key (text before every image of its sample counts
        for none), for a caller that reads visual slots only."""
        key = ("rows", self.layout.key, tuple(slots.counts), slots.segments, slots.text_counts, self.n_prompt, kind,
               scoring_only, self.state.text_config.num_attention_heads, self.device)
        tc = self.state.text_config
        heads = tc.num_attention_heads
        kv_heads = getattr(tc, "num_key_value_heads", None) or heads

        def build():
            t = to_device(self.device, *self._query_rows_host(slots, kind, scoring_only))
            dynamic = t[5].bool() if t[5].numel() else None
            # positions known before the forward: the masks are part of the plan, computed once
            masks = None if dynamic is not None else row_masks(t[2], t[1], t[3], t[4], heads, kv_heads)
            return QueryRows(*t[:5], dynamic=dynamic, masks=masks, slot=t[6])

        return cached(key + (kv_heads,), build)

    def _query_rows_host(self, slots: StageSlots, kind: str, scoring_only: bool = False):
        layout, n_prompt, images = self.layout, self.n_prompt, self.layout.images
        heads = self.state.text_config.num_attention_heads
        text = slots.text_rows(n_prompt) if kind == "text_attention" else None
        if text is None:  # FastV, or a prompt of visual tokens only: its last prompt token
            idx, row_pos = [], []
            for b in range(layout.bsz):
                last, lp = 0, -2
                for s_, (c, i) in enumerate(zip(slots.code[b], slots.src[b])):
                    if c == TEXT and i < n_prompt:
                        last, lp = s_, i
                    elif c >= 0 and images[c].start < n_prompt:
                        last, lp = s_, images[c].start  # sees its image and everything before, as its own position does
                idx.append([last])
                row_pos.append([lp])
        else:
            idx, ok, pos = text
            row_pos = [[p if k else -2 for p, k in zip(pr, okr)] for pr, okr in zip(pos, ok)]
        row_last = [max(r) for r in row_pos]
        # PuMer: each image is read by the text after it; an image with none after it by all the text
        scored_after = kind == "text_attention"
        follows = [row_last[im.sample] > im.end for im in images]
        if scored_after and scoring_only and text is not None:
            idx, row_pos = self._rows_after_images(idx, row_pos, follows)
        past = self.n0 + 1
        key_pos, key_end, count = [], [], []
        for b, (codes, srcs) in enumerate(zip(slots.code, slots.src)):
            valid_rows = [p for p in row_pos[b] if p >= 0]
            n_after: dict[int, int] = {}
            kp, ke, kc = [], [], []
            for c, i in zip(codes, srcs):
                if c >= 0:
                    lone = scored_after and not follows[c]
                    kp.append(-1 if lone else images[c].start)
                    e = images[c].end if (scored_after and not lone) else -1
                else:
                    kp.append(i if c == TEXT else past)
                    e = -1
                if e not in n_after:
                    n_after[e] = sum(p > e for p in valid_rows)
                ke.append(e)
                kc.append(heads * max(1, n_after[e]))
            key_pos.append(kp)
            key_end.append(ke)
            count.append(kc)
        width = slots.width
        flat = [b * width + i for b, row in enumerate(idx) for i in row]
        # text runs that merged: their slots hold a stand-in position; the device has the real one
        dynamic = [] if slots.exact else [[int(j >= 0) for j in row] for row in slots.seg]
        return flat, row_pos, key_pos, key_end, count, dynamic, [i for row in idx for i in row]

    def _rows_after_images(self, idx: list[list[int]], row_pos: list[list[int]], follows: list[bool]):
        """The text rows of each sample that come after its first image (the others count for
        no visual key), padded; a sample with an image that no text follows keeps every row
        (that image is read by all the text)."""
        cut = []  # per sample: a row counts when its position is past this (padding rows sit at -2)
        for b in range(self.layout.bsz):
            ims = [(im.end, f) for im, f in zip(self.layout.images, follows) if im.sample == b]
            if not ims:
                cut.append(float("inf"))  # no image: no row counts
            else:
                cut.append(min(e for e, _ in ims) if all(f for _, f in ims) else -1)
        rows = [[(s_, p) for s_, p in zip(ir, pr) if p > c] for ir, pr, c in zip(idx, row_pos, cut)]
        r = max(1, max(len(x) for x in rows))
        idx = [[s_ for s_, _ in x] + [x[0][0] if x else ir[0]] * (r - len(x)) for x, ir in zip(rows, idx)]
        row_pos = [[p for _, p in x] + [-2] * (r - len(x)) for x in rows]
        return idx, row_pos

    # ------------------------------------------------------------------ deciding (the method's callables)

    def _context(self, stage: Stage, layer: int, module, hs: torch.Tensor, kw: dict, scores=None) -> LayerContext:
        return LayerContext(self, self._index(stage.index), stage.index - int(self.stages[0].vision), layer, module,
                            hs, kw, scores)

    def _score(self, stage: Stage, module, hs: torch.Tensor, kw: dict) -> torch.Tensor:
        """(B, N) the method's scores of the current slots (only visual ones are read)."""
        scores = self.state.method.score(self._context(stage, stage.score_layer, module, hs, kw))
        if scores.shape != hs.shape[:2]:
            raise ValueError(f"{self.state.method.name}: score returned shape {tuple(scores.shape)}, expected "
                             f"{tuple(hs.shape[:2])} (one score per slot)")
        return scores

    def _decide(self, stage: Stage, module, hs: torch.Tensor, kw: dict) -> StageDecision:
        """The method's choice within each image: every image keeps its own budget. Images are
        the rows (G of them across the batch), so no step moves a token's share from one image to
        another; every shape comes from the host plan."""
        method = self.state.method
        scores = None
        if stage.index in self.deferred:
            scores = self._score(stage, *self.deferred.pop(stage.index))
            self.taps.pop(stage.score_layer, None)  # read: no need to hold it for the rest of the prefill
        elif method.score is not None:
            scores = self._score(stage, module, hs, kw)
        ctx = self._context(stage, stage.layer, module, hs, kw, scores)
        choice = method.selector(ctx)
        tx = ctx._ix.text
        text = None if tx is None else self._text_choice(ctx, tx)
        self.metric = None
        return self._select(ctx._ix, choice, text)

    def _decide_vision(self, stage: Stage, hs: torch.Tensor) -> StageDecision:
        ix = self._index(stage.index)
        choice = self.state.method.before_llm(VisionContext(self, ix, hs))
        return self._select(ix, choice)

    # ------------------------------------------------------------------ the score layer's own keys

    def _tap(self, layer: int, module) -> None:
        """Keep the k projection ``layer`` computes for this forward's slots (one call, then the
        hook goes): a stage that scores at an earlier layer reads those keys instead of
        projecting every slot again."""
        k_proj = self.state.adapter.attn_parts(module, self.state.text_config).k_proj
        handle = None

        def keep(mod, args, out):
            self.taps[layer] = out
            handle.remove()

        handle = k_proj.register_forward_hook(keep)
        self._tap_handles.append(handle)

    def close_taps(self) -> None:
        """Remove the hooks of taps that never fired (a forward that stopped early)."""
        for h in self._tap_handles:
            h.remove()
        self._tap_handles.clear()

    def projected_keys(self, ctx: LayerContext) -> torch.Tensor | None:
        """(B, N, Hkv, hd) the k projection (before RoPE) the context's layer computed for the
        current slots, or None when it has not run (the caller projects them itself)."""
        k = self.taps.get(ctx.layer)
        if k is None:
            return None
        parts = ctx.parts
        bsz, n = ctx.hidden.shape[:2]
        if k.shape[:2] != (bsz, n) or k.shape[-1] != parts.num_kv_heads * parts.head_dim:
            return None  # not this call's slots
        return k.view(bsz, n, parts.num_kv_heads, parts.head_dim)

    # services the contexts offer (see :mod:`.context`)

    def attention(self, ctx: LayerContext, rows: str) -> torch.Tensor:
        kind = "text_attention" if rows == "text" else "last_token_attention"
        q_rows = self._query_rows(ctx.slots, kind, scoring_only=True)
        scores, metric, flops = attention_scores(self.state, self.tokens, q_rows, ctx.module, ctx.hidden, ctx.kwargs,
                                                 rope=self.rope_now(ctx.kwargs), keys=self.projected_keys(ctx))
        self.metric = (ctx.layer, metric)
        self.score_flops += flops
        return scores

    def row_attention(self, ctx: LayerContext, rows: str):
        kind = "text_attention" if rows == "text" else "last_token_attention"
        q_rows = self._query_rows(ctx.slots, kind)
        probs, counts, metric, flops = attention_scores(self.state, self.tokens, q_rows, ctx.module, ctx.hidden,
                                                        ctx.kwargs, per_row=True, rope=self.rope_now(ctx.kwargs),
                                                        keys=self.projected_keys(ctx))
        self.metric = (ctx.layer, metric)
        self.score_flops += flops
        return probs, q_rows.flat.view(probs.shape[0], -1), counts

    def keys(self, ctx: LayerContext, flat: torch.Tensor | None, rotated: bool = False) -> torch.Tensor:
        """Keys of the slots ``flat`` (None: every slot): head-averaged before RoPE, or with
        ``rotated`` every kv head after RoPE, concatenated (their dot product depends on how far
        apart two tokens are). The ones the attention computed at this layer, else from the
        layer's own norm, k projection and the slots' cos / sin."""
        hs = ctx.hidden
        if self.metric is not None and self.metric[0] == ctx.layer:
            pre, rot = self.metric[1]
            if rotated:
                keys = rot.transpose(1, 2).flatten(2)  # (B, N, Hkv*hd)
                return keys if flat is None else keys.reshape(-1, keys.shape[-1])[flat.to(keys.device)]
            if flat is None:
                return pre.mean(2)  # (B, N, hd)
            at = flat.to(pre.device)
            rows = pre.reshape(-1, *pre.shape[2:]).index_select(0, at.reshape(-1))  # the slots read
            return rows.view(*at.shape, *pre.shape[2:]).mean(-2)  # heads averaged
        _, k, flops = layer_keys(ctx.parts, hs, flat)
        self.score_flops += flops
        shape = k.shape[:-2]
        if rotated:
            cos, sin = ctx.position_embeddings
            bsz, width = hs.shape[:2]
            at = (torch.arange(bsz * width, device=k.device).view(bsz, width) if flat is None else flat).to(k.device)
            cos = cos.expand(bsz, -1, -1).reshape(bsz * width, -1)[at.reshape(-1)].view(*shape, 1, -1)
            sin = sin.expand(bsz, -1, -1).reshape(bsz * width, -1)[at.reshape(-1)].view(*shape, 1, -1)
            return apply_rope_rolled(k, cos.to(k), rope_sin(sin.to(k))).flatten(-2)
        return k.mean(-2)

    # ------------------------------------------------------------------ after the last layer

    def finish(self, output):
        state = self.state
        self.close_taps()
        if not self.reduces:
            state.last_stats = stats_unreduced(state, self)
            return None
        state.last_stats = stats_reduced(state, self)
        if self.fingerprint is not None and self.decisions and self.reuse is None and self.n_prompt == self.n0:
            state.prompt = PromptDecision(self.input_ids[:, : self.n0], self.mask, self.fingerprint, self.decisions)
        self._mask_labels()
        return self._scatter_back(output)

    def present(self) -> torch.Tensor:
        """(B, N0) bool: which input positions are still in the sequence after the last stage."""
        pos = self.tokens.cache_pos
        out = torch.zeros(pos.shape[0], self.n0 + 1, dtype=torch.bool, device=pos.device)
        out.scatter_(1, torch.where(pos < 0, torch.full_like(pos, self.n0), pos), True)
        return out[:, : self.n0]

    def _mask_labels(self) -> None:
        """A prediction made at a removed position is not the model's: never score it. The top
        pre-hook handed the model clones of ``labels`` / ``shift_labels``; edit them in place."""
        labels, shift = self.state.labels
        if labels is None and shift is None:
            return
        gone = ~self.present()
        if labels is not None and labels.shape[1] == self.n0:
            labels[:, 1:].masked_fill_(gone[:, :-1].to(labels.device), -100)
        if shift is not None and shift.shape[1] == self.n0:
            shift.masked_fill_(gone.to(shift.device), -100)

    def _scatter_back(self, output):
        """Put the reduced last hidden state back at its full-length positions (zeros elsewhere)."""
        h = output.last_hidden_state  # (B, N', d)
        bsz, n0 = self.input_ids.shape
        k = self.logits_to_keep
        if isinstance(k, int) and 0 < k <= h.shape[1]:
            # the last k positions of every row are kept (non-visual: never removed), in the last k slots
            if all(c < 0 and c != FILLER for row in self.layout.code for c in row[n0 - k :]):
                return None  # the caller only reads them
        cpos = self.tokens.cache_pos.to(h.device)
        if self.tokens.has_fillers:
            cpos = torch.where(cpos < 0, torch.full_like(cpos, n0), cpos)  # fillers land in a trash column
        full = h.new_zeros(bsz, n0 + 1, h.shape[-1])
        full.scatter_(1, cpos[..., None].expand(-1, -1, h.shape[-1]), h)
        output.last_hidden_state = full[:, :n0]
        return output
