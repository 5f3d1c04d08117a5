"""The protection-method base: configuration, presets, and the bookkeeping every method shares.

A method is a frozen dataclass config plus a small class (torchattacks' shape). The base owns the
budget presets, seeding, the ε-ball / valid-range projection and the grayscale constraint, so a
subclass writes only its own optimisation steps. Every method maps a :class:`WorkingSet` to a
:class:`Perturbation` — sample-wise δ keyed by sample index, or class-wise δ keyed by label.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ueguard.data.working_set import WorkingSet
from ueguard.engine.progress import SILENT, Progress
from ueguard.engine.runtime import Runtime
from ueguard._registry import Registry

BUDGETS = ("quick", "standard", "thorough")


@dataclass(frozen=True)
class MethodConfig:
    """Settings every method has: the L∞ budget ``eps`` in [0, 1] units and the seed."""

    eps: float = 8 / 255
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.eps <= 1:
            raise ValueError(f"eps must be in (0, 1] (image units), got {self.eps}")


@dataclass
class Perturbation:
    """What a method releases: δ rows in [−ε, ε] at the working resolution.

    ``delta`` is ``N×3×H×W`` (sample-wise, row i belongs to sample i) or ``K×3×H×W`` (class-wise, row
    k to class k). ``info`` carries the method's own statistics (rounds, final surrogate accuracy, …).
    """

    delta: torch.Tensor
    classwise: bool
    eps: float
    info: dict[str, Any] = field(default_factory=dict)

    def for_samples(self, index: torch.Tensor, labels: torch.Tensor, grayscale: torch.Tensor) -> torch.Tensor:
        """δ for samples ``index`` (labels/grayscale given per sample of the whole set)."""
        rows = self.delta[labels[index]] if self.classwise else self.delta[index]
        return gray_project(rows, grayscale[index].to(rows.device))


def gray_project(delta: torch.Tensor, grayscale: torch.Tensor) -> torch.Tensor:
    """Replace the three channels of grayscale samples by their mean: the closest perturbation that keeps
    a gray image gray. The mean of values in [−ε, ε] stays in [−ε, ε], so the budget is preserved."""
    mean = delta.mean(1, keepdim=True).expand_as(delta)
    return torch.where(grayscale[:, None, None, None], mean, delta)


def apply_delta(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x̃ = clip(x + δ, 0, 1): what the saved image holds (before 8-bit rounding)."""
    return (x + delta).clamp_(0, 1)


class ProtectionMethod(ABC):
    """Base class. Subclasses set ``name``, ``description``, ``config_class``, ``presets`` and the
    capability flags, and implement :meth:`generate`.

    ``presets`` maps each budget (``quick``/``standard``/``thorough``) to config overrides: the
    steps/epochs a budget buys. ``needs_surrogate`` methods receive a classifier to train or attack;
    ``needs_pretrained`` ones require its weights to be a real prior (``--weights``/``--pretrained``).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {b: {} for b in BUDGETS}
    needs_labels: ClassVar[bool] = True
    needs_surrogate: ClassVar[bool] = True
    needs_pretrained: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, *, runtime: Runtime, surrogate: nn.Module | None = None,
                 progress: Progress = SILENT) -> None:
        if self.needs_surrogate and surrogate is None:
            raise ValueError(f"method {self.name!r} needs a surrogate model")
        self.config = config
        self.runtime = runtime
        self.surrogate = surrogate
        self.progress = progress
        self.generator = torch.Generator().manual_seed(config.seed)

    @classmethod
    def make_config(cls, budget: str = "standard", **overrides: Any) -> MethodConfig:
        """The config for a budget preset with explicit overrides on top; unknown keys are an error that
        lists the valid ones."""
        if budget not in BUDGETS:
            raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
        valid = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"method {cls.name!r} has no option {', '.join(unknown)}; its options: {', '.join(sorted(valid))}")
        values = {**cls.presets.get(budget, {}), **{k: v for k, v in overrides.items() if v is not None}}
        return cls.config_class(**values)

    def __call__(self, data: WorkingSet) -> Perturbation:
        if self.needs_labels and bool((data.labels < 0).any()):
            raise ValueError(f"method {self.name!r} needs a label for every image (class subfolders)")
        return self.generate(data)

    @abstractmethod
    def generate(self, data: WorkingSet) -> Perturbation:
        """Compute the perturbation for ``data`` (on ``self.runtime.device``)."""


METHODS: Registry[ProtectionMethod] = Registry("method")


def create_method(name: str, *, budget: str = "standard", runtime: Runtime, surrogate: nn.Module | None = None,
                  progress: Progress = SILENT, **options: Any) -> ProtectionMethod:
    """Build a registered method from a budget preset plus option overrides (``eps``, ``seed``, and the
    method's own constants)."""
    cls = METHODS.get(name)
    return cls(cls.make_config(budget, **options), runtime=runtime, surrogate=surrogate, progress=progress)


def list_methods() -> list[tuple[str, str]]:
    """``(name, one-line description)`` for every registered method."""
    return [(name, cls.description) for name, cls in METHODS.items()]
