"""Defenses and training paradigms: how ``verify``'s adversary trains on the released data.

A :class:`Defense` changes the training run in a few well-defined places — the whole training set once
(``preprocess``: e.g. JPEG or grayscale squeezing), each batch (``augment``: the standard crop + flip
by default), the optimisation step itself (``step``: e.g. adversarial training), and the bookkeeping
around it (``start``/``after_step``/``end_epoch``: e.g. the staged schedule watching activations;
``selected_epoch``: which epoch's test accuracy the adversary reports, e.g. early stopping). A defense
is a frozen dataclass config (its constants, settable with ``--defense-option KEY=VALUE``) plus a small
class; one fresh instance serves one training run, so it may keep per-run state.

A :class:`Paradigm` decides where the model starts and which parameters train (from scratch,
fine-tuning a pretrained backbone, frozen shallow layers, a linear probe). Both live in registries;
``ueguard defenses`` lists them.
"""

from __future__ import annotations

import dataclasses
from abc import ABC
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ueguard._registry import Registry
from ueguard.data.working_set import WorkingSet
from ueguard.engine.augment import crop_flip
from ueguard.engine.loops import Trainer
from ueguard.engine.runtime import Runtime



@dataclass(frozen=True)
class DefenseConfig:
    """A defense's constants; subclasses add fields (all with defaults)."""


@dataclass
class FitState:
    """What a defense's hooks may look at during one training run (built by :func:`ueguard.engine.fit.fit`).

    ``images``/``labels``: the (preprocessed) training set on the device; ``validation``: clean held-out
    images for defenses with ``needs_validation``; ``steps_per_epoch``: optimiser steps per pass; ``epochs``:
    passes in the run."""

    model: nn.Module
    trainer: Trainer
    runtime: Runtime
    generator: torch.Generator
    images: torch.Tensor
    labels: torch.Tensor
    steps_per_epoch: int
    epochs: int
    validation: WorkingSet | None = None


