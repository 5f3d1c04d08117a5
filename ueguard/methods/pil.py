"""PIL — perturbation-induced linearization (Liu, Chen, Zhang, *Perturbation-Induced Linearization:
Constructing Unlearnable Data with Solely Linear Classifiers*, ICLR 2026, arXiv 2601.19967).
Code: github.com/jinlinll/pil.

Threat model: the adversary trains a classifier (from scratch) on the released images. The paper's
finding is that working unlearnable examples make a deep network behave like a *linear* model of the
perturbation; so PIL needs no deep surrogate at all. It builds its own bias-free linear classifier
f(x) = W₂W₁·vec(x) (W₁: d×K then W₂: K×K, no biases, as the authors' code has it; the paper writes
the same map as one matrix f(x) = xw) and crafts per sample an L∞-bounded δ for it:

1. train f on the *clean* images: SGD (lr ``lr`` = 0.003, momentum 0.9, no weight decay), cosine
   annealing to 0 over ``train_epochs`` = 30 epochs, batches of ``batch_size`` = 512, no augmentation;
2. per sample, from a uniform random start in [−ε, ε], ``steps`` = 30 signed-gradient steps of
   ``step_fraction``·ε (ε/10) that *descend*

       λ · CE(f(−δ), y)  +  (1 − λ) · KL(U_K ‖ softmax f(x + δ)),      λ = ``balance`` = 0.9

   — the shortcut term makes the perturbation alone a strong linear predictor of the label, the
   obfuscation term makes the released image x + δ look uninformative (uniform over the K classes)
   to the linear model. A deep model trained on (x + δ, y) then learns the linear map δ → y.

Budget: L∞, ``--eps`` (default 8/255): every value of δ is in [−ε, ε] and x + δ in [0, 1]; the
manifest's ``within_budget`` means exactly that, as for every L∞ method. Sample-wise (as the authors).
The whole cost is one linear model's training plus 30 steps through it — no deep network anywhere —
so CIFAR-10 takes about a GPU-minute in the paper; ``bench/generation.py`` measures it on this CPU
against EMN (docs/methods.md keeps the numbers).

What ueguard does differently from the authors' code (none of it changes the objective):

* sign: the authors release x − n and optimise n; ueguard stores δ = −n and releases x + δ, the
  same images. The objective above is theirs rewritten for δ;
* valid range: every step projects onto {‖δ‖∞ ≤ ε, 0 ≤ x + δ ≤ 1} (the authors clip x − n to [0, 1]
  only when saving), so the δ optimised is the δ saved; grayscale images get gray δ;
* since f is linear, f(x + δ) = f(x) + f(δ): each step evaluates f once, on δ, with f(x) computed
  once per batch — the same numbers, half the work;
* seeded: the linear layers' initialisation (PyTorch's default uniform ±1/√fan-in), the batch order
  (the authors' loader does not shuffle) and the random starts come from the run's seed;
* presets: ``thorough`` is the authors' setting; ``standard`` and ``quick`` take fewer epochs and
  steps with larger steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ueguard.data.working_set import WorkingSet
from ueguard.engine.loops import BatchSampler, OptimConfig, Trainer, batch_ranges
from ueguard.kernels import project_step
from ueguard.methods.base import (METHODS, MethodConfig, Perturbation, ProtectionMethod, clean_batch, gray_project,
                                  option)


@dataclass(frozen=True)
class PILConfig(MethodConfig):
    train_epochs: int = option(30, 1, 10_000)       # epochs of the linear surrogate on the clean images
    lr: float = option(0.003, 0, 10, above=True)    # its SGD learning rate, cosine-annealed to 0 per epoch
    momentum: float = option(0.9, 0, 1)             # its SGD momentum
    weight_decay: float = option(0.0, 0, 1)         # its weight decay (the authors use none)
    steps: int = option(30, 1, 100_000)             # signed-gradient steps on δ per sample
    step_fraction: float = option(0.1, 0, 10, above=True)  # step as a fraction of eps (0.8/255 at 8/255)
    # λ: weight of the shortcut term CE(f(−δ), y); 1 − λ weighs the obfuscation term KL(U ‖ f(x + δ))
    balance: float = option(0.9, 0, 1)
    batch_size: int = option(512, 1, 65536)         # images per surrogate step and per batch of δ steps


class BiasFreeLinear(nn.Module):
    """f(x) = W₂W₁·vec(x): two bias-free linear layers (d→K, K→K), so f(0) = 0 and f is linear in x.
    Weights start uniform in ±1/√fan-in (PyTorch's default for ``nn.Linear``), drawn from ``generator``."""

    def __init__(self, in_features: int, num_classes: int, generator: torch.Generator) -> None:
        super().__init__()
        self.first = nn.Linear(in_features, num_classes, bias=False)
        self.second = nn.Linear(num_classes, num_classes, bias=False)
        with torch.no_grad():
            for layer in (self.first, self.second):
                bound = 1 / math.sqrt(layer.in_features)
                layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x.flatten(1)))


