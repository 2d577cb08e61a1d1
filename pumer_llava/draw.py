"""Which image patches a reduction kept, drawn on the image."""

from __future__ import annotations

import math

LABEL, GAP = 12, 4  # pixels: the caption band above each panel, the space between panels


def draw_kept(image, stats, sample: int = 0, layer: int | None = None, dim: float = 0.25):
    """The image with the patches kept by a reduction shown and the others dimmed.

    ``stats`` is ``model.pumer.last_stats`` of the forward that carried ``image`` (as
    sample ``sample``). ``layer``: one reducing layer (``-1``: VisPruner's choice before the
    LLM); None draws every reducing layer side by side, left to right in depth order, each
    under a caption band of ``LABEL`` pixels. The
    image is shown as LLaVA's processor crops it (shortest side resized, centre square), one
    cell per patch of its square grid (24 x 24 on LLaVA-1.5). Raises ValueError when nothing
    was reduced or the visual tokens are not one square grid (anyres crops, video, several
    images in the sample).
    """
    from PIL import Image, ImageDraw

    kept = stats.kept_patches
    if not kept:
        raise ValueError("nothing was reduced in this forward: there are no kept patches to draw")
    if not 0 <= sample < len(stats.visual_tokens_total):
        raise ValueError(f"sample {sample} is not in this batch of {len(stats.visual_tokens_total)}")
    layers = sorted(kept) if layer is None else [layer]
    for lay in layers:
        if lay not in kept:
            raise ValueError(f"layer {lay} did not reduce; reducing layers: {sorted(kept)}")
    total = stats.visual_tokens_total[sample]
    side = math.isqrt(total)
    if side * side != total or side == 0:
        raise ValueError(
            f"sample {sample} has {total} visual tokens, not one square grid of patches: draw_kept draws "
            "single-image LLaVA-1.5 prompts"
        )
    img = image.convert("RGB")
    cell = max(4, round(min(img.size) / side))
    size = cell * side
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))))
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    base = img.crop((left, top, left + size, top + size))
    out = Image.new("RGB", (size * len(layers) + GAP * (len(layers) - 1), LABEL + size), (255, 255, 255))
    pen = ImageDraw.Draw(out)
    for i, lay in enumerate(layers):
        shade = Image.new("L", base.size, int(255 * dim))
        mask = ImageDraw.Draw(shade)
        for p in kept[lay][sample]:
            r, c = divmod(int(p), side)
            mask.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], fill=255)
        x = i * (size + GAP)
        out.paste(Image.composite(base, Image.new("RGB", base.size, (0, 0, 0)), shade), (x, LABEL))
        pen.text((x + 2, 1), "before LLM" if lay == -1 else f"layer {lay}", fill=(0, 0, 0))
    return out