class Defense(ABC):
    """Standard training unless a subclass overrides a hook.

    Class attributes: ``config_class`` (the constants), ``presets`` (config overrides per budget),
    ``needs_validation`` (the defense needs clean held-out images, which ``verify`` splits off ``--clean``).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type[DefenseConfig]] = DefenseConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    needs_validation: ClassVar[bool] = False

    def __init__(self, config: DefenseConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()

    @classmethod
    def make_config(cls, budget: str = "standard", **overrides: Any) -> DefenseConfig:
        """The config for a budget preset with explicit overrides; unknown keys are an error listing the
        valid ones."""
        valid = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            options = ", ".join(sorted(valid)) or "none"
            raise ValueError(f"defense {cls.name!r} has no option {', '.join(unknown)}; its options: {options}")
        return cls.config_class(**{**cls.presets.get(budget, {}), **overrides})

    # -- hooks, in the order a run calls them ---------------------------------------------------------
    def preprocess(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Transform the uint8 ``N×3×H×W`` training set once, before training (identity by default); its
        ``labels`` are there for a defense that treats each class apart (an adaptive one)."""
        return images

    def start(self, state: FitState) -> dict[str, Any]:
        """Called once before the first step; returns extra fields for an epoch-0 record (none by default)."""
        return {}

    def augment(self, x: torch.Tensor, generator: torch.Generator, standard=crop_flip) -> torch.Tensor:
        """Per-batch training augmentation of float images in [0, 1]: the recipe's ``standard`` one (random
        crop + flip; the run's recipe says how far the crop translates)."""
        return standard(x, generator)

    def step(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on an augmented batch; returns (loss, number correct)."""
        return trainer.step(x, y)

    def after_step(self, state: FitState, step: int) -> None:
        """Called after optimiser step ``step`` (1-based, counted over the whole run)."""

    def end_epoch(self, state: FitState, epoch: int) -> dict[str, Any]:
        """Extra fields for this epoch's history record (none by default)."""
        return {}

    def selected_epoch(self, history: list[dict]) -> int:
        """Index into ``history`` of the epoch whose test accuracy the adversary reports: the last."""
        return len(history) - 1

    def summary(self) -> dict[str, Any]:
        """Run-level extras for the report (e.g. the staged schedule's ACM curves and cuts)."""
        return {}


class Paradigm(ABC):
    """Where training starts and what trains. ``needs_pretrained`` paradigms require --weights/--pretrained;
    they start from the pretrained backbone with a fresh head (the prior supplies features, the labels
    come from the released data)."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs_pretrained: ClassVar[bool] = False
    default_lr: ClassVar[float] = 0.1
    #: How many stages, from the shallow end, are frozen (``None``: all but the head).
    frozen_stages: ClassVar[int | None] = 0

    def _frozen(self, model: nn.Module) -> list[nn.Module]:
        if self.frozen_stages == 0:
            return []
        stages = _stages(model, self.name)
        body = stages[:-1]
        count = len(body) if self.frozen_stages is None else self.frozen_stages
        return [module for _, module in body[:count]]

    def prepare(self, model: nn.Module) -> list[dict]:
        """Freeze what this paradigm freezes and return the optimiser's parameter groups, one per stage
        (named, so a defense can change one stage's learning rate), shallow to deep."""
        if self.needs_pretrained:
            model.reset_head(model.num_classes)
        for module in self._frozen(model):
            module.requires_grad_(False)
        try:
            stages = model.stages()
        except (NotImplementedError, AttributeError):
            return [{"params": [p for p in model.parameters() if p.requires_grad], "name": "all"}]
        groups = [{"params": [p for p in module.parameters() if p.requires_grad], "name": name}
                  for name, module in stages]
        return [g for g in groups if g["params"]]

    def train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode, with frozen stages (and their BatchNorm statistics) in eval mode."""
        model.train()
        for module in self._frozen(model):
            module.eval()


def _stages(model: nn.Module, paradigm: str) -> list[tuple[str, nn.Module]]:
    try:
        return model.stages()
    except (NotImplementedError, AttributeError) as error:
        raise ValueError(f"paradigm {paradigm!r} freezes stages, which needs a model with a known stage "
                         f"layout: {error}") from None


DEFENSES: Registry[Defense] = Registry("defense")
PARADIGMS: Registry[Paradigm] = Registry("paradigm")


@DEFENSES.register("none", "standard")
class NoDefense(Defense):
    description = "standard training with random crop + horizontal flip (no countermeasure)"


@PARADIGMS.register("scratch")
class Scratch(Paradigm):
    description = "random initialisation, all layers trained (lr 0.1)"


@PARADIGMS.register("finetune")
class Finetune(Paradigm):
    description = "pretrained backbone (--weights/--pretrained), fresh head, all layers trained (lr 1e-3)"
    needs_pretrained = True
    default_lr = 1e-3


@PARADIGMS.register("frozen")
class Frozen(Paradigm):
    description = ("pretrained backbone, fresh head; stem + first stage frozen with BatchNorm in eval mode, "
                   "the rest trained (lr 1e-3)")
    needs_pretrained = True
    default_lr = 1e-3
    frozen_stages = 2  # stem, layer1


@PARADIGMS.register("linear")
class Linear(Paradigm):
    description = "linear probe: pretrained backbone frozen (BatchNorm in eval mode), only a fresh head trained (lr 0.1)"
    needs_pretrained = True
    default_lr = 0.1
    frozen_stages = None


def create_defense(name: str, budget: str = "standard", **options: Any) -> Defense:
    cls = DEFENSES.get(name)
    return cls(cls.make_config(budget, **options))


def create_paradigm(name: str) -> Paradigm:
    return PARADIGMS.get(name)()


def defense_names() -> list[str]:
    """Canonical defense names (aliases left out), in the order ``--defense all`` runs them."""
    seen, out = set(), []
    for name, cls in DEFENSES.items():
        if cls not in seen and name == cls.name:
            seen.add(cls)
            out.append(name)
    first = ["none"]
    return first + sorted(n for n in out if n not in first)


def paradigm_names() -> list[str]:
    """Paradigm names in the order ``--paradigm all`` runs them: from scratch first, then from the prior with
    ever more of it frozen (finetune, frozen, linear)."""
    def depth(cls) -> tuple[bool, int]:
        return cls.needs_pretrained, 1_000 if cls.frozen_stages is None else cls.frozen_stages

    return sorted((name for name, cls in PARADIGMS.items() if name == cls.name), key=lambda n: depth(PARADIGMS.get(n)))


def list_defenses() -> list[tuple[str, str]]:
    return [(name, DEFENSES.get(name).description) for name in sorted(defense_names())]
