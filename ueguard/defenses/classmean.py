"""Class-pattern removal: an adaptive defense against class-wise perturbations (ueguard's).

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms.v2 import functional as TF

from ueguard.defenses.base import DEFENSES, Defense, DefenseConfig

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
    if sigma > 0:
        size = 2 * math.ceil(3 * sigma) + 1
        diff = diff - TF.gaussian_blur(diff, [size, size], [sigma, sigma])
    return diff


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
