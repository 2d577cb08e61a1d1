"""Where every token of a reducing prefill sits, known on the host from one read of the ids.

A prefill reads ``input_ids`` and the attention mask from the device once (one host
sync) and from then on knows, in plain Python, everything whose *shape* a reduction
needs: which positions are visual and which image each belongs to, how many tokens
each image keeps after each stage, and so where every image's tokens sit in the
hidden states at every stage. Only *which* visual tokens stay is data (decided on the
device). So no stage needs ``nonzero``, ``.item()`` or ``.tolist()``: its index tensors
are built here and copied to the device in one transfer (:func:`to_device`).

Slot layout at a stage, per row: ``F`` fillers (left padding for rows that keep fewer
tokens than the longest row), then the row's tokens in their original order, every
non-visual token (text and input padding) kept, each image with the count it has at
that stage. Codes per slot: ``>= 0`` the image index (visual), :data:`TEXT`,
:data:`PAD` (input padding), :data:`FILLER`.

With text merging on, the prompt's text runs between images (:class:`Segment`) also hold a
count per stage, like images: once a run has merged, which of its tokens stand where is
data, so its slots carry the run's first position as a stand-in (right for every
comparison with an image or the prompt's end, which a run never straddles) and
:attr:`StageSlots.exact` is False.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..reduce.host import upload

TEXT, PAD, FILLER = -1, -2, -3  # ordered so that valid = code >= TEXT and visual = code >= 0

# Plans depend only on the prompt's structure (where text, padding and images are), not on
# its ids: a prompt shape seen before (a chat turn repeated, a benchmark, an evaluation batch
# of equal shapes) reuses its plans, and their index tensors already on the device, instead
# of rebuilding them in Python. Nothing writes into a cached tensor.
_PLANS: OrderedDict = OrderedDict()
_PLANS_MAX = 32  # at batch 32 x 640 tokens a plan is ~1 MB of device tensors


def cached(key, build):
    """``build()``, remembered under ``key`` (least recently used entries are dropped)."""
    hit = _PLANS.get(key)
    if hit is None:
        hit = _PLANS[key] = build()
        if len(_PLANS) > _PLANS_MAX:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return hit


@dataclass(frozen=True)
class Image:
    """One image of the batch: its row, first and last input position, visual-token count."""

    sample: int
    start: int
    end: int
    count: int


@dataclass(frozen=True)
class Segment:
    """A run of the prompt's text that may merge: consecutive text tokens of one row between
    images (or an image and the row's ends), without the row's first token (an attention
    sink) and its last prompt token (it predicts what comes next)."""

    sample: int
    start: int
    end: int

    @property
    def count(self) -> int:
        return self.end - self.start + 1


def text_segments(layout: PromptLayout, n_prompt: int) -> list[Segment]:
    """The mergeable text runs of every row's prompt that has an image (at least two tokens
    each), in order. A row without an image is left as the unpatched model runs it."""
    out = []
    rows_with_images = {im.sample for im in layout.images if im.start < n_prompt}
    for b, codes in enumerate(layout.code):
        if b not in rows_with_images:
            continue
        valid = [i for i, c in enumerate(codes[:n_prompt]) if c != PAD]
        if len(valid) < 3:
            continue
        run: list[int] = []
        for i in range(valid[0] + 1, valid[-1] + 1):  # the last prompt token ends every run
            if codes[i] == TEXT and i < valid[-1]:
                run.append(i)
                continue
            if len(run) >= 2:
                out.append(Segment(b, run[0], run[-1]))
            run = []
    return out


class PromptLayout:
    """The input of one prefill, on the host.

    ids: (B, N) rows of token ids with -1 at masked (padding) positions (lists or an array);
    visual_ids: the placeholder ids of visual tokens; per_image: tokens per image when the
    model gives every image the same count (a run of adjacent images is cut every that
    many), else None. An image is a maximal run of consecutive visual tokens with the same
    id (an image next to a video is two).
    """

    def __init__(self, ids, visual_ids: set[int], per_image: int | None):
        # every token at once in numpy (a batch of 32 prompts of 640 tokens is 20k of them; a
        # loop over them in Python took ~15 ms, while the device waits for the first layer)
        a = np.asarray(ids, dtype=np.int64).reshape(len(ids), -1)
        self.ids = a.tolist() if not isinstance(ids, list) else ids
        self.bsz, self.n = a.shape
        vis = np.isin(a, np.fromiter(visual_ids, dtype=np.int64, count=len(visual_ids)))
        # an image starts where a run of one visual id starts, and every ``per_image`` tokens in it
        same = np.zeros_like(vis)
        same[:, 1:] = vis[:, 1:] & vis[:, :-1] & (a[:, 1:] == a[:, :-1])
        new = vis & ~same
        if per_image:
            at = np.arange(self.n)
            run_start = np.maximum.accumulate(np.where(new, at, 0), axis=1)
            new |= vis & ((at - run_start) % per_image == 0)
        g = np.cumsum(new.ravel()).reshape(a.shape) - 1  # the image index of every visual token
        code = np.where(vis, g, np.where(a < 0, PAD, TEXT))
        rows, starts = np.nonzero(new)
        counts = np.bincount(g[vis], minlength=len(starts))
        self.images: list[Image] = [Image(b, s, s + c - 1, c)
                                    for b, s, c in zip(rows.tolist(), starts.tolist(), counts.tolist())]
        self.code: list[list[int]] = code.tolist()
        self.key = (self.bsz, self.n, code.tobytes())  # the structure host plans depend on
        self.counts = [im.count for im in self.images]
        self.valid_n = (code != PAD).sum(1).tolist()
        self.visual_n = vis.sum(1).tolist()
        self.vis_start = np.where(vis.any(1), vis.argmax(1), 0).tolist()

    @property
    def n_images(self) -> int:
        return len(self.images)

    def per_sample(self, per_image: list[int]) -> list[int]:
        """Per row, the sum of a per-image quantity over that row's images."""
        out = [0] * self.bsz
        for im, n in zip(self.images, per_image):
            out[im.sample] += n
        return out

    def stage(self, counts: list[int], segments: tuple[Segment, ...] = (), text_counts: tuple[int, ...] = ()) -> StageSlots:
        """The slot layout when image g holds ``counts[g]`` tokens (and text run s ``text_counts[s]``)."""
        key = ("slots", self.key, tuple(counts), tuple(segments), tuple(text_counts))
        return cached(key, lambda: StageSlots(self, counts, segments, text_counts))


