"""UEraser: heavy augmentations with error-maximising selection (Qin et al., *Learning the Unlearnable:
Adversarial Augmentations Suppress Unlearnable Example Attacks*, 2023; lafeat/ueraser).

Threat model: unlearnable perturbations are fragile shortcuts; augmentations strong enough to break
them (plasma-fractal brightness and contrast, channel shuffle, TrivialAugment) leave the semantics,
and training on the *worst* of ``repeats`` random augmentations of each image (the one with the
highest loss) keeps pushing the model off whatever shortcut survives. The authors use kornia's
plasma augmentations; ueguard's plasma map is its own (a fractal sum of octaves of bilinearly
upsampled uniform noise, octave k weighted by roughness**k — the same 1/f-like look as the
diamond-square map, not the same pixels), and the fraction of epochs that use the max selection
(``max_fraction``) is ours too: the authors apply the max selection "for the first epochs" without a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from ueguard.defenses.base import DEFENSES, Defense, DefenseConfig, FitState
from ueguard.engine.augment import crop_flip
from ueguard.engine.loops import Trainer


def plasma(n: int, h: int, w: int, roughness: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``n×1×h×w`` fractal maps in [0, 1]: Σ_k roughness^k · up(U_k), U_k uniform noise on a
    (2^k + 1)² grid, each map min-max normalised."""
    octaves = max(1, math.ceil(math.log2(max(h, w))))
    out = torch.zeros(n, 1, h, w)
    for k in range(octaves + 1):
        side = 2 ** k + 1
        noise = torch.rand(n, 1, side, side, generator=generator)
        out += roughness.view(n, 1, 1, 1) ** k * F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=True)
    lo = out.amin(dim=(1, 2, 3), keepdim=True)
    hi = out.amax(dim=(1, 2, 3), keepdim=True)
    return (out - lo) / (hi - lo).clamp_min(1e-12)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def plasma_brightness(x: torch.Tensor, generator: torch.Generator, roughness=(0.1, 0.7), intensity=(0.0, 1.0)):
    """x + a·(P − ½): a spatially varying brightness shift, a ∼ U(intensity), per image."""
    n, _, h, w = x.shape
    p = plasma(n, h, w, _uniform(n, *roughness, generator), generator).to(x.device)
    a = _uniform(n, *intensity, generator).to(x.device).view(n, 1, 1, 1)
    return (x + a * (p - 0.5)).clamp(0, 1)


def plasma_contrast(x: torch.Tensor, generator: torch.Generator, roughness=(0.1, 0.7)):
    """(x − m)·2P + m, m the image mean: a spatially varying contrast factor in [0, 2]."""
    n, _, h, w = x.shape
    p = plasma(n, h, w, _uniform(n, *roughness, generator), generator).to(x.device)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - m) * 2 * p + m).clamp(0, 1)


def channel_shuffle(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """With probability ``p`` per image, a uniformly random permutation of its channels."""
    n, c = x.shape[:2]
    perm = torch.rand(n, c, generator=generator).argsort(1)
    keep = torch.rand(n, generator=generator) >= p
    perm[keep] = torch.arange(c)
    return torch.gather(x, 1, perm.to(x.device)[:, :, None, None].expand_as(x))


_TRIVIAL = v2.TrivialAugmentWide()


def trivial_augment(x: torch.Tensor) -> torch.Tensor:
    """TrivialAugmentWide (torchvision v2), one random op and magnitude per image, on uint8."""
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8)
    out = torch.stack([_TRIVIAL(img) for img in u8])
    return out.to(x.dtype) / 255


def ueraser_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw of UEraser's pipeline for every image of the batch, then crop + flip."""
    x = plasma_brightness(x, generator)
    x = plasma_contrast(x, generator)
    x = channel_shuffle(x, generator)
    x = trivial_augment(x)
    return crop_flip(x, generator)


@dataclass(frozen=True)
class UEraserConfig(DefenseConfig):
    repeats: int = 5          # K augmentation draws per image; the highest-loss one is trained on
    max_fraction: float = 0.5  # [ours] fraction of epochs with max selection; afterwards one draw
    seed: int = 0

    def __post_init__(self) -> None:
        if self.repeats < 1 or not 0 <= self.max_fraction <= 1:
            raise ValueError("ueraser needs repeats >= 1 and 0 <= max_fraction <= 1")


@DEFENSES.register("ueraser")
class UEraser(Defense):
    description = ("UEraser: plasma brightness/contrast, channel shuffle, TrivialAugment; trains on the "
                   "highest-loss of K = 5 draws per image (first half of training)")
    config_class = UEraserConfig
    presets = {"quick": {"repeats": 3}}

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.repeats = self.config.repeats
        self._max_steps = 0
        self._steps = 0

    def start(self, state: FitState) -> dict:
        self._max_steps = math.ceil(self.config.max_fraction * state.epochs) * state.steps_per_epoch
        return {}

    def augment(self, x: torch.Tensor, generator: torch.Generator, standard=None) -> torch.Tensor:
        return x  # the whole pipeline (its own crop + flip included) runs in step(), where the model is at hand

    def step(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor):
        self._steps += 1
        k = self.repeats if self._steps <= self._max_steps else 1
        views = ueraser_augment(x.repeat(k, 1, 1, 1).cpu(), self.generator).to(x.device)
        if k > 1:
            views = views.view(k, *x.shape)
            views = views[worst_view(trainer, views, y), torch.arange(len(y), device=x.device)]
        return trainer.step(views.contiguous(memory_format=torch.channels_last), y)


@torch.no_grad()
def worst_view(trainer: Trainer, views: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """For ``K×N×C×H×W`` views, the index k of the highest-loss view of each image (model in its current
    mode; BatchNorm running statistics left untouched by these probe passes)."""
    model, runtime = trainer.model, trainer.runtime
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 − 0)·running + 0·batch: unchanged
    try:
        k, n = views.shape[:2]
        with runtime.autocast():
            logits = model(views.flatten(0, 1).contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits.float(), y.repeat(k), reduction="none").view(k, n)
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
    return loss.argmax(0)
