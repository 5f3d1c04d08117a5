"""Adversarial training: min_θ E max_{‖δ‖∞ ≤ εa} CE(f_θ(x + δ), y) (Madry et al., ICLR 2018).

Threat model: error-minimising noise is a shortcut of small L∞ norm; training on worst-case
perturbations of radius εa ≥ the poison's ε makes that shortcut useless (REM was designed to survive
εa < ε, hence the 4/255 variant). The inner max is PGD from a uniform random start: ``steps`` signed-
gradient ascent steps of ``step_size``, each followed by projection onto the ε-ball and [0, 1]. The
attack runs with the model in eval mode (BatchNorm statistics untouched by adversarial probes); the
training step that follows sees the model in the paradigm's training mode.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ueguard.defenses.base import DEFENSES, Defense, DefenseConfig
from ueguard.engine.loops import Trainer, input_gradient


@contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside, and every submodule's own training flag restored afterwards (a paradigm may keep
    frozen stages in eval mode while the rest trains)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, runtime, *, eps: float, step_size: float,
             steps: int, generator: torch.Generator) -> torch.Tensor:
    """An L∞ PGD adversarial example: maximise CE within ``‖δ‖∞ ≤ eps`` and ``x + δ ∈ [0, 1]``."""
    delta = (torch.rand(x.shape, generator=generator) * 2 - 1).mul_(eps).to(x.device, x.dtype)
    adv = (x + delta).clamp_(0, 1)
    with eval_mode(model):
        for _ in range(steps):
            grad, _ = input_gradient(model, adv, y, runtime)
            adv = adv + step_size * grad.sign()
            adv = torch.min(torch.max(adv, x - eps), x + eps).clamp_(0, 1)
    return adv.detach()


@dataclass(frozen=True)
class AdversarialConfig(DefenseConfig):
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.eps <= 1 or self.step_size <= 0 or self.steps < 1:
            raise ValueError("adversarial training needs 0 < eps <= 1, step_size > 0 and steps >= 1")


@DEFENSES.register("at")
class AdversarialTraining(Defense):
    description = "adversarial training: PGD-10 at L∞ 8/255 (step 2/255) on every batch"
    config_class = AdversarialConfig

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.generator = torch.Generator().manual_seed(self.config.seed)

    def step(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        adv = pgd_linf(trainer.model, x, y, trainer.runtime, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps,
                       generator=self.generator)
        return trainer.step(adv, y)


@dataclass(frozen=True)
class Adversarial4Config(AdversarialConfig):
    eps: float = 4 / 255
    step_size: float = 1 / 255


@DEFENSES.register("at4")
class AdversarialTraining4(AdversarialTraining):
    description = "adversarial training: PGD-10 at L∞ 4/255 (step 1/255), the radius REM is built to survive"
    config_class = Adversarial4Config
