"""Which image each visual token belongs to, so every image is budgeted on its own.

A prompt may hold several images (or an image and a video). Each one is a run of
consecutive visual tokens; samples are rows, images are numbered across the batch in
reading order (row by row), so per-image tensors are simply (G,) with G the number of
images in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Images:
    """The images of a batch.

    group:  (B, N) long, the image each token belongs to (0 .. G-1), -1 for other tokens.
    sample: (G,) the row each image is in.
    end:    (G,) the position of each image's last token.
    count:  (G,) its number of visual tokens.
    """

    group: torch.Tensor
    sample: torch.Tensor
    end: torch.Tensor
    count: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.sample.shape[0])


def split_images(ids: torch.Tensor, vis: torch.Tensor, per_image: int | None = None) -> Images:
    """Number the images of a batch of ids.

    ids, vis: (B, N) token ids and which of them are visual. An image is a maximal run of
    consecutive visual tokens with the same id (so an image next to a video is two), cut
    every ``per_image`` tokens when the model gives every image the same count (LLaVA:
    ``<image><image>`` with nothing between them is one run of two images).
    """
    bsz, n = ids.shape
    ar = torch.arange(n, device=ids.device)
    same = torch.zeros_like(vis)
    same[:, 1:] = vis[:, 1:] & vis[:, :-1] & (ids[:, 1:] == ids[:, :-1])
    start = vis & ~same  # (B, N) first token of a run
    if per_image:
        run_start = torch.where(start, ar, torch.zeros_like(ar)).cummax(dim=1).values  # (B, N)
        start = start | (vis & ((ar - run_start) % per_image == 0))
    gid = start.flatten().cumsum(0).view(bsz, n) - 1  # reading order over the batch
    group = torch.where(vis, gid, torch.full_like(gid, -1))
    n_img = int(start.sum())
    sample = start.nonzero()[:, 0]  # (G,) row-major, so in gid order
    members = group[vis]
    end = torch.full((n_img,), -1, dtype=torch.long, device=ids.device)
    end = end.scatter_reduce(0, members, ar.expand(bsz, n)[vis], reduce="amax")
    count = torch.bincount(members, minlength=n_img)
    return Images(group=group, sample=sample, end=end, count=count)
