"""Verify recipes: how a victim is trained, beyond the optimiser's numbers.

A recipe is a frozen dataclass of constants plus the few behaviours :func:`ueguard.engine.fit.fit`
delegates to it: the resolved :class:`~ueguard.engine.fit.FitConfig` (batch size, peak learning rate,
schedule shape, epochs when the caller gives none), a data-dependent init before training
(:meth:`Recipe.prepare`), the optimiser's parameter groups, the training loss, the standard per-batch
augmentation a defense keeps unless it brings its own, and the test-time logits. ``verify --recipe NAME``
selects one; without it the architecture's default (:func:`ueguard.models.default_recipe`) applies.

* ``standard`` — ueguard's victim recipe since the start, unchanged: batch 128, SGD lr 0.1 (momentum 0.9,
  Nesterov, weight decay 5e-4), one-cycle (warm-up 15 %, 0.1 → 1 → 0.001 of the peak, linear), plain
  cross-entropy, pad-4 crop + flip, single-view test.
* ``fast`` — airbench's (Jordan 2024, arXiv 2404.00498) for ``fastvgg_cifar``, as ueguard writes it; each
  constant and why in docs/victim.md. Batch 1024; Nesterov SGD, momentum 0.85 (fixed: the schedule does
  not cycle it, ``cycle_momentum=False``), the learning rate stated per 1024
  examples and divided by the momentum's gain 1 + 1/(1 − m), weight decay decoupled (a fixed decay per step at the peak, independent of the rate);
  BatchNorm shifts at 64× the rate, same decay; a triangular schedule 0.2 → 1 at 23 % → 0.07; label
  smoothing 0.2; translate-2 crop + random flip; whitening stem from the first 5,000 training images
  (from-scratch runs only: a pretrained body keeps its own); lookahead (:class:`Lookahead`) every 5 steps;
  test logits averaged over the image and its mirror, and on the final test also over its ±1-px shifts.
  Differences from airbench: random rather than alternating flips, zero rather than reflect padding, no
  learned whitening bias, mean-reduced loss (the rates are rescaled to match), and a whole number of epochs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ueguard._registry import Registry
from ueguard.engine.augment import crop_flip
from ueguard.engine.loops import OptimConfig, batch_ranges


@dataclass(frozen=True)
class FitConfig:
    """The plain optimiser settings of one training run (what a recipe resolves to; see :meth:`Recipe.fit_config`)."""

    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    warmup: float = 0.15
    lr_start: float = 0.1
    lr_end: float = 0.001
    cycle_momentum: bool = True

    def optim(self) -> OptimConfig:
        return OptimConfig(self.lr, self.momentum, self.weight_decay, self.nesterov, grad_clip=None,
                           warmup=self.warmup, lr_start=self.lr_start, lr_end=self.lr_end,
                           cycle_momentum=self.cycle_momentum)


RECIPES: Registry["Recipe"] = Registry("recipe")

#: The scratch learning rate paradigms' own default rates are stated against (Paradigm.default_lr).
SCRATCH_LR = 0.1


@RECIPES.register("standard")
@dataclass(frozen=True)
class Recipe:
    """The ``standard`` recipe; subclasses change constants (and, where needed, a hook)."""

    name: ClassVar[str]  # set by the registration
    description: ClassVar[str] = ("ueguard's default victim recipe: batch 128, SGD 0.1 one-cycle, crop + flip, "
                                  "cross-entropy, single-view test")

    epochs: int | None = None        # None: the caller's (verify: per budget)
    batch_size: int = 128
    lr: float = SCRATCH_LR           # peak rate from scratch at batch_size; paradigms scale it
    momentum: float = 0.9
    weight_decay: float = 5e-4       # PyTorch's coupled form: decay per step = lr · weight_decay
    nesterov: bool = True
    warmup: float = 0.15             # fraction of the steps to the peak
    lr_start: float = 0.1            # schedule ends, as fractions of the peak
    lr_end: float = 0.001
    # PyTorch's one-cycle also cycles momentum 0.95 → 0.85 (peak) → 0.95, overriding ``momentum`` (what the
    # standard recipe has always done); False keeps ``momentum`` fixed, as the rate was scaled for.
    cycle_momentum: bool = True
    bias_lr_scale: float = 1.0       # BatchNorm shifts: lr × this, weight decay ÷ this (same decay per step)
    label_smoothing: float = 0.0
    crop_pad: int | None = None      # random-crop translation in px; None: H/8
    flip_test: bool = False          # average the test logits of the image and its mirror
    tta_translate: int = 0           # final test only: also views shifted ±this many px (reflect), with flip_test
    whiten_images: int = 0           # training images for a data-dependent stem init (0: none)
    lookahead_every: int = 0         # steps between lookahead syncs of the weights with their average (0: off)
    lookahead_decay: float = 0.95 ** 5  # the average's decay at the end of the run (ramped up by (step/total)³)

    def fit_config(self, epochs: int | None, batch_size: int | None = None, lr: float | None = None,
                   paradigm_lr: float = SCRATCH_LR):
        """The resolved FitConfig: the caller's epochs / batch size / peak rate where given, else the recipe's.
        A paradigm's rate (``paradigm_lr``: 1e-3 finetune) scales the recipe's by ``paradigm_lr / 0.1``. The
        rate is the recipe's for its own batch size: another ``batch_size`` leaves it as it is."""
        batch = batch_size or self.batch_size
        peak = lr if lr is not None else paradigm_lr * (self.lr / SCRATCH_LR)
        epochs = epochs or self.epochs
        if epochs is None:
            raise ValueError(f"recipe {self.name!r} has no default epochs; give them")
        return FitConfig(epochs=epochs, batch_size=batch, lr=peak, momentum=self.momentum,
                         weight_decay=self.weight_decay, nesterov=self.nesterov, warmup=self.warmup,
                         lr_start=self.lr_start, lr_end=self.lr_end, cycle_momentum=self.cycle_momentum)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    # -- hooks fit calls ------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, model: nn.Module, images: torch.Tensor | None, runtime, pretrained: bool) -> dict[str, Any]:
        """Data-dependent init before training: the whitening stem of a model that has one
        (``model.net.init_whitening``), from the first ``whiten_images`` uint8 training ``images``. Nothing
        for a pretrained start (its stem came with the body), a model without such a stem, or no images
        (a streamed set). Returns what was done, for the run's record."""
        init = getattr(getattr(model, "net", None), "init_whitening", None)
        if not self.whiten_images or pretrained or init is None or images is None:
            return {}
        sample = images[: self.whiten_images]
        init(torch.cat([model.normalize(runtime.to_float(sample[s])) for s in batch_ranges(len(sample), 1024)]))
        return {"whitening_images": len(sample)}

    def param_groups(self, model: nn.Module, params, cfg) -> list[dict]:
        """Optimiser groups: each group of ``params`` (parameters or named per-stage dicts), its BatchNorm
        shifts split off at ``lr × bias_lr_scale`` and ``weight_decay ÷ bias_lr_scale`` (the same name, so a
        per-stage defense changes both)."""
        items = list(model.parameters() if params is None else params)
        groups = [dict(g) for g in items] if items and isinstance(items[0], dict) else [{"params": items}]
        if self.bias_lr_scale == 1.0:
            return groups
        shifts = {id(m.bias) for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None}
        out = []
        for g in groups:
            out.append({**g, "params": [p for p in g["params"] if id(p) not in shifts]})
            out.append({**g, "params": [p for p in g["params"] if id(p) in shifts],
                        "lr": g.get("lr", cfg.lr) * self.bias_lr_scale,
                        "weight_decay": g.get("weight_decay", cfg.weight_decay) / self.bias_lr_scale})
        return out

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The standard training augmentation: random crop (translate by ``crop_pad``) + horizontal flip."""
        return crop_flip(x, generator, pad=self.crop_pad)

    @property
    def test_logits(self) -> Callable | None:
        """``(forward, x) -> logits`` for the per-epoch evaluation, or ``None`` for the plain forward pass."""
        return _mirror_logits if self.flip_test else None

    @property
    def final_test_logits(self) -> Callable | None:
        """The test logits after the last epoch: :attr:`test_logits`, plus (``tta_translate``) the mirrored
        views of the image shifted by ``tta_translate`` px up-left and down-right, weighted ½ (unshifted) and
        ¼ + ¼. Only the final test pays their 2× extra cost."""
        if not (self.flip_test and self.tta_translate):
            return self.test_logits
        return functools.partial(_translate_logits, shift=self.tta_translate)

    def averager(self, model: nn.Module, total_steps: int) -> "Lookahead | None":
        """The run's weight averaging (:class:`Lookahead`), or ``None`` when ``lookahead_every`` is 0."""
        if not self.lookahead_every:
            return None
        return Lookahead(model, self.lookahead_every, self.lookahead_decay, total_steps)


