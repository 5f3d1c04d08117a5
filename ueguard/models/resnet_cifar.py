"""CIFAR-style ResNets: a 3×3 stride-1 stem and no max-pool, so 32-pixel images keep their detail.

Two families share one implementation, differing in depth, width and shortcut:

- ``resnet18_cifar`` (and the half-width ``resnet18_cifar_slim``): the ResNet-18 that the
  unlearnable-examples literature uses as its surrogate and victim (BasicBlocks [2, 2, 2, 2], widths
  64/128/256/512, projection shortcuts "option B": 1×1 conv + BN). An ImageNet-style ResNet-18
  (7×7 stride-2 stem + max-pool) at 32×32 pixels is the wrong model here: EMN against it reaches
  ~50 % test accuracy instead of ~20 % (see methods.md §2).
- ``resnet20/32/44/56_cifar``: He et al., *Deep Residual Learning for Image Recognition*, CVPR 2016,
  §4.2 (3 stages of n = 3/5/7/9 BasicBlocks, widths 16/32/64, parameter-free shortcuts "option A":
  stride-2 subsampling plus zero channel padding). Parameter names, shortcut and normalisation match
  the akamaster/pytorch_resnet_cifar10 checkpoints exactly, so those files load as they are.

Parameter names follow the reference code of both families (``conv1``, ``bn1``,
``layer{k}.{i}.conv1/bn1/conv2/bn2``, ``layer{k}.{i}.shortcut.{0,1}``, ``linear``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_model
from .classifier import ClassifierModel

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PadShortcut(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel and zero-pad the new channels (no parameters).

    The padding is split evenly around the input channels, as in the akamaster checkpoints, whose
    blocks rely on that channel placement.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_before = (planes - in_planes) // 2
        self.pad_after = planes - in_planes - self.pad_before

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class ProjectionShortcut(nn.Sequential):
    """Option-B shortcut: 1×1 strided conv + BN (keys ``shortcut.0``, ``shortcut.1``)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__(
            nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(planes),
        )


ShortcutFactory = Callable[[int, int, int], nn.Module]


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3×3 convs."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: ShortcutFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        needs_projection = stride != 1 or in_planes != planes
        self.shortcut = shortcut(in_planes, planes, stride) if needs_projection else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A CIFAR ResNet of BasicBlocks: stem, ``len(depths)`` stages, global average pool, linear head.

    Stage k has ``depths[k]`` blocks of width ``widths[k]``; every stage after the first halves the
    resolution. Implements timm's classifier interface so :class:`ClassifierModel` can wrap it.
    """

    def __init__(
        self,
        depths: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        shortcut: ShortcutFactory,
    ) -> None:
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError(f"{len(depths)} stage depths but {len(widths)} widths")
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        for k, (depth, planes) in enumerate(zip(depths, widths, strict=True)):
            strides = [1 if k == 0 else 2] + [1] * (depth - 1)
            blocks = []
            for stride in strides:
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            setattr(self, f"layer{k + 1}", nn.Sequential(*blocks))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(self.num_features, num_classes)
        self.stage_layout = (
            ("stem", ("conv1", "bn1", "relu")),
            *((f"layer{k + 1}", (f"layer{k + 1}",)) for k in range(len(depths))),
            ("head", ("linear",)),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialisation for the convs (as torchvision's ResNets); BN starts as the identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for name, _ in self.stage_layout[1:-1]:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.linear(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes)


def _cifar_resnet(
    arch: str,
    num_classes: int,
    *,
    depths: Sequence[int],
    widths: Sequence[int],
    shortcut: ShortcutFactory,
    mean: Sequence[float],
    std: Sequence[float],
) -> ClassifierModel:
    net = CifarResNet(depths, widths, num_classes, shortcut)
    return ClassifierModel(net, arch=arch, mean=mean, std=std, stage_layout=net.stage_layout)


def _resnet18_cifar(arch: str, num_classes: int, base_width: int) -> ClassifierModel:
    return _cifar_resnet(
        arch,
        num_classes,
        depths=(2, 2, 2, 2),
        widths=tuple(base_width * 2**k for k in range(4)),
        shortcut=ProjectionShortcut,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    )


def _he2016_resnet(arch: str, num_classes: int, blocks_per_stage: int) -> ClassifierModel:
    # Depth 6n + 2: n blocks of two convs in each of 3 stages, plus the stem conv and the head.
    return _cifar_resnet(
        arch,
        num_classes,
        depths=(blocks_per_stage,) * 3,
        widths=(16, 32, 64),
        shortcut=PadShortcut,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


@register_model
def resnet18_cifar(num_classes: int = 10) -> ClassifierModel:
    """CIFAR ResNet-18 (11.2 M parameters), the field's standard surrogate and victim."""
    return _resnet18_cifar("resnet18_cifar", num_classes, base_width=64)


@register_model
def resnet18_cifar_slim(num_classes: int = 10) -> ClassifierModel:
    """CIFAR ResNet-18 at half width (32/64/128/256, 2.8 M parameters): a faster surrogate."""
    return _resnet18_cifar("resnet18_cifar_slim", num_classes, base_width=32)


@register_model
def resnet20_cifar(num_classes: int = 10) -> ClassifierModel:
    """He et al. 2016 ResNet-20 (0.27 M parameters); akamaster weights: 91.7 % on CIFAR-10."""
    return _he2016_resnet("resnet20_cifar", num_classes, blocks_per_stage=3)


@register_model
def resnet32_cifar(num_classes: int = 10) -> ClassifierModel:
    """He et al. 2016 ResNet-32 (0.46 M parameters); akamaster weights: 92.6 % on CIFAR-10."""
    return _he2016_resnet("resnet32_cifar", num_classes, blocks_per_stage=5)


@register_model
def resnet44_cifar(num_classes: int = 10) -> ClassifierModel:
    """He et al. 2016 ResNet-44 (0.66 M parameters); akamaster weights: 93.1 % on CIFAR-10."""
    return _he2016_resnet("resnet44_cifar", num_classes, blocks_per_stage=7)


@register_model
def resnet56_cifar(num_classes: int = 10) -> ClassifierModel:
    """He et al. 2016 ResNet-56 (0.85 M parameters); akamaster weights: 93.4 % on CIFAR-10."""
    return _he2016_resnet("resnet56_cifar", num_classes, blocks_per_stage=9)
