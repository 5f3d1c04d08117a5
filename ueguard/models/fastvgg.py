"""``fastvgg_cifar``: a small VGG-like victim that reaches CIFAR-10 accuracy in a handful of epochs.

ueguard's own network in the spirit of airbench (Keller Jordan, *94% on CIFAR-10 in 3.29 seconds on a
single GPU*, arXiv 2404.00498); written from the paper's description, not from its code. The training
recipe that goes with it (batch 1024, Nesterov SGD with decoupled learning rate and weight decay,
label smoothing, whitening init from the data, flip test-time augmentation) is the ``fast`` verify
recipe in :mod:`ueguard.engine.recipes`; docs/victim.md explains each choice.

Layout (32-px input; widths 64/256/256, 2.0 M parameters, ~0.24 GFLOP per image forward):

- ``stem``: ``whiten``, a 2×2 valid convolution 3 → 24 channels whose filters are the PCA whitening
  of 2×2 patches and their negations (so GELU after it loses nothing), then GELU. Its weight is a
  **buffer**, not a parameter: it is not learned. :meth:`FastVGG.init_whitening` computes it from
  training images (the ``fast`` recipe calls it before a from-scratch run); until then it holds a
  data-free default, the identity basis (each channel one pixel of the patch, or its negation). A model
  built as a ``protect`` surrogate keeps that default: the whitening is an optimisation aid of the
  victim's recipe, and a surrogate with the identity stem is still a well-posed VGG.
- ``layer1`` .. ``layer3``: blocks ``conv3×3 → max-pool 2 → BN → GELU → conv3×3 → BN → GELU``
  (32 → 31 → 15 → 7 → 3 px). Convolutions have no bias (BN follows) and start with their first
  ``in_channels`` filters at the identity (Dirac), so each block starts close to passing its input on.
  BatchNorm keeps its scale fixed at 1 (``weight`` frozen) and learns its shift: with the scale fixed,
  the convolution weights are scale-invariant under BN and their step size is governed by weight
  decay alone, which the recipe's decoupled learning rate relies on.
- ``head``: global max-pool, a bias-free linear layer, logits scaled by 1/9 (airbench's constant: it
  keeps the initial logits small, so label-smoothed cross-entropy starts near its uniform value).

Pooling is skipped when a feature map is already 1 px, so any input from 8 px up works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_model
from .classifier import ClassifierModel
from .resnet_cifar import CIFAR10_MEAN, CIFAR10_STD

WHITEN_PATCH = 2
WHITEN_EPS = 5e-4          # added to the patch covariance's eigenvalues (airbench's value)
BN_MOMENTUM = 0.4          # PyTorch convention: running = 0.6·running + 0.4·batch (airbench's 0.6)
BN_EPS = 1e-12
LOGIT_SCALE = 1 / 9
WIDTHS = (64, 256, 256)


class Whitening(nn.Module):
    """A fixed 2×2 valid convolution, 3 → 2·3·2·2 channels: ``W`` and ``−W`` (see the module docstring)."""

    def __init__(self, in_channels: int = 3, patch: int = WHITEN_PATCH) -> None:
        super().__init__()
        self.patch = patch
        dim = in_channels * patch * patch
        self.out_channels = 2 * dim
        self.register_buffer("weight", self._pair(torch.eye(dim)).view(2 * dim, in_channels, patch, patch))

    @staticmethod
    def _pair(w: Tensor) -> Tensor:
        return torch.cat([w, -w])

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight.to(x.dtype))

    @torch.no_grad()
    def init_from(self, x: Tensor, eps: float = WHITEN_EPS) -> None:
        """Set the filters to the PCA whitening of all 2×2 patches of normalised images ``x`` (N×C×H×W):
        rows ``λ_i^{-1/2} v_i`` of the patch second-moment matrix, largest eigenvalue first. A function
        of ``x`` alone (float64 eigendecomposition), so the same images give the same filters."""
        c, p = x.shape[1], self.patch
        moment = torch.zeros(c * p * p, c * p * p, dtype=torch.float64, device=x.device)
        count = 0
        for chunk in x.split(256):  # 5,000 CIFAR images are 58 M patch values: accumulate, don't hold them
            patches = F.unfold(chunk.double(), p).transpose(1, 2).reshape(-1, c * p * p)
            moment += patches.T @ patches
            count += len(patches)
        moment /= count
        eigvals, eigvecs = torch.linalg.eigh(moment)  # ascending
        eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
        # eigh's eigenvector signs are arbitrary; fix them (largest entry positive) so the channel order is too.
        signs = torch.sign(eigvecs.gather(0, eigvecs.abs().argmax(0, keepdim=True)))
        w = (eigvecs * signs).T / (eigvals.clamp_min(0) + eps).sqrt().unsqueeze(1)
        self.weight.copy_(self._pair(w).view_as(self.weight).to(self.weight))


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a fixed unit scale (``weight`` kept, frozen) and a learned shift."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.weight.requires_grad_(False)


class Pool(nn.Module):
    """2×2 max-pool, or nothing on a map that is already a single pixel high or wide."""

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x


class ConvBlock(nn.Sequential):
    """``conv → pool → BN → GELU → conv → BN → GELU``
    (keys ``conv1, pool, norm1, act1, conv2, norm2, act2``)."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.conv1 = _conv(in_channels, width)
        self.pool = Pool()
        self.norm1 = BatchNorm(width)
        self.act1 = nn.GELU()
        self.conv2 = _conv(width, width)
        self.norm2 = BatchNorm(width)
        self.act2 = nn.GELU()


def _conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():  # default (Kaiming-uniform) init, then the first in_channels filters at the identity
        nn.init.dirac_(conv.weight[: min(in_channels, out_channels)])
    return conv


class ScaledLinear(nn.Linear):
    """A bias-free linear head whose logits are multiplied by a constant ``scale``."""

    def __init__(self, in_features: int, out_features: int, scale: float = LOGIT_SCALE) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:.4g}"


class FastVGG(nn.Module):
    """Whitening stem, three VGG blocks, global max-pool, scaled linear head (timm's classifier interface)."""

    default_recipe = "fast"

    def __init__(self, num_classes: int, widths: Sequence[int] = WIDTHS) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.whiten = Whitening()
        self.act = nn.GELU()
        in_channels = self.whiten.out_channels
        for k, width in enumerate(widths):
            setattr(self, f"layer{k + 1}", ConvBlock(in_channels, width))
            in_channels = width
        self.head = ScaledLinear(self.num_features, num_classes)
        self.stage_layout = (
            ("stem", ("whiten", "act")),
            *((f"layer{k + 1}", (f"layer{k + 1}",)) for k in range(len(widths))),
            ("head", ("head",)),
        )

    def init_whitening(self, x: Tensor) -> None:
        """Data-dependent init of the stem from normalised training images (see :class:`Whitening`)."""
        self.whiten.init_from(x)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.act(self.whiten(x))
        for name, _ in self.stage_layout[1:-1]:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.amax(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = ScaledLinear(self.num_features, num_classes)


@register_model
def fastvgg_cifar(num_classes: int = 10) -> ClassifierModel:
    """airbench-style VGG (whitening stem, widths 64/256/256, 2.0 M parameters): the ``fast`` recipe's victim."""
    net = FastVGG(num_classes)
    return ClassifierModel(net, arch="fastvgg_cifar", mean=CIFAR10_MEAN, std=CIFAR10_STD,
                           stage_layout=net.stage_layout)


fastvgg_cifar.default_recipe = "fast"  # type: ignore[attr-defined]  # verify's recipe when --recipe is not given