class StageSlots:
    """Slot layout of every row when the images hold ``counts`` tokens (see the module doc).

    width: slots per row; fillers[b]: filler slots at the start of row b; start[g]: the
    slot of image g's first token; code: (B, width) codes; src[b][s]: for a non-visual
    slot, the input position of its token (its position is known), else -1; a slot of a
    text run that has merged: the run's first position (a stand-in, ``exact`` False).
    seg[b][s]: the text run a slot belongs to, or -1; seg_start[s]: the slot of run s's
    first token; text_counts[s]: tokens run s holds.
    """

    def __init__(self, layout: PromptLayout, counts: list[int], segments=(), text_counts=()):
        self.layout, self.counts = layout, list(counts)
        self.segments, self.text_counts = tuple(segments), tuple(text_counts) or tuple(s.count for s in segments)
        self.exact = all(c == s.count for c, s in zip(self.text_counts, self.segments))
        seg_of = {}
        for j, sg in enumerate(self.segments):
            for i in range(sg.start, sg.end + 1):
                seg_of[(sg.sample, i)] = j
        rows = []
        for b, codes in enumerate(layout.code):
            row_code, row_src, row_seg, seen = [], [], [], set()
            for i, c in enumerate(codes):
                j = seg_of.get((b, i), -1)
                if j >= 0:
                    if i == self.segments[j].start:
                        n, sg = self.text_counts[j], self.segments[j]
                        row_code.extend([TEXT] * n)
                        row_src.extend(range(sg.start, sg.start + n) if n == sg.count else [sg.start] * n)
                        row_seg.extend([j] * n)
                elif c < 0:
                    row_code.append(c)
                    row_src.append(i)
                    row_seg.append(-1)
                elif c not in seen:
                    seen.add(c)
                    row_code.extend([c] * counts[c])
                    row_src.extend([-1] * counts[c])
                    row_seg.extend([-1] * counts[c])
            rows.append((row_code, row_src, row_seg))
        self.width = max((len(r[0]) for r in rows), default=0)
        self.fillers = [self.width - len(r[0]) for r in rows]
        self.code = [[FILLER] * f + r[0] for f, r in zip(self.fillers, rows)]
        self.src = [[-1] * f + r[1] for f, r in zip(self.fillers, rows)]
        self.seg = [[-1] * f + r[2] for f, r in zip(self.fillers, rows)]
        self.start = [0] * layout.n_images
        self.seg_start = [0] * len(self.segments)
        for b, row in enumerate(self.code):
            prev = None
            for s, c in enumerate(row):
                if c >= 0 and c != prev:
                    self.start[c] = s
                prev = c if c >= 0 else None
            prev = -1
            for s, j in enumerate(self.seg[b]):
                if j >= 0 and j != prev:
                    self.seg_start[j] = s
                prev = j

    @property
    def has_fillers(self) -> bool:
        return any(self.fillers)

    def image_slots(self) -> tuple[list[list[int]], list[list[bool]]]:
        """(G, m_max) the slots of each image's tokens, padded with its first slot, and validity."""
        m = max(self.counts, default=0)
        idx = [[self.start[g] + min(j, max(c - 1, 0)) for j in range(m)] for g, c in enumerate(self.counts)]
        ok = [[j < c for j in range(m)] for c in self.counts]
        return idx, ok

    def text_rows(self, n_prompt: int) -> tuple[list[list[int]], list[list[bool]], list[list[int]]]:
        """The prompt's text tokens of every row (slots, validity, input positions), padded.

        A row with no text in the prompt reads from its last prompt token instead."""
        slots = []
        for b in range(self.layout.bsz):
            row = [s for s, (c, i) in enumerate(zip(self.code[b], self.src[b])) if c == TEXT and i < n_prompt]
            slots.append(row)
        if not any(slots):
            return None
        r = max(len(s) for s in slots)
        idx = [s + [s[0] if s else 0] * (r - len(s)) for s in slots]
        ok = [[j < len(s) for j in range(r)] for s in slots]
        pos = [[self.src[b][s] for s in row] for b, row in enumerate(idx)]
        return idx, ok, pos


def to_device(device, *parts) -> list[torch.Tensor]:
    """Int (or bool) lists of one or two dimensions, each rectangular, as long tensors on
    ``device``, in one host-to-device copy that the host does not wait for (views of one
    buffer; :func:`..reduce.host.upload`)."""
    flat, shapes = [], []
    for p in parts:
        if p and isinstance(p[0], list):
            shapes.append((len(p), len(p[0])))
            for row in p:
                flat.extend(row)
        else:
            shapes.append((len(p),))
            flat.extend(p)
    t = upload(torch.tensor(flat, dtype=torch.long), device)
    out, at = [], 0
    for shape in shapes:
        n = shape[0] * (shape[1] if len(shape) > 1 else 1)
        out.append(t[at : at + n].view(shape))
        at += n
    return out
