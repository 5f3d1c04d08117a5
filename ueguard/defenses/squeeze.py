"""Image Shortcut Squeezing (ISS): compress the training images once, before training.

Liu, Zhao, Larson, *Image Shortcut Squeezing: Countering Perturbative Availability Poisons with
Compression*, ICML 2023 (liuzrcc/ImageShortcutSqueezing). Threat model: the adversary cannot tell
which perturbation was used, so it applies a cheap lossy transform that destroys small high-frequency
or colour-coded shortcuts while keeping most of the image semantics: JPEG at quality 10 (against
L∞ perturbations such as EMN/REM/TAP), grayscale (against colour-coded class-wise noise such as OPS
or LSP) and bit-depth reduction. Each acts on the uint8 ``N×3×H×W`` set through ``preprocess``; the
usual crop + flip follow per batch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from ueguard.defenses.base import DEFENSES, Defense, DefenseConfig


def jpeg_squeeze(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode each uint8 ``3×H×W`` image as a JPEG at ``quality`` (Pillow's libjpeg, its default 4:2:0
    chroma subsampling, as ISS does through PIL) and decode it again."""
    from PIL import Image

    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    hwc = images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    out = np.empty_like(hwc)
    for i, image in enumerate(hwc):
        buffer = io.BytesIO()
        Image.fromarray(image, "RGB").save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images.device)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, Y = 0.299 R + 0.587 G + 0.114 B rounded to 8 bits, replicated to three equal
    channels (what PIL's ``convert("L")`` computes, which ISS uses)."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
    luma = torch.round((images.float() * weights).sum(1, keepdim=True)).clamp_(0, 255).to(torch.uint8)
    return luma.expand(-1, 3, -1, -1).contiguous()


def bit_depth_reduce(images: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantise every channel to 2**bits evenly spaced levels of [0, 1]: round(x·L)/L with L = 2**bits − 1,
    back in uint8 (bits = 2: 0, 85, 170, 255)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    levels = 2 ** bits - 1
    x = images.float() / 255
    return torch.round(torch.round(x * levels) / levels * 255).to(torch.uint8)


@dataclass(frozen=True)
class JpegConfig(DefenseConfig):
    quality: int = 10


@DEFENSES.register("jpeg")
class Jpeg(Defense):
    description = "ISS: JPEG-compress every training image once (quality 10), then standard training"
    config_class = JpegConfig

    def preprocess(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return jpeg_squeeze(images, self.config.quality)


@DEFENSES.register("gray", "grayscale")
class Gray(Defense):
    description = "ISS: grayscale every training image once (three equal channels), then standard training"

    def preprocess(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return grayscale(images)


@dataclass(frozen=True)
class BdrConfig(DefenseConfig):
    bits: int = 2


@DEFENSES.register("bdr")
class BitDepthReduction(Defense):
    description = "ISS: bit-depth reduction of every training image to 2 bits per channel, then standard training"
    config_class = BdrConfig

    def preprocess(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return bit_depth_reduce(images, self.config.bits)
