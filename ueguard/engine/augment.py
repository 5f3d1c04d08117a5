"""Batched image moves on the device: training's random crop with zero padding + horizontal flip, and a
per-row circular shift (shifted class-wise perturbations, and the defense that realigns them).

One draw of per-sample parameters (offsets, flip bits) from a caller-owned generator, then one
fused gather (:func:`ueguard.kernels.augment`) — no per-sample Python, and differentiable, so a
gradient can flow back through the augmentation to the input. The standard CIFAR recipe: pad 4 px
at 32 px (scaled with the image), crop back, flip with probability 1/2.
"""

from __future__ import annotations

import torch

from ueguard.kernels import augment


def draw_crop_flip(n: int, generator: torch.Generator, *, pad: int, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample window offsets ``(oy, ox)`` in [0, 2·pad] and flip bits (probability 1/2, or none),
    drawn on the CPU from ``generator`` in a fixed order (oy, ox, flips) so a seed replays a draw."""
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return torch.stack([oy, ox], dim=1), flips


def crop_flip(x: torch.Tensor, generator: torch.Generator, *, pad: int | None = None, flip: bool = True) -> torch.Tensor:
    """Random-crop (after zero padding by ``pad``, default H/8) and randomly flip a ``N×C×H×W`` batch
    of float images; differentiable with respect to ``x``."""
    n, _, h, _ = x.shape
    pad = max(1, h // 8) if pad is None else pad
    offsets, flips = draw_crop_flip(n, generator, pad=pad, flip=flip)
    return augment(x, offsets, flips, pad=pad)


def roll_rows(rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``N×C×H×W`` rows, row i circularly shifted by ``offsets[i]`` = (down, right) pixels — one gather,
    differentiable in ``rows`` (a step on the shifted copies reaches the class row they came from)."""
    n, _, h, w = rows.shape
    ys = (torch.arange(h, device=rows.device) - offsets[:, :1].to(rows.device)) % h   # N×H
    xs = (torch.arange(w, device=rows.device) - offsets[:, 1:].to(rows.device)) % w   # N×W
    picked = rows[torch.arange(n, device=rows.device)[:, None, None], :, ys[:, :, None], xs[:, None, :]]
    return picked.permute(0, 3, 1, 2)
