"""LSP — linearly separable synthetic perturbations (Yu, Zhang, Chen, Yin, Liu, *Availability Attacks
Create Shortcuts*, KDD 2022; alias ``sp``). Code: github.com/dayu11/Availability-Attacks-Create-Shortcuts.

Threat model: the adversary trains a classifier from scratch on the released images. The paper's
observation is that every working availability attack makes the perturbations *linearly separable* by
class, so a model picks up that linear shortcut before any semantics; LSP therefore skips the surrogate
entirely and synthesises such noise directly. Model-free, class-wise:

* per class k a point v_k of a linearly separable Gaussian mixture in d = ⌈H/p⌉·⌈W/p⌉·3 dimensions:
  its component's centre is a vertex of the hypercube {−s, +s}^d (``class_sep`` = s, distinct
  vertices per class, so the classes are separable by a hyperplane) plus a standard normal draw;
* v_k is reshaped to 3×⌈H/p⌉×⌈W/p⌉ and upsampled by repetition to p×p patches (so δ is constant
  within every patch, and cropped to H×W);
* δ_k is scaled to the L2 norm ``l2_eps``; the default is (6/255)·√(H·W·3), i.e. an RMS of
  6/255 per value, which is √3072·6/255 ≈ 1.30 at 32 px.

The budget is L2 (``-o l2_eps=...`` in [0, 1] units at the working resolution); the CLI's L∞ ``--eps``
does not apply. Authors' patch size: 8 px on 32-px CIFAR, 32 px on 224-px images; ueguard's default
``patch`` is size/4 up to 64 px and size/7 above (8 at 32 px, 32 at 224 px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ueguard.data.working_set import WorkingSet
from ueguard.methods.base import (GREY_LEVEL, L2_BUDGET_WHY, METHODS, MethodConfig, Perturbation, ProtectionMethod,
                                  l2_scale, option)

#: The default LSP budget: an RMS of 6/255 per value, L2 = (6/255)·√(H·W·3).
LSP_RMS = 6 / 255


@dataclass(frozen=True)
class LSPConfig(MethodConfig):
    # L2 radius per image in [0, 1] units; default (6/255)·√(H·W·3)
    l2_eps: float | None = option(None, GREY_LEVEL, 2000, why=L2_BUDGET_WHY)
    # patch side in px; default size/4 (≤ 64 px) or size/7 (above); one wider than the working image
    # (at most 1024 px) is the whole image
    patch: int | None = option(None, 1, 1024)
    class_sep: float = option(1.0, 0, 1000, above=True)  # half-side of the hypercube the class centres sit on


def default_l2_eps(height: int, width: int) -> float:
    """The default L2 radius: an RMS of :data:`LSP_RMS` per value of a 3×H×W image."""
    return LSP_RMS * math.sqrt(3 * height * width)


def default_patch(size: int) -> int:
    return max(1, size // 4) if size <= 64 else max(1, size // 7)


def separable_points(num_classes: int, dim: int, class_sep: float, generator: torch.Generator) -> torch.Tensor:
    """One point per class of a Gaussian mixture whose unit-variance components are centred on distinct
    vertices of the hypercube {−s, +s}^dim: ``num_classes×dim``."""
    if dim < math.log2(max(num_classes, 2)):
        raise ValueError(f"{num_classes} classes need at least {math.ceil(math.log2(num_classes))} dimensions, got {dim}")
    vertices: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    while len(vertices) < num_classes:
        v = tuple((torch.randint(0, 2, (dim,), generator=generator) * 2 - 1).tolist())
        if v not in seen:
            seen.add(v)
            vertices.append(v)
    centres = class_sep * torch.tensor(vertices, dtype=torch.float32)
    return centres + torch.randn(num_classes, dim, generator=generator)


def patch_upsample(points: torch.Tensor, size: tuple[int, int], patch: int) -> torch.Tensor:
    """``K×d`` points → ``K×3×H×W`` images made of constant ``patch×patch`` blocks (the last row and
    column of blocks cut at the border). Each pixel picks its block by index, so memory is that of the
    ``H×W`` result whatever the patch (repeating blocks first would build ``patch·⌈H/patch⌉`` rows)."""
    h, w = size
    rows, cols = -(-h // patch), -(-w // patch)
    grid = points.view(-1, 3, rows, cols)
    return grid[:, :, torch.arange(h) // patch][:, :, :, torch.arange(w) // patch].contiguous()


@METHODS.register("lsp", "sp")
class LSP(ProtectionMethod):
    description = ("linearly separable synthetic patches (Yu et al. KDD 2022): model-free class-wise "
                   "shortcut, L2 budget (-o l2_eps, default RMS 6/255)")
    config_class = LSPConfig
    needs_surrogate = False
    norm = "l2"

    def generate(self, data: WorkingSet) -> Perturbation:
        cfg = self.config
        h, w = data.images.shape[-2:]
        patch = cfg.patch or default_patch(min(h, w))
        radius = cfg.l2_eps if cfg.l2_eps is not None else default_l2_eps(h, w)
        dim = 3 * (-(-h // patch)) * (-(-w // patch))
        points = separable_points(data.num_classes, dim, cfg.class_sep, self.generator)
        delta = l2_scale(patch_upsample(points, (h, w), patch), radius)
        info = {"patch": patch, "l2_eps": radius, "dims": dim, "rms_255": round(radius / math.sqrt(3 * h * w) * 255, 4)}
        return Perturbation(delta.to(self.runtime.device), True, radius, info, norm="l2")
