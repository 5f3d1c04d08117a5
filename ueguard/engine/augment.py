"""Batched training augmentation on the device: random crop with zero padding + horizontal flip.

One draw of per-sample parameters (offsets, flip bits) from a caller-owned generator, then one
gather — no per-sample Python. The standard CIFAR recipe: pad 4 px at 32 px (scaled with the image),
crop back, flip with probability 1/2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, generator: torch.Generator, *, pad: int | None = None, flip: bool = True) -> torch.Tensor:
    """Random-crop (after zero padding by ``pad``, default H/8) and randomly flip a ``N×C×H×W`` batch."""
    n, _, h, w = x.shape
    pad = max(1, h // 8) if pad is None else pad
    dev = x.device
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]           # N×1×H×1
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]           # N×1×1×W
    if flip:
        flipped = torch.rand(n, generator=generator).to(dev) < 0.5
        cols = torch.where(flipped[:, None, None, None], cols.flip(-1), cols)
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=dev)[None, :, None, None]
    return padded[batch, chans, rows, cols]
