"""TAP — targeted adversarial poisoning (Fowl, Goldblum, Chiang, Geiping, Czaja, Goldstein, *Adversarial
Examples Make Strong Poisons*, NeurIPS 2021). Code: github.com/lhfowl/adversarial_poisons.

Threat model: the adversary trains from scratch on the released images. TAP takes a classifier trained
on the *clean* data and replaces every image by a targeted adversarial example for it:

    δ_i = argmin_{‖δ‖∞ ≤ ε, 0 ≤ x_i+δ ≤ 1} CE(f_clean(x_i + δ), t_i),   t_i = (y_i + 1) mod C

Targeted adversarial examples carry non-robust features of the *target* class, so a model trained on
(x_i + δ_i, y_i) learns features that contradict the labels — TAP is among the strongest poisons from
scratch (published CIFAR-10 accuracy 8.2 %; docs/results.md).

Surrogate: trained on the clean working set first, for up to ``train_epochs`` epochs (SGD, one-cycle,
crop + flip) or until its clean train accuracy reaches ``fit_accuracy``. A surrogate loaded with
``--weights`` that already fits the clean data that well is used as is (no training); one that does
not (e.g. an ImageNet backbone with a fresh head) is fine-tuned the same way. Then PGD: ``steps``
signed-gradient steps of ``step_fraction``·ε from ``restarts`` random starts (the first from zero);
each sample keeps the restart with the lowest target loss.

Authors' settings (``thorough`` budget): ε = 8/255, 250 steps of about 0.4/255 (step_fraction 0.05),
8 restarts. The authors also average gradients over differentiable augmentations (``augment=True``
here: one crop + flip draw per step, through ``input_gradient``'s ``transform``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ueguard.data.working_set import WorkingSet
from ueguard.engine.augment import crop_flip
from ueguard.engine.loops import batch_ranges, input_gradient
from ueguard.kernels import project_step
from ueguard.methods.base import (METHODS, MethodConfig, Perturbation, ProtectionMethod, clean_batch, gray_project,
                                  option)


@dataclass(frozen=True)
class TAPConfig(MethodConfig):
    steps: int = option(250, 1, 100_000)           # PGD steps per restart
    step_fraction: float = option(0.05, 0, 10, above=True)  # step as a fraction of eps (0.4/255 at 8/255)
    restarts: int = option(8, 1, 1000)
    augment: bool = False          # one crop + flip draw per PGD step (expectation over augmentation)
    target_offset: int = option(1, 1, 10**6)       # t = (y + offset) mod C
    train_epochs: int = option(40, 0, 10_000)      # clean-training epochs at most
    # stop clean training (or skip it) at this clean train accuracy; above 1: train every epoch
    fit_accuracy: float = option(0.9, 0, 2, above=True)
    batch_size: int = option(128, 1, 65536)
    lr: float = option(0.1, 0, 10)
    momentum: float = option(0.9, 0, 1)
    weight_decay: float = option(5e-4, 0, 1)


@METHODS.register("tap")
class TAP(ProtectionMethod):
    description = ("targeted adversarial poisoning (Fowl et al. NeurIPS 2021): targeted PGD to class y+1 on a "
                   "clean-trained surrogate (trained here first, or --weights); sample-wise")
    config_class = TAPConfig
    presets = {
        "quick": dict(steps=20, step_fraction=0.15, restarts=1, train_epochs=10),
        "standard": dict(steps=100, step_fraction=0.05, restarts=2, train_epochs=30),
        "thorough": dict(steps=250, step_fraction=0.05, restarts=8, train_epochs=40),
    }

    def generate(self, data: WorkingSet) -> Perturbation:
        cfg, rt = self.config, self.runtime
        started = time.perf_counter()
        data = data.to(rt.device)
        model = rt.prepare_model(self.surrogate)
        before = self.clean_accuracy(model, data)
        epochs, after = self._train_clean(model, data, before)
        model.eval()
        delta = self.new_delta((len(data), *data.images.shape[1:]))
        hits = 0
        with self.progress.bar(len(data), "tap", unit="image") as bar:
            for span in batch_ranges(len(data), cfg.batch_size):
                idx = torch.arange(span.start, span.stop)
                delta[span], hit = self._attack(model, data, idx)
                hits += hit
                bar.update(span.stop - span.start)
        info = {"surrogate_clean_accuracy_before": round(before, 4), "surrogate_clean_accuracy": round(after, 4),
                "clean_train_epochs": epochs, "target_success": round(hits / max(1, len(data)), 4),
                "seconds": round(time.perf_counter() - started, 2)}
        return Perturbation(delta, False, cfg.eps, info)

    def targets(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        return (labels + self.config.target_offset) % num_classes

    def _train_clean(self, model, data: WorkingSet, accuracy: float) -> tuple[int, float]:
        """Train on the clean images (crop + flip) until they are fitted to ``fit_accuracy``."""
        cfg = self.config
        if accuracy >= cfg.fit_accuracy or cfg.train_epochs == 0:
            return 0, accuracy
        epoch = 0
        for epoch, bar in self.train_clean(model, data, cfg.train_epochs, "tap: training the clean model"):
            accuracy = self.clean_accuracy(model, data)
            bar.update(1, clean_acc=f"{accuracy:.3f}")
            if accuracy >= cfg.fit_accuracy:
                break
        return epoch, accuracy

    def _attack(self, model, data: WorkingSet, idx: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Targeted PGD with restarts on one batch; returns the best δ per sample and how many of them
        the surrogate classifies as their target."""
        cfg, rt = self.config, self.runtime
        x, y, gray = clean_batch(data, idx, rt)
        target = self.targets(y, data.num_classes)
        alpha = cfg.step_fraction * cfg.eps
        best = torch.zeros_like(x)
        best_loss = torch.full((x.shape[0],), float("inf"), device=rt.device)
        for restart in range(cfg.restarts):
            delta = torch.zeros_like(x)
            if restart > 0:
                start = (torch.rand(x.shape, generator=self.generator).to(rt.device) * 2 - 1) * cfg.eps
                delta = gray_project((x + start).clamp(0, 1) - x, gray)
            for _ in range(cfg.steps):
                transform = None
                if cfg.augment:
                    seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
                    transform = lambda z: crop_flip(z, torch.Generator().manual_seed(seed))  # noqa: E731
                grad, _ = input_gradient(model, x + delta, target, rt, transform=transform)
                delta = gray_project(project_step(delta, grad, x, alpha, cfg.eps, 1.0), gray)
            with torch.no_grad(), rt.autocast():
                loss = F.cross_entropy(model((x + delta).clamp(0, 1)).float(), target, reduction="none")
            better = loss < best_loss
            best[better] = delta[better]
            best_loss = torch.where(better, loss, best_loss)
        with torch.no_grad(), rt.autocast():
            hit = int((model((x + best).clamp(0, 1)).argmax(1) == target).sum())
        return best, hit
