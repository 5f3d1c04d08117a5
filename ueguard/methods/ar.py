"""AR — autoregressive perturbations (Sandoval-Segura, Singla, Geiping, Goldblum, Goldstein, Jacobs,
*Autoregressive Perturbations for Data Poisoning*, NeurIPS 2022). Code:
github.com/psandovalsegura/autoregressive-poisoning.

Threat model: the adversary trains a classifier from scratch. AR noise needs neither a surrogate nor
the data: each class k owns, per channel c, a causal 3×3 autoregressive filter w_{k,c} (the bottom-right
tap, the pixel being generated, is 0), and a fresh realisation of that process is drawn for every
image:

    δ[c, i, j] = Σ_{a,b ∈ {0,1,2}, (a,b) ≠ (2,2)} w_{k,c}[a, b] · δ[c, i−2+a, j−2+b]

filled in raster order on an (H+crop)×(W+crop) canvas whose first two rows and columns are standard
normal, then cropped to its last H×W (the authors: a 36×36 canvas cropped by 4 for 32-px CIFAR) and
scaled to the L2 norm ``l2_eps`` (authors: 1.0 on CIFAR). A filter is easy to "read" for a network (a
3×3 convolution with the matching coefficients annihilates its own class's noise), yet the noise of a
class is different in every image.

Filters as in the authors' default: standard normal taps, the generated tap set to 0, normalised to sum
to 1 per channel; unstable ones are rejected (see :func:`random_filters`; the authors likewise select
their processes by a search). ueguard's scaling of the default budget with the image: ``l2_eps`` = 1.0·√(H·W/32²),
i.e. the same RMS as 1.0 at 32 px. The budget is L2 (``-o l2_eps=...``); the CLI's L∞ ``--eps`` does
not apply. Unstable filters can grow geometrically along the raster; every row the canvas is divided,
per image and channel, by a positive scalar when its magnitude passes 1e6 — the recurrence is linear
and homogeneous, so it still holds exactly and the final L2 scaling is unaffected in shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ueguard.data.working_set import WorkingSet
from ueguard.engine.loops import batch_ranges
from ueguard.methods.base import (GREY_LEVEL, L2_BUDGET_WHY, METHODS, MethodConfig, Perturbation, ProtectionMethod,
                                  l2_scale, mark_rows_done, option, rows_done)


@dataclass(frozen=True)
class ARConfig(MethodConfig):
    # L2 radius per image in [0, 1] units; default 1.0·√(H·W)/32
    l2_eps: float | None = option(None, GREY_LEVEL, 2000, why=L2_BUDGET_WHY)
    # canvas margin dropped at the top/left (the process's burn-in); the process runs pixel by pixel
    # over (size + crop)², so a wide margin only costs time
    crop: int = option(4, 2, 64, why="the first two rows/columns are the process's random start")
    batch_size: int = option(1024, 1, 65536)  # images generated at once


def default_l2_eps(height: int, width: int) -> float:
    """The default L2 radius: the authors' 1.0 at 32×32, scaled to keep the same RMS per value."""
    return math.sqrt(height * width) / 32


def random_filters(num_classes: int, generator: torch.Generator, probe: int = 32, crop: int = 4) -> torch.Tensor:
    """``K×3×3×3`` causal filters: standard normal taps, the current tap (2, 2) zero, each channel's taps
    summing to 1 — kept only when the process is *stationary-looking* on a ``probe``-px canvas.

    Most such random filters are unstable: their realisation grows geometrically along the raster, so
    after L2 scaling all the energy sits in the bottom-right corner (measured: a median 93 % of the
    energy in the last 8×8 of 32×32) — not a texture at all. The authors select their processes with a
    search script (autoregressive_param_finder.py); ueguard's criterion is that the RMS of both the
    first and the last 8×8 corner of a probe realisation lies within [¼, 2]× the RMS of the whole
    (about one random filter in four passes; a filter's verdict agrees across realisations 96 % of the
    time)."""
    accepted: list[torch.Tensor] = []
    while len(accepted) < 3 * num_classes:
        taps = torch.randn(64, 3, 3, generator=generator)
        taps[..., 2, 2] = 0
        taps = taps / taps.sum((-2, -1), keepdim=True)
        out = ar_realise(taps[:, None].expand(-1, 3, -1, -1), (probe, probe), crop, generator)[:, 0]
        rms = out.pow(2).mean((-2, -1)).sqrt()
        corner = min(8, probe // 2)
        first = out[:, :corner, :corner].pow(2).mean((-2, -1)).sqrt() / rms
        last = out[:, -corner:, -corner:].pow(2).mean((-2, -1)).sqrt() / rms
        ok = (first > 0.25) & (first < 2) & (last > 0.25) & (last < 2)
        accepted.extend(taps[ok])
    return torch.stack(accepted[:3 * num_classes]).view(num_classes, 3, 3, 3)


def ar_realise(filters: torch.Tensor, size: tuple[int, int], crop: int, generator: torch.Generator) -> torch.Tensor:
    """One realisation per row of ``filters`` (``N×3×3×3``): ``N×3×H×W`` (unscaled, float64)."""
    n = filters.shape[0]
    h, w = size
    canvas = torch.zeros(n, 3, h + crop, w + crop, dtype=torch.float64)
    canvas[:, :, :2, :] = torch.randn(n, 3, 2, w + crop, generator=generator, dtype=torch.float64)
    canvas[:, :, :, :2] = torch.randn(n, 3, h + crop, 2, generator=generator, dtype=torch.float64)
    taps = filters.to(torch.float64)
    for i in range(2, h + crop):
        for j in range(2, w + crop):
            canvas[:, :, i, j] = (taps * canvas[:, :, i - 2:i + 1, j - 2:j + 1]).sum((-2, -1))
        big = canvas[:, :, :i + 1].abs().amax((-2, -1), keepdim=True)
        canvas = torch.where(big > 1e6, canvas / big, canvas)
    return canvas[:, :, crop:, crop:]


@METHODS.register("ar")
class AR(ProtectionMethod):
    description = ("autoregressive perturbations (Sandoval-Segura et al. NeurIPS 2022): model-free, class-wise "
                   "3×3 AR filters, a fresh realisation per image, L2 budget (-o l2_eps, default 1.0 at 32 px)")
    config_class = ARConfig
    needs_surrogate = False
    norm = "l2"

    def generate(self, data: WorkingSet) -> Perturbation:
        cfg = self.config
        h, w = data.images.shape[-2:]
        radius = cfg.l2_eps if cfg.l2_eps is not None else default_l2_eps(h, w)
        filters = random_filters(data.num_classes, self.generator)
        labels = data.labels.cpu()
        # Each batch draws from its own generator (seeded from the run's), so a batch's rows do not
        # depend on the batches before it: a resumed run skips the rows an interrupted one finished.
        batch_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        delta = self.new_delta((len(data), 3, h, w), resumable=True)
        for span in batch_ranges(len(data), cfg.batch_size):
            if rows_done(delta, span):
                continue
            generator = torch.Generator().manual_seed(batch_seed + span.start)
            raw = ar_realise(filters[labels[span]], (h, w), cfg.crop, generator)
            delta[span] = l2_scale(raw, radius).float().to(self.runtime.device)
            mark_rows_done(delta, span)
        info = {"l2_eps": radius, "filters": filters.flatten(2).tolist(), "crop": cfg.crop,
                "rms_255": round(radius / math.sqrt(3 * h * w) * 255, 4)}
        return Perturbation(delta, False, radius, info, norm="l2")
