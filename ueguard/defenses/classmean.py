"""Class-pattern removal: adaptive defenses against class-wise perturbations (ueguard's).

Threat model: the adversary knows the released set may carry one additive pattern per class — what
class-wise EMN, SSC, BAIT, OPS and LSP release — and that natural images of a class share no fine
pattern. Every image of class k is then x_i + δ_k, so the class's mean image is the clean class mean plus
δ_k; subtracting the mean over all classes leaves δ_k beside the class's natural average difference, which
is smooth (colour casts, a bright sky, a centred object). The defense estimates each class's pattern as
that difference with its smooth part (a Gaussian blur of ``sigma`` pixels) removed, and subtracts it from
the class's images before standard training. ``sigma`` 0 subtracts the whole difference, natural part
included; ``strength`` scales what is subtracted.

Sample-wise perturbations average out of a class mean and pass untouched, as they should: this is the
adversary aimed at the structure of ueguard's class-wise defaults, not a general purifier.

``classalign`` is the same adversary told that each image may carry its class's pattern at its own
circular shift (SSC's ``shift`` option, which hides the pattern from a plain class mean): it finds each
image's shift by circular cross-correlation with a class template, averages the images aligned, and
repeats — the template converges to the pattern when one is there — then subtracts the template at each
image's shift. With every shift found as zero it is ``classmean`` without the mean over classes removed.
It holds one class's images in float at a time, with their spectra (about 2.5 GB for 1,300 images at 224 px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms.v2 import functional as TF

from ueguard.defenses.base import DEFENSES, Defense, DefenseConfig
from ueguard.engine.augment import roll_rows

CHUNK = 4096  # images converted to float at a time


def class_patterns(images: torch.Tensor, labels: torch.Tensor, sigma: float) -> torch.Tensor:
    """``K×C×H×W`` float estimates of each class's additive pattern from uint8 ``images``: the class mean
    minus the mean of the class means, less its Gaussian blur of ``sigma`` pixels (none at 0). A class
    with no image gets a zero pattern."""
    k = int(labels.max()) + 1 if labels.numel() else 0
    sums = torch.zeros(k, *images.shape[1:], dtype=torch.float64)
    for start in range(0, len(images), CHUNK):
        chunk = images[start:start + CHUNK].to(torch.float64) / 255
        sums.index_add_(0, labels[start:start + CHUNK].cpu(), chunk)
    counts = torch.bincount(labels.cpu(), minlength=k)
    present = counts > 0
    means = sums / counts.clamp(min=1).view(-1, 1, 1, 1)
    diff = torch.where(present.view(-1, 1, 1, 1), means - means[present].mean(0), 0.0).float()
    return fine_detail(diff, sigma)


def fine_detail(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` less its Gaussian blur of ``sigma`` pixels (``x`` itself at 0)."""
    if sigma <= 0:
        return x
    size = 2 * math.ceil(3 * sigma) + 1
    return x - TF.gaussian_blur(x, [size, size], [sigma, sigma])


def best_shifts(detail: torch.Tensor, template: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each ``N×C×H×W`` row, the circular (down, right) shift at which ``template`` matches it best
    (the peak of their cross-correlation, summed over channels, by FFT), and how far that peak stands
    above the row's other shifts (peak / standard deviation over all H·W shifts)."""
    h, w = detail.shape[-2:]
    spectrum = torch.fft.rfft2(detail) * torch.fft.rfft2(template).conj()
    correlation = torch.fft.irfft2(spectrum.sum(1), s=(h, w)).flatten(1)  # [i, s] = Σ row_i(p) · template(p − s)
    peak, where = correlation.max(1)
    offsets = torch.stack([where // w, where % w], 1)
    return offsets, peak / correlation.std(1).clamp(min=1e-12)


def aligned_pattern(detail: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One class's pattern from the fine detail of its images when each may carry it at its own circular
    shift: start from the first image, then alternately find each image's best shift and average the
    images moved back by it, until no shift changes. Returns the template, the ``N×2`` shifts and the
    mean peak sharpness of the last matching (about 3–4 for natural images alone)."""
    template = detail[0]
    offsets = torch.full((len(detail), 2), -1, dtype=torch.long)
    sharpness = torch.zeros(len(detail))
    for _ in range(iterations):
        found, sharpness = best_shifts(detail, template)
        if torch.equal(found, offsets):
            break
        offsets = found
        template = roll_rows(detail, -offsets).mean(0)
    return template, offsets, float(sharpness.mean())


@dataclass(frozen=True)
class ClassMeanConfig(DefenseConfig):
    sigma: float = 1.0      # px of the smooth part kept as natural (0: subtract the whole class-mean difference)
    strength: float = 1.0   # multiple of the estimated pattern subtracted

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"sigma must be a finite number of pixels >= 0, got {self.sigma}")
        if not (math.isfinite(self.strength) and self.strength >= 0):
            raise ValueError(f"strength must be a finite number >= 0, got {self.strength}")


@DEFENSES.register("classmean")
class ClassMean(Defense):
    description = ("adaptive: estimate each class's additive pattern from its mean image (fine detail of the "
                   "class mean minus the mean of all classes) and subtract it from the class's images, then "
                   "standard training — aimed at class-wise perturbations")
    config_class = ClassMeanConfig

    def __init__(self, config: ClassMeanConfig | None = None) -> None:
        super().__init__(config)
        self._record: dict[str, Any] = {}

    def preprocess(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        patterns = self.config.strength * class_patterns(images, labels, self.config.sigma)
        self._record = {"pattern_linf_255": round(float(patterns.abs().amax()) * 255, 3),
                        "pattern_rms_255": round(float(patterns.pow(2).mean().sqrt()) * 255, 3)}
        out = torch.empty_like(images)
        for start in range(0, len(images), CHUNK):
            span = slice(start, start + CHUNK)
            x = images[span].float() / 255 - patterns[labels[span].cpu()].to(images.device)
            out[span] = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        return out

    def summary(self) -> dict[str, Any]:
        return dict(self._record)


@dataclass(frozen=True)
class ClassAlignConfig(ClassMeanConfig):
    iterations: int = 5     # rounds of matching and averaging at most (each: one FFT correlation per image)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")


@DEFENSES.register("classalign")
class ClassAlign(ClassMean):
    description = ("adaptive: like classmean, but each image may carry its class's pattern at its own circular "
                   "shift — find every image's shift by cross-correlation with a class template, average the "
                   "aligned images, repeat, subtract the template at each shift — aimed at shifted class-wise "
                   "patterns (SSC -o shift=N)")
    config_class = ClassAlignConfig  # its record and summary are ClassMean's

    def preprocess(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        out = images.clone()
        rms, sharpness = [], {}
        for k in labels.unique().tolist():
            rows = (labels == k).nonzero().flatten().to(images.device)
            x = images[rows].float() / 255
            template, offsets, sharpness[k] = aligned_pattern(fine_detail(x, cfg.sigma), cfg.iterations)
            pattern = cfg.strength * roll_rows(template.expand(len(rows), *template.shape), offsets)
            out[rows] = ((x - pattern).clamp(0, 1) * 255).round().to(torch.uint8)
            rms.append(float(template.pow(2).mean().sqrt()) * cfg.strength * 255)
        self._record = {"pattern_rms_255": round(max(rms, default=0.0), 3),
                        "alignment_sharpness": {str(k): round(v, 2) for k, v in sharpness.items()}}
        return out