def _mirror_logits(forward: Callable, x: torch.Tensor) -> torch.Tensor:
    return (forward(x).float() + forward(x.flip(-1)).float()) / 2


def _translate_logits(forward: Callable, x: torch.Tensor, shift: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    padded = F.pad(x, (shift,) * 4, mode="reflect")
    views = (padded[..., :h, :w], padded[..., 2 * shift:2 * shift + h, 2 * shift:2 * shift + w])
    shifted = sum(_mirror_logits(forward, v.contiguous(memory_format=_format(x))) for v in views) / 2
    return (_mirror_logits(forward, x) + shifted) / 2


def _format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


class Lookahead:
    """Lookahead with an averaged slow copy (airbench's form): every ``every`` steps the slow copy of every
    floating-point tensor of the state dict (parameters and BatchNorm statistics) moves toward the fast
    weights, ``slow ← d·slow + (1 − d)·fast``, and the fast weights restart from it; ``d = decay ·
    (step / total)³`` is near 0 early (plain SGD) and reaches ``decay`` at the end, so the late, noisy
    steps are averaged. :meth:`finish` puts the slow copy in the model. Tensors nobody trains (frozen
    stages) stay as they are: the average of a constant is that constant."""

    def __init__(self, model: nn.Module, every: int, decay: float, total_steps: int) -> None:
        self.every, self.decay, self.total = every, decay, max(1, total_steps)
        self.fast = [t for t in model.state_dict(keep_vars=True).values() if t.is_floating_point()]
        self.slow = [t.detach().clone() for t in self.fast]

    def step(self, step: int) -> None:
        """After optimiser step ``step`` (1-based over the run)."""
        if step % self.every == 0:
            self._sync(self.decay * (min(step, self.total) / self.total) ** 3)

    def finish(self) -> None:
        self._sync(1.0)

    @torch.no_grad()
    def _sync(self, decay: float) -> None:
        for slow, fast in zip(self.slow, self.fast):
            slow.lerp_(fast.detach(), 1 - decay)
            fast.detach().copy_(slow)


#: airbench's constants, as stated there per 1024 examples (docs/victim.md).
FAST_LR_PER_1024 = 11.5
FAST_DECAY_PER_1024 = 0.0153
FAST_MOMENTUM = 0.85


@RECIPES.register("fast")
@dataclass(frozen=True)
class FastRecipe(Recipe):
    description: ClassVar[str] = ("airbench-style (fastvgg_cifar): batch 1024, Nesterov SGD with decoupled rate, "
                                  "label smoothing 0.2, translate-2 crop, whitening init, flip test-time augmentation")

    epochs: int | None = 10
    batch_size: int = 1024
    # Mean-reduced loss at batch 1024: 11.5 / (1 + 1/(1 − 0.85)) = 1.5.
    lr: float = FAST_LR_PER_1024 / (1 + 1 / (1 - FAST_MOMENTUM))
    momentum: float = FAST_MOMENTUM
    # Decay per step at the peak = lr · weight_decay = 0.0153 · 1024 / (1024 · (1 + 1/(1 − m))): coupled form.
    weight_decay: float = FAST_DECAY_PER_1024 / FAST_LR_PER_1024
    nesterov: bool = True
    warmup: float = 0.23
    lr_start: float = 0.2
    lr_end: float = 0.07
    bias_lr_scale: float = 64.0
    label_smoothing: float = 0.2
    crop_pad: int | None = 2
    flip_test: bool = True
    tta_translate: int = 1
    whiten_images: int = 5000
    # airbench's fixed momentum and lookahead: on all of CIFAR-10 (10 epochs) they reached 93.43 %, where the
    # cycled momentum without lookahead had reached 91.99 % (docs/bench/victim.md, 2026-12-07).
    cycle_momentum: bool = False
    lookahead_every: int = 5


def create_recipe(name: str, **overrides: Any) -> Recipe:
    return RECIPES.get(name)(**overrides)


def recipe_names() -> list[str]:
    return RECIPES.names()
