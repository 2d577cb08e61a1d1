"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): before the language model, keep the
tokens the vision tower's [CLS] attends to most (dominant) and fold the rest into a few
contextual tokens.

The paper, at the tower layer the projector reads (CLIP's second-to-last): the [CLS] and the
``D - 1`` patches with the highest [CLS] attention are dominant; of the other tokens, in
their order, every ``max(1, M // C)``-th (``C`` of them) is a target, every other one joins
the target with the most similar key (cosine, head-mean keys), and a contextual token is the
target's feature plus the mean of its members' features. The ``D + C`` tokens are projected
and replace the image's 576 (LLaVA-1.5: 54 + 10 = 64, 108 + 20 = 128, 162 + 30 = 192).

Here, per image with budget ``o``: ``C = round(o * 10 / 64)`` (at least 1 when ``o >= 2``),
``D = o - C`` (option ``dominant``: ``D`` given, ``C = o - D``), then the same steps
(``reduce.contextual``), batched over the images of a batch. Deviations:

- LLaVA-1.5 drops the tower's [CLS] before the projector, and so do we: the ``D`` dominant
  tokens are all patches (the paper spends one of them on the [CLS], fed to the LLM).
- Each kept token keeps its original position (RoPE ids) and a contextual token sits at its
  target's slot, so the image keeps its layout; the paper appends the contextual tokens after
  the dominant ones and re-indexes the shortened sequence.
- The contextual features are summed in float32 and projected in the model's dtype (the paper:
  fp16 throughout); importance is the head *mean* of the [CLS] attention (the paper sums the
  heads: the same ranking).
- An image whose budget is its whole count is left as it was (no contextual rebuild).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..reduce.contextual import contextual_flops, contextual_tokens
from .base import Choice, Method, MethodOptions


@dataclass(frozen=True)
class VisionZipOptions(MethodOptions):
    """dominant: dominant tokens per image (the rest of the budget is contextual); None: the
    paper's split, 54 of 64 (``C = round(budget * 10 / 64)``)."""

    dominant: int | None = None

    def validate(self) -> None:
        if self.dominant is not None and (isinstance(self.dominant, bool) or not isinstance(self.dominant, int)
                                          or self.dominant < 1):
            raise ValueError(f"dominant must be an int >= 1 (dominant tokens per image) or None, got {self.dominant!r}")


def check_budget(options: VisionZipOptions, budget: int) -> None:
    if options.dominant is not None and options.dominant > budget:
        raise ValueError(f"visionzip: dominant={options.dominant} exceeds the per-image budget of {budget} tokens: "
                         f"give dominant <= {budget}, or leave it unset (the budget minus round(budget * 10 / 64))")


def split(out: int, count: int, dominant: int | None) -> tuple[int, int]:
    """(dominant, contextual) for an image of ``count`` tokens keeping ``out``."""
    if dominant is not None and dominant > out:
        raise ValueError(f"visionzip: dominant={dominant} exceeds the per-image budget of {out} tokens")
    if out >= count:
        return count, 0
    if dominant is not None:
        return dominant, out - dominant
    c = max(1, round(out * 10 / 64)) if out >= 2 else 0
    return out - c, c


def before_llm(ctx) -> Choice:
    plan = [split(o, n, ctx.options.dominant) for o, n in zip(ctx.out, ctx.counts)]
    n_ctx = max(c for _, c in plan)
    dc = ctx.host_tensor(f"visionzip:{ctx.options.dominant}", lambda: [[d for d, _ in plan], [c for _, c in plan]])
    imp = ctx.importance(per_image=True)
    keys = ctx.tower_keys(per_image=True)
    feats = ctx.tower_features(per_image=True)
    keep, targets, values = contextual_tokens(imp, keys, feats, dc[0], dc[1], ctx.out_max, n_ctx, ctx.image_pad)
    g, m = imp.shape
    ctx.add_flops(contextual_flops(g, m, keys.shape[-1], feats.shape[-1], n_ctx))
    if n_ctx == 0:
        return Choice(keep=ctx.ascending(keep, ctx.out_pad))
    # each image's real contextual tokens, picked with a host-built index (no device read)
    real = ctx.host_tensor(f"visionzip-real:{ctx.options.dominant}",
                           lambda: [i * n_ctx + j for i, (_, c) in enumerate(plan) for j in range(c)])
    slots = ctx.flat_slots.gather(1, targets.to(ctx.flat_slots.device)).reshape(-1)[real]
    projected = ctx.project(values.reshape(-1, values.shape[-1])[real.to(values.device)].to(ctx.hidden.dtype))
    return Choice(keep=ctx.ascending(keep, ctx.out_pad), replace=(slots, projected))


METHOD = Method(
    name="visionzip",
    description="before the LLM: keep the tokens the vision tower's [CLS] attends to most, fold the rest into "
    "a few contextual tokens by key similarity (VisionZip)",
    options=VisionZipOptions,
    before_llm=before_llm,
    needs=frozenset({"vision", "cls", "tower_features"}),
    check_budget=check_budget,
    paper="Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language Models, CVPR 2025",
)
