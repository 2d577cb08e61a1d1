"""A reducing prefill: plan the stages, then at each stage decide and apply, layer by layer.

Flow of one prefill (the hooks in :mod:`.runtime` only route here):

1. :class:`Prefill` is opened by the inner model's pre-hook from ``input_ids``: which
   tokens are visual, which image each belongs to, how many each stage keeps per image.
2. At a stage's decoder layer, :meth:`Prefill.at_layer` scores (or takes the prompt's
   earlier decision, see below), decides a :class:`StageDecision` (which slots stay,
   which merge into which), applies it to the hidden states and the :class:`Tokens`, and
   gathers the decoder loop's full-length kwargs (cos/sin, position ids, mask) for the
   tokens now present. Every later layer gets those, and its cache layer is told the
   original positions of what it stores (:mod:`.cache`).
3. :meth:`Prefill.finish` writes ``last_stats``, masks labels that a removed position
   would predict, and scatters the last hidden state back to full length when the caller
   reads more than the last positions.

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
from ..reduce.images import Images, split_images
from ..reduce.merge import bipartite_merge, merge_into
from ..reduce.ragged import ragged_nonzero, top_per_row
from .cache import reduced_layer
from .masks import layer_mask
from .scoring import attention_scores, custom_scores, random_scores, take_rows
from .stats import stats_reduced, stats_unreduced
from .tokens import Tokens, keep_slots
from .vision import vispruner_keep


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


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
    ``last_stats`` key (-1: VisPruner's choice before the LLM, made at the first layer's input);
    score_layer: the layer whose input is scored (FastV scores at L-1); vision: chosen from
    the vision tower (VisPruner) instead of by a scorer.
    """

    index: int
    layer: int
    key: int
    score_layer: int
    vision: bool = False


@dataclass(frozen=True)
class StageDecision:
    """What a stage did, in the slots it received, so that it can be applied again.

    n_in: slots it received; sel / filler (B, N'): which slots stay (left-padded rows);
    merge: (rows, src, dst, w) pairs (P,) of ``reduce.merge.merge_into``, or None.
    """

    n_in: int
    sel: torch.Tensor
    filler: torch.Tensor
    has_fillers: bool
    merge: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def extended(self, extra: int) -> StageDecision:
        """The same decision on ``extra`` more slots at the end (tokens after the prompt: kept)."""
        if extra == 0:
            return self
        bsz = self.sel.shape[0]
        tail = torch.arange(self.n_in, self.n_in + extra, device=self.sel.device).expand(bsz, extra)
        return StageDecision(self.n_in + extra, torch.cat([self.sel, tail], 1),
                             torch.cat([self.filler, self.filler.new_zeros(bsz, extra)], 1), self.has_fillers, self.merge)


@dataclass
class PromptDecision:
    """The last reducing prefill, kept so a forward that extends its prompt can reuse it."""

    input_ids: torch.Tensor  # (B, n)
    mask: torch.Tensor  # (B, n) bool
    fingerprint: torch.Tensor  # (B, n) a fixed projection of the input embeddings
    decisions: list[StageDecision]