def pil_objective(logits_clean: torch.Tensor, logits_delta: torch.Tensor, y: torch.Tensor,
                  balance: float) -> torch.Tensor:
    """Per-sample λ·CE(f(−δ), y) + (1−λ)·KL(U ‖ softmax f(x + δ)) from f(x) and f(δ) (f linear, so
    f(−δ) = −f(δ) and f(x + δ) = f(x) + f(δ)). KL(U ‖ p) = −log K − mean_k log p_k."""
    shortcut = F.cross_entropy(-logits_delta, y, reduction="none")
    log_p = F.log_softmax(logits_clean + logits_delta, dim=1)
    obfuscation = -log_p.mean(1) - math.log(log_p.shape[1])
    return balance * shortcut + (1 - balance) * obfuscation


@METHODS.register("pil")
class PIL(ProtectionMethod):
    description = ("perturbation-induced linearization (Liu et al. ICLR 2026): sample-wise δ against a bias-free "
                   "linear classifier it trains itself on the clean images; no deep surrogate")
    config_class = PILConfig
    needs_surrogate = False  # it trains its own linear surrogate
    presets = {
        "quick": dict(train_epochs=5, steps=10, step_fraction=0.25),
        "standard": dict(train_epochs=15, steps=20, step_fraction=0.15),
        "thorough": dict(train_epochs=30, steps=30, step_fraction=0.1),
    }

    def generate(self, data: WorkingSet) -> Perturbation:
        cfg, rt = self.config, self.runtime
        started = time.perf_counter()
        data = data.to(rt.device)
        model = BiasFreeLinear(data.images[0].numel(), max(data.num_classes, 2), self.generator).to(rt.device)
        surrogate_accuracy = self.train_surrogate(model, data)
        trained = time.perf_counter()
        model.eval().requires_grad_(False)
        delta = self.new_delta((len(data), *data.images.shape[1:]))
        counts = torch.zeros(3, device=rt.device)  # shortcut hits, released-image hits, summed objective
        with self.progress.bar(len(data), "pil", unit="img") as bar:
            for span in batch_ranges(len(data), cfg.batch_size):
                delta[span], stats = self.attack(model, data, torch.arange(span.start, span.stop))
                counts += stats
                bar.update(span.stop - span.start)
        n = max(1, len(data))
        info = {"surrogate": "bias-free linear", "surrogate_clean_accuracy": round(surrogate_accuracy, 4),
                "shortcut_accuracy": round(counts[0].item() / n, 4),
                "released_accuracy": round(counts[1].item() / n, 4),
                "final_objective": round(counts[2].item() / n, 4),
                "surrogate_seconds": round(trained - started, 2),
                "seconds": round(time.perf_counter() - started, 2)}
        return Perturbation(delta, False, cfg.eps, info)

    def train_surrogate(self, model: BiasFreeLinear, data: WorkingSet) -> float:
        """Fit the linear classifier to the clean images (SGD, cosine-annealed per epoch); returns its
        clean train accuracy after the last epoch."""
        cfg, rt = self.config, self.runtime
        sampler = BatchSampler(len(data), cfg.batch_size, self.generator, drop_last=False)
        trainer = Trainer(model, rt, OptimConfig(cfg.lr, cfg.momentum, cfg.weight_decay, grad_clip=None))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(trainer.optimizer, T_max=cfg.train_epochs)
        correct = torch.zeros((), device=rt.device)
        with self.progress.bar(cfg.train_epochs, "pil linear surrogate", unit="epoch") as bar:
            for _ in range(cfg.train_epochs):
                model.train()
                correct.zero_()
                for idx in sampler.epoch():
                    x, y, _ = clean_batch(data, idx, rt)
                    correct += trainer.step(x, y)[1]
                schedule.step()
                bar.update(1, train_acc=f"{correct.item() / len(data):.3f}")
        return self.accuracy(model, data)

    @torch.no_grad()
    def accuracy(self, model: BiasFreeLinear, data: WorkingSet) -> float:
        """The linear classifier's accuracy on the clean images."""
        hits = 0
        for span in batch_ranges(len(data), 4 * self.config.batch_size):
            x, y, _ = clean_batch(data, torch.arange(span.start, span.stop), self.runtime)
            hits += int((model(x).argmax(1) == y).sum())
        return hits / max(1, len(data))

    def attack(self, model: BiasFreeLinear, data: WorkingSet, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL's signed-gradient descent on one batch from a uniform start; returns δ and (shortcut hits,
        released-image hits, summed objective) under the linear classifier."""
        cfg, rt = self.config, self.runtime
        x, y, gray = clean_batch(data, idx, rt)
        keep_gray = (lambda d: gray_project(d, gray)) if bool(gray.any()) else (lambda d: d)  # noqa: E731
        start = ((torch.rand(x.shape, generator=self.generator) * 2 - 1) * cfg.eps).to(rt.device)
        delta = keep_gray((x + start).clamp(0, 1) - x)
        with torch.no_grad():
            logits_clean = model(x).float()
        for _ in range(cfg.steps):
            delta.requires_grad_(True)
            loss = pil_objective(logits_clean, model(delta).float(), y, cfg.balance).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            delta = keep_gray(project_step(delta.detach(), grad, x, cfg.step_fraction * cfg.eps, cfg.eps, 1.0))
        with torch.no_grad():
            logits_delta = model(delta).float()
            objective = pil_objective(logits_clean, logits_delta, y, cfg.balance)
            stats = torch.stack([(logits_delta.neg().argmax(1) == y).sum().float(),
                                 ((logits_clean + logits_delta).argmax(1) == y).sum().float(), objective.sum()])
        return delta, stats
