"""Defenses and training paradigms: how ``verify``'s adversary trains on the released data.

A :class:`Defense` changes the training run in up to three places — the whole training set once
(``preprocess``: e.g. JPEG or grayscale squeezing), each batch (``augment``: the standard crop + flip
by default), and the optimisation step itself (``step``: e.g. adversarial training). A
:class:`Paradigm` decides where the model starts and which parameters train (from scratch, fine-tuning
a pretrained backbone, ...). Both live in registries; ``ueguard defenses`` lists them.
"""

from __future__ import annotations

from abc import ABC
from typing import ClassVar

import torch
from torch import nn

from ueguard._registry import Registry
from ueguard.engine.augment import crop_flip
from ueguard.engine.loops import Trainer


class Defense(ABC):
    """Standard training unless a subclass overrides a hook."""

    name: ClassVar[str]
    description: ClassVar[str]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Transform the uint8 ``N×3×H×W`` training set once, before training (identity by default)."""
        return images

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Per-batch training augmentation of float images in [0, 1]: random crop + flip."""
        return crop_flip(x, generator)

    def step(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on an augmented batch."""
        return trainer.step(x, y)


class Paradigm(ABC):
    """Where training starts and what trains. ``needs_pretrained`` paradigms require --weights/--pretrained."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs_pretrained: ClassVar[bool] = False
    default_lr: ClassVar[float] = 0.1

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters the optimiser updates (all by default)."""
        return list(model.parameters())


DEFENSES: Registry[Defense] = Registry("defense")
PARADIGMS: Registry[Paradigm] = Registry("paradigm")


@DEFENSES.register("none", "standard")
class NoDefense(Defense):
    name = "none"
    description = "standard training with random crop + horizontal flip (no countermeasure)"


@PARADIGMS.register("scratch")
class Scratch(Paradigm):
    name = "scratch"
    description = "random initialisation, all layers trained (lr 0.1)"


@PARADIGMS.register("finetune")
class Finetune(Paradigm):
    name = "finetune"
    description = "start from pretrained weights (--weights/--pretrained), all layers trained (lr 1e-3)"
    needs_pretrained = True
    default_lr = 1e-3


def create_defense(name: str) -> Defense:
    return DEFENSES.get(name)()


def create_paradigm(name: str) -> Paradigm:
    return PARADIGMS.get(name)()


def list_defenses() -> list[tuple[str, str]]:
    seen, out = set(), []
    for name, cls in DEFENSES.items():
        if cls not in seen:
            seen.add(cls)
            out.append((cls.name, cls.description))
    return sorted(out)
