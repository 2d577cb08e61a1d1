"""Host data on its way to the device without making the host wait.

A blocking copy to a GPU (``torch.tensor(data, device=...)``, ``t.to(device)``) synchronizes
the stream: the host waits until every kernel queued before it has run. A non-blocking copy
from pageable memory may too (the driver stages it). A non-blocking copy from pinned memory
does not: the host queues it and goes on, and the kernels after it on the stream see the data.
"""

from __future__ import annotations

import torch


def upload(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` (on the host) on ``device``: pinned and non-blocking to a CUDA device (torch's
    pinned-memory cache keeps the buffer until the copy has run), non-blocking to any other
    device, ``t`` itself on the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, non_blocking=True)