def fingerprint(emb: torch.Tensor) -> torch.Tensor:
    """(B, N) a fixed random projection of each input embedding: the same prompt gives the same
    values, another image under the same placeholder ids different ones."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(emb.shape[-1], generator=g).to(emb.device)
    return emb.float() @ w


def plan(state, images: Images) -> tuple[list[Stage], list[list]]:
    """The stages of the cascade and, per stage, each image's (prune, merge, n_out)."""
    cfg = state.config
    counts, owners = images.count.tolist(), images.sample.tolist()
    keeps = []
    for n, b in zip(counts, owners):
        if cfg.keep_tokens is not None:
            if n < cfg.keep_tokens:
                raise ValueError(
                    f"keep_tokens={cfg.keep_tokens} is larger than an image of sample {b} ({n} visual tokens): "
                    "keep_tokens is a budget per image"
                )
            keeps.append(cfg.keep_tokens)
        else:
            keeps.append(min(n, max(1, round(n * cfg.ratio))))
    if keeps == counts:
        return [], []
    recipe = state.recipe
    stages = []
    if recipe.pre_llm:
        stages.append(Stage(index=0, layer=0, key=-1, score_layer=0, vision=True))
    for layer in state.layers:
        stages.append(Stage(index=len(stages), layer=layer, key=layer, score_layer=layer + recipe.score_offset))
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

    def __init__(self, state, input_ids: torch.Tensor, vis: torch.Tensor, mask2d, use_cache: bool, logits_to_keep):
        self.state = state
        bsz, n0 = input_ids.shape
        dev = vis.device
        valid = mask2d.bool().to(dev) if (mask2d is not None and mask2d.ndim == 2) else torch.ones_like(vis)
        self.input_ids, self.mask, self.n0 = input_ids, valid, n0
        self.use_cache, self.logits_to_keep = use_cache, logits_to_keep
        # The prompt: a caller that reads the logits of the last k positions of a prefill checks
        # the k - 1 tokens before them (a speculative decoder's candidates): they are not the prompt
        k = logits_to_keep if isinstance(logits_to_keep, int) else 0
        self.n_prompt = n0 - (k - 1) if 1 < k <= n0 else n0
        self.totals = vis.sum(1).tolist()  # samples may carry different numbers of visual tokens
        self.images = split_images(input_ids.to(dev), vis, state.adapter.visual_tokens_per_image(state.model_config))
        self.vis_start = vis.to(torch.int8).argmax(1)
        self.tokens = Tokens.full(valid, vis, self.images.group)
        self.stages, self.plans = plan(state, self.images)
        self.reduces = bool(self.stages)
        self.at: dict[int, list[Stage]] = {}
        self.score_at: dict[int, list[Stage]] = {}
        for st in self.stages:
            self.at.setdefault(st.layer, []).append(st)
            if not st.vision and st.score_layer != st.layer:
                self.score_at.setdefault(st.score_layer, []).append(st)
        self.first_layer = min([st.score_layer for st in self.stages] + [st.layer for st in self.stages], default=0)
        self.first_reduced = min((st.layer for st in self.stages), default=0)
        self.decisions: list[StageDecision] = []
        self.reuse: list[StageDecision] | None = None
        self.fingerprint: torch.Tensor | None = None
        self.kw: dict | None = None  # gathered kwargs for the tokens now present
        self.cache_view: tuple | None = None  # (pos, log_size, n_full, fillers) the reduced cache layers store
        self.pending_scores: dict[int, torch.Tensor] = {}
        self.metric: tuple[int, torch.Tensor] | None = None  # (layer, keys) the scoring computed
        self.tokens_per_layer: dict[int, torch.Tensor] = {}  # reducing layer -> (B,) from it on
        self.vis_per_layer: dict[int, torch.Tensor] = {}
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.select_seconds = 0.0
        self.score_flops = 0.0

    # ------------------------------------------------------------------ the prompt's decision

    def check_reuse(self, emb: torch.Tensor) -> None:
        """At the language model's input: reuse the last prompt's decisions if this extends it."""
        state = self.state
        self.fingerprint = fingerprint(emb)
        prev = state.prompt
        if prev is None or self.use_cache or not self.reduces:
            return
        n = prev.input_ids.shape[1]
        ids = self.input_ids
        if ids.shape[0] != prev.input_ids.shape[0] or ids.shape[1] < n:
            return
        if self.images.end.numel() and int(self.images.end.max()) >= n:
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
            t0 = _now(hs.device)
            dec = self._decision(stage, module, hs, kwargs)
            hs = self._apply(dec, hs)
            self.kw = self._gather(kwargs, hs.dtype)
            tok = self.tokens
            self.cache_view = (tok.cache_pos, tok.log_size(self.state.prop_attn), self.n0, tok.has_fillers)
            self.kept[stage.key] = (tok.pos, tok.is_vis)
            # counts change only here: later layers read the last count at or before them
            self.tokens_per_layer[layer] = tok.valid.sum(1)
            self.vis_per_layer[layer] = (tok.is_vis & tok.valid).sum(1)
            self.select_seconds += _now(hs.device) - t0
        for stage in self.score_at.get(layer, ()):  # FastV-style: score from this layer's input, drop later
            if self.reuse is None:
                t0 = _now(hs.device)
                self.pending_scores[stage.index] = self._score(stage, module, hs, self.kw or kwargs)
                self.select_seconds += _now(hs.device) - t0
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
        if dec.merge is not None:
            rows, src, dst, w = (t.to(hs.device) for t in dec.merge)
            hs, size = merge_into(hs, tok.size.to(hs.device), rows, src, dst, w)
            tok = tok.with_sizes(size.to(tok.size.device))
        self.tokens = tok.take(dec.sel, dec.filler, dec.has_fillers)
        return take_rows(hs, dec.sel)

    def _gather(self, kwargs: dict, dtype) -> dict:
        """The decoder loop's full-length kwargs, for the tokens now present."""
        tok, state, out = self.tokens, self.state, {}
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            out["position_embeddings"] = tuple(take_rows(t, tok.pos) for t in pe)
        pid = kwargs.get("position_ids")
        if pid is not None:
            out["position_ids"] = take_positions(pid, tok.pos)
        out["attention_mask"] = layer_mask(
            kwargs.get("attention_mask"), tok.pos, tok.pos, tok.cache_pos, tok.log_size(state.prop_attn),
            fillers=tok.has_fillers, dtype=dtype, flash=state.flash, eager=state.eager,
        )
        return out

    # ------------------------------------------------------------------ deciding

    def _score(self, stage: Stage, module, hs: torch.Tensor, kw: dict) -> torch.Tensor:
        """(B, n_vis) scores of the current visual tokens, ``ragged_nonzero`` order."""
        state, tok = self.state, self.tokens
        scorer = state.recipe.scorer
        if callable(scorer):
            # how many each sample keeps after pruning (merging takes its share after the scores)
            keep = self._per_sample([n_out + m for _, m, n_out in self.plans[stage.index]])
            return custom_scores(scorer, tok, hs, stage.layer, stage.index - int(bool(state.recipe.pre_llm)),
                                 self.input_ids[:, : self.n_prompt], self.vis_start, keep)
        vis_idx, _ = ragged_nonzero(tok.is_vis)
        if scorer == "random":
            p = self.n_prompt
            return random_scores(state.config.seed, self.input_ids[:, :p], self.mask[:, :p], vis_idx.shape[1], vis_idx.device)
        scores, metric, flops = attention_scores(state, tok, self.images, module, hs, kw, scorer, self.n_prompt)
        self.metric = (stage.score_layer, metric)
        self.score_flops += flops
        return scores.gather(1, vis_idx.to(scores.device))

    def _per_sample(self, per_image: list[int]) -> list[int]:
        out = [0] * self.input_ids.shape[0]
        for b, n in zip(self.images.sample.tolist(), per_image):
            out[b] += n
        return out

    def _decide(self, stage: Stage, module, hs: torch.Tensor, kw: dict) -> StageDecision:
        """Prune, then merge, within each image: every image keeps its own budget.

        Images are the rows here (G of them across the batch), so top-k and bipartite merging
        never move a token's share from one image to another."""
        state, tok, imgs = self.state, self.tokens, self.images
        scores = self.pending_scores.pop(stage.index, None)
        if scores is None:
            scores = self._score(stage, module, hs, kw)
        rows_plan = self.plans[stage.index]
        dev0 = tok.is_vis.device
        prune = torch.tensor([p for p, _, _ in rows_plan], device=dev0)
        merge_n = [m for _, m, _ in rows_plan]
        vis_idx, vis_ok = ragged_nonzero(tok.is_vis)  # the layout ``scores`` come in
        full = torch.zeros(tok.is_vis.shape, device=dev0)
        full[torch.arange(vis_idx.shape[0], device=dev0)[:, None].expand_as(vis_idx)[vis_ok], vis_idx[vis_ok]] = (
            scores.to(dev0).float()[vis_ok]
        )
        own = tok.group[imgs.sample] == torch.arange(imgs.n, device=dev0)[:, None]  # (G, N)
        img_idx, img_ok = ragged_nonzero(own)  # (G, m) current slots of each image's tokens
        rows = imgs.sample[:, None].expand_as(img_idx)
        top, kept_ok = top_per_row(full[rows, img_idx], img_ok, img_ok.sum(1) - prune)
        kept = img_idx.gather(1, top)  # (G, k_max) current slots, ascending
        rows = imgs.sample[:, None].expand_as(kept)
        merge = None
        if any(merge_n):
            parts = state.adapter.attn_parts(module, state.text_config)
            dev = parts.k_proj.weight.device
            xv = hs[rows.to(hs.device), kept.to(hs.device)].to(dev)  # (G, k_max, d)
            n_img, k_max, d = xv.shape
            if self.metric is not None and self.metric[0] == stage.layer:  # keys the scoring already computed
                metric = self.metric[1][rows.to(dev), kept.to(dev)]
            else:
                with torch.no_grad():
                    metric = parts.k_proj(parts.norm(xv)).view(n_img, k_max, parts.num_kv_heads, parts.head_dim).mean(2)
                self.score_flops += n_img * k_max * d * parts.num_kv_heads * parts.head_dim
            res = bipartite_merge(xv, metric, tok.size[rows, kept].to(dev),
                                  torch.tensor(merge_n, device=dev), valid=kept_ok.to(dev))
            src, dst = kept.gather(1, res.src.to(dev0)), kept.gather(1, res.dst.to(dev0))  # (G, r) slots
            pair_rows = imgs.sample[:, None].expand_as(src)
            merge = (pair_rows.reshape(-1), src.reshape(-1), dst.reshape(-1), res.src_ok.to(dev0).reshape(-1).float())
            kept_ok = res.survive.to(dev0)
        self.metric = None
        keep = (~tok.is_vis & ~tok.filler).index_put((rows[kept_ok], kept[kept_ok]), torch.tensor(True, device=dev0))
        sel, filler, has_fillers = keep_slots(keep)
        return StageDecision(tok.pos.shape[1], sel, filler, has_fillers, merge)

    def _decide_vision(self, stage: Stage, hs: torch.Tensor) -> StageDecision:
        tok = self.tokens
        keep_vis, flops = vispruner_keep(self.state, tok, self.images, [n for _, _, n in self.plans[stage.index]], hs)
        self.score_flops += flops
        keep = (~tok.is_vis & ~tok.filler) | keep_vis.to(tok.is_vis.device)
        sel, filler, has_fillers = keep_slots(keep)
        return StageDecision(tok.pos.shape[1], sel, filler, has_fillers)

    # ------------------------------------------------------------------ after the last layer

    def finish(self, output):
        state = self.state
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
        pos = self.tokens.pos
        if isinstance(k, int) and 0 < k <= h.shape[1]:
            tail = torch.arange(n0 - k, n0, device=pos.device)
            if bool((pos[:, -k:] == tail).all()):
                return None  # the caller only reads the last k positions, which are all kept
        cpos = self.tokens.cache_pos.to(h.device)
        cpos = torch.where(cpos < 0, torch.full_like(cpos, n0), cpos)  # fillers land in a trash column
        full = h.new_zeros(bsz, n0 + 1, h.shape[-1])
        full.scatter_(1, cpos[..., None].expand(-1, -1, h.shape[-1]), h)
        output.last_hidden_state = full[:, :n0]
        return output

